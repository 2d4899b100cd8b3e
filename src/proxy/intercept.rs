//! Step 8c: an intercepted CONNECT tunnel (see `crate::intercept` for what is intercepted).
//!
//! Lifecycle: the driver has identified, checked, resolved, vetted and dialled as for any tunnel,
//! and found the host in the agent's `[[policies.NAME.intercept]]`; `tunnel::run` has answered
//! 200, taken the client connection back and run the SNI check. Then [`Session::serve`]
//!
//! 1. completes TLS with the agent, presenting the leaf the CA mints (or has cached) for the
//!    CONNECT host: the ClientHello bytes the SNI check read come first, then the socket;
//! 2. serves HTTP/1.1 inside with hyper; every request runs [`admit`] against the *current*
//!    snapshot (agent, host still intercepted, rate and concurrency, `Host`, rules, sizes,
//!    credentials) and is refused inside the session with the usual one-line response, or
//! 3. is sent, with its credentials injected and its body streamed, over verified TLS to the
//!    vetted address the CONNECT dialled: on an idle connection from the interception pool
//!    (per agent, host and address), on the tunnel's own dialled socket for the first one, or
//!    on a new connection to the same vetted address. The response streams back through a
//!    [`ForwardBody`], which writes the request's audit line when it ends.
//!
//! The tunnel's own audit line (`connect`, `intercepted: true`) counts the bytes on the client
//! side of the session and is written when the session ends, by `tunnel::run`, which also
//! applies the idle bound, revocation, certificate expiry and the shutdown grace to it.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::ctx::{Audited, RequestCtx};
use super::forward::{self, ForwardBody};
use super::pool::{Conn, Key, Lease, UpBody};
use super::tunnel::ClientIo;
use super::{ProxyBody, Shared};
use crate::identity::AgentId;
use crate::io::{Cap, Direction, Meter, Metered, MeteredBody};
use crate::limits::Limits;
use crate::outcome::{Deny, Mode, Reason};
use crate::reload::Snapshot;
use crate::target::{self, Kind, Target};
use crate::vet::VettedAddr;

/// What an intercepted tunnel needs beyond a plain one.
pub struct Session {
    /// The gateway's shared parts (live config, audit, metrics, pools, tracker).
    pub shared: Arc<Shared>,
    /// The agent the CONNECT was admitted for (found again by name in each request's snapshot).
    pub agent: Arc<str>,
    /// The CONNECT target.
    pub target: Target,
    /// The vetted address the CONNECT dialled: every upstream connection goes there.
    pub peer: VettedAddr,
    /// The client's address.
    pub client: SocketAddr,
    /// Bound on the TLS handshake with the agent (`timeouts.request_header`).
    pub handshake: Duration,
}

/// The per-session state each request of the inner server sees.
struct Inner {
    shared: Arc<Shared>,
    agent: Arc<str>,
    target: Target,
    peer: VettedAddr,
    client: SocketAddr,
    /// The `Host` value the upstream gets (the port only when it is not 443).
    authority: HeaderValue,
    /// The tunnel's own dialled socket, for the first upstream connection.
    first: Mutex<Option<TcpStream>>,
    /// An upgraded exchange (WebSocket): the relay to run once hyper hands the session over.
    upgraded: Mutex<Option<Relay>>,
}

/// The two-way relay of an upgraded exchange, run by [`Session::serve`] after the 101.
type Relay = Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// How a session ended, for the tunnel's audit line.
pub enum Ended {
    /// The agent and the gateway spoke HTTP until one of them closed.
    Served,
    /// No TLS session with the agent (it does not trust the CA, pins certificates, left).
    Handshake(Reason),
}

// === impl Session ===

