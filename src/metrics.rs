//! Prometheus metrics: every family is created here, once, with its name and buckets as consts.
//!
//! Label values come only from the config (`agent`, `policy`) or from closed vocabularies
//! (`kind`, `decision`, `reason`, `direction`, `result`, `listener`), never from a host, path,
//! client address or error text, so the number of series is bounded by the config. A client
//! that matched no agent is counted under `agent="unknown"`.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::outcome::{Decision, Reason};
use crate::target::Kind;
use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// `chokepoint_requests_total{agent,kind,decision,reason}`: requests and tunnels by outcome.
pub const REQUESTS_TOTAL: &str = "chokepoint_requests_total";
/// `chokepoint_bytes_total{agent,direction}`: payload bytes (`up`: client→upstream).
pub const BYTES_TOTAL: &str = "chokepoint_bytes_total";
/// `chokepoint_active_tunnels{agent}`: tunnels open now.
pub const ACTIVE_TUNNELS: &str = "chokepoint_active_tunnels";
/// `chokepoint_request_duration_seconds{kind}`: arrival to end of exchange.
pub const REQUEST_DURATION: &str = "chokepoint_request_duration_seconds";
/// `chokepoint_upstream_connect_seconds`: successful dials to a vetted address.
pub const UPSTREAM_CONNECT: &str = "chokepoint_upstream_connect_seconds";
/// `chokepoint_dns_lookup_seconds`: lookups that went to DNS (not static hosts).
pub const DNS_LOOKUP: &str = "chokepoint_dns_lookup_seconds";
/// `chokepoint_config_reloads_total{result}`: `ok` or `error`.
pub const CONFIG_RELOADS: &str = "chokepoint_config_reloads_total";
/// `chokepoint_build_info{version}`: always 1.
pub const BUILD_INFO: &str = "chokepoint_build_info";
/// `chokepoint_audit_queue_lines`: audit lines waiting for the writer.
pub const AUDIT_QUEUE: &str = "chokepoint_audit_queue_lines";
/// `chokepoint_audit_wait_seconds_total`: time requests spent waiting for audit queue space.
pub const AUDIT_WAIT: &str = "chokepoint_audit_wait_seconds_total";
/// `chokepoint_audit_lines_total`: audit lines written.
pub const AUDIT_LINES: &str = "chokepoint_audit_lines_total";
/// `chokepoint_refusals_dropped_total{reason}`: refusals before identification dropped past
/// their client address's budget (closed unanswered, no audit line of their own).
pub const REFUSALS_DROPPED: &str = "chokepoint_refusals_dropped_total";
/// `chokepoint_connections_refused_total{listener}`: connections closed at accept because the
/// listener's connection cap was reached.
pub const CONNECTIONS_REFUSED: &str = "chokepoint_connections_refused_total";
/// When the HTTPS listener's certificate expires (Unix seconds); exported only with `tls_listen`.
pub const TLS_CERT_EXPIRY: &str = "chokepoint_tls_cert_expiry_timestamp_seconds";

/// `chokepoint_limit_store_requests_total{result}`: calls requests made to the limit store:
/// `ok`, `error`, `timeout` (slower than `cluster.timeout`), `skipped` (the store was down).
pub const LIMIT_STORE_REQUESTS: &str = "chokepoint_limit_store_requests_total";
/// `chokepoint_limit_store_duration_seconds`: round trip of the calls requests made.
pub const LIMIT_STORE_DURATION: &str = "chokepoint_limit_store_duration_seconds";
/// `chokepoint_limit_store_fallback`: 1 while the store is unusable and `fail_mode` applies.
pub const LIMIT_STORE_FALLBACK: &str = "chokepoint_limit_store_fallback";

/// `chokepoint_byte_budget_used_ratio{agent}`: the agent's most used byte budget, as used /
/// limit in its current window (this replica's view).
pub const BYTE_BUDGET_USED: &str = "chokepoint_byte_budget_used_ratio";

