//! The audit line as a test sees it ([`Audit`], decoded strictly), what a test expects of one
//! ([`AuditMatch`]), and the stream of lines a gateway writes ([`AuditLog`]), with failure
//! messages that show the expectation and every line seen. `dropped` summary lines
//! ([`Dropped`], decoded strictly too) go to a stream of their own, so a test that does not
//! look for them never sees them among its request lines.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

use super::WAIT;

/// One audit line, decoded strictly: an unknown or missing field fails the test.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    pub v: u32,
    pub ts: String,
    pub event: String,
    pub request_id: String,
    pub agent: Option<String>,
    pub policy: Option<String>,
    pub client: String,
    pub method: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub decision: String,
    pub reason: String,
    pub rule: Option<String>,
    pub mode: String,
    pub upstream: Option<String>,
    pub sni: Option<String>,
    pub intercepted: bool,
    pub credential: Option<String>,
    pub status: Option<u16>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    pub detail: Option<String>,
    /// The length of the line as written, in bytes (not a field of the line).
    #[serde(skip)]
    pub line_len: usize,
}

/// A `dropped` summary line, decoded strictly: an unknown or missing field fails the test.
#[derive(Debug, Deserialize, Clone, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Dropped {
    pub v: u32,
    pub ts: String,
    pub event: String,
    pub cause: String,
    pub client: Option<String>,
    pub listener: Option<String>,
    pub count: u64,
    pub reasons: BTreeMap<String, u64>,
    pub interval_ms: u64,
}

/// The one field that tells a summary from a request line.
#[derive(Deserialize)]
struct Event {
    event: String,
}

/// Where a gateway's audit output goes, a line at a time: request lines and summaries to their
/// own streams of an [`AuditLog`], with the bytes counted.
pub struct AuditTx {
    lines: Sender<Audit>,
    dropped: Sender<Dropped>,
    bytes: Arc<AtomicU64>,
}

impl AuditTx {
    /// Decode `line` (without its newline) and pass it on; `false` once the test no longer
    /// listens.
    pub fn line(&self, line: &str) -> bool {
        self.bytes
            .fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
        let event: Event = serde_json::from_str(line).unwrap_or_else(|e| {
            panic!("audit line is not a JSON object with an event: {e}: {line}")
        });
        if event.event == "dropped" {
            let d: Dropped = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("summary line does not match schema v1: {e}: {line}"));
            self.dropped.send(d).is_ok()
        } else {
            self.lines.send(Audit::decode(line)).is_ok()
        }
    }
}

/// A sender for a gateway's audit output and the log a test reads.
pub fn audit_channel() -> (AuditTx, AuditLog) {
    let (lines, rx) = mpsc::channel();
    let (dropped, drx) = mpsc::channel();
    let bytes = Arc::new(AtomicU64::new(0));
    let tx = AuditTx {
        lines,
        dropped,
        bytes: bytes.clone(),
    };
    (
        tx,
        AuditLog {
            rx,
            dropped: drx,
            bytes,
        },
    )
}

impl Audit {
    /// Decode one line; panics with the line if it does not match schema v1.
    pub fn decode(line: &str) -> Audit {
        let mut a: Audit = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("audit line does not match schema v1: {e}: {line}"));
        a.line_len = line.len();
        a
    }

    /// The client's address without the port.
    pub fn client_ip(&self) -> &str {
        self.client
            .rsplit_once(':')
            .map_or(self.client.as_str(), |(ip, _)| ip)
    }
}

impl fmt::Display for Audit {
    /// The fields a reader looks at first, on one line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {} agent={:?} {:?} {:?}:{:?}{} status={:?} upstream={:?} up={} down={} client={}",
            self.event,
            self.decision,
            self.reason,
            self.agent,
            self.method,
            self.host,
            self.port,
            self.path.as_deref().unwrap_or(""),
            self.status,
            self.upstream,
            self.bytes_up,
            self.bytes_down,
            self.client,
        )
    }
}

type Check = Box<dyn Fn(&Audit) -> bool + Send + Sync>;