impl Session {
    /// Serve the session on the client connection (`prefix` first: the bytes the SNI check
    /// read), counting client-side bytes into `meter` (uploads against `upload`).
    pub async fn serve(
        self,
        io: ClientIo,
        prefix: Bytes,
        upstream: TcpStream,
        meter: &Arc<Meter>,
        upload: Cap,
    ) -> io::Result<Ended> {
        let snap = self.shared.live.load();
        let host = self.target.host.to_string();
        let Some(interceptor) = snap.intercept.clone() else {
            // The config dropped [intercept] between the CONNECT and now: revocation closes it.
            return Ok(Ended::Handshake(Reason::TlsHandshakeFailed));
        };
        let config = match interceptor.server_config(&host) {
            Ok((config, minted)) => {
                if minted {
                    tracing::debug!(%host, "interception leaf minted");
                    self.shared.metrics.leaf_minted(interceptor.cached());
                }
                config
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot mint an interception certificate");
                return Ok(Ended::Handshake(Reason::TlsHandshakeFailed));
            }
        };
        let client = Rewind::new(prefix, io, meter.clone());
        let client = Metered::new(client, meter.clone(), Direction::Up).with_cap(upload);
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(client);
        let tls = match tokio::time::timeout(self.handshake, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(%host, error = %e, "agent failed the intercepted TLS handshake");
                self.shared.metrics.intercepted(false);
                return Ok(Ended::Handshake(Reason::TlsHandshakeFailed));
            }
            Err(_) => {
                tracing::info!(%host, "agent did not complete the intercepted TLS handshake in time");
                self.shared.metrics.intercepted(false);
                return Ok(Ended::Handshake(Reason::TlsHandshakeFailed));
            }
        };
        self.shared.metrics.intercepted(true);
        let authority = match self.target.port {
            443 => host.clone(),
            p => format!("{host}:{p}"),
        };
        let inner = Arc::new(Inner {
            shared: self.shared.clone(),
            agent: self.agent,
            target: self.target,
            peer: self.peer,
            client: self.client,
            authority: HeaderValue::from_str(&authority)
                .map_err(|_| io::Error::other("host is not a header value"))?,
            first: Mutex::new(Some(upstream)),
            upgraded: Mutex::new(None),
        });
        let svc_inner = inner.clone();
        let svc = service_fn(move |req| handle(req, svc_inner.clone()));
        let conn = self
            .shared
            .http(&snap.config)
            .serve_connection(TokioIo::new(tls), svc)
            .with_upgrades();
        drop(snap);
        conn.await.map_err(io::Error::other)?;
        // hyper has handed an upgraded session over (its 101 is written): relay it here, so the
        // tunnel's idle bound, revocation and shutdown still end it.
        let relay = inner.upgraded.lock().take();
        if let Some(relay) = relay {
            relay.await;
        }
        Ok(Ended::Served)
    }
}

/// Run one request inside the session: check it, inject its credentials, send it upstream and
/// hand back the response with its streaming body (which finishes the audit line).
///
/// One flat future: hyper moves it on every request, and a nested `async fn` is moved into its
/// caller's state when first polled. The branches off the hot path (a refusal, a WebSocket, a
/// new upstream connection, a retry) are boxed, so the future holds only what the hot path needs.
async fn handle(
    req: Request<Incoming>,
    inner: Arc<Inner>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snap = inner.shared.live.load();
    let mut audited = Audited::new(request_ctx(&req, &inner), inner.shared.recorder());
    let plan = match admit(&req, audited.ctx_mut(), &snap, &inner) {
        Ok(p) => p,
        Err(deny) => return Ok(Box::pin(super::refuse(audited, &deny, req.uri())).await),
    };
    let uri = req.uri().clone();
    if is_websocket(&req) {
        return match Box::pin(upgrade(req, plan, audited, &snap, &inner)).await {
            Ok(resp) => Ok(resp),
            Err((audited, deny)) => Ok(Box::pin(super::refuse(audited, &deny, &uri)).await),
        };
    }
    let meter = audited.ctx().meter.clone();
    let deny = 'refused: {
        let caps = forward::Caps::new(&plan.limits, plan.enforce);
        let (parts, body) = req.into_parts();
        let is_head = parts.method == Method::HEAD;
        let parts = match outgoing(parts, plan, &inner) {
            Ok(parts) => parts,
            Err(deny) => break 'refused deny,
        };
        let pooled = inner
            .shared
            .intercept_pool
            .checkout_ready(&inner.agent, &inner.target, &[inner.peer])
            .await;
        let mut lease = match pooled {
            Some(lease) => lease,
            None => match Box::pin(fresh(&inner, &snap)).await {
                Ok(lease) => lease,
                Err(deny) => break 'refused deny,
            },
        };
        let up = MeteredBody::new(body, meter.clone(), Direction::Up).with_cap(caps.request);
        let (body, request_done) = UpBody::new(Either::Left(up));
        let sent = lease
            .conn
            .sender
            .try_send_request(Request::from_parts(parts, body))
            .await;
        let mut resp = match sent {
            Ok(resp) => resp,
            Err(e) => match Box::pin(retry(e, lease, &meter, caps, &snap, &inner)).await {
                Ok((resp, again)) => {
                    lease = again;
                    resp
                }
                Err(deny) => break 'refused deny,
            },
        };
        if let Err(deny) = forward::check_response(&mut resp, is_head, caps, &meter, &mut lease) {
            break 'refused deny;
        }
        return Ok(ForwardBody::respond(
            resp,
            audited,
            caps.response,
            request_done,
            lease,
        ));
    };
    Ok(Box::pin(super::refuse(audited, &deny, &uri)).await)
}

