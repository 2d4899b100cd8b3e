//! Step 8b: plain-HTTP forwarding of absolute-form requests.
//!
//! Lifecycle: the driver has run the pipeline up to vetting; [`send`] rewrites the request to
//! origin-form, strips hop-by-hop headers (RFC 9110 §7.6.1), and sends it, streaming the body,
//! over an HTTP/1.1 connection to one of the request's vetted addresses: an idle one from the
//! [`Pool`] when there is one for this agent, target and address, else a new one from
//! `connect::dial`. The response head comes back to the driver; its body is wrapped in a
//! [`ForwardBody`] that counts bytes, writes the audit line when the body ends (or when the client
//! goes away first), and gives the connection back to the pool if the exchange ended cleanly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, PROXY_AUTHENTICATE,
    PROXY_AUTHORIZATION, TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::sync::oneshot;

use super::ctx::{Audited, Finish, RequestCtx};
use super::pool::{Conn, Key, Lease, UpBody};
use super::Shared;
use crate::connect;
use crate::io::{BoxError, Cap, Direction, Meter, Metered, MeteredBody};
use crate::outcome::{Deny, Reason};
use crate::target::{self, Target};
use crate::vet::VettedAddr;

/// Hop-by-hop headers removed in both directions, besides those the Connection header lists.
/// `HeaderName`s, not strings: removing by `&str` parses and classifies the name every time.
const HOP_BY_HOP: [HeaderName; 9] = [
    CONNECTION,
    HeaderName::from_static("proxy-connection"),
    PROXY_AUTHORIZATION,
    PROXY_AUTHENTICATE,
    HeaderName::from_static("keep-alive"),
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// The response head, a signal that completes once the request body has been sent, and the
/// connection (to go back to the pool when the exchange ends cleanly).
pub struct Sent {
    /// The upstream response.
    pub response: Response<Incoming>,
    /// Completes (with an error: the sender is dropped) when the request body is done.
    pub request_done: oneshot::Receiver<()>,
    /// The connection the exchange runs on.
    pub lease: Lease,
}

/// Where a plain-HTTP request may go, as its own pipeline decided: the agent, the normalised
/// target and the addresses that passed vetting (in answer order).
#[derive(Debug)]
pub struct Route {
    /// The identified agent.
    pub agent: Arc<str>,
    /// The normalised target.
    pub target: Target,
    /// The request's vetted addresses.
    pub vetted: Vec<VettedAddr>,
    /// Bound on each connection attempt.
    pub connect_timeout: Duration,
    /// Bound on an upstream connection on which nothing moves.
    pub idle: Duration,
}

/// The byte caps of one forwarded exchange.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// On the request body (`body_too_large`).
    pub request: Cap,
    /// On the response body (`response_cap`).
    pub response: Cap,
}

impl Caps {
    /// The agent's body caps; `enforce` false (report mode) records a cap passed, cuts nothing.
    pub fn new(limits: &crate::limits::Limits, enforce: bool) -> Caps {
        Caps {
            request: Cap {
                max: limits.max_request_body_bytes,
                enforce,
                reason: Reason::BodyTooLarge,
            },
            response: Cap {
                max: limits.max_response_body_bytes,
                enforce,
                reason: Reason::ResponseCap,
            },
        }
    }
}

