//! The proxy: accept loop, one hyper HTTP/1.1 server per client connection, and the request
//! driver that runs the pipeline steps in order.
//!
//! Lifecycle of one request: `handle` makes a [`RequestCtx`] inside an [`Audited`] guard, runs
//! `steps` (parse → identify → limits → policy → sizes → resolve → vet → dial), then either hands the upstream
//! socket to `tunnel` (CONNECT) or `forward` (plain HTTP), or turns the [`Deny`] into a response
//! with `respond::render`. The audit line is written exactly once by the guard, whichever way the
//! request ends.

pub mod ctx;
pub mod forward;
pub mod hello;
pub mod intercept;
pub mod pool;
pub mod respond;
pub mod revoke;
pub mod tunnel;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::AuditSink;
use crate::budget::{Allowance, Budget, Dropped, Listener, Refused};
use crate::config::Config;
use crate::connect;
use crate::identity::PeerCert;
use crate::io::{Cap, Direction, Meter, Metered};
use crate::limits::{budget, Limits};
use crate::metrics::Metrics;
use crate::outcome::{Deny, Reason, MAX_DETAIL_BYTES};
use crate::policy::Mode;
use crate::reload::{Live, Snapshot};
use crate::target::{self, Kind};
use ctx::{Audited, Recorder, RequestCtx};
use forward::ForwardBody;
use revoke::{Grant, Granted};

/// The response body type of every proxy response.
pub type ProxyBody = Either<Full<Bytes>, ForwardBody>;

/// Largest request head any config may allow (`max_request_header_bytes` is checked per agent).
pub const MAX_HEAD_BYTES: usize = 256 * 1024;

/// Most header fields in a request head (hyper's `max_headers`): beyond it hyper answers 431,
/// audited as `header_too_large`. This is hyper's own default, set explicitly so the bound is
/// ours and documented. hyper parses into an array of this many slots kept on the stack up to
/// 100 (its inline capacity); a larger value would cost a heap allocation per request.
pub const MAX_HEADERS: usize = 100;

/// What hyper serves on a client connection of the proxy listener. A tunnel downcasts hyper's
/// upgraded connection to this type to take the raw socket back (`tunnel::Client::take`).
type ServerIo = TokioIo<Metered<TcpStream>>;

/// hyper's smallest read buffer.
const MIN_BUF_BYTES: usize = 8 * 1024;

/// hyper's message for a request target over its URI limit, which it answers with 414.
const HYPER_URI_TOO_LONG: &str = "URI too long";

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What every connection and request shares.
pub struct Shared {
    /// The live configuration; each request loads one snapshot and keeps it.
    pub live: Arc<Live>,
    /// Where audit lines go.
    pub audit: AuditSink,
    /// The metrics.
    pub metrics: Arc<Metrics>,
    /// True while the listener accepts and the gateway is not draining (`/readyz`).
    pub ready: AtomicBool,
    /// Every connection, tunnel and upstream task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Set when shutdown starts: stop accepting, finish in-flight requests.
    pub draining: CancellationToken,
    /// Set when the grace period is over: end everything still open.
    pub abort: CancellationToken,
    /// Idle upstream connections of plain-HTTP forwarding.
    pub pool: Arc<pool::Pool>,
    /// Each client address's budget of refusals before identification.
    pub budget: Budget,
    /// Connections refused at a connection cap, for the next summary.
    pub refused: Refused,
    /// Idle upstream TLS connections of intercepted tunnels (never mixed with `pool`: a plain
    /// connection must not carry an intercepted request, nor the reverse).
    pub intercept_pool: Arc<pool::Pool>,
    timer: TokioTimer,
}

/// A request dropped past its client address's refusal budget: the service fails with it, so
/// hyper closes the connection without an answer (and nothing is audited but the summary).
#[derive(Debug, thiserror::Error)]
#[error("request dropped: the client address is past its refusal budget")]
pub struct OverBudget;

// === impl Shared ===

