//! Step 8a: CONNECT tunnels.
//!
//! Lifecycle: the driver has already identified, checked, resolved, vetted and dialled; it answers
//! `200` and hands the upstream socket and the audit guard here. A task then
//!
//! 1. waits for hyper to give up the client connection (the upgrade) and takes the client's side
//!    back as a [`Client`]: the raw socket when hyper served a plain TCP connection, with the
//!    bytes hyper had already read past the `CONNECT` head (a client may send its first payload
//!    in the same write as the request) as the pending `prefix`;
//! 2. on a TLS port (`[sni] ports`), reads the client's ClientHello (the prefix, then more from
//!    the client) and checks its server name against the CONNECT host: nothing reaches the
//!    upstream before that check passes, and a refused tunnel closes the upstream unused;
//! 3. writes the prefix (with the ClientHello) upstream, counted and capped like every other
//!    upload byte;
//! 4. relays both ways until either side closes, no byte moves for `timeouts.idle`, or the
//!    shutdown grace ends: with splice(2) between the two sockets on Linux, else (another
//!    listener's stream type, another OS, or a kernel that refuses splice) with the portable copy.
//!
//! The audit line is written when the tunnel ends, with the bytes counted in each direction.

use std::io;
use std::pin::Pin;
#[cfg(target_os = "linux")]
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::ctx::Audited;
use super::hello;
use super::intercept::{Ended, Session};
use super::revoke::Watch;
use super::ServerIo;
use crate::io::{copy_bidirectional, Cap, CapReached, Direction, Meter, Metered};
use crate::outcome::{Deny, Reason};
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

/// Set once splice(2) has been refused and said so: the warning is logged once per process.
#[cfg(target_os = "linux")]
static SPLICE_REFUSED: AtomicBool = AtomicBool::new(false);

/// Run one tunnel to completion and write its audit line. `idle` also bounds the wait for
/// hyper to hand over the client connection (the 200 must be written first). A tunnel whose
/// agent was identified by a client certificate is closed when the certificate expires
/// (`identity_ends`), audited as `client_cert_expired`; one that a reload or a token change
/// revokes (`watch`) is closed at once, audited as `revoked`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    on_upgrade: OnUpgrade,
    upstream: TcpStream,
    mut audited: Audited,
    upload: Cap,
    sni: Option<SniCheck>,
    identity_ends: Option<tokio::time::Instant>,
    mut watch: Watch,
    idle: Duration,
    abort: CancellationToken,
    intercept: Option<Session>,
) {
    let upgraded = match tokio::time::timeout(idle, on_upgrade).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "client left before the tunnel started");
            audited.ctx_mut().outcome.ended(Reason::ClientClosed);
            return audited.finish().await;
        }
        Err(_) => {
            tracing::debug!("client did not take the 200 in time");
            audited.ctx_mut().outcome.ended(Reason::IdleTimeout);
            return audited.finish().await;
        }
    };
    let meter = audited.ctx().meter.clone();
    let _open = audited
        .ctx()
        .agent_metrics
        .as_ref()
        .map(|m| m.tunnel_opened());
    let Client { mut io, mut prefix } = Client::take(upgraded);
    if let Some(check) = sni {
        let first = tokio::select! {
            r = hello::read(&mut io, &prefix, check.within) => r,
            () = abort.cancelled() => {
                audited.ctx_mut().outcome.ended(Reason::Shutdown);
                return audited.finish().await;
            }
        };
        if !judge(&mut audited, first.hello, &check) {
            return audited.finish().await; // the upstream is closed unused
        }
        prefix = Bytes::from(first.bytes);
    }
    let relay = async {
        let mut upstream = upstream;
        if let Some(session) = intercept {
            // Intercepted: TLS with the agent, HTTP inside (`proxy::intercept`).
            return session.serve(io, prefix, upstream, &meter, upload).await;
        }
        // Consumed: an empty prefix still holds hyper's whole read buffer (8 KiB and up), which
        // an idle tunnel must not keep.
        send_prefix(&mut upstream, prefix, &meter, upload).await?;
        relay(io, upstream, &meter, upload).await?;
        Ok(Ended::Served)
    };
    // Cancelled by the byte budget flusher once the agent passes a budget.
    // Report mode lets the tunnel go on (the next request's check records the budget).
    let budget = match audited.ctx().mode {
        crate::policy::Mode::Enforce => audited.ctx().budget.as_ref().map(|b| b.cut.clone()),
        crate::policy::Mode::Report => None,
    };
    let reason = tokio::select! {
        r = relay => match r {
            Ok(Ended::Served) => Reason::Allowed,
            Ok(Ended::Handshake(reason)) => {
                let ctx = audited.ctx_mut();
                ctx.outcome.refuse(ctx.mode, reason);
                reason
            }
            Err(e) => {
                // A reset from either side is how many tunnels end; it is not a refusal. An
                // upload cap shows up here too, and is recorded on the meter.
                tracing::debug!(error = %e, "tunnel ended with an I/O error");
                Reason::Allowed
            }
        },
        () = meter.idle_for(idle) => Reason::IdleTimeout,
        () = abort.cancelled() => Reason::Shutdown,
        () = spent(&budget) => {
            tracing::info!("byte budget spent; tunnel closed");
            let ctx = audited.ctx_mut();
            ctx.outcome.refuse(ctx.mode, Reason::ByteBudget);
            Reason::ByteBudget
        }
        () = until(identity_ends) => {
            tracing::info!("client certificate expired; tunnel closed");
            let ctx = audited.ctx_mut();
            ctx.outcome.refuse(ctx.mode, Reason::ClientCertExpired);
            Reason::ClientCertExpired
        }
        deny = watch.revoked() => {
            tracing::info!(detail = %deny.detail, "tunnel revoked; closed");
            let ctx = audited.ctx_mut();
            ctx.outcome.refuse(ctx.mode, Reason::Revoked);
            Reason::Revoked
        }
    };
    audited.ctx_mut().outcome.ended(reason);
    audited.finish().await;
}