/// `chokepoint_intercepted_tunnels_total{result}`: intercepted tunnels by the agent's TLS
/// handshake with the gateway: `ok` or `handshake_failed`.
pub const INTERCEPTED_TUNNELS: &str = "chokepoint_intercepted_tunnels_total";
/// `chokepoint_intercept_certificates_minted_total`: leaf certificates minted for intercepted
/// hosts.
pub const INTERCEPT_MINTS: &str = "chokepoint_intercept_certificates_minted_total";
/// `chokepoint_intercept_certificates_cached`: leaf certificates in the cache now.
pub const INTERCEPT_CACHED: &str = "chokepoint_intercept_certificates_cached";
/// `chokepoint_intercept_upstream_tls_failures_total`: upstream TLS connections of intercepted
/// hosts that failed (untrusted or wrong-name certificate, handshake error or timeout).
pub const INTERCEPT_TLS_FAILURES: &str = "chokepoint_intercept_upstream_tls_failures_total";

/// Sub-millisecond to seconds: DNS and connects on loopback take tens of microseconds, across
/// the internet tens to hundreds of milliseconds.
const FAST_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// Requests take milliseconds; tunnels live for minutes.
const REQUEST_BUCKETS: [f64; 16] = [
    0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 120.0,
    600.0, 3600.0,
];

/// The agent label of a client that matched no agent.
pub const UNKNOWN_AGENT: &str = "unknown";

/// The `kind` label values, indexed by [`kind_index`].
const KINDS: [&str; 3] = ["connect", "http", "reject"];
/// The `decision` label values, indexed by [`decision_index`].
const DECISIONS: [Decision; 3] = [Decision::Allow, Decision::Deny, Decision::WouldDeny];
/// One cached `chokepoint_requests_total` child per kind, decision and reason.
const OUTCOMES: usize = KINDS.len() * DECISIONS.len() * Reason::ALL.len();

/// Every metric family of the gateway.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    bytes: IntCounterVec,
    active_tunnels: IntGaugeVec,
    budget_used: GaugeVec,
    connect: Histogram,
    dns: Histogram,
    reloads: IntCounterVec,
    audit_queue: IntGauge,
    audit_wait: Counter,
    audit_lines: IntCounter,
    tls_expiry: IntGaugeVec,
    refusals_dropped: IntCounterVec,
    /// `chokepoint_refusals_dropped_total` per kind of drop, resolved on first use (a flood
    /// of drops does not hash label strings).
    dropped: Arc<[OnceLock<IntCounter>]>,
    connections_refused: IntCounterVec,
    /// `chokepoint_limit_store_requests_total` per result, resolved once.
    store_requests: [IntCounter; 4],
    store_duration: Histogram,
    store_fallback: IntGauge,
    intercepted: [IntCounter; 2],
    mints: IntCounter,
    cached: IntGauge,
    upstream_tls_failures: IntCounter,
    /// `chokepoint_request_duration_seconds` per kind, resolved once.
    durations: [Histogram; 3],
    /// The handles of clients that matched no agent (`agent="unknown"`).
    unknown: Arc<AgentMetrics>,
}

/// The per-agent series of one agent, each child looked up in its family at most once (on
/// first use, so a series appears only once it has something to say) and then kept: the
/// request path increments handles instead of hashing label strings. The reload snapshot
/// holds one set per agent, carried over by name.
#[derive(Debug)]
pub struct AgentMetrics {
    agent: Arc<str>,
    requests: IntCounterVec,
    bytes: IntCounterVec,
    active_tunnels: IntGaugeVec,
    outcomes: Box<[OnceLock<IntCounter>]>,
    bytes_up: OnceLock<IntCounter>,
    bytes_down: OnceLock<IntCounter>,
    tunnels: OnceLock<IntGauge>,
    budget_used_vec: GaugeVec,
    budget_used: OnceLock<Gauge>,
}

