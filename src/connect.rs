//! Step 7: dial a vetted address. The only place that creates upstream sockets, and it takes
//! only [`VettedAddr`]s, so nothing here can resolve a name or reach an unchecked address. It
//! also records `chokepoint_upstream_connect_seconds` for each successful dial.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::metrics::Metrics;
use crate::outcome::{Deny, Reason};
use crate::vet::VettedAddr;

/// Most addresses tried for one request before giving up; each attempt has the full timeout.
pub const MAX_ATTEMPTS: usize = 3;

/// Connect to the first vetted address that accepts, in order, each attempt bounded by `timeout`.
/// Returns the socket and the address it is connected to; the time the successful dial took is
/// recorded in `metrics`.
pub async fn dial(
    addrs: &[VettedAddr],
    timeout: Duration,
    metrics: &Metrics,
) -> Result<(TcpStream, VettedAddr), Deny> {
    let dialling = std::time::Instant::now();
    let mut timed_out = 0usize;
    let mut last_err: Option<io::Error> = None;
    for &vetted in addrs.iter().take(MAX_ATTEMPTS) {
        let addr = vetted.addr();
        match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
            Ok(Ok(stream)) => {
                // Proxied traffic is request/response; Nagle only adds latency here.
                let _ = stream.set_nodelay(true);
                metrics.upstream_connected(dialling.elapsed());
                return Ok((stream, vetted));
            }
            Ok(Err(e)) => {
                tracing::debug!(%addr, error = %e, "upstream connect failed");
                last_err = Some(e);
            }
            Err(_) => {
                tracing::debug!(%addr, "upstream connect timed out");
                timed_out += 1;
            }
        }
    }
    Err(match last_err {
        None if timed_out > 0 => Deny::new(
            Reason::UpstreamConnectTimeout,
            "upstream did not accept the connection in time",
        ),
        None => Deny::new(Reason::UpstreamConnectFailed, "no address to connect to"),
        Some(e) => Deny::with_detail(
            Reason::UpstreamConnectFailed,
            format!("upstream refused the connection ({})", e.kind()),
        ),
    })
}
