//! Step 9: the audit line — one JSON object per request, tunnel or refusal, schema version 1.
//!
//! [`AuditRecord`] borrows every field from the request context and is serialised once, when the
//! request ends. Lines go through a bounded queue to one writer thread: when the writer falls
//! behind, requests wait for queue space instead of dropping lines (the audit trail is lossless by
//! design). The writer is a plain OS thread with a `BufWriter`: it blocks on the queue, drains
//! whatever is queued, and writes the batch with one flush, so the async workers never hand
//! writes to tokio's blocking pool (that hand-off cost a third of the proxy's CPU under load).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Serialize, Serializer};
use std::io::{BufWriter, Write};
use std::thread::JoinHandle;
use std::time::Duration;
use time::OffsetDateTime;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::target::Host;

/// Schema version written in every line's `v` field.
pub const SCHEMA_VERSION: u32 = 1;

/// Longest path written to an audit line, in bytes (cut at a char boundary, marked with `…`).
pub const MAX_PATH_BYTES: usize = 512;

/// Longest `detail` written to an audit line, in bytes (cut at a char boundary).
pub const MAX_DETAIL_BYTES: usize = 256;

/// Lines that may wait for the writer before requests start to wait.
pub const QUEUE_LINES: usize = 8192;

/// One audit line, schema v1. Field names and order are a contract (see README).
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// Schema version ([`SCHEMA_VERSION`]).
    pub v: u32,
    /// When the request arrived, RFC 3339 UTC with milliseconds.
    pub ts: &'a str,
    /// `connect`, `http`, or `reject` (refused before a target was known).
    pub event: &'static str,
    /// Unique, time-sortable id of this request (ULID).
    pub request_id: &'a str,
    /// The agent, once identified.
    pub agent: Option<&'a str>,
    /// The agent's policy.
    pub policy: Option<&'a str>,
    /// The client's address.
    pub client: SocketAddr,
    /// The HTTP method; null when the request head never parsed.
    pub method: Option<&'a str>,
    /// The normalised target host.
    #[serde(serialize_with = "host_field")]
    pub host: Option<&'a Host>,
    /// The target port.
    pub port: Option<u16>,
    /// For plain HTTP, the request path without its query string (queries often carry secrets).
    pub path: Option<&'a str>,
    /// `allow`, `deny` or `would_deny` (report mode).
    pub decision: &'static str,
    /// The reason token (see `outcome::Reason`).
    pub reason: &'static str,
    /// The allow rule that admitted the request.
    pub rule: Option<&'a str>,
    /// `enforce` or `report`: the mode of the agent's policy.
    pub mode: &'static str,
    /// The vetted address that was dialled.
    pub upstream: Option<SocketAddr>,
    /// For tunnels to `[sni] ports`: the server name of the client's TLS ClientHello.
    pub sni: Option<&'a str>,
    /// True for an intercepted tunnel (`connect`) and each request inside one (`http`).
    pub intercepted: bool,
    /// The name of the credential injected into an intercepted request (its `value_file` as the
    /// config writes it; several comma-separated), never its value.
    pub credential: Option<&'a str>,
    /// The status sent to the client (for tunnels: the CONNECT response); null if none was sent.
    pub status: Option<u16>,
    /// Bytes from client to upstream (request body or tunnel payload).
    pub bytes_up: u64,
    /// Bytes from upstream to client (response body or tunnel payload).
    pub bytes_down: u64,
    /// Time from request arrival to the end of the exchange.
    pub duration_ms: u64,
    /// For a refusal whose response withholds its cause (`auth_failed`): the cause, at most
    /// [`MAX_DETAIL_BYTES`]. Null otherwise.
    pub detail: Option<&'a str>,
}

/// The `dropped` summary line (schema v1): how many refusals or connections were dropped
/// without a line of their own, per client address or listener, over the last interval.
#[derive(Debug)]
pub struct DroppedRecord<'a> {
    /// When the summary was written, RFC 3339 UTC with milliseconds.
    pub ts: &'a str,
    /// `refusal_budget` (a client address past its budget), `max_connections` or
    /// `admin_max_connections` (a listener at its connection cap).
    pub cause: &'static str,
    /// The client address (no port) of a `refusal_budget` summary; null for the others, and
    /// for addresses the budget table forgot before their summary.
    pub client: Option<IpAddr>,
    /// `proxy`, `tls` or `admin` for a connection cap; null for `refusal_budget`.
    pub listener: Option<&'static str>,
    /// How many were dropped.
    pub count: u64,
    /// Per reason (the refusal each would have been, or `credentials_unchecked`); `{}` for a
    /// connection cap.
    pub reasons: Option<&'a crate::budget::Counts>,
    /// The summary interval (`server.summary_interval`), in milliseconds: the drops happened
    /// within that much time before `ts`.
    pub interval_ms: u64,
}