/// Completes when the agent passes a byte budget; never without one.
async fn spent(cut: &Option<tokio_util::sync::CancellationToken>) {
    match cut {
        Some(c) => c.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Completes at `deadline`; never without one.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
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
        ctx.outcome.ended(Reason::ClientClosed);
        return false;
    }
    match ctx.judge(deny) {
        Ok(()) => true,
        Err(deny) => {
            tracing::info!(reason = deny.reason.as_str(), detail = %deny.detail, "tunnel refused by the SNI check");
            false
        }
    }
}
/// The client's side of a tunnel, once hyper has let go of it.
#[derive(Debug)]
pub struct Client {
    /// The connection.
    pub io: ClientIo,
    /// Bytes the client already sent that must reach the upstream before anything read from
    /// `io` (hyper read them together with the `CONNECT` head).
    pub prefix: Bytes,
}

impl Client {
    /// Take the client connection back from hyper: the raw socket and hyper's unread bytes when
    /// the connection is the proxy listener's own type, else hyper's upgraded stream as it is
    /// (which yields those bytes itself).
    pub fn take(upgraded: Upgraded) -> Client {
        match upgraded.downcast::<ServerIo>() {
            Ok(parts) => Client {
                io: ClientIo::Tcp(parts.io.into_inner().into_inner()),
                prefix: parts.read_buf,
            },
            Err(upgraded) => Client {
                io: ClientIo::Upgraded(TokioIo::new(upgraded)),
                prefix: Bytes::new(),
            },
        }
    }
}

