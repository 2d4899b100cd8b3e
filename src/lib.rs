//! chokepoint: an egress gateway for AI agents.
//!
//! An HTTP/1.1 forward proxy (CONNECT tunnels and absolute-form requests) that decides, for every
//! request, which agent is asking, whether that agent may reach the destination, and whether the
//! destination's addresses are safe to reach; and writes one JSON audit line per decision.
//!
//! # Pipeline
//!
//! ```text
//! accept ─► read request head (bounded, timed; hyper)
//!        ─► target: parse + normalise; plain HTTP: one Host that agrees, chunked-only framing
//!        ─► identity: which agent (address class, proxy token, client certificate)
//!        ─► limits: rate (GCRA), concurrency            ┐ report mode: recorded as would_deny,
//!        ─► policy: allowlist(host, port)                │ the request goes on
//!        ─► limits: head and declared body size          ┘ (outcome::Mode::verdict)
//!        ─► resolve (static hosts, then DNS; timed) ─► vet addresses (deny ranges, exceptions)
//!        ─► connect (timed, only to a vetted address)
//!        ─► CONNECT: 200, SNI check on TLS ports, then tunnel bytes both ways
//!                    (counted, upload-capped, idle-timed); to a host the policy intercepts:
//!                    TLS with the agent, then per request rules, injected credentials and
//!                    verified TLS upstream (`proxy::intercept`)
//!           HTTP:    forward request (hop-by-hop stripped, body capped), stream the response
//!                    back (counted, capped)
//!        ─► audit line + metrics, from the request's one Outcome (always: allow, deny,
//!           would_deny, error, client gone)
//! ```
//!
//! Limits run before the allowlist on purpose: every request of an agent spends its rate
//! budget, refused ones too, so a flood of refused requests is throttled like any other (and
//! cannot write audit lines at line rate).
//!
//! # Layout
//!
//! | module | job |
//! | --- | --- |
//! | [`outcome`] | the refusal vocabulary (`Reason`, `Decision`, `Deny`) and the one verdict (`Mode::verdict`, `Outcome`) |
//! | [`config`] | read and validate the TOML file into plain settings and compiled matchers |
//! | [`fingerprint`] | the file-content hash the watchers compare |
//! | [`target`] | step: parse and normalise the request target |
//! | [`identity`] | step: match the client to an agent |
//! | [`policy`] | step: the agent's allowlist, mode |
//! | [`budget`] | per client address: the budget of refusals before identification; `dropped` summaries |
//! | [`limits`] | step: per-agent rate (GCRA) and concurrency gates, byte caps |
//! | [`resolve`] | step: static hosts and DNS, with a deadline |
//! | [`vet`] | step: refuse private, loopback, metadata and operator-denied addresses |
//! | [`connect`] | step: dial a vetted address (the only upstream dialer) |
//! | [`proxy`] | accept loop, request driver; `tunnel`, `forward`, `respond` |
//! | [`io`] | byte counting, caps and idle tracking |
//! | [`audit`] | the audit line and its lossless writer |
//! | [`metrics`] | every Prometheus family |
//! | [`admin`] | `/metrics`, `/healthz`, `/readyz` |
//! | [`reload`] | the live config snapshot; file watch, SIGHUP, token refresh |
//! | [`shutdown`] | signals |
//! | [`tls`] | the HTTPS listener's rustls config (rotated files), client certificate identity |
//! | [`intercept`] | opt-in TLS interception: intercepted hosts, path rules, the CA and leaf cache, injected secrets |
//! | [`sni`] | the TLS ClientHello reader behind the tunnels' SNI check |
//! | [`explain`], [`propose`], [`probe`], [`commands`] | the operator subcommands |

pub mod admin;
pub mod audit;
pub mod budget;
pub mod commands;
pub mod config;
pub mod connect;
pub mod explain;
pub mod fingerprint;
pub mod identity;
pub mod intercept;
pub mod io;
pub mod limits;
pub mod metrics;
pub mod outcome;
pub mod policy;
pub mod probe;
pub mod propose;
pub mod proxy;
pub mod reload;
pub mod resolve;
pub mod shutdown;
pub mod sni;
pub mod target;
pub mod tls;
pub mod vet;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use config::Config;
use proxy::Shared;
use reload::Live;