// === impl DroppedRecord ===

impl DroppedRecord<'_> {
    /// The `event` of a summary line.
    pub const EVENT: &'static str = "dropped";

    /// The JSON line (no trailing newline). Not on the request path: serde_json writes it.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

impl Serialize for DroppedRecord<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeStruct};
        struct Reasons<'a>(Option<&'a crate::budget::Counts>);
        impl Serialize for Reasons<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut map = s.serialize_map(None)?;
                for (what, n) in self.0.iter().flat_map(|c| c.iter()) {
                    map.serialize_entry(what.as_str(), &n)?;
                }
                map.end()
            }
        }
        let mut st = s.serialize_struct("DroppedRecord", 9)?;
        st.serialize_field("v", &SCHEMA_VERSION)?;
        st.serialize_field("ts", self.ts)?;
        st.serialize_field("event", Self::EVENT)?;
        st.serialize_field("cause", self.cause)?;
        st.serialize_field("client", &self.client)?;
        st.serialize_field("listener", &self.listener)?;
        st.serialize_field("count", &self.count)?;
        st.serialize_field("reasons", &Reasons(self.reasons))?;
        st.serialize_field("interval_ms", &self.interval_ms)?;
        st.end()
    }
}

fn host_field<S: Serializer>(host: &Option<&Host>, s: S) -> Result<S::Ok, S::Error> {
    match host {
        None => s.serialize_none(),
        Some(Host::Name(n)) => s.serialize_str(n),
        // Without brackets: the field holds a host, not an authority.
        Some(Host::Ip(ip)) => s.collect_str(ip),
    }
}

/// Where finished requests send their audit lines. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AuditSink {
    tx: mpsc::Sender<String>,
    written: Arc<AtomicU64>,
}

/// The writer task; await [`AuditWriter::finish`] after every sink is dropped to flush the tail.
#[derive(Debug)]
pub struct AuditWriter {
    task: JoinHandle<std::io::Result<()>>,
    failed: CancellationToken,
}

/// A reserved slot in the audit queue: sending through it cannot wait or fail.
#[derive(Debug)]
pub struct AuditPermit<'a>(mpsc::Permit<'a, String>);

/// The audit writer has stopped; lines can no longer be queued.
#[derive(Debug, Clone, Copy)]
pub struct WriterGone;

/// Start the writer thread on `out` (stdout in the binary).
pub fn spawn<W>(out: W) -> std::io::Result<(AuditSink, AuditWriter)>
where
    W: Write + Send + 'static,
{
    let (tx, rx) = mpsc::channel(QUEUE_LINES);
    let failed = CancellationToken::new();
    let on_fail = failed.clone();
    let written = Arc::new(AtomicU64::new(0));
    let count = written.clone();
    let task = std::thread::Builder::new()
        .name("chokepoint-audit".into())
        .spawn(move || {
            let r = write_lines(rx, out, &count);
            if r.is_err() {
                // The gateway must not keep passing traffic it cannot audit: `run` shuts down.
                on_fail.cancel();
            }
            r
        })?;
    Ok((AuditSink { tx, written }, AuditWriter { task, failed }))
}

/// How long the writer pauses after writing a batch before it looks at the queue again.
///
/// While the writer is parked on the empty queue, every queued line wakes it (a futex call on
/// the request's worker thread, then two context switches): under load that was a wake-up per
/// line, a sixth of the gateway's CPU. While it pauses, lines queue without waking anyone and
/// the next batch is written in one go. Lines reach the output at most this much later; a full
/// queue (`QUEUE_LINES`, far more than a pause's worth) still holds requests back, never drops.
pub const BATCH_PAUSE: Duration = Duration::from_millis(1);

/// Block for a line, take every line queued behind it, write them, flush once, then pause for
/// [`BATCH_PAUSE`]: batches under load, a line at a time when quiet.
fn write_lines<W: Write>(
    mut rx: mpsc::Receiver<String>,
    out: W,
    written: &AtomicU64,
) -> std::io::Result<()> {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    while let Some(first) = rx.blocking_recv() {
        let mut line = first;
        loop {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
            written.fetch_add(1, Ordering::Relaxed);
            match rx.try_recv() {
                Ok(next) => line = next,
                Err(_) => break,
            }
        }
        out.flush()?;
        std::thread::sleep(BATCH_PAUSE);
    }
    out.flush()
}