impl Shared {
    /// Bundle what the proxy needs.
    pub fn new(live: Arc<Live>, audit: AuditSink, metrics: Arc<Metrics>) -> Self {
        Shared {
            live,
            audit,
            metrics,
            ready: AtomicBool::new(false),
            tracker: TaskTracker::new(),
            draining: CancellationToken::new(),
            abort: CancellationToken::new(),
            pool: Arc::new(pool::Pool::new()),
            budget: Budget::new(),
            refused: Refused::default(),
            intercept_pool: Arc::new(pool::Pool::new()),
            timer: TokioTimer::new(),
        }
    }

    /// Charge a refusal that happened before any agent was charged (so no agent's rate paid
    /// for it) to the client address's budget. `true`: answer and audit it as usual. `false`:
    /// the address is past its budget; the drop is counted (metric, next summary) and the
    /// caller closes the connection without an answer or an audit line.
    pub fn charge_refusal(&self, client: IpAddr, reason: Reason, allowance: Allowance) -> bool {
        if self.budget.spend(client, reason, allowance) {
            return true;
        }
        self.metrics.refusal_dropped(Dropped::Refusal(reason));
        false
    }

    /// Where finished requests are recorded.
    pub fn recorder(&self) -> Recorder {
        Recorder {
            sink: self.audit.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The HTTP/1.1 server settings for a new connection under `config`.
    pub(crate) fn http(&self, config: &Config) -> http1::Builder {
        let mut http = http1::Builder::new();
        // Without a timer hyper silently skips the header timeout (and panics on a configured one).
        // The read buffer bounds the request head: the largest any policy allows, plus room for
        // the pipelined bytes that may follow it.
        let head = usize::try_from(config.max_header_bytes()).unwrap_or(MAX_HEAD_BYTES);
        http.timer(self.timer.clone())
            .header_read_timeout(config.timeouts.request_header)
            .max_buf_size(head.max(MIN_BUF_BYTES) + MIN_BUF_BYTES)
            .max_headers(MAX_HEADERS)
            .keep_alive(true);
        http
    }
}

/// Which protocol a listener speaks to its clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP/1.1 (`server.listen`).
    Plain,
    /// HTTP/1.1 inside TLS (`server.tls_listen`): an HTTPS proxy.
    Tls,
}

/// Accept connections until `draining` is set, serving each on its own task.
///
/// `slots` holds `max_connections` permits shared by every listener: beyond them a new
/// connection is closed as soon as it is accepted, so a flood cannot starve the ones open.
/// Such connections are counted (metric, and the next `dropped` summary line); only the first
/// of each summary interval is logged.
pub async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
    transport: Transport,
) {
    let max_connections = slots.available_permits();
    let which = match transport {
        Transport::Plain => Listener::Proxy,
        Transport::Tls => Listener::Tls,
    };
    shared.ready.store(true, Relaxed);
    loop {
        let accepted = tokio::select! {
            () = shared.draining.cancelled() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    shared.metrics.connection_refused(which);
                    if shared.refused.add(which) {
                        tracing::warn!(client = %peer, max_connections, listener = which.as_str(), "connection limit reached; closing new connections (counted in the next dropped summary)");
                    }
                    drop(stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn_shared = shared.clone();
                let slot = Arc::new(slot);
                match transport {
                    Transport::Plain => {
                        shared
                            .tracker
                            .spawn(serve_conn(stream, peer, conn_shared, slot, None))
                    }
                    Transport::Tls => {
                        shared
                            .tracker
                            .spawn(serve_tls(stream, peer, conn_shared, slot))
                    }
                };
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// Complete the TLS handshake of an HTTPS-listener client (bounded by
/// `timeouts.request_header`), then serve it like a plain one, with its client certificate's
/// identity. A failed handshake is audited as `tls_handshake_failed`, unless the client just
/// went away.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Arc<OwnedSemaphorePermit>,
) {
    let snap = shared.live.load();
    let Some(tls) = snap.tls.clone() else {
        tracing::warn!(client = %peer, "server.tls_listen was removed from the config; restart to close the listener");
        return;
    };
    let bound = snap.config.timeouts.request_header;
    let allowance = snap.config.refusal_budget;
    drop(snap);
    // Made now, so a refused handshake's line says how long it took.
    let ctx = RequestCtx::new(peer, None);
    let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
    let handshake = tokio::select! {
        r = tokio::time::timeout(bound, acceptor.accept(stream)) => r,
        () = shared.draining.cancelled() => return,
    };
    let failure = match handshake {
        Ok(Ok(stream)) => {
            let cert = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(crate::tls::peer_cert)
                .map(Arc::new);
            return serve_conn(stream, peer, shared, slot, cert).await;
        }
        Ok(Err(e)) if is_gone(&e) => {
            tracing::debug!(client = %peer, error = %e, "TLS client left during the handshake");
            return;
        }
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no TLS handshake within {bound:?}"),
    };
    if !shared.charge_refusal(peer.ip(), Reason::TlsHandshakeFailed, allowance) {
        return;
    }
    // Bounded like every refusal detail: the log must not carry whatever a client can make
    // the TLS library quote.
    let failure = &failure[..crate::outcome::floor_char_boundary(&failure, MAX_DETAIL_BYTES)];
    tracing::info!(client = %peer, error = %failure, "TLS handshake refused");
    let ctx = ctx.reject(Reason::TlsHandshakeFailed, None);
    Audited::new(ctx, shared.recorder()).finish().await;
}

/// The wall clock in Unix seconds (0 before 1970: only a badly wrong clock gets there, and
/// then no certificate is within its validity).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// True for the I/O errors of a client that closed or reset the connection.
fn is_gone(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionReset, UnexpectedEof};
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted
    )
}

/// Serve one client connection: keep-alive requests, then maybe an upgrade to a tunnel.
///
/// `slot` is the connection's place under `max_connections`; every request holds a clone, so a
/// tunnel that outlives the HTTP exchange keeps the slot until it closes. `cert` is the
/// verified client certificate of a TLS connection.
async fn serve_conn<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: Arc<OwnedSemaphorePermit>,
    cert: Option<Arc<PeerCert>>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let received = Arc::new(Meter::default());
    let requests = Arc::new(AtomicU64::new(0));
    let granted = Arc::new(Granted::default());
    let io = TokioIo::new(Metered::new(stream, received.clone(), Direction::Up));
    let svc_shared = shared.clone();
    let svc_requests = requests.clone();
    let svc_received = received.clone();
    let svc_granted = granted.clone();
    let svc = service_fn(move |req| {
        svc_requests.fetch_add(1, Relaxed);
        let conn = Conn {
            peer,
            slot: slot.clone(),
            received: svc_received.clone(),
            cert: cert.clone(),
            granted: svc_granted.clone(),
        };
        handle(req, svc_shared.clone(), conn)
    });
    let mut changes = shared.live.subscribe();
    let snap = shared.live.load();
    let idle = snap.config.timeouts.idle;
    let conn = shared
        .http(&snap.config)
        .serve_connection(io, svc)
        .with_upgrades();
    drop(snap);
    tokio::pin!(conn);
    let result = loop {
        break tokio::select! {
            r = conn.as_mut() => r,
            // hyper bounds reading a request head, but not a client that stops reading our
            // responses, nor an exchange where neither side moves: close such connections.
            () = received.idle_for(idle) => {
                tracing::debug!(client = %peer, "client connection idle; closed");
                // An exchange still in flight (a response the client stopped reading) ends
                // with the connection: audited as idle_timeout, not as the client leaving.
                received.cut(Reason::IdleTimeout);
                Ok(())
            }
            Ok(()) = changes.changed() => {
                match granted.recheck(&shared.live.load(), unix_now()) {
                    Ok(()) => continue,
                    Err(deny) => {
                        tracing::info!(client = %peer, detail = %deny.detail, "client connection revoked; closed");
                        // A request in flight is audited `revoked` as it is dropped.
                        received.cut(Reason::Revoked);
                        Ok(())
                    }
                }
            }
            () = shared.draining.cancelled() => {
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    () = shared.abort.cancelled() => Ok(()),
                }
            }
        };
    };
    if let Err(e) = result {
        let first_head = requests.load(Relaxed) == 0 && received.up() > 0;
        match broken_head(&e, first_head) {
            Some((reason, status)) => {
                audit_broken_head(reason, status, peer, &shared).await;
            }
            None => {
                tracing::debug!(client = %peer, error = %e, "client connection ended with an error");
            }
        }
    }
}