/// The head that goes upstream: origin-form target, HTTP/1.1, no hop-by-hop headers, the
/// canonical `Host`, and the injected credentials in place of whatever the agent sent under
/// their names.
fn outgoing(
    mut parts: http::request::Parts,
    plan: Plan,
    inner: &Inner,
) -> Result<http::request::Parts, Deny> {
    parts.uri = forward::origin_form(&parts.uri)?;
    parts.version = Version::HTTP_11;
    forward::strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(HOST, inner.authority.clone());
    for (name, value) in plan.inject {
        // `insert` replaces every value the agent sent under the name.
        parts.headers.insert(name, value);
    }
    Ok(parts)
}

/// The audit record of a request inside the session, before any check.
fn request_ctx(req: &Request<Incoming>, inner: &Inner) -> RequestCtx {
    let mut ctx = RequestCtx::new(inner.client, Some(req.method().clone()));
    ctx.kind = Some(Kind::Http);
    ctx.target = Some(inner.target.clone());
    ctx.path = Some(crate::audit::truncate_path(req.uri().path()).into());
    ctx.intercepted = true;
    ctx.upstream = Some(inner.peer.addr());
    ctx
}

/// What [`admit`] decided for a request that may go on.
struct Plan {
    limits: Limits,
    enforce: bool,
    inject: Vec<(HeaderName, HeaderValue)>,
}

/// The per-request checks, against the current snapshot. Every `?` is a refusal; in report
/// mode the reportable ones (limits, rules, sizes) are recorded as `would_deny`.
fn admit(
    req: &Request<Incoming>,
    ctx: &mut RequestCtx,
    snap: &Snapshot,
    inner: &Inner,
) -> Result<Plan, Deny> {
    let cfg = &snap.config;
    let Some(i) = cfg.agents.iter().position(|a| *a.name == *inner.agent) else {
        return Err(Deny::new(
            Reason::Revoked,
            "the agent is no longer configured",
        ));
    };
    let id = AgentId(i);
    let agent = cfg.agents.get(id);
    let policy = cfg.policy_of(agent);
    ctx.agent = Some(agent.name.clone());
    ctx.agent_metrics = Some(snap.agent_metrics(id).clone());
    ctx.policy = Some(policy.name.clone());
    ctx.mode = policy.mode;
    let limits = policy.limits;
    let (permit, over) = snap.gate(id).admit(limits.max_concurrent);
    ctx.permit = Some(permit);
    if let Some(deny) = over {
        ctx.judge(deny)?;
    }
    let target = &inner.target;
    let intercept = match (
        policy.check(Kind::Connect, target),
        policy.intercept.find(target),
    ) {
        (Ok(_), Some(i)) => i,
        _ => {
            return Err(Deny::with_detail(
                Reason::Revoked,
                format!("policy {} no longer intercepts {target}", policy.name),
            ))
        }
    };
    ctx.credential = intercept.credential.clone();
    check_host(req, target, &inner.authority)?;
    match intercept.rules.check(req.method(), req.uri().path()) {
        Ok(rule) => {
            ctx.rule = Some(rule.map_or_else(|| intercept.host.clone(), |r| (&*r.text).into()));
        }
        Err(why) => ctx.judge(path_refusal(why, req, intercept, &policy.name))?,
    }
    super::check_sizes(req, &limits).or_else(|deny| ctx.judge(deny))?;
    let mut inject = Vec::with_capacity(intercept.inject.len());
    for j in &intercept.inject {
        let value = snap
            .secrets
            .get(&j.value_file)
            .and_then(|s| s.get())
            .and_then(|secret| j.value(&secret));
        let Some(value) = value else {
            return Err(Deny::with_detail(
                Reason::CredentialUnavailable,
                format!(
                    "credential `{}` for {} is unavailable (its secret file is missing or unreadable); the request was not sent",
                    j.name, intercept.host
                ),
            ));
        };
        inject.push((j.header.clone(), value));
    }
    Ok(Plan {
        limits,
        enforce: ctx.mode == Mode::Enforce,
        inject,
    })
}