/// How long tasks still open at the end of the grace period get to write their audit lines.
const ABORT_WAIT: Duration = Duration::from_secs(2);

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The listener's address could not be read.
    #[error("reading the listener address")]
    Listener(#[source] std::io::Error),
    /// The live parts of the config (resolver, TLS files) could not be set up.
    #[error(transparent)]
    Snapshot(#[from] reload::ReloadError),
    /// The metrics registry could not be set up.
    #[error("setting up metrics")]
    Metrics(#[source] prometheus::Error),
    /// Audit lines could not be written.
    #[error("writing audit lines")]
    Audit(#[source] std::io::Error),
}

/// The bound sockets the gateway serves.
#[derive(Debug)]
pub struct Listeners {
    /// The proxy listener.
    pub proxy: TcpListener,
    /// The HTTPS proxy listener (`server.tls_listen`), if configured.
    pub tls: Option<TcpListener>,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), if configured.
    pub admin: Option<TcpListener>,
}

/// Serve the proxy on `listener` until `shutdown` completes, then drain.
///
/// Draining: stop accepting, let open requests and tunnels finish for up to
/// `timeouts.shutdown_grace`, then end what is left (tunnels are audited with reason `shutdown`)
/// and flush the audit writer. Audit lines go to `audit_out`.
pub async fn run<W>(
    listeners: Listeners,
    config: Config,
    audit_out: W,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError>
where
    W: std::io::Write + Send + 'static,
{
    let Listeners {
        proxy: listener,
        tls,
        admin,
    } = listeners;
    let bound = listener.local_addr().map_err(RunError::Listener)?;
    let metrics = Arc::new(metrics::Metrics::new().map_err(RunError::Metrics)?);
    let grace = config.timeouts.shutdown_grace;
    let max_connections = config.max_connections;
    let admin_max_connections = config.admin_max_connections;
    let (source, agents, policies) = (
        config.source.clone(),
        config.agents.len(),
        config.policies.len(),
    );
    let mut own = vec![bound];
    for l in admin.iter().chain(tls.iter()) {
        own.push(l.local_addr().map_err(RunError::Listener)?);
    }
    let live = Arc::new(Live::new(config, own, metrics.clone())?);
    let (sink, writer) = audit::spawn(audit_out).map_err(RunError::Audit)?;
    let shared = Arc::new(Shared::new(live.clone(), sink, metrics));
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin_task = match admin {
        Some(l) => {
            let at = l.local_addr().map_err(RunError::Listener)?;
            tracing::info!(admin = %at, "admin listening");
            Some(tokio::spawn(admin::serve(
                l,
                shared.clone(),
                admin_max_connections,
                admin_stop.clone(),
            )))
        }
        None => None,
    };
    // Stopped only after the drain, so what is dropped meanwhile is summarised too.
    let summary_stop = tokio_util::sync::CancellationToken::new();
    let summaries = tokio::spawn(budget::summarise(shared.clone(), summary_stop.clone()));
    let hup = reload::hangup();
    let watcher = tokio::spawn(live.watch(hup, shared.draining.clone()));
    // Expires idle upstream connections; closes the pool when draining starts, so they do not
    // hold the drain up.
    let reaper = tokio::spawn(proxy::pool::reap(
        shared.pool.clone(),
        shared.draining.clone(),
    ));
    let intercept_reaper = tokio::spawn(proxy::pool::reap(
        shared.intercept_pool.clone(),
        shared.draining.clone(),
    ));
    // Announced only now: signal handlers are installed and every part is ready. The HTTPS
    // listener first: tools wait for the `listen=` line and then expect everything up.
    if let Some(l) = &tls {
        let at = l.local_addr().map_err(RunError::Listener)?;
        tracing::info!(https = %at, "HTTPS proxy listening");
    }
    tracing::info!(listen = %bound, config = %source.display(), agents, policies, "proxy listening");

    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections));
    let mut accepts = vec![tokio::spawn(proxy::accept_loop(
        listener,
        shared.clone(),
        slots.clone(),
        proxy::Transport::Plain,
    ))];
    if let Some(l) = tls {
        accepts.push(tokio::spawn(proxy::accept_loop(
            l,
            shared.clone(),
            slots,
            proxy::Transport::Tls,
        )));
    }
    tokio::select! {
        () = shutdown => {}
        () = writer.failed() => {
            tracing::error!("audit log cannot be written; shutting down rather than pass traffic unaudited");
        }
    }
    shared
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    shared.draining.cancel();
    for accept in accepts {
        let _ = accept.await; // a listener is closed once its accept loop has returned
    }
    tracing::info!(grace = ?grace, "listener closed; draining open requests and tunnels");

    shared.tracker.close();
    if tokio::time::timeout(grace, shared.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over; closing what is still open");
        shared.abort.cancel();
        let _ = tokio::time::timeout(ABORT_WAIT, shared.tracker.wait()).await;
    }
    let _ = watcher.await;
    let _ = reaper.await;
    let _ = intercept_reaper.await;
    admin_stop.cancel();
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    summary_stop.cancel();
    let _ = summaries.await;
    drop(shared);
    writer.finish().await.map_err(RunError::Audit)?;
    tracing::info!("stopped");
    Ok(())
}