/// Room for a typical line (387–412 bytes under the load bench), so encoding never reallocates.
const LINE_CAPACITY: usize = 512;

// === impl AuditRecord ===

impl AuditRecord<'_> {
    /// The JSON line (no trailing newline).
    pub fn to_line(&self) -> String {
        let mut out = String::with_capacity(LINE_CAPACITY);
        self.write_line(&mut out);
        out
    }

    /// Append the JSON line to `out`: byte for byte what serde_json makes of this record through
    /// its `Serialize` derive (the reference; a property test holds the two together), written
    /// by hand because it runs once per request and serde's generic path (escaping every string
    /// a byte at a time, `Display` for every number and address) takes about 3.3× as long: some
    /// 0.4 µs more per line (`benches/audit.rs`, figures in docs/benchmarks.md).
    pub fn write_line(&self, out: &mut String) {
        out.push_str("{\"v\":");
        push_u64(out, self.v.into());
        out.push_str(",\"ts\":");
        push_str(out, self.ts);
        out.push_str(",\"event\":");
        push_str(out, self.event);
        out.push_str(",\"request_id\":");
        push_str(out, self.request_id);
        out.push_str(",\"agent\":");
        push_opt_str(out, self.agent);
        out.push_str(",\"policy\":");
        push_opt_str(out, self.policy);
        out.push_str(",\"client\":");
        push_addr(out, self.client);
        out.push_str(",\"method\":");
        push_opt_str(out, self.method);
        out.push_str(",\"host\":");
        match self.host {
            None => out.push_str("null"),
            Some(Host::Name(n)) => push_str(out, n),
            Some(Host::Ip(ip)) => {
                out.push('"');
                push_ip(out, *ip);
                out.push('"');
            }
        }
        out.push_str(",\"port\":");
        push_opt_u64(out, self.port.map(u64::from));
        out.push_str(",\"path\":");
        push_opt_str(out, self.path);
        out.push_str(",\"decision\":");
        push_str(out, self.decision);
        out.push_str(",\"reason\":");
        push_str(out, self.reason);
        out.push_str(",\"rule\":");
        push_opt_str(out, self.rule);
        out.push_str(",\"mode\":");
        push_str(out, self.mode);
        out.push_str(",\"upstream\":");
        match self.upstream {
            None => out.push_str("null"),
            Some(a) => push_addr(out, a),
        }
        out.push_str(",\"sni\":");
        push_opt_str(out, self.sni);
        out.push_str(if self.intercepted {
            ",\"intercepted\":true"
        } else {
            ",\"intercepted\":false"
        });
        out.push_str(",\"credential\":");
        push_opt_str(out, self.credential);
        out.push_str(",\"status\":");
        push_opt_u64(out, self.status.map(u64::from));
        out.push_str(",\"bytes_up\":");
        push_u64(out, self.bytes_up);
        out.push_str(",\"bytes_down\":");
        push_u64(out, self.bytes_down);
        out.push_str(",\"duration_ms\":");
        push_u64(out, self.duration_ms);
        out.push_str(",\"detail\":");
        push_opt_str(out, self.detail);
        out.push('}');
    }
}

