//! The TLS ClientHello reader behind the SNI check on CONNECT tunnels (issue: domain fronting).
//!
//! After the `200`, a client of a tunnel to a TLS port (`[sni] ports`) must start with a TLS
//! ClientHello whose `server_name` is the CONNECT host. This module is the pure part: given the
//! bytes the client has sent so far, say whether they hold a complete ClientHello yet, and if so
//! which name it asks for. `proxy::tunnel` reads the bytes (bounded in size and time) and decides.
//!
//! The reader is strict where leniency would let a fronted name through and lenient nowhere
//! else: the first byte must open a handshake record; the ClientHello may span several records
//! (each checked), but nothing else may come between them; a second `server_name` extension or a
//! second host name in the list is refused, since servers disagree on which one they would use.
//! A hello may span at most [`MAX_HELLO_RECORDS`] records.
//!
//! The bytes arrive over many reads, and the client chooses how: [`HelloParser`] keeps its place
//! between reads (the records taken, their fragments joined), so a hello costs time linear in
//! its bytes however it is split; re-reading everything on each read made a 128 KiB hello in
//! 1-byte records cost about a second of CPU (`benches/hello.rs`). It never allocates for a
//! ClientHello that fits one record (the usual case), and copies each fragment once otherwise.
//! Nothing here panics on any input.

use crate::outcome::{Deny, Reason};
use crate::target::{self, Host};

/// Largest ClientHello (handshake message body) accepted. Real ones are 200 bytes to ~2 KiB
/// (post-quantum key shares make them ~1.8 KiB); 64 KiB leaves room for any legitimate client
/// while bounding what a tunnel buffers before the check.
pub const MAX_HELLO_BYTES: usize = 64 * 1024;

/// Most TLS records one ClientHello may span. Clients send it in one record, a large
/// (post-quantum) one in a few; tools that fragment it on purpose split it in a handful of
/// places. 64 leaves room for all of that, and bounds the records a client can make the reader
/// take one at a time.
pub const MAX_HELLO_RECORDS: usize = 64;

/// Largest TLS record payload (RFC 8446 §5.1: 2^14; a ClientHello is plaintext).
const MAX_RECORD_BYTES: usize = 1 << 14;
const RECORD_HEADER: usize = 5;
const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
/// `encrypted_client_hello` (draft-ietf-tls-esni; the code point browsers ship).
const EXT_ECH: u16 = 0xfe0d;
const NAME_TYPE_HOST: u8 = 0;

/// Longest server name accepted: a DNS name has at most 253 bytes, 254 with a trailing dot
/// (RFC 1035 §2.3.4); 255 is the bound the audit line's `sni` field promises. A longer one
/// could never match a CONNECT host, and is refused as malformed rather than copied anywhere.
pub const MAX_SNI_BYTES: usize = 255;

/// What a complete ClientHello says about where it is going.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientHello {
    /// The `server_name` host name, as sent (not yet normalised), if any.
    pub sni: Option<String>,
    /// True when the hello carries an `encrypted_client_hello` extension: the name above is then
    /// the outer (client-facing) name, and the real one is hidden.
    pub ech: bool,
    /// Bytes of the input the ClientHello's records took (what follows is later traffic).
    pub len: usize,
}

/// Why the bytes are not an acceptable ClientHello.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotHello {
    /// The bytes are not a TLS handshake record, or the handshake is not a ClientHello.
    #[error("not a TLS ClientHello: {0}")]
    NotTls(&'static str),
    /// A TLS ClientHello, but malformed or ambiguous.
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
    /// The ClientHello is larger than [`MAX_HELLO_BYTES`].
    #[error("TLS ClientHello larger than {MAX_HELLO_BYTES} bytes")]
    TooLarge,
}

/// The SNI rule for a tunnel to `host`: the ClientHello must name it. A hello without a name
/// passes for an IP-literal host (TLS forbids IP addresses in SNI) or when `require` is off.
pub fn check(hello: &ClientHello, host: &Host, require: bool) -> Result<(), Deny> {
    let Some(sent) = hello.sni.as_deref() else {
        return match host {
            Host::Name(_) if require => Err(Deny::with_detail(
                Reason::SniMissing,
                format!("the TLS ClientHello names no server; the tunnel is for {host}"),
            )),
            _ => Ok(()),
        };
    };
    match target::normalise_host(sent) {
        Ok(named) if named == *host => Ok(()),
        _ => Err(Deny::with_detail(
            Reason::SniMismatch,
            format!("the TLS ClientHello is for {sent}; the tunnel is for {host}"),
        )),
    }
}

/// Read a ClientHello from the start of `buf`: `Ok(None)` means "well-formed so far, send more".
/// (One call; a reader fed over many reads keeps a [`HelloParser`] instead.)
pub fn parse(buf: &[u8]) -> Result<Option<ClientHello>, NotHello> {
    HelloParser::default().parse(buf)
}

/// A ClientHello read as its bytes arrive: each call is given every byte received so far, and
/// looks only at what it has not taken yet.
#[derive(Debug, Default)]
pub struct HelloParser {
    /// Offset of the first record not taken yet.
    at: usize,
    /// Records taken so far.
    records: usize,
    /// The handshake bytes of the records taken, once the message spans more than one.
    joined: Vec<u8>,
}

// === impl HelloParser ===

