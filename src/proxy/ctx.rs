//! The per-request context, and the guard that writes its audit line exactly once.
//!
//! [`RequestCtx`] is what every step fills in and what the audit line is made from. It lives
//! inside an [`Audited`] guard: the happy path calls [`Audited::finish`]; if the request's future
//! is dropped instead (client gone, task aborted at the end of the shutdown grace), `Drop` writes
//! the line, so no request leaves without a trace.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::Method;
use time::OffsetDateTime;
use tokio::sync::OwnedSemaphorePermit;

use crate::audit::{self, AuditRecord, AuditSink, SCHEMA_VERSION};
use crate::io::Meter;
use crate::limits::Permit;
use crate::metrics::{Done, Metrics};
use crate::outcome::{Decision, Deny, Reason};
use crate::policy::Mode;
use crate::target::{Kind, Target};

/// Everything known about one request or tunnel.
#[derive(Debug)]
pub struct RequestCtx {
    /// Time-sortable unique id.
    pub request_id: ulid::Ulid,
    /// Arrival, wall clock.
    pub arrived: OffsetDateTime,
    /// Arrival, monotonic.
    pub start: Instant,
    /// The client's address.
    pub client: SocketAddr,
    /// The HTTP method; `None` when the request head never parsed.
    pub method: Option<Method>,
    /// Tunnel or plain HTTP, once the target is parsed.
    pub kind: Option<Kind>,
    /// The normalised target, once parsed.
    pub target: Option<Target>,
    /// Plain HTTP: the path (no query), truncated.
    pub path: Option<Box<str>>,
    /// The identified agent.
    pub agent: Option<Arc<str>>,
    /// The agent's policy.
    pub policy: Option<Arc<str>>,
    /// The rule that admitted the target.
    pub rule: Option<Arc<str>>,
    /// The vetted address dialled.
    pub upstream: Option<SocketAddr>,
    /// The server name of a tunnel's TLS ClientHello (tunnels to `[sni] ports`).
    pub sni: Option<Box<str>>,
    /// The status sent to the client.
    pub status: Option<u16>,
    /// Allow or deny.
    pub decision: Decision,
    /// Why it ended as it did.
    pub reason: Reason,
    /// Bytes both ways, and the first cap passed.
    pub meter: Arc<Meter>,
    /// Enforce or report, from the agent's policy.
    pub mode: Mode,
    /// The agent's concurrency slot, held until the audit line is written.
    pub permit: Option<Permit>,
    /// The client connection's slot under `server.max_connections`, held as long as the request
    /// (a tunnel outlives the HTTP connection it came from).
    pub connection: Option<Arc<OwnedSemaphorePermit>>,
    /// The client connection's meter. A cut recorded on it (the connection was closed because
    /// nothing moved for `timeouts.idle`) is how a request dropped with the connection ended.
    pub client_conn: Option<Arc<Meter>>,
}

// === impl RequestCtx ===

impl RequestCtx {
    /// A fresh context for a request that just arrived.
    pub fn new(client: SocketAddr, method: Option<Method>) -> Self {
        RequestCtx {
            request_id: ulid::Ulid::new(),
            arrived: OffsetDateTime::now_utc(),
            start: Instant::now(),
            client,
            method,
            kind: None,
            target: None,
            path: None,
            agent: None,
            policy: None,
            rule: None,
            upstream: None,
            sni: None,
            status: None,
            decision: Decision::Allow,
            reason: Reason::Allowed,
            meter: Arc::new(Meter::default()),
            mode: Mode::Enforce,
            permit: None,
            connection: None,
            client_conn: None,
        }
    }

    /// Record how an allowed exchange ended (`idle_timeout`, `client_closed`, …). A refusal
    /// reason already recorded (report mode's would-be denial) is kept: it is the one that
    /// matters to the operator, and to `propose`.
    pub fn ended(&mut self, how: Reason) {
        if self.reason == Reason::Allowed {
            self.reason = how;
        }
    }

    /// Report mode: record the refusal that would have happened (the first one counts) and go on.
    ///
    /// An allowlist reason replaces a limit reason recorded before it: the allowlist is what a
    /// report-mode rollout evaluates, and what `propose` turns into rules.
    pub fn would_deny(&mut self, deny: &Deny) {
        let first = self.decision == Decision::Allow;
        let upgrade = self.decision == Decision::WouldDeny
            && !self.reason.is_allowlist()
            && deny.reason.is_allowlist();
        if first || upgrade {
            self.decision = Decision::WouldDeny;
            self.reason = deny.reason;
        }
    }