/// What an audit line must say: the fields named are checked, the rest are not.
///
/// ```ignore
/// proxy.expect_audit(AuditMatch::of("connect", "deny", "not_tls").status(200).bytes_up(0));
/// ```
#[derive(Default)]
pub struct AuditMatch {
    checks: Vec<(String, Check)>,
}

impl fmt::Debug for AuditMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.checks.iter().map(|(n, _)| n.as_str()).collect();
        write!(f, "{{{}}}", names.join(", "))
    }
}

impl AuditMatch {
    /// Matches every line.
    pub fn any() -> AuditMatch {
        AuditMatch::default()
    }

    /// `event`, `decision` and `reason`, the three a test almost always states.
    pub fn of(event: &str, decision: &str, reason: &str) -> AuditMatch {
        AuditMatch::any()
            .event(event)
            .decision(decision)
            .reason(reason)
    }

    /// Only the `reason`.
    pub fn reason_is(reason: &str) -> AuditMatch {
        AuditMatch::any().reason(reason)
    }

    /// Add a named check.
    pub fn and(
        mut self,
        what: impl Into<String>,
        f: impl Fn(&Audit) -> bool + Send + Sync + 'static,
    ) -> AuditMatch {
        self.checks.push((what.into(), Box::new(f)));
        self
    }

    fn eq<T>(self, field: &str, want: T, get: fn(&Audit) -> T) -> AuditMatch
    where
        T: PartialEq + fmt::Debug + Send + Sync + 'static,
    {
        self.and(format!("{field} == {want:?}"), move |a| get(a) == want)
    }

    pub fn event(self, v: &str) -> AuditMatch {
        self.eq("event", v.to_string(), |a| a.event.clone())
    }
    pub fn decision(self, v: &str) -> AuditMatch {
        self.eq("decision", v.to_string(), |a| a.decision.clone())
    }
    pub fn reason(self, v: &str) -> AuditMatch {
        self.eq("reason", v.to_string(), |a| a.reason.clone())
    }
    pub fn mode(self, v: &str) -> AuditMatch {
        self.eq("mode", v.to_string(), |a| a.mode.clone())
    }
    pub fn agent(self, v: Option<&str>) -> AuditMatch {
        self.eq("agent", v.map(String::from), |a| a.agent.clone())
    }
    pub fn policy(self, v: Option<&str>) -> AuditMatch {
        self.eq("policy", v.map(String::from), |a| a.policy.clone())
    }
    pub fn rule(self, v: Option<&str>) -> AuditMatch {
        self.eq("rule", v.map(String::from), |a| a.rule.clone())
    }
    pub fn method(self, v: Option<&str>) -> AuditMatch {
        self.eq("method", v.map(String::from), |a| a.method.clone())
    }
    pub fn host(self, v: Option<&str>) -> AuditMatch {
        self.eq("host", v.map(String::from), |a| a.host.clone())
    }
    pub fn port(self, v: Option<u16>) -> AuditMatch {
        self.eq("port", v, |a| a.port)
    }
    pub fn path(self, v: Option<&str>) -> AuditMatch {
        self.eq("path", v.map(String::from), |a| a.path.clone())
    }
    pub fn upstream(self, v: Option<&str>) -> AuditMatch {
        self.eq("upstream", v.map(String::from), |a| a.upstream.clone())
    }
    pub fn sni(self, v: Option<&str>) -> AuditMatch {
        self.eq("sni", v.map(String::from), |a| a.sni.clone())
    }
    pub fn status(self, v: u16) -> AuditMatch {
        self.eq("status", Some(v), |a| a.status)
    }
    pub fn no_status(self) -> AuditMatch {
        self.eq("status", None, |a| a.status)
    }
    pub fn bytes_up(self, v: u64) -> AuditMatch {
        self.eq("bytes_up", v, |a| a.bytes_up)
    }
    pub fn bytes_down(self, v: u64) -> AuditMatch {
        self.eq("bytes_down", v, |a| a.bytes_down)
    }
    pub fn detail(self, v: Option<&str>) -> AuditMatch {
        self.eq("detail", v.map(String::from), |a| a.detail.clone())
    }
    /// The client address is `ip` (any port).
    pub fn client_ip(self, ip: impl fmt::Display) -> AuditMatch {
        let ip = ip.to_string();
        self.and(format!("client ip == {ip}"), move |a| a.client_ip() == ip)
    }

