//! Step 9: the audit line — one JSON object per request, tunnel or refusal, schema version 1.
//!
//! [`AuditRecord`] borrows every field from the request context and is serialised once, when the
//! request ends. Lines go through a bounded queue to one writer thread: when the writer falls
//! behind, requests wait for queue space instead of dropping lines (the audit trail is lossless by
//! design). The writer is a plain OS thread with a `BufWriter`: it blocks on the queue, drains
//! whatever is queued, and writes the batch with one flush, so the async workers never hand
//! writes to tokio's blocking pool (that hand-off cost a third of the proxy's CPU under load).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::{Serialize, Serializer};
use std::io::{BufWriter, Write};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::target::Host;

/// Schema version written in every line's `v` field.
pub const SCHEMA_VERSION: u32 = 1;

/// Longest path written to an audit line, in bytes (cut at a char boundary, marked with `…`).
pub const MAX_PATH_BYTES: usize = 512;

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
    /// The status sent to the client (for tunnels: the CONNECT response); null if none was sent.
    pub status: Option<u16>,
    /// Bytes from client to upstream (request body or tunnel payload).
    pub bytes_up: u64,
    /// Bytes from upstream to client (response body or tunnel payload).
    pub bytes_down: u64,
    /// Time from request arrival to the end of the exchange.
    pub duration_ms: u64,
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

// === impl AuditRecord ===

impl AuditRecord<'_> {
    /// The JSON line (no trailing newline).
    pub fn to_line(&self) -> String {
        // Serialising plain strings, numbers and addresses cannot fail.
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"v":{SCHEMA_VERSION},"event":"audit_encode_error","error":"{e}"}}"#)
        })
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
    if path.len() <= MAX_PATH_BYTES {
        return path;
    }
    let mut end = MAX_PATH_BYTES;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
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
            status: Some(200),
            bytes_up: 1,
            bytes_down: 2,
            duration_ms: 3,
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
        assert!(line.contains(r#""upstream":"[2001:db8::1]:443""#), "{line}");
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        let long = "é".repeat(400);
        let cut = truncate_path(&long);
        assert!(cut.len() <= MAX_PATH_BYTES);
        assert!(cut.chars().all(|c| c == 'é'));
        assert_eq!(truncate_path("/short"), "/short");
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
