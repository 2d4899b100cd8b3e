//! Step 8b: plain-HTTP forwarding of absolute-form requests.
//!
//! Lifecycle: the driver has checked and dialled; [`send`] rewrites the request to origin-form,
//! strips hop-by-hop headers (RFC 9110 §7.6.1), and sends it over a fresh HTTP/1.1 connection to
//! the vetted address, streaming the body. The response head comes back to the driver; its body
//! is wrapped in a [`ForwardBody`] that counts bytes and writes the audit line when the body ends
//! (or when the client goes away first).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Request, Response, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pin_project_lite::pin_project;
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, PollSender};
use tokio_util::task::TaskTracker;

use super::ctx::Audited;
use crate::io::{BoxError, Cap, Direction, Meter, Metered, MeteredBody};
use crate::outcome::{Deny, Reason};
use crate::target::{self, Target};

/// Hop-by-hop headers removed in both directions, besides those the Connection header lists.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pin_project! {
    /// The request body as sent upstream: counted and capped; when hyper is done with it
    /// (sent, or failed), dropping it signals `done`.
    pub struct UpBody {
        #[pin]
        inner: MeteredBody<Incoming>,
        done: oneshot::Sender<()>,
    }
}

impl Body for UpBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The response head, and a signal that completes once the request body has been sent.
pub struct Sent {
    /// The upstream response.
    pub response: Response<Incoming>,
    /// Completes (with an error: the sender is dropped) when the request body is done.
    pub request_done: oneshot::Receiver<()>,
}

/// The byte caps of one forwarded exchange.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// On the request body (`body_too_large`).
    pub request: Cap,
    /// On the response body (`response_cap`).
    pub response: Cap,
}

/// Refuse a request whose `Host` header names another destination than its absolute-form target
/// (two parsers, two answers: the classic smuggling and cache-poisoning set-up).
pub fn check_host(headers: &HeaderMap, target: &Target) -> Result<(), Deny> {
    let mut hosts = headers.get_all(HOST).iter();
    let Some(value) = hosts.next() else {
        return Ok(());
    };
    if hosts.next().is_some() {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "more than one Host header",
        ));
    }
    let parsed = value
        .to_str()
        .ok()
        .and_then(|v| target::parse_authority(v, Some(80)).ok());
    match parsed {
        Some(h) if h == *target => Ok(()),
        _ => Err(Deny::new(
            Reason::HostMismatch,
            "Host header does not match the request target",
        )),
    }
}