/// Send the request to one of `route`'s vetted addresses, on an idle pooled connection for this
/// agent, target and address if there is one, else on a new one; returns the response head with
/// its streaming body. Records the address used in `ctx.upstream`.
///
/// A request that fails on a pooled connection before any response arrives (the server closed
/// it while idle) is sent again, once, on a new connection: when hyper reports it was never
/// written, or when it is safe to repeat (GET, HEAD, OPTIONS, TRACE without a body).
pub async fn send(
    req: Request<Incoming>,
    route: &Route,
    ctx: &mut RequestCtx,
    caps: Caps,
    shared: &Shared,
) -> Result<Sent, Deny> {
    let (mut parts, body) = req.into_parts();
    let is_head = parts.method == Method::HEAD;
    prepare(&mut parts)?;
    let meter = ctx.meter.clone();
    let mut lease = acquire(route, shared).await?;
    ctx.upstream = Some(lease.peer());
    // What it takes to repeat a safe request: only kept when a repeat may be needed.
    let replay = (lease.pooled && is_safe(&parts.method) && body.is_end_stream())
        .then(|| replay_parts(&parts));
    let up = MeteredBody::new(body, meter.clone(), Direction::Up).with_cap(caps.request);
    let (body, mut request_done) = UpBody::new(Either::Left(up));
    let first = lease
        .conn
        .sender
        .try_send_request(Request::from_parts(parts, body))
        .await;
    let mut resp = match first {
        Ok(resp) => resp,
        Err(mut e) => {
            let again = if lease.pooled && meter.cut_reason().is_none() {
                match e.take_message() {
                    Some(unsent) => Some(unsent),
                    None if peer_closed(e.error()) => replay.map(|parts| {
                        let (body, done) = UpBody::new(Either::Right(Empty::new()));
                        request_done = done;
                        Request::from_parts(parts, body)
                    }),
                    None => None,
                }
            } else {
                None
            };
            let Some(req) = again else {
                return Err(exchange_error(&meter, caps, e.error()));
            };
            tracing::debug!(error = %e.error(), "pooled upstream connection failed; sending again on a new one");
            lease = fresh(route, shared).await?;
            ctx.upstream = Some(lease.peer());
            lease
                .conn
                .sender
                .send_request(req)
                .await
                .map_err(|e| exchange_error(&meter, caps, &e))?
        }
    };
    check_response(&mut resp, is_head, caps, &meter, &mut lease)?;
    Ok(Sent {
        response: resp,
        request_done,
        lease,
    })
}

/// An idle pooled connection for `route`, else a new one.
async fn acquire(route: &Route, shared: &Shared) -> Result<Lease, Deny> {
    match shared
        .pool
        .checkout_ready(&route.agent, &route.target, &route.vetted)
        .await
    {
        Some(lease) => Ok(lease),
        None => fresh(route, shared).await,
    }
}

/// Dial one of `route`'s vetted addresses and start an HTTP/1.1 connection on it.
async fn fresh(route: &Route, shared: &Shared) -> Result<Lease, Deny> {
    let (stream, peer) =
        connect::dial(&route.vetted, route.connect_timeout, &shared.metrics).await?;
    // The socket gets its own activity meter: the idle bound covers waiting for the response
    // head too, which the body meter never sees.
    let activity = Arc::new(Meter::default());
    let io = TokioIo::new(Metered::new(stream, activity.clone(), Direction::Down));
    let (sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, UpBody>(io)
        .await
        .map_err(|e| upstream_error("handshake", &e))?;
    let (watch, idle, abort) = (activity.clone(), route.idle, shared.abort.clone());
    // Ends when the server closes the connection, when it is idle too long, at the end of the
    // shutdown grace, or once every handle is gone (closed by the pool, or not pooled).
    shared.tracker.spawn(async move {
        tokio::select! {
            // The connection first: it is what wakes the task (twice per small exchange).
            // Polling the timer and the token on those wake-ups as well costs some 30 ns each,
            // which a waker of their own did not pay for (benches/watched.rs).
            biased;
            end = conn => {
                if let Err(e) = end {
                    tracing::debug!(error = %e, "upstream connection ended with an error");
                }
            }
            () = watch.idle_for(idle) => tracing::debug!("upstream connection idle; closed"),
            () = abort.cancelled() => {}
        }
    });
    let key = Key::new(route.agent.clone(), route.target.clone(), peer);
    Ok(Lease::fresh(
        shared.pool.clone(),
        key,
        Conn { sender, activity },
    ))
}

/// RFC 9110 §9.2.1: methods a client may repeat without asking.
fn is_safe(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE
    )
}