    /// Fold a cap passed while streaming (or a client failure) into the outcome.
    fn apply_cut(&mut self) {
        match self.meter.cut_reason() {
            Some(Reason::ClientClosed) if self.reason == Reason::Allowed => {
                self.reason = Reason::ClientClosed;
            }
            Some(Reason::ClientClosed) | None => {}
            // Report mode: the first would-be refusal is the one recorded.
            Some(r) if self.mode == Mode::Report && self.decision == Decision::Allow => {
                self.decision = Decision::WouldDeny;
                self.reason = r;
            }
            Some(_) if self.mode == Mode::Report => {}
            Some(r) => {
                self.decision = Decision::Deny;
                self.reason = r;
            }
        }
    }

    /// Record a refusal. The decision is `deny` for refusals the client caused (4xx); a fault on
    /// the way to an allowed destination (DNS, connect, upstream: 5xx) keeps the decision made so
    /// far (`allow`, or `would_deny` in report mode) with the fault as its reason.
    pub fn deny(&mut self, deny: &Deny) {
        // A policy refusal inside a tunnel (SNI) comes after the 200 and is still a deny.
        if deny.reason.status().is_client_error() || deny.reason.is_policy() {
            self.decision = Decision::Deny;
        }
        self.reason = deny.reason;
        self.status = Some(deny.reason.status().as_u16());
    }

    /// Render the audit line.
    pub fn audit_line(&self) -> String {
        let mut ts_buf = [0u8; 24];
        let far_off: String;
        let ts = match audit::timestamp(self.arrived, &mut ts_buf) {
            Some(ts) => ts,
            None => {
                // A year outside 0–9999: only a badly wrong clock gets here.
                let t = self.arrived;
                far_off = format!(
                    "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
                    t.year(),
                    u8::from(t.month()),
                    t.day(),
                    t.hour(),
                    t.minute(),
                    t.second(),
                    t.millisecond()
                );
                &far_off
            }
        };
        let mut id_buf = [0u8; ulid::ULID_LEN];
        let id: &str = self.request_id.array_to_str(&mut id_buf);
        let event = match self.kind {
            Some(k) => k.as_str(),
            None => "reject",
        };
        AuditRecord {
            v: SCHEMA_VERSION,
            ts,
            event,
            request_id: id,
            agent: self.agent.as_deref(),
            policy: self.policy.as_deref(),
            client: self.client,
            method: self.method.as_ref().map(Method::as_str),
            host: self.target.as_ref().map(|t| &t.host),
            port: self.target.as_ref().map(|t| t.port),
            path: self.path.as_deref().map(audit::truncate_path),
            decision: self.decision.as_str(),
            reason: self.reason.as_str(),
            rule: self.rule.as_deref(),
            mode: self.mode.as_str(),
            upstream: self.upstream,
            sni: self.sni.as_deref(),
            status: self.status,
            bytes_up: self.meter.up(),
            bytes_down: self.meter.down(),
            duration_ms: self.start.elapsed().as_millis() as u64,
        }
        .to_line()
    }
}

/// Where a finished request is recorded: the audit queue and the metrics.
#[derive(Clone, Debug)]
pub struct Recorder {
    /// The audit queue.
    pub sink: AuditSink,
    /// The metrics.
    pub metrics: Arc<Metrics>,
}

/// A context whose audit line (and metrics) are written exactly once: by [`Audited::finish`],
/// or on drop.
#[derive(Debug)]
pub struct Audited {
    ctx: Option<RequestCtx>,
    rec: Recorder,
}

// === impl Audited ===

impl Audited {
    /// Guard `ctx`; it is recorded through `rec`.
    pub fn new(ctx: RequestCtx, rec: Recorder) -> Self {
        Audited {
            ctx: Some(ctx),
            rec,
        }
    }

    /// The metrics (for gauges that live as long as the request, like open tunnels).
    pub fn metrics(&self) -> &Metrics {
        &self.rec.metrics
    }

    /// The context.
    pub fn ctx(&self) -> &RequestCtx {
        // Only `finish`/`finish_now`/`drop` take the context, and they consume `self`.
        self.ctx
            .as_ref()
            .unwrap_or_else(|| unreachable!("context taken before finish"))
    }