/// Which connection errors are refused request heads worth an audit line. A head that does not
/// parse is always one. A head cut short (timeout, EOF) is one only on a connection that sent
/// bytes but never completed a request: on a keep-alive connection after a request, the same
/// error is just the client going quiet.
fn broken_head(e: &hyper::Error, first_head: bool) -> Option<(Reason, Option<StatusCode>)> {
    if e.is_parse_too_large() {
        // hyper answers a request target over its own URI limit (65,534 bytes) with 414 and
        // any other head too large with 431; the audit line records the one it sent. hyper has
        // no predicate for the URI case, only its message (pinned by tests/abuse.rs).
        let status = if e.to_string() == HYPER_URI_TOO_LONG {
            StatusCode::URI_TOO_LONG
        } else {
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        };
        Some((Reason::HeaderTooLarge, Some(status)))
    } else if e.is_parse() {
        Some((Reason::MalformedRequest, Some(StatusCode::BAD_REQUEST)))
    } else if first_head && e.is_timeout() {
        Some((Reason::HeaderTimeout, None))
    } else if first_head && e.is_incomplete_message() {
        Some((Reason::ClientClosed, None))
    } else {
        None
    }
}

/// Audit a refused request head, if its client address's budget pays for the line.
async fn audit_broken_head(
    reason: Reason,
    status: Option<StatusCode>,
    peer: SocketAddr,
    shared: &Shared,
) {
    let allowance = shared.live.load().config.refusal_budget;
    if !shared.charge_refusal(peer.ip(), reason, allowance) {
        return;
    }
    tracing::info!(client = %peer, reason = reason.as_str(), "request head refused");
    let ctx = RequestCtx::rejected(peer, reason, status);
    Audited::new(ctx, shared.recorder()).finish().await;
}