/// Refuse transfer codings other than `chunked`: hyper removes only the chunked framing, so a
/// `gzip, chunked` body would reach the next hop still gzip-coded but labelled as plain.
pub fn check_framing(headers: &HeaderMap) -> Result<(), Deny> {
    let only_chunked = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .all(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
    if only_chunked {
        Ok(())
    } else {
        Err(Deny::new(
            Reason::MalformedRequest,
            "unsupported Transfer-Encoding: only chunked is forwarded",
        ))
    }
}

/// Send the request upstream on `stream`; returns the response head with its streaming body.
pub async fn send(
    req: Request<Incoming>,
    stream: TcpStream,
    meter: Arc<Meter>,
    caps: Caps,
    idle: Duration,
    tracker: &TaskTracker,
    abort: CancellationToken,
) -> Result<Sent, Deny> {
    let (mut parts, body) = req.into_parts();
    let is_head = parts.method == http::Method::HEAD;
    prepare(&mut parts)?;
    let (done, request_done) = oneshot::channel();
    let body = UpBody {
        inner: MeteredBody::new(body, meter.clone(), Direction::Up).with_cap(caps.request),
        done,
    };
    let req = Request::from_parts(parts, body);

    // The socket gets its own activity meter: the idle bound covers waiting for the response
    // head too, which the body meter never sees.
    let activity = Arc::new(Meter::default());
    let io = TokioIo::new(Metered::new(stream, activity.clone(), Direction::Down));
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, UpBody>(io)
        .await
        .map_err(|e| upstream_error("handshake", &e))?;
    tracker.spawn(async move {
        tokio::select! {
            r = conn => if let Err(e) = r {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            },
            () = activity.idle_for(idle) => tracing::debug!("upstream connection idle; closed"),
            () = abort.cancelled() => {}
        }
    });
    let mut resp = match sender.send_request(req).await {
        Ok(resp) => resp,
        // The request body decides what a failed exchange was: over its cap, or the client gone.
        Err(e) => {
            return Err(match meter.cut_reason() {
                Some(Reason::BodyTooLarge) => Deny::with_detail(
                    Reason::BodyTooLarge,
                    format!(
                        "request body passed the agent's max_request_body_bytes ({}); the upstream request was aborted",
                        caps.request.max
                    ),
                ),
                Some(Reason::ClientClosed) if is_malformed_body(&e) => Deny::new(
                    Reason::MalformedRequest,
                    "the request body's chunked framing is broken",
                ),
                Some(Reason::ClientClosed) => {
                    Deny::new(Reason::ClientClosed, "client body ended early")
                }
                _ => upstream_error("request", &e),
            })
        }
    };
    if check_framing(resp.headers()).is_err() {
        return Err(Deny::new(
            Reason::UpstreamError,
            "upstream used a transfer coding other than chunked",
        ));
    }
    // HEAD answers and 1xx/204/304 carry no body, whatever Content-Length says.
    let bodiless =
        is_head || resp.status().is_informational() || matches!(resp.status().as_u16(), 204 | 304);
    if let Some(len) = content_length(resp.headers()).filter(|_| !bodiless) {
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
    strip_hop_by_hop(resp.headers_mut());
    // The client speaks HTTP/1.1 with us, whatever the upstream spoke.
    *resp.version_mut() = Version::HTTP_11;
    Ok(Sent {
        response: resp,
        request_done,
    })
}

/// The declared `Content-Length`, if present and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cold]
fn upstream_error(stage: &str, e: &hyper::Error) -> Deny {
    Deny::with_detail(
        Reason::UpstreamError,
        format!("upstream {stage} failed: {e}"),
    )
}

/// Origin-form URI, HTTP/1.1, Host present, hop-by-hop headers gone, framing unambiguous.
fn prepare(parts: &mut http::request::Parts) -> Result<(), Deny> {
    let authority = parts
        .uri
        .authority()
        .cloned()
        .ok_or(Deny::new(Reason::MalformedRequest, "URL has no host"))?;
    let origin_form = match parts.uri.path_and_query().map(|pq| pq.as_str()) {
        Some(pq) if pq.starts_with('/') => Uri::try_from(pq),
        // `http://host?q` has an empty path: origin-form needs the `/` (RFC 9112 §3.2.1).
        Some(pq) if pq.starts_with('?') => Uri::try_from(format!("/{pq}")),
        _ => Ok(Uri::from_static("/")),
    }
    .map_err(|_| Deny::new(Reason::MalformedRequest, "invalid request path"))?;
    parts.uri = origin_form;
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(HOST) {
        let value = HeaderValue::from_str(authority.as_str())
            .map_err(|_| Deny::new(Reason::MalformedRequest, "invalid authority"))?;
        parts.headers.insert(HOST, value);
    }
    Ok(())
}

/// Remove hop-by-hop headers: the fixed set, and every header the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
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
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

pin_project! {
    /// The upstream response body on its way to the client: counted, and the audit line written
    /// when it ends. The end of the body is held back until the request body has been sent (so
    /// the line counts every byte and the agent's concurrency slot is held for the whole
    /// exchange) and until the audit queue has room (backpressure, never a dropped line).
    pub struct ForwardBody {
        #[pin]
        inner: MeteredBody<Incoming>,
        audited: Option<Audited>,
        request_done: Option<oneshot::Receiver<()>>,
        audit_slot: Option<PollSender<String>>,
    }

    impl PinnedDrop for ForwardBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            let Some(audited) = this.audited.take() else { return };
            if !this.inner.is_end_stream() {
                drop(audited); // the client went away mid-body: written as client_closed
                return;
            }
            // hyper drops a body it knows is complete (Content-Length reached, HEAD, 204, 304)
            // without polling it to its end: finish here, after the upload if it is still going.
            match this.request_done.take() {
                Some(mut rx) => {
                    if rx.try_recv() == Err(oneshot::error::TryRecvError::Empty) {
                        audited.finish_after(rx);
                    } else {
                        audited.finish_now();
                    }
                }
                None => audited.finish_now(),
            }
        }
    }
}