    /// The context, mutably.
    pub fn ctx_mut(&mut self) -> &mut RequestCtx {
        self.ctx
            .as_mut()
            .unwrap_or_else(|| unreachable!("context taken before finish"))
    }

    /// Write the line, waiting for queue space (backpressure). The context stays in the guard
    /// until a slot is reserved, so if this future is dropped while waiting, `Drop` still writes it.
    pub async fn finish(mut self) {
        let sink = self.rec.sink.clone();
        // Only a reservation that had to wait counts as audit wait (the writer fell behind).
        let permit = match sink.try_reserve() {
            Ok(p) => Ok(p),
            Err(_) => {
                let waiting = std::time::Instant::now();
                let p = sink.reserve().await;
                self.rec.metrics.audit_waited(waiting.elapsed());
                p
            }
        };
        if let Some(line) = self.take_line(None) {
            match permit {
                Ok(p) => p.send(line),
                Err(_) => audit::fallback(&line),
            }
        }
    }

    /// Finish now and hand the line to the caller, which queues it (a body that reserved a
    /// queue slot inside `poll_frame`).
    pub fn into_line(mut self) -> Option<String> {
        self.take_line(None)
    }

    /// A poll-based handle on the audit queue.
    pub fn poll_sender(&self) -> tokio_util::sync::PollSender<String> {
        self.rec.sink.poll_sender()
    }

    /// Write the line from a synchronous context (a body's `poll` or `Drop`). With a free queue
    /// slot it is queued at once; otherwise the whole guard, and with it the agent's concurrency
    /// permit, moves to a task that waits for a slot, so pending lines are bounded by the agents'
    /// `max_concurrent` and an agent whose lines cannot be written is held back.
    pub fn finish_now(mut self) {
        let sink = self.rec.sink.clone();
        match sink.try_reserve() {
            Ok(permit) => {
                if let Some(line) = self.take_line(None) {
                    permit.send(line);
                }
            }
            Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {
                match tokio::runtime::Handle::try_current() {
                    Ok(rt) => {
                        rt.spawn(self.finish());
                    }
                    Err(_) => self.finish_sync(None),
                }
            }
            Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => self.finish_sync(None),
        };
    }

    /// Finish once `upload_done` completes (the request body has been sent), in a task.
    pub fn finish_after(self, upload_done: tokio::sync::oneshot::Receiver<()>) {
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(async move {
                    let _ = upload_done.await;
                    self.finish().await;
                });
            }
            Err(_) => self.finish_now(),
        }
    }

    fn finish_sync(&mut self, cancelled: Option<Reason>) {
        if let Some(line) = self.take_line(cancelled) {
            self.rec.sink.send_now(line);
        }
    }

    /// The one way a context ends: take it (so it ends once), fold in a cap passed while
    /// streaming and, for an exchange cut short, how it ended; record the metrics; render the
    /// line. `None` if it has ended already.
    fn take_line(&mut self, cancelled: Option<Reason>) -> Option<String> {
        let mut ctx = self.ctx.take()?;
        ctx.apply_cut();
        if let Some(reason) = cancelled {
            ctx.ended(reason);
        }
        record(&ctx, &self.rec.metrics);
        Some(ctx.audit_line())
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        // Dropped before finishing: the client went away, the gateway closed its connection
        // (recorded on the connection's meter), or the task was aborted.
        let how = self
            .ctx
            .as_ref()
            .and_then(|c| c.client_conn.as_ref())
            .and_then(|m| m.cut_reason())
            .unwrap_or(Reason::ClientClosed);
        self.finish_sync(Some(how));
    }
}

fn record(ctx: &RequestCtx, metrics: &Metrics) {
    metrics.request_done(&Done {
        agent: ctx.agent.as_deref(),
        kind: ctx.kind.map_or("reject", |k| k.as_str()),
        decision: ctx.decision.as_str(),
        reason: ctx.reason.as_str(),
        bytes_up: ctx.meter.up(),
        bytes_down: ctx.meter.down(),
        elapsed: ctx.start.elapsed(),
    });
    tracing::debug!(
        request_id = %ctx.request_id,
        decision = ctx.decision.as_str(),
        reason = ctx.reason.as_str(),
        "request done"
    );
}