/// What [`steps`] hands over when a request may proceed.
struct Admitted {
    upstream: Upstream,
    limits: Limits,
    /// CONNECT to a TLS port: the ClientHello check the tunnel runs first.
    sni: Option<tunnel::SniCheck>,
    /// When the client certificate that identified the agent expires.
    identity_ends: Option<tokio::time::Instant>,
    /// What admitted the request, to check again when the config or a token changes.
    grant: Grant,
    /// CONNECT to a host the agent's policy intercepts: the vetted address dialled.
    intercept: Option<crate::vet::VettedAddr>,
}

/// Where an admitted request goes next.
enum Upstream {
    /// CONNECT: the dialled socket.
    Tunnel(TcpStream),
    /// Plain HTTP: the vetted route; `forward` takes a pooled connection or dials.
    Http(forward::Route),
}

/// What a request knows of the client connection it came on.
struct Conn {
    peer: SocketAddr,
    /// The connection's place under `max_connections`.
    slot: Arc<OwnedSemaphorePermit>,
    /// The connection's meter (see [`RequestCtx::client_conn`]).
    received: Arc<Meter>,
    /// The verified client certificate of a TLS connection.
    cert: Option<Arc<PeerCert>>,
    /// Where an admitted plain-HTTP request leaves its grant for the connection to check again.
    granted: Arc<Granted>,
}