/// A copy of a bodiless request's head, to send it again.
fn replay_parts(parts: &http::request::Parts) -> http::request::Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// Whether a failed exchange failed because the server closed or reset the connection before
/// answering (what a connection closed while idle in the pool looks like).
fn peer_closed(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

/// Whether the server leaves the connection open after this response: HTTP/1.1, no
/// `Connection: close`, not a protocol switch.
pub(super) fn keeps_alive(resp: &Response<Incoming>) -> bool {
    resp.version() == Version::HTTP_11
        && resp.status() != StatusCode::SWITCHING_PROTOCOLS
        && !resp.headers().get_all(CONNECTION).iter().any(|v| {
            v.to_str().map_or(true, |v| {
                v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
            })
        })
}

/// The refusal for a failed exchange: the request body decides what it was (over its cap, or
/// the client gone); anything else is the upstream.
pub(super) fn exchange_error(meter: &Meter, caps: Caps, e: &hyper::Error) -> Deny {
    match meter.cut_reason() {
        // Report mode records a body over its cap without cutting it: then the failure is the
        // upstream's, and the cap is folded in as `would_deny` when the line is written.
        Some(Reason::BodyTooLarge) if caps.request.enforce => Deny::with_detail(
            Reason::BodyTooLarge,
            format!(
                "request body passed the agent's max_request_body_bytes ({}); the upstream request was aborted",
                caps.request.max
            ),
        ),
        Some(Reason::ClientClosed) if is_malformed_body(e) => Deny::new(
            Reason::MalformedRequest,
            "the request body's chunked framing is broken",
        ),
        Some(Reason::ClientClosed) => Deny::new(Reason::ClientClosed, "client body ended early"),
        _ => upstream_error("request", e),
    }
}

#[cold]
fn upstream_error(stage: &str, e: &hyper::Error) -> Deny {
    Deny::with_detail(
        Reason::UpstreamError,
        format!("upstream {stage} failed: {e}"),
    )
}

/// What every upstream response head gets before it goes to the client: a transfer coding other
/// than chunked is refused, a `Content-Length` over the response cap is refused (enforce mode)
/// or recorded (report mode), the connection's reuse is read off it, its hop-by-hop headers go,
/// and it is sent as HTTP/1.1.
pub(crate) fn check_response(
    resp: &mut Response<Incoming>,
    is_head: bool,
    caps: Caps,
    meter: &Meter,
    lease: &mut Lease,
) -> Result<(), Deny> {
    if target::check_framing(resp.headers()).is_err() {
        return Err(Deny::new(
            Reason::UpstreamError,
            "upstream used a transfer coding other than chunked",
        ));
    }
    // HEAD answers and 1xx/204/304 carry no body, whatever Content-Length says.
    let bodiless =
        is_head || resp.status().is_informational() || matches!(resp.status().as_u16(), 204 | 304);
    if let Some(len) = target::content_length(resp.headers()).filter(|_| !bodiless) {
        if len > caps.response.max {
            let deny = Deny::with_detail(
                Reason::ResponseCap,
                format!(
                    "response body is {len} bytes; the agent's max_response_body_bytes is {}",
                    caps.response.max
                ),
            );
            // Recorded either way, so a response refused up front and one cut while streaming
            // are audited alike (decision deny, or would_deny in report mode).
            meter.cut(Reason::ResponseCap);
            if caps.response.enforce {
                return Err(deny);
            }
        }
    }
    // Read before the hop-by-hop headers go: whether the server keeps the connection open.
    lease.reusable = keeps_alive(resp);
    strip_hop_by_hop(resp.headers_mut());
    // The client speaks HTTP/1.1 with us, whatever the upstream spoke.
    *resp.version_mut() = Version::HTTP_11;
    Ok(())
}

/// Origin-form URI, HTTP/1.1, Host present, hop-by-hop headers gone, framing unambiguous.
fn prepare(parts: &mut http::request::Parts) -> Result<(), Deny> {
    let authority = parts
        .uri
        .authority()
        .cloned()
        .ok_or(Deny::new(Reason::MalformedRequest, "URL has no host"))?;
    parts.uri = origin_form(&parts.uri)?;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(HOST) {
        let value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| Deny::new(Reason::MalformedRequest, "invalid authority"))?;
        parts.headers.insert(HOST, value);
    }
    Ok(())
}

