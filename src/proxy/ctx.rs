//! The per-request context, and the guard that writes its audit line exactly once.
//!
//! [`RequestCtx`] is what every step fills in and what the audit line is made from. It lives
//! inside an [`Audited`] guard: the happy path calls [`Audited::finish`]; if the request's future
//! is dropped instead (client gone, task aborted at the end of the shutdown grace), `Drop` writes
//! the line, so no request leaves without a trace.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{Method, StatusCode};
use time::OffsetDateTime;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::PollSender;

use crate::audit::{self, AuditRecord, AuditSink, SCHEMA_VERSION};
use crate::io::Meter;
use crate::limits::budget::Flusher;
use crate::limits::Permit;
use crate::metrics::{AgentMetrics, Done, Metrics};
use crate::outcome::{Deny, Outcome, Reason, Verdict};
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
    /// The agent's metric handles (from the snapshot), once identified.
    pub agent_metrics: Option<Arc<AgentMetrics>>,
    /// The agent's policy.
    pub policy: Option<Arc<str>>,
    /// The rule that admitted the target.
    pub rule: Option<Arc<str>>,
    /// The vetted address dialled.
    pub upstream: Option<SocketAddr>,
    /// The server name of a tunnel's TLS ClientHello (tunnels to `[sni] ports`).
    pub sni: Option<Box<str>>,
    /// For a refusal whose response withholds its cause (`Reason::withholds_detail`): the
    /// cause, for the audit line only.
    pub detail: Option<Box<str>>,
    /// An intercepted tunnel, or a request inside one.
    pub intercepted: bool,
    /// The name of the credential injected into an intercepted request.
    pub credential: Option<std::sync::Arc<str>>,
    /// Decision, reason and the status sent: changed only through [`Outcome`]'s methods.
    pub outcome: Outcome,
    /// Bytes both ways, and the first cap passed.
    pub meter: Arc<Meter>,
    /// Enforce or report, from the agent's policy.
    pub mode: Mode,
    /// The agent's concurrency slot, held until the audit line is written.
    pub permit: Option<Permit>,
    /// Counts this request's bytes against the agent's byte budgets (agents with one only);
    /// dropped with the context, which adds the last bytes.
    pub budget: Option<Flusher>,
    /// The client connection's slot under `server.max_connections`, held as long as the request
    /// (a tunnel outlives the HTTP connection it came from).
    pub connection: Option<Arc<OwnedSemaphorePermit>>,
    /// The client connection's meter. A cut recorded on it (the connection was closed because
    /// nothing moved for `timeouts.idle`) is how a request dropped with the connection ended.
    pub client_conn: Option<Arc<Meter>>,
}

// === impl RequestCtx ===

impl RequestCtx {
    /// A fresh context for a request that just arrived. A method longer than
    /// `target::MAX_METHOD_BYTES` is recorded cut to that length (the request is refused).
    pub fn new(client: SocketAddr, method: Option<Method>) -> Self {
        // One reading of the wall clock for the id's time part and the line's `ts`.
        let now = std::time::SystemTime::now();
        RequestCtx {
            request_id: ulid::Ulid::from_datetime(now),
            arrived: OffsetDateTime::from(now),
            start: Instant::now(),
            client,
            method: method.and_then(crate::target::recorded_method),
            kind: None,
            target: None,
            path: None,
            agent: None,
            agent_metrics: None,
            policy: None,
            rule: None,
            upstream: None,
            sni: None,
            detail: None,
            intercepted: false,
            credential: None,
            outcome: Outcome::ALLOWED,
            meter: Arc::new(Meter::default()),
            mode: Mode::Enforce,
            permit: None,
            budget: None,
            connection: None,
            client_conn: None,
        }
    }

    /// A request refused before it was tied to an agent (a head hyper could not parse, a
    /// failed TLS handshake), arrived now; `answered` is the status hyper sent, if any.
    pub fn rejected(client: SocketAddr, reason: Reason, answered: Option<StatusCode>) -> Self {
        RequestCtx::new(client, None).reject(reason, answered)
    }

    /// This context (made when the connection arrived, so its duration counts from then),
    /// refused before it was tied to an agent.
    pub fn reject(mut self, reason: Reason, answered: Option<StatusCode>) -> Self {
        self.outcome = Outcome::refused(reason);
        if let Some(status) = answered {
            self.outcome.answered(status);
        }
        self
    }

    /// Fold a refusal in under the policy's mode ([`Outcome::refuse`], the one report-mode
    /// rule): `Ok` when report mode records it and lets the request go on, else the refusal,
    /// for the caller to end the request with.
    pub fn judge(&mut self, deny: Deny) -> Result<(), Deny> {
        match self.outcome.refuse(self.mode, deny.reason) {
            Verdict::Report => Ok(()),
            Verdict::Refuse => Err(deny),
        }
    }