/// Plain HTTP to a host the policy intercepts: its `rules` apply as inside a tunnel (the method
/// and path are in the clear already). Nothing is injected: a credential never travels
/// unencrypted.
pub fn check_plain(
    policy: &crate::policy::Policy,
    target: &Target,
    req: &Request<Incoming>,
) -> Result<(), Deny> {
    let Some(intercept) = policy.intercept.find_http(target) else {
        return Ok(());
    };
    match intercept.rules.check(req.method(), req.uri().path()) {
        Ok(_) => Ok(()),
        Err(why) => Err(path_refusal(why, req, intercept, &policy.name)),
    }
}

#[cold]
fn path_refusal(
    why: &str,
    req: &Request<Incoming>,
    intercept: &crate::intercept::Intercept,
    policy: &str,
) -> Deny {
    let rules: Vec<&str> = intercept.rules.iter().map(|r| &*r.text).collect();
    Deny::with_detail(
        Reason::PathNotAllowed,
        format!(
            "{why}: {} {} is not allowed on {} by policy {policy} (rules: {})",
            req.method(),
            crate::audit::truncate_path(req.uri().path()),
            intercept.host,
            rules.join(", ")
        ),
    )
}

/// The request must be for the CONNECT host: a `Host` header (and an absolute-form target)
/// naming another would let an agent reach another virtual host of the same server.
/// `authority` is the target's canonical `Host` value: a header equal to it (as clients send
/// it) needs no parse.
fn check_host<B>(req: &Request<B>, target: &Target, authority: &HeaderValue) -> Result<(), Deny> {
    let mismatch = |what: &str| {
        Deny::with_detail(
            Reason::HostMismatch,
            format!("{what} names another host than the intercepted {target}"),
        )
    };
    if let Some(a) = req.uri().authority() {
        match target::parse_authority(a.as_str(), Some(target.port)) {
            Ok(t) if t == *target => {}
            _ => return Err(mismatch("the request target")),
        }
    }
    let mut hosts = req.headers().get_all(HOST).iter();
    if let Some(h) = hosts.next() {
        let same = h.as_bytes().eq_ignore_ascii_case(authority.as_bytes())
            || h.to_str()
                .ok()
                .and_then(|h| target::parse_authority(h, Some(target.port)).ok())
                .is_some_and(|named| named == *target);
        if !same || hosts.next().is_some() {
            return Err(mismatch("the Host header"));
        }
    }
    Ok(())
}

/// A pooled connection the server closed while idle: hyper gives back a request it never
/// wrote, which is sent once more on a new connection. Anything else is the exchange's error.
async fn retry(
    mut e: hyper::client::conn::TrySendError<Request<UpBody>>,
    lease: Lease,
    meter: &Arc<Meter>,
    caps: forward::Caps,
    snap: &Snapshot,
    inner: &Inner,
) -> Result<(Response<Incoming>, Lease), Deny> {
    let again = if lease.pooled && meter.cut_reason().is_none() {
        e.take_message()
    } else {
        None
    };
    let Some(req) = again else {
        return Err(forward::exchange_error(meter, caps, e.error()));
    };
    let mut lease = fresh(inner, snap).await?;
    let resp = lease
        .conn
        .sender
        .send_request(req)
        .await
        .map_err(|e| forward::exchange_error(meter, caps, &e))?;
    Ok((resp, lease))
}

