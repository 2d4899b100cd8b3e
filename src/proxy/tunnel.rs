//! Step 8a: CONNECT tunnels.
//!
//! Lifecycle: the driver has already identified, checked, resolved, vetted and dialled; it answers
//! `200` and hands the upstream socket and the audit guard here. A task waits for hyper to give up
//! the client connection (the upgrade). On a TLS port (`[sni] ports`) it first reads the
//! client's ClientHello and checks its server name against the CONNECT host; nothing reaches the
//! upstream before that check passes. Then it copies bytes both ways until either side closes, no
//! byte moves for `timeouts.idle`, or the shutdown grace ends. The audit line is written when the
//! tunnel ends, with the bytes counted in each direction.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::ctx::Audited;
use super::hello;
use crate::io::{self, Cap, Direction, Metered};
use crate::outcome::{Deny, Reason};
use crate::policy::Mode;
use crate::sni;
use crate::target::Host;

/// The SNI check a tunnel to a TLS port gets.
#[derive(Clone, Debug)]
pub struct SniCheck {
    /// The CONNECT host the ClientHello must name.
    pub host: Host,
    /// Refuse a ClientHello without a server name (`[sni] require`).
    pub require: bool,
    /// Bound on receiving the ClientHello (`timeouts.request_header`).
    pub within: Duration,
}

/// Run one tunnel to completion and write its audit line. `idle` also bounds the wait for
/// hyper to hand over the client connection (the 200 must be written first).
pub async fn run(
    on_upgrade: OnUpgrade,
    upstream: TcpStream,
    mut audited: Audited,
    upload: Cap,
    sni: Option<SniCheck>,
    idle: Duration,
    abort: CancellationToken,
) {
    let upgraded = match tokio::time::timeout(idle, on_upgrade).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "client left before the tunnel started");
            audited.ctx_mut().ended(Reason::ClientClosed);
            return audited.finish().await;
        }
        Err(_) => {
            tracing::debug!("client did not take the 200 in time");
            audited.ctx_mut().ended(Reason::IdleTimeout);
            return audited.finish().await;
        }
    };
    let meter = audited.ctx().meter.clone();
    let agent = audited.ctx().agent.clone();
    let _open = agent.map(|a| audited.metrics().tunnel_opened(&a));
    let mut client_io = TokioIo::new(upgraded);
    let mut server = Metered::new(upstream, meter.clone(), Direction::Down);
    if let Some(check) = sni {
        let first = tokio::select! {
            r = hello::read(&mut client_io, &[], check.within) => r,
            () = abort.cancelled() => {
                audited.ctx_mut().ended(Reason::Shutdown);
                return audited.finish().await;
            }
        };
        if !judge(&mut audited, first.hello, &check) {
            return audited.finish().await; // the upstream is closed unused
        }
        // The ClientHello (and anything after it) goes on first, counted as payload.
        meter.add(Direction::Up, first.bytes.len() as u64);
        if let Err(e) = server.write_all(&first.bytes).await {
            tracing::debug!(error = %e, "upstream closed before the ClientHello was sent");
            audited.ctx_mut().ended(Reason::UpstreamError);
            return audited.finish().await;
        }
    }
    let mut client = Metered::new(client_io, meter.clone(), Direction::Up).with_cap(upload);
    let copy = io::copy_bidirectional(&mut client, &mut server);
    let reason = tokio::select! {
        r = copy => {
            if let Err(e) = r {
                // A reset from either side is how many tunnels end; it is not a refusal. An
                // upload cap shows up here too, and is recorded on the meter.
                tracing::debug!(error = %e, "tunnel ended with an I/O error");
            }
            Reason::Allowed
        }
        () = meter.idle_for(idle) => Reason::IdleTimeout,
        () = abort.cancelled() => Reason::Shutdown,
    };
    audited.ctx_mut().ended(reason);
    audited.finish().await;
}

/// Apply the SNI verdict to the tunnel's outcome: true when the tunnel goes on (allowed, or a
/// report-mode `would_deny`), false when it must close now.
fn judge(audited: &mut Audited, hello: Result<sni::ClientHello, Deny>, check: &SniCheck) -> bool {
    let ctx = audited.ctx_mut();
    let verdict = hello.and_then(|h| {
        ctx.sni = h.sni.as_deref().map(Into::into);
        if h.ech {
            tracing::debug!(sni = ?h.sni, "ClientHello offers ECH: the check applies to the outer name");
        }
        sni::check(&h, &check.host, check.require)
    });
    let Err(deny) = verdict else {
        return true;
    };
    if deny.reason == Reason::ClientClosed {
        ctx.ended(Reason::ClientClosed);
        return false;
    }
    if ctx.mode == Mode::Report && deny.reason.is_reportable() {
        ctx.would_deny(&deny);
        return true;
    }
    tracing::info!(reason = deny.reason.as_str(), detail = %deny.detail, "tunnel refused by the SNI check");
    ctx.deny(&deny);
    false
}
