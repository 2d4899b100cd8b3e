//! The load client: closed loops of connections (a, b, c), 1 GiB transfers on one connection
//! (d), and tunnels held open (e); each measures CPU over its window with [`Usage`].

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::{sleep, sleep_until, timeout, Instant};

use crate::http::{
    connect_request, get_origin_form, invalid, post_head, within, Stream, Wire, BULK_CHUNK,
    BULK_TIMEOUT, IO_TIMEOUT, MAX_EXCHANGES, SMALL_BUF,
};
use crate::machine::{Spent, Usage};
use crate::origin::Origin;
use crate::profile::{start_perf, stop_perf};
use crate::proxy::Proxy;
use crate::settings::Settings;

/// Concurrent connections of the closed-loop scenarios (a, b, c).
pub(crate) const CONNS: usize = 64;
/// One GiB: what each bulk transfer moves.
pub(crate) const GIB: u64 = 1 << 30;
/// Bytes moved before each bulk measurement, so the connection's buffers have grown.
const BULK_WARM: u64 = 64 << 20;
/// Latency samples kept over all connections of one run (u32 µs each: 32 MiB).
const MAX_SAMPLES: usize = 8 << 20;

// === closed-loop load (a, b, c) ===

/// What each client connection does.
#[derive(Clone)]
pub(crate) struct Script {
    /// Sent once on each new connection (a CONNECT), if any.
    pub(crate) preface: Option<Arc<[u8]>>,
    /// One exchange.
    pub(crate) request: Arc<[u8]>,
    /// A new connection (and preface) for every exchange, timed with it.
    pub(crate) reconnect: bool,
    /// TLS after the preface (scenarios i and j): the client config and the server name.
    pub(crate) tls: Option<(Arc<rustls::ClientConfig>, &'static str)>,
}

#[derive(Clone, Copy)]
struct Window {
    start: Instant,
    end: Instant,
}

/// One worker's share.
#[derive(Default)]
struct Outcome {
    done: u64,
    samples: Vec<u32>,
    first_error: Option<String>,
    errors: u64,
    tls: Handshakes,
}

/// The load client's TLS handshakes of a closed-loop run (warm-up included).
#[derive(Default, Clone, Copy)]
pub(crate) struct Handshakes {
    /// Handshakes completed.
    pub(crate) done: u64,
    /// Of those, how many resumed an earlier session.
    pub(crate) resumed: u64,
}

/// A closed-loop run: exchanges completed in the window, their sorted latencies, CPU spent.
pub(crate) struct Closed {
    /// Exchanges completed inside the window.
    pub(crate) ops: u64,
    samples: Vec<u32>,
    /// CPU over the window.
    pub(crate) spent: Spent,
    /// Connections that failed.
    pub(crate) errors: u64,
    /// Why the first of them failed.
    pub(crate) first_error: Option<String>,
    /// The client's TLS handshakes (i, j).
    pub(crate) tls: Handshakes,
}

impl Closed {
    /// Exchanges per second.
    pub(crate) fn rate(&self) -> f64 {
        self.ops as f64 / self.spent.wall
    }

    /// Nearest-rank percentile of the latencies, in µs; `None` without samples.
    pub(crate) fn percentile(&self, p: f64) -> Option<u32> {
        if self.samples.is_empty() {
            return None;
        }
        let rank = ((p * self.samples.len() as f64).ceil() as usize).clamp(1, self.samples.len());
        Some(self.samples[rank - 1])
    }

    /// Proxy CPU µs per exchange.
    pub(crate) fn cpu_per_op(&self) -> Option<f64> {
        Some(self.spent.proxy? * 1e6 / self.ops.max(1) as f64)
    }

    /// CPU µs per exchange of this process: the load client and the origin together.
    pub(crate) fn load_per_op(&self) -> Option<f64> {
        Some(self.spent.own? * 1e6 / self.ops.max(1) as f64)
    }

    /// A run that measured nothing.
    pub(crate) fn empty() -> Closed {
        Closed {
            ops: 0,
            samples: Vec::new(),
            spent: Spent::default(),
            errors: 0,
            first_error: None,
            tls: Handshakes::default(),
        }
    }