/// The origin-form target for the next hop: the path (`/` when it is empty) and the query, never
/// a fragment (RFC 9112 §3.2.1: origin-form is `absolute-path [ "?" query ]`).
///
/// The `http` crate drops a fragment while parsing, so `http://host#x` arrives with empty
/// path-and-query text, which its `as_str` shows as `/` but an origin-form `Uri` built from it
/// writes as nothing at all: the request line would be `GET  HTTP/1.1`. Whatever the input, the
/// result's path is checked to be one absolute path.
pub(crate) fn origin_form(uri: &Uri) -> Result<Uri, Deny> {
    let invalid = || Deny::new(Reason::MalformedRequest, "invalid request path");
    let origin = match uri.path_and_query() {
        // The parsed path and query, shared rather than parsed again.
        Some(pq) if pq.as_str().starts_with('/') => {
            let mut origin = http::uri::Parts::default();
            origin.path_and_query = Some(pq.clone());
            Uri::from_parts(origin).map_err(|_| invalid())?
        }
        // `http://host?q` has an empty path: origin-form needs the `/`.
        Some(pq) if pq.as_str().starts_with('?') => {
            Uri::try_from(format!("/{}", pq.as_str())).map_err(|_| invalid())?
        }
        _ => Uri::from_static("/"),
    };
    // `Uri::path` is what the request line is written from: empty for the fragment-only case
    // above (the shared text is empty), then the next hop gets `/`.
    if origin.path().is_empty() {
        return Ok(Uri::from_static("/"));
    }
    if !origin.path().starts_with('/') {
        return Err(invalid());
    }
    Ok(origin)
}

/// Remove hop-by-hop headers: the fixed set, and every header the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over the names says so without touching the map.
    if !headers.keys().any(|k| HOP_BY_HOP.contains(k)) {
        return;
    }
    // RFC 9112 §6.3: with Transfer-Encoding, Content-Length must not be forwarded; the body is
    // re-framed by the next connection from what was actually received.
    if headers.contains_key(TRANSFER_ENCODING) {
        headers.remove(CONTENT_LENGTH);
    }
    if headers.contains_key(CONNECTION) {
        let listed: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in listed {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// The upstream response body on its way to the client: counted, and the audit line written
/// when it ends. The end of the body is held back until the request body has been sent (so
/// the line counts every byte and the agent's concurrency slot is held for the whole
/// exchange) and until the audit queue has room (backpressure, never a dropped line). An
/// exchange that ended cleanly gives its connection back to the pool.
///
/// Its state (over a kilobyte: the audit guard, the lease, the meter) lives in one allocation:
/// the response that carries it is moved from future to future and into hyper's dispatcher on
/// every request, and a moved pointer costs less than a moved kilobyte.
pub struct ForwardBody(Pin<Box<Forwarding>>);

pin_project! {
    /// What [`ForwardBody`] holds.
    struct Forwarding {
        #[pin]
        inner: MeteredBody<Incoming>,
        audited: Option<Audited>,
        request_done: Option<oneshot::Receiver<()>>,
        // Set once the upstream body has ended: the line on its way into the audit queue.
        finishing: Option<Finish>,
        ended: bool,
        lease: Option<Lease>,
    }

    impl PinnedDrop for Forwarding {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let audited = match (this.audited.take(), this.finishing.take()) {
                (Some(a), _) => a,
                // The line was waiting for a queue slot: finished below, without waiting here.
                (None, Some(f)) => match f.into_inner() {
                    Some(a) => a,
                    None => return,
                },
                (None, None) => return,
            };
            if !*this.ended && !this.inner.is_end_stream() {
                drop(audited); // the client went away mid-body: written as client_closed
                return;
            }
            // hyper drops a body it knows is complete (Content-Length reached, HEAD, 204, 304)
            // without polling it to its end: finish here, after the upload if it is still going.
            // A connection whose upload is still going is not given back.
            let mut upload = this.request_done.take();
            let uploading = upload
                .as_mut()
                .is_some_and(|rx| rx.try_recv() == Err(oneshot::error::TryRecvError::Empty));
            match (upload, tokio::runtime::Handle::try_current()) {
                (Some(rx), Ok(rt)) if uploading => {
                    rt.spawn(async move {
                        let _ = rx.await;
                        audited.finish().await;
                    });
                }
                _ => {
                    release(this.lease, &audited);
                    audited.finish_now();
                }
            }
        }
    }
}

/// The exchange is over (response read to its end, request body sent): give the connection
/// back, unless a cap cut either body or the client failed.
fn release(lease: &mut Option<Lease>, audited: &Audited) {
    if let Some(lease) = lease.take() {
        if audited.ctx().meter.cut_reason().is_none() {
            lease.release();
        }
    }
}

/// The end of a forwarded response: wait for the request body, give the connection back, then
/// wait for an audit queue slot, queue the line and end the body.
fn finish_at_end(
    audited: &mut Option<Audited>,
    request_done: &mut Option<oneshot::Receiver<()>>,
    finishing: &mut Option<Finish>,
    lease: &mut Option<Lease>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
    if let Some(rx) = request_done.as_mut() {
        // Resolves (Err: sender dropped) once hyper is done with the request body.
        let _ = ready!(Pin::new(rx).poll(cx));
        *request_done = None;
    }
    if let Some(a) = audited.take() {
        release(lease, &a);
        *finishing = Some(a.finish());
    }
    if let Some(f) = finishing.as_mut() {
        ready!(Pin::new(f).poll(cx));
        *finishing = None;
    }
    Poll::Ready(None)
}

// === impl ForwardBody ===

impl ForwardBody {
    /// `response` on its way to the client: its status recorded for the audit line, its body
    /// wrapped as [`ForwardBody::new`] does.
    pub fn respond(
        response: Response<Incoming>,
        mut audited: Audited,
        cap: Cap,
        request_done: oneshot::Receiver<()>,
        lease: Lease,
    ) -> Response<super::ProxyBody> {
        audited.ctx_mut().outcome.answered(response.status());
        response
            .map(|body| Either::Right(ForwardBody::new(body, audited, cap, request_done, lease)))
    }

    /// Wrap `body`, counting into the request's meter against `cap`; `audited` is finished when
    /// it ends, and `lease` goes back to the pool if the exchange ended cleanly.
    pub fn new(
        body: Incoming,
        audited: Audited,
        cap: Cap,
        request_done: oneshot::Receiver<()>,
        lease: Lease,
    ) -> Self {
        let meter = audited.ctx().meter.clone();
        ForwardBody(Box::pin(Forwarding {
            inner: MeteredBody::new(body, meter, Direction::Down).with_cap(cap),
            audited: Some(audited),
            request_done: Some(request_done),
            finishing: None,
            ended: false,
            lease: Some(lease),
        }))
    }
}

impl Body for ForwardBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.get_mut().0.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.0.size_hint()
    }
}

