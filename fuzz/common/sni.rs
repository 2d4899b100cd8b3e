//! The TLS ClientHello reader behind the tunnels' SNI check (`chokepoint::sni`).
//!
//! Input: the first byte picks a record size for re-fragmenting, the rest are the client's bytes.
//!
//! Properties:
//! * never panics, on any bytes;
//! * a complete hello is complete within the bytes it claims (`len`), and parsing exactly those
//!   bytes gives the same answer;
//! * a server name is non-empty printable ASCII;
//! * the same handshake re-split into records of any size gives the same name and ECH flag
//!   (the fragmentation an attacker chooses cannot change the verdict);
//! * `check` accepts a hello for the host its own name normalises to, and never accepts a name
//!   that normalises to another host;
//! * a `HelloParser` fed the bytes a few at a time (reads of the size the first byte picks)
//!   reaches the verdict one parse of all of them reaches.
use chokepoint::sni::{self, ClientHello, HelloParser};
use chokepoint::target::{normalise_host, Host};

/// Re-split a single-record handshake into records of `size` payload bytes.
fn refragment(bytes: &[u8], size: usize) -> Option<Vec<u8>> {
    let len = usize::from(u16::from_be_bytes([*bytes.get(3)?, *bytes.get(4)?]));
    let payload = bytes.get(5..5 + len)?;
    let mut out = Vec::with_capacity(payload.len() + 5 * (payload.len() / size + 1));
    for part in payload.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    Some(out)
}

fn same_verdict(a: &ClientHello, b: &ClientHello) -> bool {
    a.sni == b.sni && a.ech == b.ech
}

/// Check one input; panics on a broken invariant.
pub(crate) fn run(input: &[u8]) {
    let Some((&size, bytes)) = input.split_first() else {
        return;
    };
    let whole = sni::parse(bytes);
    let step = usize::from(size % 64) + 1;
    let mut parser = HelloParser::default();
    let mut end = 0;
    let fed = loop {
        end = (end + step).min(bytes.len());
        match parser.parse(&bytes[..end]) {
            Ok(None) if end < bytes.len() => continue,
            v => break v,
        }
    };
    assert_eq!(fed, whole, "fed {step} bytes at a time");
    let Ok(Some(hello)) = whole else {
        return;
    };
    assert!(hello.len <= bytes.len());
    let again = sni::parse(&bytes[..hello.len]).expect("a complete hello parses alone");
    assert_eq!(again.as_ref(), Some(&hello));
    if let Some(name) = &hello.sni {
        assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic()));
    }
    if let Some(split) = refragment(bytes, usize::from(size % 64) + 1) {
        if let Ok(Some(other)) = sni::parse(&split) {
            assert!(same_verdict(&hello, &other), "{hello:?} vs {other:?}");
        }
    }
    let Some(name) = &hello.sni else { return };
    match normalise_host(name) {
        Ok(host) => {
            assert!(sni::check(&hello, &host, true).is_ok());
            let other = Host::Name("other.invalid".into());
            if host != other {
                assert!(sni::check(&hello, &other, true).is_err());
            }
        }
        Err(_) => {
            let any = Host::Name(name.to_ascii_lowercase().into());
            assert!(sni::check(&hello, &any, true).is_err());
        }
    }
}