/// One finished request or tunnel, as the metrics see it.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    /// Tunnel or plain HTTP; `None` for a request refused before its target was known.
    pub kind: Option<Kind>,
    /// Allow, deny or would_deny.
    pub decision: Decision,
    /// Why it ended as it did.
    pub reason: Reason,
    /// Bytes client→upstream.
    pub bytes_up: u64,
    /// Bytes upstream→client.
    pub bytes_down: u64,
    /// Arrival to end.
    pub elapsed: Duration,
}

/// How a call to the limit store ended (the `result` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreResult {
    /// Answered in time.
    Ok,
    /// Failed (connection lost, refused, a server error).
    Error,
    /// No answer within `cluster.timeout`.
    Timeout,
    /// Not asked: the store was down.
    Skipped,
}

/// The `result` label values, indexed by `StoreResult as usize`.
const STORE_RESULTS: [&str; 4] = ["ok", "error", "timeout", "skipped"];

/// Decrements `chokepoint_active_tunnels` for its agent when dropped.
#[derive(Debug)]
pub struct TunnelGuard(IntGauge);

// === impl Metrics ===

impl Metrics {
    /// Create and register every family (and the process collector) in a new registry.
    pub fn new() -> prometheus::Result<Self> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                REQUESTS_TOTAL,
                "Requests and tunnels by agent, kind, decision and reason.",
            ),
            &["agent", "kind", "decision", "reason"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new(
                BYTES_TOTAL,
                "Payload bytes by agent and direction (up: client to upstream).",
            ),
            &["agent", "direction"],
        )?;
        let active_tunnels = IntGaugeVec::new(
            Opts::new(ACTIVE_TUNNELS, "CONNECT tunnels open now, by agent."),
            &["agent"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                REQUEST_DURATION,
                "Time from request arrival to the end of the exchange.",
            )
            .buckets(REQUEST_BUCKETS.to_vec()),
            &["kind"],
        )?;
        let connect = Histogram::with_opts(
            HistogramOpts::new(
                UPSTREAM_CONNECT,
                "Time to connect to a vetted upstream address.",
            )
            .buckets(FAST_BUCKETS.to_vec()),
        )?;
        let dns = Histogram::with_opts(
            HistogramOpts::new(DNS_LOOKUP, "Time of DNS lookups (static hosts excluded).")
                .buckets(FAST_BUCKETS.to_vec()),
        )?;
        let reloads = IntCounterVec::new(
            Opts::new(CONFIG_RELOADS, "Config reloads by result (ok, error)."),
            &["result"],
        )?;
        let build = IntGaugeVec::new(
            Opts::new(BUILD_INFO, "Build information; always 1."),
            &["version"],
        )?;
        let audit_queue = IntGauge::new(AUDIT_QUEUE, "Audit lines waiting for the writer.")?;
        let audit_wait = Counter::new(
            AUDIT_WAIT,
            "Total time requests waited for audit queue space (the writer fell behind).",
        )?;
        let audit_lines = IntCounter::new(AUDIT_LINES, "Audit lines written.")?;
        // A vector without labels: no series at all until a certificate is loaded, so a gateway
        // without the HTTPS listener exports nothing an expiry alert could misread.
        let tls_expiry = IntGaugeVec::new(
            Opts::new(
                TLS_CERT_EXPIRY,
                "When the HTTPS listener's serving certificate expires (Unix seconds).",
            ),
            &[],
        )?;
        let refusals_dropped = IntCounterVec::new(
            Opts::new(
                REFUSALS_DROPPED,
                "Refusals before identification dropped unanswered and unaudited: their client address was past its budget.",
            ),
            &["reason"],
        )?;
        let connections_refused = IntCounterVec::new(
            Opts::new(
                CONNECTIONS_REFUSED,
                "Connections closed at accept because the listener's connection cap was reached.",
            ),
            &["listener"],
        )?;
        let budget_used = GaugeVec::new(
            Opts::new(
                BYTE_BUDGET_USED,
                "The agent's most used byte budget: bytes counted in the current window / the limit.",
            ),
            &["agent"],
        )?;
        let store_requests_vec = IntCounterVec::new(
            Opts::new(
                LIMIT_STORE_REQUESTS,
                "Calls requests made to the limit store, by result (ok, error, timeout, skipped).",
            ),
            &["result"],
        )?;
        let store_duration = Histogram::with_opts(
            HistogramOpts::new(
                LIMIT_STORE_DURATION,
                "Round trip of the limit store calls requests made.",
            )
            .buckets(FAST_BUCKETS.to_vec()),
        )?;
        let store_fallback = IntGauge::new(
            LIMIT_STORE_FALLBACK,
            "1 while the limit store is unusable and cluster.fail_mode applies.",
        )?;
        let intercepted = IntCounterVec::new(
            Opts::new(
                INTERCEPTED_TUNNELS,
                "Intercepted tunnels by the result of the agent's TLS handshake (ok, handshake_failed).",
            ),
            &["result"],
        )?;
        let mints = IntCounter::new(
            INTERCEPT_MINTS,
            "Leaf certificates minted for intercepted hosts.",
        )?;
        let cached = IntGauge::new(
            INTERCEPT_CACHED,
            "Leaf certificates for intercepted hosts cached now.",
        )?;
        let upstream_tls_failures = IntCounter::new(
            INTERCEPT_TLS_FAILURES,
            "Upstream TLS connections of intercepted hosts that failed.",
        )?;
        for c in [
            Box::new(store_requests_vec.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(store_duration.clone()),
            Box::new(store_fallback.clone()),
            Box::new(budget_used.clone()),
            Box::new(intercepted.clone()),
            Box::new(mints.clone()),
            Box::new(cached.clone()),
            Box::new(upstream_tls_failures.clone()),
            Box::new(requests.clone()),
            Box::new(bytes.clone()),
            Box::new(active_tunnels.clone()),
            Box::new(duration.clone()),
            Box::new(connect.clone()),
            Box::new(dns.clone()),
            Box::new(reloads.clone()),
            Box::new(build.clone()),
            Box::new(audit_queue.clone()),
            Box::new(audit_wait.clone()),
            Box::new(audit_lines.clone()),
            Box::new(tls_expiry.clone()),
            Box::new(refusals_dropped.clone()),
            Box::new(connections_refused.clone()),
        ] {
            registry.register(c)?;
        }
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        for result in ["ok", "error"] {
            reloads.with_label_values(&[result]);
        }
        // Exported from the start, at 0, so `increase()` sees the first refusal.
        for listener in crate::budget::Listener::ALL {
            connections_refused.with_label_values(&[listener.as_str()]);
        }
        let durations = KINDS.map(|k| duration.with_label_values(&[k]));
        let store_requests = STORE_RESULTS.map(|r| store_requests_vec.with_label_values(&[r]));
        let intercepted = ["ok", "handshake_failed"].map(|r| intercepted.with_label_values(&[r]));
        let unknown = Arc::new(AgentMetrics::new(
            UNKNOWN_AGENT.into(),
            &requests,
            &bytes,
            &active_tunnels,
            &budget_used,
        ));
        Ok(Metrics {
            registry,
            requests,
            bytes,
            active_tunnels,
            budget_used,
            connect,
            dns,
            reloads,
            audit_queue,
            audit_wait,
            audit_lines,
            tls_expiry,
            refusals_dropped,
            dropped: (0..crate::budget::Dropped::KINDS)
                .map(|_| OnceLock::new())
                .collect(),
            connections_refused,
            store_requests,
            store_duration,
            store_fallback,
            intercepted,
            mints,
            cached,
            upstream_tls_failures,
            durations,
            unknown,
        })
    }

    /// The handle set of an agent (built once per agent, when a config is loaded).
    pub fn agent(&self, name: Arc<str>) -> AgentMetrics {
        AgentMetrics::new(
            name,
            &self.requests,
            &self.bytes,
            &self.active_tunnels,
            &self.budget_used,
        )
    }

    /// Record a finished request or tunnel of `agent` (`None`: a client that matched no
    /// agent).
    pub fn request_done(&self, agent: Option<&AgentMetrics>, d: &Done) {
        let agent = agent.unwrap_or(&self.unknown);
        agent.outcome(d.kind, d.decision, d.reason).inc();
        if d.bytes_up > 0 {
            agent.bytes(Direction::Up).inc_by(d.bytes_up);
        }
        if d.bytes_down > 0 {
            agent.bytes(Direction::Down).inc_by(d.bytes_down);
        }
        self.durations[kind_index(d.kind)].observe(d.elapsed.as_secs_f64());
    }

    /// A successful dial took `d`.
    pub fn upstream_connected(&self, d: Duration) {
        self.connect.observe(d.as_secs_f64());
    }

    /// A refusal before identification was dropped past its address's budget.
    pub fn refusal_dropped(&self, what: crate::budget::Dropped) {
        let fresh = || self.refusals_dropped.with_label_values(&[what.as_str()]);
        match self.dropped.get(what.index()) {
            Some(cell) => cell.get_or_init(fresh).inc(),
            // Unreachable: one cell per kind by construction.
            None => fresh().inc(),
        }
    }

    /// `listener` closed a new connection at its connection cap.
    pub fn connection_refused(&self, listener: crate::budget::Listener) {
        self.connections_refused
            .with_label_values(&[listener.as_str()])
            .inc();
    }

    /// A DNS lookup took `d`.
    pub fn dns_looked_up(&self, d: Duration) {
        self.dns.observe(d.as_secs_f64());
    }

    /// The HTTPS listener now serves a certificate that expires at `not_after` (Unix seconds).
    pub fn tls_cert_loaded(&self, not_after: i64) {
        self.tls_expiry
            .with_label_values::<&str>(&[])
            .set(not_after);
    }

    /// A request's call to the limit store ended with `result` after `took` (`None`: not
    /// made).
    pub fn store_request(&self, result: StoreResult, took: Option<Duration>) {
        self.store_requests[result as usize].inc();
        if let Some(d) = took {
            self.store_duration.observe(d.as_secs_f64());
        }
    }

    /// The limit store became unusable (`true`) or usable again.
    pub fn store_fallback(&self, on: bool) {
        self.store_fallback.set(i64::from(on));
    }

    /// An intercepted tunnel's TLS handshake with the agent completed (`ok`) or failed.
    pub fn intercepted(&self, ok: bool) {
        self.intercepted[usize::from(!ok)].inc();
    }

    /// A leaf certificate was minted; `cached` leaves are held now.
    pub fn leaf_minted(&self, cached: usize) {
        self.mints.inc();
        self.leaves_cached(cached);
    }

    /// `cached` leaves are held now (after a mint, or a CA rotation that emptied the cache).
    pub fn leaves_cached(&self, cached: usize) {
        self.cached.set(i64::try_from(cached).unwrap_or(i64::MAX));
    }

    /// An upstream TLS connection of an intercepted host failed.
    pub fn upstream_tls_failed(&self) {
        self.upstream_tls_failures.inc();
    }

    /// A reload finished.
    pub fn reloaded(&self, ok: bool) {
        self.reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    /// A request waited `d` for audit queue space.
    pub fn audit_waited(&self, d: Duration) {
        self.audit_wait.inc_by(d.as_secs_f64());
    }

    /// Update the audit writer's figures (sampled at scrape time).
    pub fn audit_state(&self, queued: usize, written: u64) {
        self.audit_queue
            .set(i64::try_from(queued).unwrap_or(i64::MAX));
        let seen = self.audit_lines.get();
        if written > seen {
            self.audit_lines.inc_by(written - seen);
        }
    }

    /// Delete the series of agents no longer in the config (their handle sets, dropped from
    /// the snapshot). A tunnel of theirs still open keeps its gauge (it must still count
    /// down); the rest goes.
    pub fn forget_agents<'a>(&self, gone: impl Iterator<Item = &'a AgentMetrics>) {
        for agent in gone {
            agent.forget();
        }
    }

    /// The Prometheus text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding gathered families into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// Which way payload bytes went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
}

