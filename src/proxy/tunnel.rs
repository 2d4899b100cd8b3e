//! Step 8a: CONNECT tunnels.
//!
//! Lifecycle: the driver has already identified, checked, resolved, vetted and dialled; it answers
//! `200` and hands the upstream socket and the audit guard here. A task waits for hyper to give up
//! the client connection (the upgrade), then copies bytes both ways until either side closes, no
//! byte moves for `timeouts.idle`, or the shutdown grace ends. The audit line is written when the
//! tunnel ends, with the bytes counted in each direction.

use std::time::Duration;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::ctx::Audited;
use crate::io::{self, Cap, Direction, Metered};
use crate::outcome::Reason;

/// Run one tunnel to completion and write its audit line. `idle` also bounds the wait for
/// hyper to hand over the client connection (the 200 must be written first).
pub async fn run(
    on_upgrade: OnUpgrade,
    upstream: TcpStream,
    mut audited: Audited,
    upload: Cap,
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
    let mut client =
        Metered::new(TokioIo::new(upgraded), meter.clone(), Direction::Up).with_cap(upload);
    let mut server = Metered::new(upstream, meter.clone(), Direction::Down);
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