/// `t` as the schema's `ts`, RFC 3339 in UTC with exactly three fractional digits
/// (`2026-11-22T10:00:00.123Z`), in `buf`. `None` for a year outside 0–9999.
pub fn timestamp(t: OffsetDateTime, buf: &mut [u8; 24]) -> Option<&str> {
    fn digits(buf: &mut [u8], mut n: u32) {
        for b in buf.iter_mut().rev() {
            *b = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    let t = t.to_offset(time::UtcOffset::UTC);
    let (year, month, day) = t.to_calendar_date();
    let year = u32::try_from(year).ok().filter(|y| *y <= 9999)?;
    let (h, m, s, ms) = t.to_hms_milli();
    digits(&mut buf[0..4], year);
    buf[4] = b'-';
    digits(&mut buf[5..7], u8::from(month).into());
    buf[7] = b'-';
    digits(&mut buf[8..10], day.into());
    buf[10] = b'T';
    digits(&mut buf[11..13], h.into());
    buf[13] = b':';
    digits(&mut buf[14..16], m.into());
    buf[16] = b':';
    digits(&mut buf[17..19], s.into());
    buf[19] = b'.';
    digits(&mut buf[20..23], ms.into());
    buf[23] = b'Z';
    std::str::from_utf8(buf).ok()
}

/// `n` in decimal (itoa: two digits per step, one `push_str`; as serde_json writes numbers).
fn push_u64(out: &mut String, n: u64) {
    out.push_str(itoa::Buffer::new().format(n));
}

fn push_opt_u64(out: &mut String, n: Option<u64>) {
    match n {
        Some(n) => push_u64(out, n),
        None => out.push_str("null"),
    }
}

fn push_opt_str(out: &mut String, s: Option<&str>) {
    match s {
        Some(s) => push_str(out, s),
        None => out.push_str("null"),
    }
}

/// A JSON string, escaped exactly as serde_json escapes: `"` and `\\`, the short forms `\b \t
/// \n \f \r`, every other control character below 0x20 as `\u00xx`; everything else as is.
fn push_str(out: &mut String, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push('"');
    // Almost every string needs no escape: find that out 8 bytes at a time.
    let clean = clean_prefix(s.as_bytes());
    if clean == s.len() {
        out.push_str(s);
        out.push('"');
        return;
    }
    let mut start = 0;
    for (i, b) in s.bytes().enumerate().skip(clean) {
        let short = match b {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            0x08 => "\\b",
            0x09 => "\\t",
            0x0a => "\\n",
            0x0c => "\\f",
            0x0d => "\\r",
            0x00..=0x1f => "",
            _ => continue,
        };
        // `i` is at an ASCII byte, so both cuts are on char boundaries.
        out.push_str(&s[start..i]);
        start = i + 1;
        if short.is_empty() {
            out.push_str("\\u00");
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0xf)]));
        } else {
            out.push_str(short);
        }
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// How many leading bytes of `b` need no JSON escape: all of them, or a count of whole 8-byte
/// words (the rest is left to the byte loop). A word passes if it has no byte below 0x20, no
/// `"` and no `\\`; the last, short word is checked padded with a clean byte.
fn clean_prefix(b: &[u8]) -> usize {
    let words = b.chunks_exact(8);
    let tail = words.remainder();
    let mut n = 0;
    for w in words {
        let mut word = [0u8; 8];
        word.copy_from_slice(w);
        if !clean_word(u64::from_le_bytes(word)) {
            return n;
        }
        n += 8;
    }
    let mut word = [b'a'; 8];
    word[..tail.len()].copy_from_slice(tail);
    if clean_word(u64::from_le_bytes(word)) {
        b.len()
    } else {
        n
    }
}

/// No byte of `x` needs a JSON escape.
fn clean_word(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Bytes of `x` that are zero get their high bit set (exact when combined with `!x`).
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    // Below 0x20: the byte minus 0x20 borrows; only counted for bytes without the high bit.
    let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
    control | zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\'))) == 0
}

/// An address as its `Display` writes it, quoted (`1.2.3.4:5`, `[::1]:5`).
fn push_addr(out: &mut String, addr: SocketAddr) {
    out.push('"');
    match addr {
        SocketAddr::V4(a) => {
            push_ip(out, IpAddr::V4(*a.ip()));
            out.push(':');
            push_u64(out, a.port().into());
        }
        // Rare here, and `Display` brackets it and adds a scope id: leave it to `Display`.
        SocketAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
    out.push('"');
}

/// An IP address as its `Display` writes it.
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u64(out, octet.into());
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

// === impl AuditSink ===

impl AuditSink {
    /// A poll-based handle on the queue, for bodies that must wait for space inside `poll_frame`.
    pub fn poll_sender(&self) -> tokio_util::sync::PollSender<String> {
        tokio_util::sync::PollSender::new(self.tx.clone())
    }

    /// Lines queued and not yet taken by the writer.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Lines handed to the output so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Wait for a free slot in the queue (backpressure when the writer is behind).
    pub async fn reserve(&self) -> Result<AuditPermit<'_>, WriterGone> {
        self.tx
            .reserve()
            .await
            .map(AuditPermit)
            .map_err(|_| WriterGone)
    }

    /// A free slot now, if there is one.
    pub fn try_reserve(&self) -> Result<AuditPermit<'_>, mpsc::error::TrySendError<()>> {
        self.tx.try_reserve().map(AuditPermit)
    }

    /// Queue a line from a synchronous context (a `Drop` or a body's `poll`). Never drops it:
    /// when the queue is full a task waits for space; when the writer is gone, the line goes to
    /// stderr.
    pub fn send_now(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(line)) => {
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        let tx = self.tx.clone();
                        rt.spawn(async move {
                            if let Err(mpsc::error::SendError(line)) = tx.send(line).await {
                                fallback(&line);
                            }
                        });
                    }
                    Err(_) => fallback(&line),
                }
            }
            Err(mpsc::error::TrySendError::Closed(line)) => fallback(&line),
        }
    }
}