fn kind_index(kind: Option<Kind>) -> usize {
    match kind {
        Some(Kind::Connect) => 0,
        Some(Kind::Http) => 1,
        None => 2,
    }
}

fn decision_index(decision: Decision) -> usize {
    match decision {
        Decision::Allow => 0,
        Decision::Deny => 1,
        Decision::WouldDeny => 2,
    }
}

// === impl AgentMetrics ===

impl AgentMetrics {
    fn new(
        agent: Arc<str>,
        requests: &IntCounterVec,
        bytes: &IntCounterVec,
        active_tunnels: &IntGaugeVec,
        budget_used: &GaugeVec,
    ) -> Self {
        AgentMetrics {
            agent,
            requests: requests.clone(),
            bytes: bytes.clone(),
            active_tunnels: active_tunnels.clone(),
            outcomes: (0..OUTCOMES).map(|_| OnceLock::new()).collect(),
            bytes_up: OnceLock::new(),
            bytes_down: OnceLock::new(),
            tunnels: OnceLock::new(),
            budget_used_vec: budget_used.clone(),
            budget_used: OnceLock::new(),
        }
    }

    /// `chokepoint_byte_budget_used_ratio{agent}`: the agent's most used budget is at `ratio`.
    pub fn byte_budget_used(&self, ratio: f64) {
        self.budget_used
            .get_or_init(|| self.budget_used_vec.with_label_values(&[&*self.agent]))
            .set(ratio);
    }