    /// The checks `a` fails, by name; empty if it matches.
    pub fn failures(&self, a: &Audit) -> Vec<&str> {
        self.checks
            .iter()
            .filter(|(_, f)| !f(a))
            .map(|(n, _)| n.as_str())
            .collect()
    }

    pub fn matches(&self, a: &Audit) -> bool {
        self.checks.iter().all(|(_, f)| f(a))
    }

    /// Panic unless `a` matches, naming the failed checks and showing the line.
    pub fn assert(&self, a: &Audit) {
        let failed = self.failures(a);
        assert!(
            failed.is_empty(),
            "audit line does not match: failed {failed:?} of {self:?}\n  line: {a}\n  full: {a:?}"
        );
    }
}

/// The audit lines of one gateway, in the order written.
pub struct AuditLog {
    rx: Receiver<Audit>,
    dropped: Receiver<Dropped>,
    bytes: Arc<AtomicU64>,
}

impl AuditLog {
    /// Bytes of audit output so far (newlines included), request lines and summaries alike.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The next `dropped` summary line within `within`.
    pub fn next_dropped_within(&self, within: Duration) -> Option<Dropped> {
        self.dropped.recv_timeout(within).ok()
    }

    /// The first summary line for which `f` holds, within [`WAIT`]; others are skipped, and
    /// listed if none matches.
    pub fn find_dropped(&self, what: &str, f: impl Fn(&Dropped) -> bool) -> Dropped {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_dropped_within(left) {
                Some(d) if f(&d) => return d,
                Some(d) => seen.push(d),
                None => panic!("no summary line ({what}) within {WAIT:?}; seen: {seen:#?}"),
            }
        }
    }

    /// Assert that no summary line arrives within `d`.
    pub fn no_dropped_for(&self, d: Duration) {
        if let Some(s) = self.next_dropped_within(d) {
            panic!("unexpected summary line: {s:?}");
        }
    }

    /// The next line, waiting up to `within`.
    pub fn next_within(&self, within: Duration) -> Option<Audit> {
        self.rx.recv_timeout(within).ok()
    }

    /// The next line; fails if none comes within [`WAIT`].
    pub fn next(&self) -> Audit {
        self.next_within(WAIT)
            .unwrap_or_else(|| panic!("no audit line within {WAIT:?}"))
    }

    /// The next line, which must match `m`.
    pub fn expect(&self, m: &AuditMatch) -> Audit {
        let a = self
            .next_within(WAIT)
            .unwrap_or_else(|| panic!("no audit line within {WAIT:?}; expected {m:?}"));
        m.assert(&a);
        a
    }

    /// The first line matching `m` within [`WAIT`]; lines before it are skipped, and listed if
    /// none matches.
    pub fn find(&self, m: &AuditMatch) -> Audit {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_within(left) {
                Some(a) if m.matches(&a) => return a,
                Some(a) => seen.push(a),
                None => panic!(
                    "no audit line matching {m:?} within {WAIT:?}; lines seen:\n{}",
                    list(&seen)
                ),
            }
        }
    }

    /// Assert that no line arrives within `d`.
    pub fn none_for(&self, d: Duration) {
        if let Some(a) = self.next_within(d) {
            panic!("unexpected audit line: {a}\n  full: {a:?}");
        }
    }
}

/// Lines for a failure message, one per line.
pub fn list(seen: &[Audit]) -> String {
    if seen.is_empty() {
        return "  (none)".into();
    }
    seen.iter()
        .map(|a| format!("  {a}"))
        .collect::<Vec<_>>()
        .join("\n")
}