impl HelloParser {
    /// Go on reading with `buf`: the bytes earlier calls were given, unchanged, followed by
    /// whatever arrived since. `Ok(None)` means "well-formed so far, send more"; after a hello
    /// or an error the parser is done and must not be called again. Every complete record is
    /// taken once and its payload copied at most once, so the calls for one hello cost time
    /// linear in its bytes.
    pub fn parse(&mut self, buf: &[u8]) -> Result<Option<ClientHello>, NotHello> {
        while let Some(rec) = record(buf, self.at)? {
            self.records += 1;
            if self.records > MAX_HELLO_RECORDS {
                return Err(NotHello::Malformed(
                    "ClientHello split into more than 64 records",
                ));
            }
            self.at = rec.end;
            // The usual case: the whole handshake message is in the first record, used in place.
            if self.records == 1 {
                if let Some(msg) = message(rec.payload)? {
                    return self.done(msg);
                }
                self.joined.reserve(rec.payload.len() * 2);
            }
            // Fragmented over several records: gather the fragments, each checked, until the
            // message is complete (`message` looks only at its 4-byte header until then).
            self.joined.extend_from_slice(rec.payload);
            if let Some(msg) = message(&self.joined)? {
                return self.done(msg);
            }
        }
        Ok(None)
    }

    /// The verdict on a complete handshake message.
    fn done(&self, msg: &[u8]) -> Result<Option<ClientHello>, NotHello> {
        let hello = client_hello(msg)?;
        Ok(Some(ClientHello {
            len: self.at,
            ..hello
        }))
    }
}

/// One TLS record at `buf[at..]`.
struct Record<'a> {
    payload: &'a [u8],
    /// Offset just past the record.
    end: usize,
}

/// The record at `buf[at..]`, `None` if it is not all there yet.
fn record(buf: &[u8], at: usize) -> Result<Option<Record<'_>>, NotHello> {
    let rest = buf.get(at..).unwrap_or_default();
    if let Some(&kind) = rest.first() {
        if kind != CONTENT_HANDSHAKE {
            return Err(NotHello::NotTls(
                "first bytes are not a TLS handshake record",
            ));
        }
    }
    if let Some(&major) = rest.get(1) {
        if major != 3 {
            return Err(NotHello::NotTls("record version is not TLS"));
        }
    }
    if rest.len() < RECORD_HEADER {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
    if len == 0 || len > MAX_RECORD_BYTES {
        return Err(NotHello::Malformed("record length out of range"));
    }
    let Some(payload) = rest.get(RECORD_HEADER..RECORD_HEADER + len) else {
        return Ok(None);
    };
    Ok(Some(Record {
        payload,
        end: at + RECORD_HEADER + len,
    }))
}

/// The ClientHello body in handshake bytes, `None` if not all there yet.
fn message(hs: &[u8]) -> Result<Option<&[u8]>, NotHello> {
    if let Some(&kind) = hs.first() {
        if kind != HANDSHAKE_CLIENT_HELLO {
            return Err(NotHello::NotTls("handshake message is not a ClientHello"));
        }
    }
    if hs.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
    if len > MAX_HELLO_BYTES {
        return Err(NotHello::TooLarge);
    }
    Ok(hs.get(4..4 + len))
}

/// A cursor over a ClientHello body; every read checks the length first.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], NotHello> {
        if n > self.buf.len() {
            return Err(NotHello::Malformed("a length runs past its container"));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, NotHello> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, NotHello> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], NotHello> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }

    /// A vector with a two-byte length prefix.
    fn vec16(&mut self) -> Result<&'a [u8], NotHello> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }

    fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Parse a ClientHello body (RFC 8446 §4.1.2; TLS 1.2's is the same up to the extensions).
fn client_hello(body: &[u8]) -> Result<ClientHello, NotHello> {
    let mut r = Reader { buf: body };
    let version = r.u16()?;
    if !(0x0301..=0x0304).contains(&version) {
        return Err(NotHello::NotTls(
            "ClientHello version is not TLS 1.0 to 1.3",
        ));
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err(NotHello::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(NotHello::Malformed("bad cipher suite list"));
    }
    if r.vec8()?.is_empty() {
        return Err(NotHello::Malformed("no compression methods"));
    }
    let mut hello = ClientHello {
        sni: None,
        ech: false,
        len: 0,
    };
    if r.is_empty() {
        return Ok(hello); // a TLS 1.2 hello may have no extensions at all
    }
    let mut exts = Reader { buf: r.vec16()? };
    if !r.is_empty() {
        return Err(NotHello::Malformed("bytes after the extensions"));
    }
    let mut seen_sni = false;
    while !exts.is_empty() {
        let kind = exts.u16()?;
        let data = exts.vec16()?;
        match kind {
            EXT_SERVER_NAME => {
                if seen_sni {
                    return Err(NotHello::Malformed("two server_name extensions"));
                }
                seen_sni = true;
                hello.sni = server_name(data)?;
            }
            EXT_ECH => hello.ech = true,
            _ => {}
        }
    }
    Ok(hello)
}

/// The host name of a `server_name` extension (RFC 6066 §3). An empty extension (as servers send
/// back) carries no name.
fn server_name(data: &[u8]) -> Result<Option<String>, NotHello> {
    if data.is_empty() {
        return Ok(None);
    }
    let mut ext = Reader { buf: data };
    let mut list = Reader { buf: ext.vec16()? };
    if !ext.is_empty() {
        return Err(NotHello::Malformed("bytes after the server name list"));
    }
    let mut host = None;
    while !list.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind != NAME_TYPE_HOST {
            continue; // no other name type is defined; skip as RFC 6066 allows
        }
        if host.is_some() {
            return Err(NotHello::Malformed("two host names in server_name"));
        }
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return Err(NotHello::Malformed("server name is not printable ASCII"));
        }
        if name.len() > MAX_SNI_BYTES {
            return Err(NotHello::Malformed("server name longer than 255 bytes"));
        }
        host = Some(String::from_utf8_lossy(name).into_owned());
    }
    Ok(host)
}

#[cfg(test)]
mod tests;