// === impl AuditPermit ===

impl AuditPermit<'_> {
    /// Queue the line in the reserved slot.
    pub fn send(self, line: String) {
        self.0.send(line);
    }
}

/// Last resort when the writer is gone: the line goes to stderr, marked, rather than nowhere.
#[cold]
pub fn fallback(line: &str) {
    tracing::error!(
        audit = line,
        "audit writer has stopped; audit line written to the log instead"
    );
}

// === impl AuditWriter ===

impl AuditWriter {
    /// Completes if the writer fails (stdout closed or broken).
    pub async fn failed(&self) {
        self.failed.cancelled().await;
    }

    /// Wait until every queued line is written and flushed (all sinks must be dropped first).
    pub async fn finish(self) -> std::io::Result<()> {
        let task = self.task;
        match tokio::task::spawn_blocking(move || task.join()).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(std::io::Error::other("audit writer thread panicked")),
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Cut `path` to at most [`MAX_PATH_BYTES`] at a char boundary.
pub fn truncate_path(path: &str) -> &str {
    &path[..crate::outcome::floor_char_boundary(path, MAX_PATH_BYTES)]
}

/// Cut `detail` to at most [`MAX_DETAIL_BYTES`] at a char boundary.
pub fn truncate_detail(detail: &str) -> &str {
    &detail[..crate::outcome::floor_char_boundary(detail, MAX_DETAIL_BYTES)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_serialises_schema_v1_in_order() {
        let host = Host::Ip("2001:db8::1".parse().unwrap());
        let rec = AuditRecord {
            v: SCHEMA_VERSION,
            ts: "2026-11-22T10:00:00.123Z",
            event: "connect",
            request_id: "01J0000000000000000000000",
            agent: Some("a"),
            policy: Some("p"),
            client: "127.0.0.1:5000".parse().unwrap(),
            method: Some("CONNECT"),
            host: Some(&host),
            port: Some(443),
            path: None,
            decision: "allow",
            reason: "allowed",
            rule: Some("[2001:db8::1]:443"),
            mode: "enforce",
            upstream: Some("[2001:db8::1]:443".parse().unwrap()),
            sni: Some("api.example.com"),
            intercepted: true,
            credential: None,
            status: Some(200),
            bytes_up: 1,
            bytes_down: 2,
            duration_ms: 3,
            detail: None,
        };
        let line = rec.to_line();
        assert!(
            line.starts_with(r#"{"v":1,"ts":"2026-11-22T10:00:00.123Z","event":"connect""#),
            "{line}"
        );
        assert!(
            line.contains(r#""host":"2001:db8::1","port":443,"path":null"#),
            "{line}"
        );
        assert!(
            line.contains(r#""upstream":"[2001:db8::1]:443","sni":"api.example.com","intercepted":true,"credential":null"#),
            "{line}"
        );
        assert!(
            line.ends_with(r#","duration_ms":3,"detail":null}"#),
            "{line}"
        );
    }

    /// The hand-written encoder against the reference: serde_json through the derive.
    fn same_as_serde(rec: &AuditRecord<'_>) {
        let reference = serde_json::to_string(rec).unwrap();
        assert_eq!(rec.to_line(), reference);
    }

    fn record<'a>(host: Option<&'a Host>, text: &'a str, n: u64) -> AuditRecord<'a> {
        AuditRecord {
            v: SCHEMA_VERSION,
            ts: "2026-11-22T10:00:00.123Z",
            event: "http",
            request_id: "01J0000000000000000000000",
            agent: Some(text),
            policy: None,
            client: "10.1.2.3:65535".parse().unwrap(),
            method: Some("GET"),
            host,
            port: Some(u16::try_from(n % 65536).unwrap()),
            path: Some(text),
            decision: "deny",
            reason: "host_not_allowed",
            rule: None,
            mode: "report",
            upstream: None,
            sni: Some(text),
            intercepted: n % 2 == 0,
            credential: Some(text),
            status: None,
            bytes_up: n,
            bytes_down: u64::MAX,
            duration_ms: 0,
            detail: Some(text),
        }
    }

    #[test]
    fn encoder_matches_serde_json() {
        let v4 = Host::Ip("192.0.2.1".parse().unwrap());
        let v6 = Host::Ip("2001:db8::1".parse().unwrap());
        let name = Host::Name("api.example.com".into());
        for text in [
            "",
            "/plain",
            "quote\" and back\\slash",
            "\u{0}\u{1}\u{8}\t\n\u{b}\u{c}\r\u{1f} \u{7f}",
            "ünïcödé/π/🦀",
        ] {
            for host in [None, Some(&v4), Some(&v6), Some(&name)] {
                same_as_serde(&record(host, text, 0));
                same_as_serde(&record(host, text, 1_234_567_890));
            }
        }
        let mut rec = record(Some(&name), "/", 7);
        rec.client = "[fe80::1%3]:443".parse().unwrap();
        rec.upstream = Some("[2001:db8::7]:80".parse().unwrap());
        rec.status = Some(200);
        same_as_serde(&rec);
        rec.upstream = Some("0.0.0.0:0".parse().unwrap());
        same_as_serde(&rec);
    }

    proptest::proptest! {
        #[test]
        fn encoder_matches_serde_json_on_any_text(text in ".*", n in proptest::num::u64::ANY) {
            let host = Host::Name(text.clone().into());
            same_as_serde(&record(Some(&host), &text, n));
        }

        #[test]
        fn encoder_matches_serde_json_around_every_escape(
            text in "[a-z~\x7f\"\\\\\x00-\x1f\u{80}-\u{10ffff}]{0,40}",
        ) {
            same_as_serde(&record(None, &text, 1));
        }
    }

    #[test]
    fn timestamps_have_the_schema_form() {
        use time::{Date, Month, PrimitiveDateTime, Time, UtcOffset};
        let at = |y, mo, d, h, mi, s, ms, off_h| {
            let date = Date::from_calendar_date(y, mo, d).unwrap();
            let time = Time::from_hms_milli(h, mi, s, ms).unwrap();
            PrimitiveDateTime::new(date, time)
                .assume_offset(UtcOffset::from_hms(off_h, 0, 0).unwrap())
        };
        let mut buf = [0u8; 24];
        let t = at(2026, Month::November, 22, 10, 0, 0, 123, 0);
        assert_eq!(timestamp(t, &mut buf), Some("2026-11-22T10:00:00.123Z"));
        let t = at(99, Month::January, 2, 3, 4, 5, 6, 2);
        assert_eq!(timestamp(t, &mut buf), Some("0099-01-02T01:04:05.006Z"));
        let t = at(-1, Month::January, 1, 0, 0, 0, 0, 0);
        assert_eq!(timestamp(t, &mut buf), None);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let long = "é".repeat(400);
        let cut = truncate_path(&long);
        assert!(cut.len() <= MAX_PATH_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate_path("/short"), "/short");
        let long = "ü".repeat(200);
        assert!(truncate_detail(&long).len() <= MAX_DETAIL_BYTES);
    }

    /// A writer that hands every write to a channel, so the test sees exactly what was written.
    struct Pipe(std::sync::mpsc::Sender<Vec<u8>>);

    impl Write for Pipe {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .send(buf.to_vec())
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn writer_flushes_every_line_on_finish() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (sink, writer) = spawn(Pipe(tx)).unwrap();
        for i in 0..100 {
            sink.reserve().await.unwrap().send(format!("{{\"n\":{i}}}"));
        }
        sink.send_now("{\"n\":100}".into());
        drop(sink);
        writer.finish().await.unwrap();
        let out = String::from_utf8(rx.try_iter().flatten().collect()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 101);
        assert_eq!(lines[100], "{\"n\":100}");
    }

    #[tokio::test]
    async fn a_broken_output_is_reported() {
        let (tx, rx) = std::sync::mpsc::channel();
        drop(rx);
        let (sink, writer) = spawn(Pipe(tx)).unwrap();
        sink.reserve().await.unwrap().send("x".into());
        tokio::time::timeout(std::time::Duration::from_secs(5), writer.failed())
            .await
            .expect("writer failure is signalled");
        drop(sink);
        assert!(writer.finish().await.is_err());
    }
}