/// Run the pipeline for one request and produce its response. [`OverBudget`] when the request
/// is dropped past its client address's refusal budget: hyper then closes the connection.
async fn handle(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    conn: Conn,
) -> Result<Response<ProxyBody>, OverBudget> {
    // Before the load: a change after it is seen (see `revoke`).
    let changes = shared.live.subscribe();
    let snap = shared.live.load();
    let allowance = snap.config.refusal_budget;
    let peer = conn.peer;
    // An address past its budget learns nothing about credentials: they are not checked, so
    // token guessing goes no faster than the budget, whatever the guesser sends.
    if req
        .headers()
        .contains_key(http::header::PROXY_AUTHORIZATION)
        && !shared.budget.may_check_credentials(peer.ip(), allowance)
    {
        shared
            .metrics
            .refusal_dropped(Dropped::CredentialsUnchecked);
        return Err(OverBudget);
    }
    let mut ctx = RequestCtx::new(peer, Some(req.method().clone()));
    ctx.connection = Some(conn.slot);
    ctx.client_conn = Some(conn.received);
    let mut audited = Audited::new(ctx, shared.recorder());
    let steps = steps(
        &req,
        audited.ctx_mut(),
        &snap,
        &shared.metrics,
        conn.cert.as_ref(),
    );
    let admitted = match steps.await {
        Ok(ok) => ok,
        // Refused before an agent was identified (and charged its rate): the address pays.
        Err(deny)
            if audited.ctx().agent.is_none()
                && !shared.charge_refusal(peer.ip(), deny.reason, allowance) =>
        {
            audited.discard();
            return Err(OverBudget);
        }
        Err(deny) => return Ok(refuse(audited, &deny, req.uri()).await),
    };
    let timeouts = snap.config.timeouts;
    drop(snap);
    let grant = admitted.grant;
    let enforce = audited.ctx().mode == Mode::Enforce;
    match admitted.upstream {
        Upstream::Tunnel(upstream) => {
            let watch = revoke::Watch {
                live: shared.live.clone(),
                changes,
                grant,
            };
            audited.ctx_mut().outcome.answered(StatusCode::OK);
            let on_upgrade = hyper::upgrade::on(&mut req);
            let upload = Cap {
                max: admitted.limits.max_tunnel_upload_bytes,
                enforce,
                reason: Reason::UploadCap,
            };
            let intercept = admitted.intercept.and_then(|peer| {
                let ctx = audited.ctx();
                Some(intercept::Session {
                    shared: shared.clone(),
                    agent: ctx.agent.clone()?,
                    target: ctx.target.clone()?,
                    peer,
                    client: conn.peer,
                    handshake: timeouts.request_header,
                })
            });
            shared.tracker.spawn(tunnel::run(
                on_upgrade,
                upstream,
                audited,
                upload,
                admitted.sni,
                admitted.identity_ends,
                watch,
                timeouts.idle,
                shared.abort.clone(),
                intercept,
            ));
            Ok(Response::new(Either::Left(Full::new(Bytes::new()))))
        }
        Upstream::Http(route) => {
            let uri = req.uri().clone();
            conn.granted.set(grant);
            // A change since this request's snapshot was loaded: the connection may have
            // checked its grant before it was set, so check it here.
            if changes.has_changed().unwrap_or(false) {
                if let Err(deny) = conn.granted.recheck(&shared.live.load(), unix_now()) {
                    return Ok(refuse(audited, &deny, &uri).await);
                }
            }
            let caps = forward::Caps::new(&admitted.limits, enforce);
            let sent = forward::send(req, &route, audited.ctx_mut(), caps, &shared).await;
            match sent {
                Ok(forward::Sent {
                    response,
                    request_done,
                    lease,
                }) => Ok(ForwardBody::respond(
                    response,
                    audited,
                    caps.response,
                    request_done,
                    lease,
                )),
                Err(deny) => Ok(refuse(audited, &deny, &uri).await),
            }
        }
    }
}

