//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` (the process is alive) and
//! `/readyz` (config loaded and the proxy listener accepting; 503 while draining). Nothing else
//! is served, and nothing is ever proxied from here.
//!
//! Bounded like the proxy listener, on its own budget: at most `server.admin_max_connections`
//! connections at once (beyond it a new one is closed at accept, counted in
//! `chokepoint_connections_refused_total{listener="admin"}` and the `dropped` summary), a request
//! head within [`HEAD_TIMEOUT`] (also the bound on an idle keep-alive connection), and a
//! connection's whole life within [`MAX_LIFETIME`] (a client that stops reading a response
//! cannot hold its slot). So a client that can reach the port cannot take the process's
//! descriptors, and a scraper is never starved by the proxy's own clients.

use std::convert::Infallible;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::budget::Listener;
use crate::proxy::Shared;

/// Bound on an admin request head (scrapers and probes send tiny requests), and on a kept-alive
/// connection waiting for its next one.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest an admin connection lives: then it finishes the exchange in flight (for up to
/// [`HEAD_TIMEOUT`] more) and closes. Scrapers reconnect; a client that stops reading a
/// response does not hold its slot for longer.
pub const MAX_LIFETIME: Duration = Duration::from_secs(60);

/// Serve the admin endpoints until `stop`, at most `max_connections` connections at once.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_connections: usize,
    stop: CancellationToken,
) {
    let mut http = http1::Builder::new();
    // Without a timer hyper silently skips the header timeout.
    http.timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .keep_alive(true);
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            shared.metrics.connection_refused(Listener::Admin);
            if shared.refused.add(Listener::Admin) {
                tracing::warn!(client = %peer, max_connections, "admin connection limit reached; closing new connections (counted in the next dropped summary)");
            }
            drop(stream);
            continue;
        };
        let svc_shared = shared.clone();
        let conn = http.serve_connection(
            TokioIo::new(stream),
            service_fn(move |req| {
                let shared = svc_shared.clone();
                async move { Ok::<_, Infallible>(route(&req, &shared)) }
            }),
        );
        let stop = stop.clone();
        tokio::spawn(async move {
            let _slot = slot;
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = stop.cancelled() => return,
                () = tokio::time::sleep(MAX_LIFETIME) => {}
            }
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = tokio::time::timeout(HEAD_TIMEOUT, conn.as_mut()) => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

fn route(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    // Origin-form only: an absolute-form (proxy) request has a scheme and is not ours.
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return text(
            StatusCode::NOT_FOUND,
            "this is the admin port; it does not proxy\n",
        );
    }
    match req.uri().path() {
        "/metrics" => {
            shared
                .metrics
                .audit_state(shared.audit.queued(), shared.audit.written());
            let mut resp = Response::new(Full::new(Bytes::from(shared.metrics.render())));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            if !shared.ready.load(Relaxed) {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready (starting or draining)\n",
                )
            } else if !shared.live.load().limits_ready() {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready (limit store unavailable; cluster.fail_mode is closed)\n",
                )
            } else {
                text(StatusCode::OK, "ready\n")
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: /metrics, /healthz, /readyz\n",
        ),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