    /// Fold a cap passed while streaming (or a client failure) into the outcome.
    fn apply_cut(&mut self) {
        match self.meter.cut_reason() {
            None => {}
            Some(Reason::ClientClosed) => self.outcome.ended(Reason::ClientClosed),
            Some(cap) => {
                self.outcome.refuse(self.mode, cap);
            }
        }
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
            decision: self.outcome.decision().as_str(),
            reason: self.outcome.reason().as_str(),
            rule: self.rule.as_deref(),
            mode: self.mode.as_str(),
            upstream: self.upstream,
            sni: self.sni.as_deref(),
            intercepted: self.intercepted,
            credential: self.credential.as_deref(),
            status: self.outcome.status(),
            bytes_up: self.meter.up(),
            bytes_down: self.meter.down(),
            duration_ms: self.start.elapsed().as_millis() as u64,
            detail: self.detail.as_deref().map(audit::truncate_detail),
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

    /// End the request without an audit line or request metrics: a refusal dropped past its
    /// client address's budget, which the budget counts instead (`budget::Budget::spend`).
    pub fn discard(mut self) {
        self.ctx = None;
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

    /// End the request: the future that writes its line, waiting for queue space
    /// (backpressure). The context stays in the guard until a slot is reserved, so if the
    /// future is dropped while waiting, `Drop` still writes it. Bodies poll it inside
    /// `poll_frame`; everything else awaits it.
    pub fn finish(self) -> Finish {
        Finish {
            audited: Some(self),
            slot: None,
            waiting: None,
        }
    }

    /// End the request from a synchronous context (a body's `Drop`). With a free queue slot
    /// the line is queued at once; otherwise the whole guard, and with it the agent's
    /// concurrency permit, moves to a task that waits for a slot, so pending lines are bounded
    /// by the agents' `max_concurrent` and an agent whose lines cannot be written is held back.
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
        match cancelled {
            // The gateway closed the connection because the request no longer holds.
            Some(Reason::Revoked) => {
                ctx.outcome.refuse(ctx.mode, Reason::Revoked);
            }
            Some(reason) => ctx.outcome.ended(reason),
            None => {}
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

pin_project_lite::pin_project! {
    /// [`Audited::finish`]: queues the line once the audit queue has room.
    #[derive(Debug)]
    #[must_use = "the line is written when the future completes (or, dropped, by the guard)"]
    pub struct Finish {
        audited: Option<Audited>,
        // Made only when the queue was full at the first poll (a `PollSender` allocates).
        slot: Option<PollSender<String>>,
        waiting: Option<Instant>,
    }
}

// === impl Finish ===

impl Finish {
    /// The guard, if the line has not been written yet (a body dropped while its line waited:
    /// it is finished another way).
    pub fn into_inner(self) -> Option<Audited> {
        self.audited
    }
}

impl Future for Finish {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.project();
        let Some(audited) = this.audited.as_mut() else {
            return Poll::Ready(());
        };
        if this.slot.is_none() {
            let sink = audited.rec.sink.clone();
            match sink.try_reserve() {
                Ok(permit) => {
                    if let Some(line) = audited.take_line(None) {
                        permit.send(line);
                    }
                    *this.audited = None;
                    return Poll::Ready(());
                }
                Err(tokio::sync::mpsc::error::TrySendError::Full(())) => {
                    *this.slot = Some(sink.poll_sender());
                    *this.waiting = Some(Instant::now());
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(())) => {
                    audited.finish_sync(None);
                    *this.audited = None;
                    return Poll::Ready(());
                }
            };
        }
        let Some(slot) = this.slot.as_mut() else {
            return Poll::Ready(());
        };
        let reserved = ready!(slot.poll_reserve(cx));
        // Only a reservation that had to wait counts as audit wait (the writer fell behind).
        if let Some(since) = this.waiting.take() {
            audited.rec.metrics.audit_waited(since.elapsed());
        }
        if let Some(line) = audited.take_line(None) {
            match reserved {
                Ok(()) => {
                    if let Err(e) = slot.send_item(line) {
                        // Closed between the reservation and the send: nothing else to try.
                        tracing::error!(error = %e, "audit queue closed with a slot reserved");
                    }
                }
                Err(_) => audit::fallback(&line),
            }
        }
        *this.audited = None;
        Poll::Ready(())
    }
}

fn record(ctx: &RequestCtx, metrics: &Metrics) {
    metrics.request_done(
        ctx.agent_metrics.as_deref(),
        &Done {
            kind: ctx.kind,
            decision: ctx.outcome.decision(),
            reason: ctx.outcome.reason(),
            bytes_up: ctx.meter.up(),
            bytes_down: ctx.meter.down(),
            elapsed: ctx.start.elapsed(),
        },
    );
    tracing::debug!(
        request_id = %ctx.request_id,
        decision = ctx.outcome.decision().as_str(),
        reason = ctx.outcome.reason().as_str(),
        "request done"
    );
}