impl Body for Forwarding {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if *this.ended {
            // The body has ended; finishing the audit line is all that is left.
            return finish_at_end(
                this.audited,
                this.request_done,
                this.finishing,
                this.lease,
                cx,
            );
        }
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            None => {
                if this.audited.is_some() {
                    *this.ended = true;
                    return finish_at_end(
                        this.audited,
                        this.request_done,
                        this.finishing,
                        this.lease,
                        cx,
                    );
                }
            }
            Some(Err(e)) => {
                if let Some(mut a) = this.audited.take() {
                    tracing::debug!(error = %e, "response body ended early");
                    // A cap passed is folded in by the guard; anything else is the upstream.
                    if a.ctx().meter.cut_reason().is_none() {
                        a.ctx_mut().outcome.ended(Reason::UpstreamError);
                    }
                    a.finish_now();
                }
            }
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        // Not at the end while the audit line is pending: hyper stops polling a body that says
        // it has ended, and the end is where the line waits for the upload and a queue slot.
        self.inner.is_end_stream() && self.audited.is_none() && self.finishing.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// True when a failed exchange failed because the client's body broke its framing (hyper's
/// chunked decoder reports `InvalidInput`/`InvalidData`), as opposed to the client going away.
fn is_malformed_body(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            );
        }
        cause = c.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic eDp5"),
            ("proxy-connection", "keep-alive"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("transfer-encoding", "chunked"),
            ("content-length", "10"),
            ("x-keep", "yes"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["x-keep"]);
    }

    /// What the request line of the next hop says, as hyper writes it (from `Uri`'s `Display`).
    #[test]
    fn every_target_becomes_one_absolute_path_without_fragment() {
        for (target, sent) in [
            ("http://h:8080#x", "/"),
            ("http://h#", "/"),
            ("http://h", "/"),
            ("http://h/", "/"),
            ("http://h?q=1", "/?q=1"),
            ("http://h?q=1#x", "/?q=1"),
            ("http://h/p#x?y", "/p"),
            ("http://h/p/q?r=s#t", "/p/q?r=s"),
        ] {
            let uri: Uri = target.parse().unwrap();
            let origin = origin_form(&uri).unwrap();
            assert_eq!(origin.to_string(), sent, "{target}");
        }
    }
}