/// The pipeline up to a connected upstream socket (CONNECT) or a vetted route (plain HTTP, which
/// `forward` sends on a pooled or new connection). Every `?` is a refusal; in report mode the
/// allowlist and limit refusals are recorded as `would_deny` and the request goes on.
async fn steps(
    req: &Request<Incoming>,
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    metrics: &Metrics,
    cert: Option<&Arc<PeerCert>>,
) -> Result<Admitted, Deny> {
    let cfg = &snap.config;
    let (kind, target) = target::parse(req.method(), req.uri())?;
    ctx.kind = Some(kind);
    ctx.target = Some(target.clone());
    match kind {
        Kind::Http => {
            ctx.path = Some(crate::audit::truncate_path(req.uri().path()).into());
            let authority = req.uri().authority().map_or("", |a| a.as_str());
            target::check_host(req.headers(), &target, authority)?;
            target::check_framing(req.headers())?;
        }
        Kind::Connect => target::check_connect(req.version(), req.headers())?,
    }
    let now = unix_now();
    let agent_id = cfg.agents.identify(
        &snap.tokens,
        ctx.client,
        req.headers(),
        cert.map(|c| &**c),
        now,
    )?;
    let agent = cfg.agents.get(agent_id);
    // An identity from a certificate ends at its notAfter (inclusive, to the second): a
    // tunnel still open then is closed.
    let identity_ends = match (&agent.cert, cert) {
        (Some(_), Some(c)) => {
            let left = u64::try_from(c.valid.end().saturating_sub(now)).unwrap_or(0);
            Some(tokio::time::Instant::now() + Duration::from_secs(left.saturating_add(1)))
        }
        _ => None,
    };
    let policy = cfg.policy_of(agent);
    ctx.agent = Some(agent.name.clone());
    ctx.agent_metrics = Some(snap.agent_metrics(agent_id).clone());
    ctx.policy = Some(policy.name.clone());
    ctx.mode = policy.mode;
    // Limits first: every request of an agent spends its budget, so a flood of refused requests
    // is throttled too (and cannot flood the audit log at line rate).
    let limits = policy.limits;
    let gate = snap.gate(agent_id);
    let (permit, over) = match &snap.cluster {
        None => gate.admit(limits.max_concurrent),
        // Boxed: the in-process path keeps its future as small as it was.
        Some(c) => {
            let report = ctx.mode == Mode::Report;
            Box::pin(c.admit(agent_id.0, gate, &limits, report)).await
        }
    };
    ctx.permit = Some(permit);
    if let Some(deny) = over {
        ctx.judge(deny)?;
    }
    if limits.budgets.any() {
        admit_budget(ctx, snap, agent_id, &limits)?;
    }
    match policy.check(kind, &target) {
        Ok(rule) => ctx.rule = Some(rule.text.clone()),
        Err(deny) => {
            // The audit line names the deny rule that refused (found again: refusals are the
            // cold path, and the allow path stays free of it).
            if deny.reason == Reason::HostDenied {
                ctx.rule = policy
                    .denied_by(&target)
                    .map(|hit| hit.rule.to_string().into());
            }
            ctx.judge(deny)?
        }
    }
    if kind == Kind::Http {
        // The method/path rules of an intercepted host hold for its plain HTTP too.
        intercept::check_plain(policy, &target, req).or_else(|deny| ctx.judge(deny))?;
    }
    check_sizes(req, &limits).or_else(|deny| ctx.judge(deny))?;
    let lookup = Instant::now();
    let resolved = snap.resolver.resolve(&target.host).await;
    // Failed and timed-out lookups too (every error is DNS's): they are the ones an operator
    // looks for. Static hosts and IP literals are not lookups.
    if resolved.as_ref().map_or(true, |a| a.from_dns) {
        metrics.dns_looked_up(lookup.elapsed());
    }
    let addrs = resolved?.addrs;
    let vetted = cfg.vetter.vet(&addrs, target.port, &policy.allow_cidrs)?;
    let mut intercept = None;
    let upstream = match kind {
        // The pool is asked only now, with this request's own vetted addresses.
        Kind::Http => Upstream::Http(forward::Route {
            agent: agent.name.clone(),
            target: target.clone(),
            vetted,
            connect_timeout: cfg.timeouts.connect,
            idle: cfg.timeouts.idle,
        }),
        Kind::Connect => {
            let (upstream, addr) = connect::dial(&vetted, cfg.timeouts.connect, metrics).await?;
            ctx.upstream = Some(addr.addr());
            // Interception only for a host the policy lists (and admits: checked at load), and
            // only with the CA loaded.
            if snap.intercept.is_some() && policy.intercept.find(&target).is_some() {
                ctx.intercepted = true;
                intercept = Some(addr);
            }
            Upstream::Tunnel(upstream)
        }
    };
    Ok(Admitted {
        identity_ends,
        sni: (kind == Kind::Connect && cfg.sni.applies_to(target.port)).then(|| tunnel::SniCheck {
            host: target.host.clone(),
            require: cfg.sni.require,
            within: cfg.timeouts.request_header,
        }),
        grant: Grant::new(
            agent.name.clone(),
            ctx.client,
            req.headers(),
            cert.cloned(),
            kind,
            target,
        ),
        upstream,
        limits,
        intercept,
    })
}