    /// The two runs as one: exchanges, latencies, CPU and wall time added up.
    pub(crate) fn merge(mut self, other: Closed) -> Closed {
        self.ops += other.ops;
        self.samples.extend_from_slice(&other.samples);
        self.samples.sort_unstable();
        self.spent = self.spent.plus(&other.spent);
        self.errors += other.errors;
        self.first_error = self.first_error.or(other.first_error);
        self.tls.done += other.tls.done;
        self.tls.resumed += other.tls.resumed;
        self
    }
}

/// `CONNS` connections to `addr` running `script` back to back: warm-up, then the measured window.
pub(crate) async fn closed_loop(
    addr: SocketAddr,
    script: &Script,
    s: &Settings,
    proxy: Option<&Proxy>,
    name: &str,
) -> Closed {
    let (closed, (), ()) = closed_loop_watched(addr, script, CONNS, s, proxy, name, || ()).await;
    closed
}

/// `conns` connections to `addr` running `script` back to back: warm-up, then the measured
/// window; `watch` is called right after the window's CPU counters are read at its start and
/// at its end (scenario r reads the limit store's counters there), and both its results are
/// returned.
pub(crate) async fn closed_loop_watched<T>(
    addr: SocketAddr,
    script: &Script,
    conns: usize,
    s: &Settings,
    proxy: Option<&Proxy>,
    name: &str,
    mut watch: impl FnMut() -> T,
) -> (Closed, T, T) {
    let now = Instant::now();
    let window = Window {
        start: now + s.warm,
        end: now + s.warm + s.secs,
    };
    let conns = conns.max(1);
    let cap = MAX_SAMPLES / conns;
    let workers: Vec<_> = (0..conns)
        .map(|_| tokio::spawn(worker(addr, script.clone(), window, cap)))
        .collect();
    sleep_until(window.start).await;
    let perf = start_perf(s, proxy, name);
    let before = Usage::now(proxy);
    let watched_before = watch();
    sleep_until(window.end).await;
    let spent = before.until(Usage::now(proxy), s.clk_tck);
    let watched_after = watch();
    stop_perf(perf).await;
    let mut out = Closed {
        ops: 0,
        samples: Vec::new(),
        spent,
        errors: 0,
        first_error: None,
        tls: Handshakes::default(),
    };
    for w in workers {
        let abort = w.abort_handle();
        let r = match timeout(IO_TIMEOUT * 2, w).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Outcome::failed(format!("worker panicked: {e}")),
            Err(_) => {
                abort.abort();
                Outcome::failed("worker did not stop".into())
            }
        };
        out.ops += r.done;
        out.samples.extend_from_slice(&r.samples);
        out.errors += r.errors;
        out.first_error = out.first_error.or(r.first_error);
        out.tls.done += r.tls.done;
        out.tls.resumed += r.tls.resumed;
    }
    out.samples.sort_unstable();
    (out, watched_before, watched_after)
}

impl Outcome {
    fn failed(why: String) -> Outcome {
        Outcome {
            errors: 1,
            first_error: Some(why),
            ..Outcome::default()
        }
    }
}

async fn worker(addr: SocketAddr, script: Script, window: Window, cap: usize) -> Outcome {
    let mut out = Outcome {
        samples: Vec::with_capacity(cap),
        ..Outcome::default()
    };
    if let Err(e) = drive(addr, &script, window, &mut out).await {
        out.errors += 1;
        out.first_error = Some(e.to_string());
    }
    out
}

/// Exchanges until the window ends; those finishing inside it are counted and timed.
async fn drive(
    addr: SocketAddr,
    script: &Script,
    window: Window,
    out: &mut Outcome,
) -> io::Result<()> {
    let mut kept: Option<Wire> = None;
    for _ in 0..MAX_EXCHANGES {
        let begun = Instant::now();
        if begun >= window.end {
            break;
        }
        let mut wire = match kept.take() {
            Some(w) => w,
            None => {
                let wire = open(addr, script.preface.as_deref(), script.tls.as_ref()).await?;
                if let Some(resumed) = wire.stream.resumed() {
                    out.tls.done += 1;
                    out.tls.resumed += u64::from(resumed);
                }
                wire
            }
        };
        within(IO_TIMEOUT, wire.exchange(&script.request)).await?;
        let done = Instant::now();
        if !script.reconnect {
            kept = Some(wire);
        }
        if done >= window.start && done < window.end {
            out.done += 1;
            if out.samples.len() < out.samples.capacity() {
                let us = (done - begun).as_micros();
                out.samples.push(u32::try_from(us).unwrap_or(u32::MAX));
            }
        }
    }
    Ok(())
}