    /// The agent this set counts for.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// `chokepoint_requests_total{agent,kind,decision,reason}` for this agent.
    fn outcome(&self, kind: Option<Kind>, decision: Decision, reason: Reason) -> &IntCounter {
        let k = kind_index(kind);
        let d = decision_index(decision);
        let i = (k * DECISIONS.len() + d) * Reason::ALL.len() + usize::from(reason.code());
        let fresh = || {
            self.requests.with_label_values(&[
                &*self.agent,
                KINDS[k],
                decision.as_str(),
                reason.as_str(),
            ])
        };
        match self.outcomes.get(i) {
            Some(cell) => cell.get_or_init(fresh),
            // Unreachable: every index is in range by construction.
            None => self.outcomes[0].get_or_init(fresh),
        }
    }

    /// `chokepoint_bytes_total{agent,direction}` for this agent.
    fn bytes(&self, direction: Direction) -> &IntCounter {
        let (cell, label) = match direction {
            Direction::Up => (&self.bytes_up, "up"),
            Direction::Down => (&self.bytes_down, "down"),
        };
        cell.get_or_init(|| self.bytes.with_label_values(&[&*self.agent, label]))
    }

    /// A tunnel of this agent opened; `chokepoint_active_tunnels` goes down when the guard is
    /// dropped.
    pub fn tunnel_opened(&self) -> TunnelGuard {
        let g = self
            .tunnels
            .get_or_init(|| self.active_tunnels.with_label_values(&[&*self.agent]))
            .clone();
        g.inc();
        TunnelGuard(g)
    }