/// The byte budget step of admission, for an agent with a budget: refuse when a budget is
/// spent (against this process's counts without `[cluster]` or while the store is unusable;
/// the store's own check ran in its admission script), else start counting the request's
/// bytes.
fn admit_budget(
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    agent: crate::identity::AgentId,
    limits: &Limits,
) -> Result<(), Deny> {
    if snap.budgets_local() {
        let local = &snap.budgets[agent.0];
        if let Some(deny) = local.check(&limits.budgets, budget::unix_now()) {
            ctx.judge(deny)?;
        }
    }
    ctx.budget = Some(budget::Flusher::start(
        ctx.meter.clone(),
        snap.budget_sink(agent),
        limits.budgets,
        ctx.agent_metrics.clone(),
    ));
    Ok(())
}

/// The agent's head and declared body size caps, checked before any upstream connection.
pub(crate) fn check_sizes(req: &Request<Incoming>, limits: &Limits) -> Result<(), Deny> {
    let head = target::head_bytes(req);
    if head > limits.max_request_header_bytes {
        return Err(Deny::with_detail(
            Reason::HeaderTooLarge,
            format!(
                "request head is {head} bytes; the agent's max_request_header_bytes is {}",
                limits.max_request_header_bytes
            ),
        ));
    }
    match target::content_length(req.headers()) {
        Some(n) if n > limits.max_request_body_bytes => Err(Deny::with_detail(
            Reason::BodyTooLarge,
            format!(
                "request body is {n} bytes; the agent's max_request_body_bytes is {}",
                limits.max_request_body_bytes
            ),
        )),
        _ => Ok(()),
    }
}

/// Turn a refusal into its response and write the audit line.
pub(crate) async fn refuse(
    mut audited: Audited,
    deny: &Deny,
    uri: &http::Uri,
) -> Response<ProxyBody> {
    let ctx = audited.ctx_mut();
    // Whatever the mode: report mode's refusals were recorded by `judge` and never get here.
    ctx.outcome.refuse(ctx.mode, deny.reason);
    ctx.permit = None;
    if deny.reason.withholds_detail() {
        // The response says the reason's one text; the cause is kept for the audit line.
        ctx.detail = Some(crate::audit::truncate_detail(&deny.detail).into());
    }
    let raw = uri.to_string();
    let resp = respond::render(ctx, deny, &raw);
    if deny.reason != Reason::ClientClosed {
        ctx.outcome.answered(resp.status()); // else nobody is left to read it
    }
    tracing::debug!(reason = deny.reason.as_str(), detail = %deny.detail, "refused");
    audited.finish().await;
    resp.map(Either::Left)
}