/// A WebSocket opening handshake (RFC 6455 §4.1): `Connection: upgrade` and `Upgrade:
/// websocket`. Other upgrades are not relayed (their `Upgrade` header is hop-by-hop and dropped).
fn is_websocket<B>(req: &Request<B>) -> bool {
    let has = |name: HeaderName, token: &str| {
        req.headers().get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    has(http::header::CONNECTION, "upgrade") && has(http::header::UPGRADE, "websocket")
}

/// A WebSocket the rules allow: the handshake goes upstream (credentials injected) on a new
/// connection; on `101` the two upgraded streams are relayed both ways by the session (counted
/// into this request's line, uploads capped by `max_tunnel_upload_bytes`), and the line is
/// written when the relay ends. Any other answer is passed back as a plain response.
async fn upgrade(
    mut req: Request<Incoming>,
    plan: Plan,
    mut audited: Audited,
    snap: &Snapshot,
    inner: &Inner,
) -> Result<Response<ProxyBody>, (Audited, Deny)> {
    let upload = Cap {
        max: plan.limits.max_tunnel_upload_bytes,
        enforce: plan.enforce,
        reason: Reason::UploadCap,
    };
    let client = hyper::upgrade::on(&mut req);
    let upgrade_value = req.headers().get(http::header::UPGRADE).cloned();
    let (mut parts, _body) = req.into_parts();
    parts.uri = match forward::origin_form(&parts.uri) {
        Ok(uri) => uri,
        Err(deny) => return Err((audited, deny)),
    };
    parts.version = Version::HTTP_11;
    forward::strip_hop_by_hop(&mut parts.headers);
    parts.headers.insert(HOST, inner.authority.clone());
    parts.headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    if let Some(v) = upgrade_value {
        parts.headers.insert(http::header::UPGRADE, v);
    }
    for (name, value) in plan.inject {
        parts.headers.insert(name, value);
    }
    let lease = match fresh(inner, snap).await {
        Ok(l) => l,
        Err(deny) => return Err((audited, deny)),
    };
    let mut sender = lease.conn.sender;
    let (body, _done) = UpBody::new(Either::Right(http_body_util::Empty::new()));
    let mut resp = match sender.send_request(Request::from_parts(parts, body)).await {
        Ok(r) => r,
        Err(e) => {
            let deny = Deny::with_detail(
                Reason::UpstreamError,
                format!("upstream WebSocket handshake failed: {e}"),
            );
            return Err((audited, deny));
        }
    };
    audited.ctx_mut().outcome.answered(resp.status());
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        // Refused upstream: pass the answer on, as for any request.
        forward::strip_hop_by_hop(resp.headers_mut());
        *resp.version_mut() = Version::HTTP_11;
        let cap = forward::Caps::new(&plan.limits, plan.enforce).response;
        let (_, never_sent) = UpBody::new(Either::Right(http_body_util::Empty::new()));
        let key = Key::new(inner.agent.clone(), inner.target.clone(), inner.peer);
        let lease = Lease::fresh(
            inner.shared.intercept_pool.clone(),
            key,
            Conn {
                sender,
                activity: Arc::new(Meter::default()),
            },
        );
        return Ok(ForwardBody::respond(resp, audited, cap, never_sent, lease));
    }
    let upstream = hyper::upgrade::on(&mut resp);
    let mut answer = Response::new(Either::Left(http_body_util::Full::new(Bytes::new())));
    *answer.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    *answer.headers_mut() = resp.headers().clone();
    let meter = audited.ctx().meter.clone();
    let relay: Relay = Box::pin(async move {
        let _sender = sender; // the upstream connection lives as long as the relay
        let ends = async {
            let (client, upstream) =
                tokio::try_join!(client, upstream).map_err(io::Error::other)?;
            let mut client =
                Metered::new(TokioIo::new(client), meter.clone(), Direction::Up).with_cap(upload);
            let mut upstream = Metered::new(TokioIo::new(upstream), meter.clone(), Direction::Down);
            crate::io::copy_bidirectional(&mut client, &mut upstream).await
        };
        if let Err(e) = ends.await {
            tracing::debug!(error = %e, "intercepted WebSocket ended with an I/O error");
        }
        audited.finish().await;
    });
    *inner.upgraded.lock() = Some(relay);
    Ok(answer)
}

/// A new verified TLS connection to the vetted address: on the tunnel's dialled socket the
/// first time, else on a new one.
async fn fresh(inner: &Inner, snap: &Snapshot) -> Result<Lease, Deny> {
    let cfg = &snap.config;
    let Some(interceptor) = &snap.intercept else {
        return Err(Deny::new(
            Reason::Revoked,
            "interception is no longer configured",
        ));
    };
    let first = inner.first.lock().take();
    let tcp = match first {
        Some(tcp) => tcp,
        None => connect_dial(inner, cfg.timeouts.connect).await?,
    };
    let name = ServerName::try_from(inner.target.host.to_string()).map_err(|_| {
        Deny::new(
            Reason::UpstreamTlsFailed,
            "the host is not a TLS server name",
        )
    })?;
    let connector = tokio_rustls::TlsConnector::from(interceptor.client_config());
    let handshake = tokio::time::timeout(cfg.timeouts.connect, connector.connect(name, tcp)).await;
    if !matches!(handshake, Ok(Ok(_))) {
        inner.shared.metrics.upstream_tls_failed();
    }
    let tls = match handshake {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            return Err(Deny::with_detail(
                Reason::UpstreamTlsFailed,
                format!("upstream TLS failed for {}: {e}", inner.target),
            ))
        }
        Err(_) => {
            return Err(Deny::with_detail(
                Reason::UpstreamTlsFailed,
                format!(
                    "upstream TLS handshake with {} did not finish within {:?}",
                    inner.target, cfg.timeouts.connect
                ),
            ))
        }
    };
    let activity = Arc::new(Meter::default());
    let io = TokioIo::new(Metered::new(tls, activity.clone(), Direction::Down));
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, UpBody>(io)
        .await
        .map_err(|e| {
            Deny::with_detail(
                Reason::UpstreamError,
                format!("upstream handshake failed: {e}"),
            )
        })?;
    let (watch, idle, abort) = (
        activity.clone(),
        cfg.timeouts.idle,
        inner.shared.abort.clone(),
    );
    inner.shared.tracker.spawn(async move {
        tokio::select! {
            biased;
            end = conn.with_upgrades() => {
                if let Err(e) = end {
                    tracing::debug!(error = %e, "intercepted upstream connection ended with an error");
                }
            }
            () = watch.idle_for(idle) => tracing::debug!("intercepted upstream connection idle; closed"),
            () = abort.cancelled() => {}
        }
    });
    let key = Key::new(inner.agent.clone(), inner.target.clone(), inner.peer);
    Ok(Lease::fresh(
        inner.shared.intercept_pool.clone(),
        key,
        Conn { sender, activity },
    ))
}