/// A client connection, readable and writable whatever it is underneath.
#[derive(Debug)]
pub enum ClientIo {
    /// A plain TCP connection: eligible for splice(2).
    Tcp(TcpStream),
    /// Any other stream hyper served (e.g. a TLS listener's): copied.
    Upgraded(TokioIo<Upgraded>),
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            ClientIo::Upgraded(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            ClientIo::Upgraded(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            ClientIo::Upgraded(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            ClientIo::Upgraded(s) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientIo::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ClientIo::Upgraded(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientIo::Tcp(s) => s.is_write_vectored(),
            ClientIo::Upgraded(s) => s.is_write_vectored(),
        }
    }
}

/// Write the client's pending bytes upstream, counted as upload bytes, and free their buffer.
/// Under an enforced cap only the bytes the cap leaves room for are sent; the rest ends the
/// tunnel with the cap's reason, as on the splice path.
pub async fn send_prefix(
    upstream: &mut TcpStream,
    prefix: Bytes,
    meter: &Meter,
    upload: Cap,
) -> io::Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    let room = meter.room(Direction::Up, Some(upload));
    let send = room.map_or(prefix.len(), |r| {
        usize::try_from(r).map_or(prefix.len(), |r| r.min(prefix.len()))
    });
    upstream.write_all(&prefix[..send]).await?;
    meter
        .admit(Direction::Up, send as u64, Some(upload))
        .map_err(io::Error::other)?;
    if send < prefix.len() {
        meter.cut(upload.reason);
        return Err(io::Error::other(CapReached(upload.reason)));
    }
    Ok(())
}

/// How a tunnel's bytes were moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Relay {
    /// `io::splice`: bulk spliced between the two sockets in the kernel, small reads copied.
    Splice,
    /// The portable copy through user space.
    Copy,
}

impl Relay {
    fn as_str(self) -> &'static str {
        match self {
            Relay::Splice => "splice",
            Relay::Copy => "copy",
        }
    }
}

/// Move bytes both ways until both sides have closed (or an error, or the upload cap): splice
/// when it can, else copy. Client → upstream bytes count as upload bytes against `upload`.
pub async fn relay(
    client: ClientIo,
    upstream: TcpStream,
    meter: &Arc<Meter>,
    upload: Cap,
) -> io::Result<Relay> {
    #[cfg(target_os = "linux")]
    let (client, upstream) = match client {
        ClientIo::Tcp(tcp) => match splice(tcp, upstream, meter, upload).await? {
            Spliced::Done => return Ok(Relay::Splice),
            Spliced::Refused(client, upstream) => (ClientIo::Tcp(client), upstream),
        },
        other => (other, upstream),
    };
    tracing::debug!(relay = %Relay::Copy.as_str(), "tunnel relaying");
    let mut client = Metered::new(client, meter.clone(), Direction::Up).with_cap(upload);
    let mut server = Metered::new(upstream, meter.clone(), Direction::Down);
    copy_bidirectional(&mut client, &mut server).await?;
    Ok(Relay::Copy)
}

/// How [`splice`] ended without an error.
#[cfg(target_os = "linux")]
enum Spliced {
    /// The tunnel is over.
    Done,
    /// splice(2) cannot carry it: the client and upstream sockets, for the copy. Whatever
    /// splice had taken from them has been delivered.
    Refused(TcpStream, TcpStream),
}

/// Splice the tunnel; if splice cannot carry it, deliver what it had taken and hand the two
/// sockets back.
#[cfg(target_os = "linux")]
async fn splice(
    mut client: TcpStream,
    mut upstream: TcpStream,
    meter: &Meter,
    upload: Cap,
) -> io::Result<Spliced> {
    use crate::io::splice::{splice_bidirectional, Spliced as Ended};

    tracing::debug!(relay = %Relay::Splice.as_str(), "tunnel relaying");
    let fallback = match splice_bidirectional(&client, &upstream, meter, Some(upload)).await? {
        Ended::Done => return Ok(Spliced::Done),
        Ended::Fallback(f) => f,
    };
    // A kernel or sandbox that refuses splice refuses it for every tunnel; each then costs one
    // failed call before it copies, which is not worth process-wide state beyond the warning.
    if fallback.unsupported {
        if !SPLICE_REFUSED.swap(true, Relaxed) {
            tracing::warn!(error = %fallback.cause, "splice(2) refused; tunnels copy through user space");
        }
    } else {
        tracing::debug!(error = %fallback.cause, "no pipe for splice(2); this tunnel copies");
    }
    let left = fallback.leftover;
    tokio::try_join!(upstream.write_all(&left.up), client.write_all(&left.down))?;
    Ok(Spliced::Refused(client, upstream))
}

#[cfg(test)]
mod tests;