/// A new connection to `addr`, with the CONNECT `preface` answered if there is one, then TLS
/// if the script asks for it.
async fn open(
    addr: SocketAddr,
    preface: Option<&[u8]>,
    tls: Option<&(Arc<rustls::ClientConfig>, &'static str)>,
) -> io::Result<Wire> {
    within(IO_TIMEOUT, async {
        let mut wire = Wire::connect(addr, SMALL_BUF).await?;
        if let Some(p) = preface {
            wire.exchange(p).await?;
        }
        let Some((config, name)) = tls else {
            return Ok(wire);
        };
        let Stream::Tcp(tcp) = wire.stream else {
            return Err(invalid("TLS over TLS"));
        };
        let stream = crate::tls::connect(config, name, tcp).await?;
        Ok(Wire::over(stream, SMALL_BUF))
    })
    .await
}

// === bulk transfers (d) ===

/// One timed transfer of `GIB` bytes.
pub(crate) struct Transfer {
    /// Wall-clock and CPU time of the transfer.
    pub(crate) spent: Spent,
}

impl Transfer {
    /// GB/s (10^9 bytes per second).
    pub(crate) fn gb_per_s(&self) -> f64 {
        GIB as f64 / self.spent.wall / 1e9
    }

    /// Proxy CPU seconds per GiB.
    pub(crate) fn proxy_cpu(&self) -> Option<f64> {
        self.spent.proxy
    }

    /// CPU seconds per GiB of this process: the load client and the origin together.
    pub(crate) fn load_cpu(&self) -> Option<f64> {
        self.spent.own
    }
}

/// Time `f` and the proxy's CPU over it.
async fn timed<T>(
    s: &Settings,
    proxy: Option<&Proxy>,
    name: &str,
    f: impl Future<Output = io::Result<T>>,
) -> io::Result<Transfer> {
    let perf = start_perf(s, proxy, name);
    let before = Usage::now(proxy);
    let done = within(BULK_TIMEOUT, f).await;
    let spent = before.until(Usage::now(proxy), s.clk_tck);
    stop_perf(perf).await;
    done.map(|_| Transfer { spent })
}

/// On one connection (through a tunnel when `preface` is a CONNECT): 1 GiB down, then 1 GiB up.
pub(crate) async fn down_and_up(
    s: &Settings,
    addr: SocketAddr,
    preface: Option<&[u8]>,
    port: u16,
    proxy: Option<&Proxy>,
) -> io::Result<(Transfer, Transfer)> {
    let mut wire = within(IO_TIMEOUT, async {
        let mut w = Wire::connect(addr, BULK_CHUNK).await?;
        if let Some(p) = preface {
            w.exchange(p).await?;
        }
        Ok(w)
    })
    .await?;
    let warm_get = get_origin_form(port, &format!("/bulk/{BULK_WARM}"));
    within(BULK_TIMEOUT, wire.exchange(&warm_get)).await?;
    within(
        BULK_TIMEOUT,
        wire.upload(&post_head(port, BULK_WARM), BULK_WARM),
    )
    .await?;
    let get = get_origin_form(port, &format!("/bulk/{GIB}"));
    let down = timed(s, proxy, "d-down", wire.exchange(&get)).await?;
    let up = timed(s, proxy, "d-up", wire.upload(&post_head(port, GIB), GIB)).await?;
    Ok((down, up))
}

/// One plain-HTTP GET (`request`) on a new connection to `addr`, timed.
pub(crate) async fn plain_download(
    s: &Settings,
    addr: SocketAddr,
    request: &[u8],
    proxy: Option<&Proxy>,
) -> io::Result<Transfer> {
    let mut wire = within(IO_TIMEOUT, Wire::connect(addr, BULK_CHUNK)).await?;
    timed(s, proxy, "d3", wire.exchange(request)).await
}

// === idle tunnels (e) ===

/// Scenario e: tunnels held open and the proxy's `VmRSS` before and after opening them.
#[derive(Serialize)]
pub(crate) struct Idle {
    /// Tunnels held open.
    pub(crate) tunnels: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

impl Idle {
    /// KiB of proxy memory per idle tunnel.
    pub(crate) fn per_tunnel_kib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.tunnels.max(1) as f64
    }

    /// The table cell: RSS before → after, in MiB.
    pub(crate) fn rss_cell(&self) -> String {
        format!(
            "RSS {:.1} → {:.1} MiB",
            self.rss_before_kib as f64 / 1024.0,
            self.rss_after_kib as f64 / 1024.0
        )
    }
}

/// The proxy's RSS before and after opening `LOAD_IDLE_TUNNELS` tunnels through it (closed
/// again before this returns).
pub(crate) async fn idle_rss(s: &Settings, origin: &Origin, proxy: &Proxy) -> io::Result<Idle> {
    let connect = connect_request(origin.addr.port());
    // Warm-up: one batch opened and closed, so one-time allocations land in "before".
    drop(open_tunnels(proxy.addr, &connect, CONNS).await?);
    sleep(Duration::from_millis(500)).await;
    let rss = || proxy.rss_kib().ok_or_else(|| invalid("VmRSS of the proxy"));
    let before = rss()?;
    let tunnels = open_tunnels(proxy.addr, &connect, s.idle_tunnels).await?;
    sleep(Duration::from_secs(1)).await;
    let after = rss()?;
    Ok(Idle {
        tunnels: tunnels.len(),
        rss_before_kib: before,
        rss_after_kib: after,
    })
}

/// `n` tunnels through the proxy at `addr`, opened `CONNS` at a time.
async fn open_tunnels(addr: SocketAddr, connect: &[u8], n: usize) -> io::Result<Vec<Wire>> {
    let connect: Arc<[u8]> = connect.into();
    let mut all = Vec::with_capacity(n);
    // Each pass opens at least one tunnel or returns the error.
    while all.len() < n {
        let batch: Vec<_> = (0..(n - all.len()).min(CONNS))
            .map(|_| {
                let connect = connect.clone();
                tokio::spawn(async move { open(addr, Some(&connect), None).await })
            })
            .collect();
        for handle in batch {
            all.push(handle.await.map_err(io::Error::other)??);
        }
    }
    Ok(all)
}