    /// Delete every series this set created (the gauge only when no tunnel is open).
    fn forget(&self) {
        let agent = &*self.agent;
        for (i, cell) in self.outcomes.iter().enumerate() {
            if cell.get().is_none() {
                continue;
            }
            let r = i % Reason::ALL.len();
            let kd = i / Reason::ALL.len();
            let (k, d) = (kd / DECISIONS.len(), kd % DECISIONS.len());
            if let Some(reason) = u8::try_from(r).ok().and_then(Reason::from_code) {
                let _ = self.requests.remove_label_values(&[
                    agent,
                    KINDS[k],
                    DECISIONS[d].as_str(),
                    reason.as_str(),
                ]);
            }
        }
        for (cell, dir) in [(&self.bytes_up, "up"), (&self.bytes_down, "down")] {
            if cell.get().is_some() {
                let _ = self.bytes.remove_label_values(&[agent, dir]);
            }
        }
        if self.tunnels.get().is_some_and(|g| g.get() == 0) {
            let _ = self.active_tunnels.remove_label_values(&[agent]);
        }
        if self.budget_used.get().is_some() {
            let _ = self.budget_used_vec.remove_label_values(&[agent]);
        }
    }
}

// === impl TunnelGuard ===

impl Drop for TunnelGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_render_with_bounded_labels() {
        let m = Metrics::new().unwrap();
        let coder = m.agent("coder".into());
        m.request_done(
            Some(&coder),
            &Done {
                kind: Some(Kind::Connect),
                decision: Decision::Allow,
                reason: Reason::Allowed,
                bytes_up: 10,
                bytes_down: 20,
                elapsed: Duration::from_millis(3),
            },
        );
        m.request_done(
            None,
            &Done {
                kind: None,
                decision: Decision::Deny,
                reason: Reason::UnknownAgent,
                bytes_up: 0,
                bytes_down: 0,
                elapsed: Duration::ZERO,
            },
        );
        let guard = coder.tunnel_opened();
        m.reloaded(false);
        let text = String::from_utf8(m.render()).unwrap();
        for line in [
            r#"chokepoint_requests_total{agent="coder",decision="allow",kind="connect",reason="allowed"} 1"#,
            r#"chokepoint_requests_total{agent="unknown",decision="deny",kind="reject",reason="unknown_agent"} 1"#,
            r#"chokepoint_bytes_total{agent="coder",direction="up"} 10"#,
            r#"chokepoint_bytes_total{agent="coder",direction="down"} 20"#,
            r#"chokepoint_active_tunnels{agent="coder"} 1"#,
            r#"chokepoint_config_reloads_total{result="error"} 1"#,
            r#"chokepoint_config_reloads_total{result="ok"} 0"#,
            r#"chokepoint_build_info{version=""#,
            "chokepoint_request_duration_seconds_bucket{kind=\"connect\",le=\"0.005\"} 1",
        ] {
            assert!(text.contains(line), "missing {line}\n{text}");
        }
        m.forget_agents([&coder].into_iter());
        let text = String::from_utf8(m.render()).unwrap();
        assert!(
            text.contains(r#"chokepoint_active_tunnels{agent="coder"} 1"#),
            "an open tunnel keeps its gauge"
        );
        assert!(!text.contains(r#"agent="coder",decision"#), "{text}");
        assert!(!text.contains(r#"chokepoint_bytes_total{agent="coder""#));
        drop(guard);
        m.forget_agents([&coder].into_iter());
        let text = String::from_utf8(m.render()).unwrap();
        assert!(!text.contains(r#"agent="coder""#), "{text}");
    }

    #[test]
    fn every_outcome_has_its_own_handle() {
        let m = Metrics::new().unwrap();
        let a = m.agent("a".into());
        for kind in [Some(Kind::Connect), Some(Kind::Http), None] {
            for decision in DECISIONS {
                for reason in Reason::ALL {
                    a.outcome(kind, decision, reason).inc();
                }
            }
        }
        let text = String::from_utf8(m.render()).unwrap();
        let series = text
            .lines()
            .filter(|l| l.starts_with("chokepoint_requests_total{") && l.ends_with(" 1"))
            .count();
        assert_eq!(series, OUTCOMES, "one series per kind, decision and reason");
    }
}