async fn connect_dial(inner: &Inner, timeout: Duration) -> Result<TcpStream, Deny> {
    let (tcp, _) = crate::connect::dial(&[inner.peer], timeout, &inner.shared.metrics).await?;
    Ok(tcp)
}

pin_project_lite::pin_project! {
    /// The client connection with the bytes already read from it (the ClientHello the SNI
    /// check buffered) replayed first; writes are counted as download bytes of the tunnel.
    struct Rewind {
        prefix: Bytes,
        #[pin]
        io: ClientIo,
        meter: Arc<Meter>,
    }
}

impl Rewind {
    fn new(prefix: Bytes, io: ClientIo, meter: Arc<Meter>) -> Rewind {
        Rewind { prefix, io, meter }
    }
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            if this.prefix.is_empty() {
                // Frees hyper's whole read buffer, which the prefix is a view of.
                *this.prefix = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        this.io.poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let n = std::task::ready!(this.io.poll_write(cx, buf))?;
        this.meter.add(Direction::Down, n as u64);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(uri: &str, hosts: &[&str]) -> Request<()> {
        let mut req = Request::builder().uri(uri);
        for h in hosts {
            req = req.header(HOST, *h);
        }
        req.body(()).unwrap()
    }

    #[test]
    fn the_host_header_must_name_the_intercepted_host() {
        let t443 = target::parse_authority("api.example.com", Some(443)).unwrap();
        let a443 = HeaderValue::from_static("api.example.com");
        let t8443 = target::parse_authority("api.example.com:8443", None).unwrap();
        let a8443 = HeaderValue::from_static("api.example.com:8443");
        for (target, authority, uri, hosts, ok) in [
            (&t443, &a443, "/v1", &["api.example.com"][..], true),
            (&t443, &a443, "/v1", &["API.Example.COM"], true),
            (&t443, &a443, "/v1", &["api.example.com:443"], true),
            (&t443, &a443, "/v1", &["api.example.com."], true),
            (&t443, &a443, "/v1", &[], true),
            (
                &t443,
                &a443,
                "https://api.example.com/v1",
                &["api.example.com"],
                true,
            ),
            (&t443, &a443, "/v1", &["other.example.com"], false),
            (&t443, &a443, "/v1", &["api.example.com:444"], false),
            (
                &t443,
                &a443,
                "/v1",
                &["api.example.com", "api.example.com"],
                false,
            ),
            (
                &t443,
                &a443,
                "/v1",
                &["api.example.com", "other.example.com"],
                false,
            ),
            (
                &t443,
                &a443,
                "https://other.example.com/v1",
                &["api.example.com"],
                false,
            ),
            (&t8443, &a8443, "/v1", &["api.example.com:8443"], true),
            // Without a port the header means the session's own port.
            (&t8443, &a8443, "/v1", &["api.example.com"], true),
            (&t8443, &a8443, "/v1", &["api.example.com:443"], false),
        ] {
            let got = check_host(&request(uri, hosts), target, authority);
            assert_eq!(got.is_ok(), ok, "{target} {uri} {hosts:?}: {got:?}");
            if let Err(deny) = got {
                assert_eq!(deny.reason, Reason::HostMismatch);
            }
        }
    }
}
