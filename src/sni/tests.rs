#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use rustls::pki_types::ServerName;

use super::*;

/// A real ClientHello, as rustls sends it for `name` (TLS 1.2 and 1.3 offered).
fn rustls_hello(name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = ServerName::try_from(name.to_owned()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    out
}

/// Split a single-record hello into records of at most `chunk` payload bytes each.
fn refragment(hello: &[u8], chunk: usize) -> Vec<u8> {
    let payload = &hello[5..];
    let mut out = Vec::new();
    for part in payload.chunks(chunk) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// A hand-built ClientHello body with the given extensions block (None: no extensions at all).
fn hello_with(exts: Option<&[u8]>) -> Vec<u8> {
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
    body.extend_from_slice(&[1, 0]); // null compression
    if let Some(exts) = exts {
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
    }
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

/// A `server_name` extension holding these (type, name) entries.
fn sni_ext(names: &[(u8, &str)]) -> Vec<u8> {
    let mut list = Vec::new();
    for (kind, name) in names {
        list.push(*kind);
        list.extend_from_slice(&(name.len() as u16).to_be_bytes());
        list.extend_from_slice(name.as_bytes());
    }
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    let mut ext = vec![0, 0];
    ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
    ext.extend_from_slice(&data);
    ext
}

#[test]
fn reads_the_server_name_of_a_real_client_hello() {
    let bytes = rustls_hello("api.example.com");
    let hello = parse(&bytes).unwrap().unwrap();
    assert_eq!(hello.sni.as_deref(), Some("api.example.com"));
    assert!(!hello.ech);
    assert_eq!(hello.len, bytes.len());
}

#[test]
fn every_prefix_of_a_hello_asks_for_more() {
    let bytes = rustls_hello("api.example.com");
    for n in 0..bytes.len() {
        assert_eq!(parse(&bytes[..n]), Ok(None), "prefix of {n} bytes");
    }
}

#[test]
fn a_hello_fragmented_over_records_is_joined() {
    let one = rustls_hello("fronted.example.net");
    // The smallest fragments that keep it within `MAX_HELLO_RECORDS`, and larger ones.
    let smallest = (one.len() - 5).div_ceil(MAX_HELLO_RECORDS);
    for chunk in [smallest, smallest + 1, 7, 100] {
        let bytes = refragment(&one, chunk);
        let hello = parse(&bytes).unwrap().unwrap();
        assert_eq!(
            hello.sni.as_deref(),
            Some("fronted.example.net"),
            "chunk {chunk}"
        );
        assert_eq!(hello.len, bytes.len());
        for n in (0..bytes.len()).step_by(7) {
            assert_eq!(parse(&bytes[..n]), Ok(None), "chunk {chunk}, prefix {n}");
        }
    }
}

#[test]
fn a_hello_in_more_than_64_records_is_refused() {
    let one = rustls_hello("fronted.example.net");
    let payload = one.len() - 5;
    let smallest = payload.div_ceil(MAX_HELLO_RECORDS);
    let at_cap = refragment(&one, smallest);
    assert!(parse(&at_cap).unwrap().is_some());
    // One byte less per record: more than 64 records.
    let over = refragment(&one, smallest - 1);
    assert_eq!(
        parse(&over),
        Err(NotHello::Malformed(
            "ClientHello split into more than 64 records"
        ))
    );
    // One-byte records: refused after 64 of them, not after the whole hello has arrived.
    let ones = refragment(&one, 1);
    assert!(parse(&ones[..6 * (MAX_HELLO_RECORDS + 1)]).is_err());
    assert_eq!(parse(&ones[..6 * MAX_HELLO_RECORDS]), Ok(None));
}

/// A parser fed every prefix in turn (as reads arrive) reaches the verdict a single parse of
/// the whole input reaches, at the first prefix that holds it.
#[test]
fn fed_read_by_read_the_parser_reaches_the_one_shot_verdict() {
    let one = rustls_hello("fronted.example.net");
    let mut inputs = vec![one.clone(), refragment(&one, 7), refragment(&one, 1)];
    let mut trailing = refragment(&one, 50);
    trailing.extend_from_slice(b"\x17\x03\x03 more traffic");
    inputs.push(trailing);
    let mut not_tls = one.clone();
    not_tls[40] = 0; // inside the random: still a hello
    not_tls.extend_from_slice(&[21, 3, 3, 0, 2]);
    inputs.push(not_tls);
    inputs.push(b"GET / HTTP/1.1\r\n\r\n".to_vec());
    for (i, input) in inputs.iter().enumerate() {
        let whole = parse(input);
        for step in [1, 3, 64] {
            let mut p = HelloParser::default();
            let mut end = 0;
            let verdict = loop {
                end = (end + step).min(input.len());
                match p.parse(&input[..end]) {
                    Ok(None) if end < input.len() => continue,
                    v => break v,
                }
            };
            assert_eq!(verdict, whole, "input {i}, step {step}");
        }
    }
}

#[test]
fn bytes_after_the_hello_are_not_part_of_it() {
    let mut bytes = rustls_hello("a.example");
    let len = bytes.len();
    bytes.extend_from_slice(b"\x17\x03\x03\x00\x05hello");
    assert_eq!(parse(&bytes).unwrap().unwrap().len, len);
}

#[test]
fn non_tls_bytes_are_refused_from_the_first_byte() {
    for bytes in [
        &b"G"[..],
        b"GET / HTTP/1.1\r\n",
        b"SSH-2.0-OpenSSH",
        b"\x16\x02",
        b"\x17",
    ] {
        assert!(
            matches!(parse(bytes), Err(NotHello::NotTls(_))),
            "{bytes:?}"
        );
    }
}

#[test]
fn a_handshake_that_is_not_a_client_hello_is_refused() {
    // A ServerHello (type 2) in a handshake record.
    assert!(matches!(
        parse(b"\x16\x03\x03\x00\x04\x02\x00\x00\x00"),
        Err(NotHello::NotTls(_))
    ));
}

#[test]
fn another_record_type_between_fragments_is_refused() {
    let one = rustls_hello("a.example");
    let mut bytes = refragment(&one, 10);
    bytes.truncate(15);
    bytes.extend_from_slice(b"\x17\x03\x03\x00\x01x");
    assert!(matches!(parse(&bytes), Err(NotHello::NotTls(_))));
}

#[test]
fn record_lengths_out_of_range_are_refused() {
    assert!(matches!(
        parse(b"\x16\x03\x01\x00\x00"),
        Err(NotHello::Malformed(_))
    ));
    assert!(matches!(
        parse(b"\x16\x03\x01\x40\x01"),
        Err(NotHello::Malformed(_))
    ));
}

#[test]
fn an_oversized_hello_is_refused_before_it_arrives() {
    // Handshake header announcing 16 MiB.
    assert_eq!(
        parse(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff"),
        Err(NotHello::TooLarge)
    );
}

#[test]
fn a_hello_without_extensions_has_no_name() {
    let hello = parse(&hello_with(None)).unwrap().unwrap();
    assert_eq!(hello.sni, None);
}

#[test]
fn a_hello_with_other_extensions_has_no_name() {
    // supported_versions only.
    let hello = parse(&hello_with(Some(&[0, 43, 0, 3, 2, 3, 4])))
        .unwrap()
        .unwrap();
    assert_eq!(hello.sni, None);
}

#[test]
fn two_server_name_extensions_are_refused() {
    let mut exts = sni_ext(&[(0, "allowed.example")]);
    exts.extend(sni_ext(&[(0, "fronted.example")]));
    assert!(matches!(
        parse(&hello_with(Some(&exts))),
        Err(NotHello::Malformed(_))
    ));
}

#[test]
fn two_host_names_in_one_extension_are_refused() {
    let exts = sni_ext(&[(0, "allowed.example"), (0, "fronted.example")]);
    assert!(matches!(
        parse(&hello_with(Some(&exts))),
        Err(NotHello::Malformed(_))
    ));
}

#[test]
fn unknown_name_types_are_skipped() {
    let exts = sni_ext(&[(7, "opaque"), (0, "allowed.example")]);
    let hello = parse(&hello_with(Some(&exts))).unwrap().unwrap();
    assert_eq!(hello.sni.as_deref(), Some("allowed.example"));
}

#[test]
fn names_with_control_bytes_or_spaces_are_refused() {
    for name in ["a\0.example", "a .example", "a\u{7f}", ""] {
        let exts = sni_ext(&[(0, name)]);
        assert!(
            matches!(parse(&hello_with(Some(&exts))), Err(NotHello::Malformed(_))),
            "{name:?}"
        );
    }
}

#[test]
fn names_longer_than_255_bytes_are_refused() {
    let longest = "a".repeat(MAX_SNI_BYTES);
    let exts = sni_ext(&[(0, &longest)]);
    let hello = parse(&hello_with(Some(&exts))).unwrap().unwrap();
    assert_eq!(hello.sni.as_deref(), Some(longest.as_str()));
    let over = "a".repeat(MAX_SNI_BYTES + 1);
    let exts = sni_ext(&[(0, &over)]);
    assert!(matches!(
        parse(&hello_with(Some(&exts))),
        Err(NotHello::Malformed(_))
    ));
}

#[test]
fn the_ech_extension_is_noticed() {
    let mut exts = sni_ext(&[(0, "public.example")]);
    exts.extend_from_slice(&[0xfe, 0x0d, 0, 1, 0]);
    let hello = parse(&hello_with(Some(&exts))).unwrap().unwrap();
    assert_eq!(hello.sni.as_deref(), Some("public.example"));
    assert!(hello.ech);
}

#[test]
fn lengths_that_run_past_their_container_are_refused() {
    // An extension claiming 200 bytes inside a 4-byte block.
    assert!(matches!(
        parse(&hello_with(Some(&[0, 0, 0, 200]))),
        Err(NotHello::Malformed(_))
    ));
    // A server name list longer than its extension.
    assert!(matches!(
        parse(&hello_with(Some(&[0, 0, 0, 2, 0, 9]))),
        Err(NotHello::Malformed(_))
    ));
}

#[test]
fn ssl2_and_ssl3_hellos_are_not_tls() {
    let mut bytes = hello_with(None);
    bytes[9] = 0; // ClientHello legacy_version 3.0
    assert!(matches!(parse(&bytes), Err(NotHello::NotTls(_))));
    // An SSLv2-compatible hello starts with a length byte with the high bit set.
    assert!(matches!(
        parse(b"\x80\x2e\x01\x03\x01"),
        Err(NotHello::NotTls(_))
    ));
}

#[test]
fn flipping_any_byte_of_a_real_hello_never_panics() {
    let bytes = rustls_hello("api.example.com");
    for i in 0..bytes.len() {
        let mut broken = bytes.clone();
        broken[i] ^= 0xff;
        let _ = parse(&broken);
    }
}