/// The end of a forwarded response: wait for the request body, then for an audit queue slot,
/// then queue the line and end the body.
fn finish_at_end(
    audited: &mut Option<Audited>,
    request_done: &mut Option<oneshot::Receiver<()>>,
    audit_slot: &mut Option<PollSender<String>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<bytes::Bytes>, BoxError>>> {
    if let Some(rx) = request_done.as_mut() {
        // Resolves (Err: sender dropped) once hyper is done with the request body.
        let _ = ready!(Pin::new(rx).poll(cx));
        *request_done = None;
    }
    if let Some(slot) = audit_slot.as_mut() {
        if ready!(slot.poll_reserve(cx)).is_err() {
            // The writer is gone: the guard's fallback logs the line instead.
            *audit_slot = None;
            if let Some(a) = audited.take() {
                a.finish_now();
            }
            return Poll::Ready(None);
        }
        if let Some(line) = audited.take().and_then(Audited::into_line) {
            let _ = slot.send_item(line);
        }
        *audit_slot = None;
    }
    Poll::Ready(None)
}

// === impl ForwardBody ===

impl ForwardBody {
    /// Wrap `body`, counting into the request's meter against `cap`; `audited` is finished when
    /// it ends.
    pub fn new(
        body: Incoming,
        audited: Audited,
        cap: Cap,
        request_done: oneshot::Receiver<()>,
    ) -> Self {
        let meter = audited.ctx().meter.clone();
        ForwardBody {
            inner: MeteredBody::new(body, meter, Direction::Down).with_cap(cap),
            audited: Some(audited),
            request_done: Some(request_done),
            audit_slot: None,
        }
    }
}

impl Body for ForwardBody {
    type Data = bytes::Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let mut this = self.project();
        if this.audited.is_some() && this.audit_slot.is_some() {
            // The body has ended; finishing the audit line is all that is left.
            return finish_at_end(this.audited, this.request_done, this.audit_slot, cx);
        }
        let frame = ready!(this.inner.as_mut().poll_frame(cx));
        match &frame {
            None => {
                if let Some(a) = this.audited.as_ref() {
                    *this.audit_slot = Some(a.poll_sender());
                    return finish_at_end(this.audited, this.request_done, this.audit_slot, cx);
                }
            }
            Some(Err(e)) => {
                if let Some(mut a) = this.audited.take() {
                    tracing::debug!(error = %e, "response body ended early");
                    // A cap passed is folded in by the guard; anything else is the upstream.
                    if a.ctx().meter.cut_reason().is_none() {
                        a.ctx_mut().ended(Reason::UpstreamError);
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
        self.inner.is_end_stream() && self.audited.is_none()
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

    #[test]
    fn only_chunked_transfer_coding_passes() {
        let te = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(TRANSFER_ENCODING, HeaderValue::from_static(v));
            check_framing(&h).is_ok()
        };
        assert!(te("chunked"));
        assert!(te("Chunked"));
        assert!(!te("gzip, chunked"));
        assert!(!te("chunked, identity"));
        assert!(check_framing(&HeaderMap::new()).is_ok());
    }

    #[test]
    fn host_must_agree() {
        let t = target::parse_authority("example.com", Some(80)).unwrap();
        let with = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(HOST, HeaderValue::from_static(v));
            check_host(&h, &t)
        };
        assert!(with("example.com").is_ok());
        assert!(with("EXAMPLE.com:80").is_ok());
        assert!(with("example.com.").is_ok());
        assert_eq!(with("evil.test").unwrap_err().reason, Reason::HostMismatch);
        assert_eq!(
            with("example.com:8080").unwrap_err().reason,
            Reason::HostMismatch
        );
        assert!(check_host(&HeaderMap::new(), &t).is_ok());
        let mut two = HeaderMap::new();
        two.append(HOST, HeaderValue::from_static("example.com"));
        two.append(HOST, HeaderValue::from_static("example.com"));
        assert_eq!(
            check_host(&two, &t).unwrap_err().reason,
            Reason::MalformedRequest
        );
    }
}
