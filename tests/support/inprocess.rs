//! [`InProcess`]: the gateway run as a library in the test's own process, on a paused clock, for
//! tests that only need the pipeline and would otherwise wait out real 1–10 s timeouts.
//!
//! `chokepoint::run` gets listeners bound on 127.0.0.1:0, the config parsed from the
//! [`ConfigBuilder`]'s TOML, and an audit writer that decodes each line into the same
//! [`AuditLog`] the binary's [`Proxy`] fills from stdout. It runs on a current-thread tokio
//! runtime of its own thread, started paused: a timeout is crossed only when the test moves the
//! clock ([`InProcess::advance`]); nothing else is timed by the gateway's clock.
//!
//! Why a blocking task is held for the gateway's whole life: with time paused, tokio
//! auto-advances the clock to the next timer whenever the runtime has nothing to do, even while
//! real socket I/O is pending. A keep-alive connection waiting for its client's next request
//! has hyper's header timer armed, so the clock would jump to it and cut the connection while
//! the test thread is still writing. Tokio inhibits auto-advance while a `spawn_blocking` task
//! runs (`tokio::time::pause`, "Preventing auto-advance"; `BlockingSchedule::new` counts it in
//! `Clock::inhibit_auto_advance`, `release` gives it back), so one blocking task parked on a
//! channel keeps the clock where the test put it. The audit writer is an OS thread and the
//! clients are the test's blocking sockets: both run in real time, so audit lines and socket
//! effects are awaited in real time, bounded by [`WAIT`].
//!
//! The clock is moved by a task on the gateway's runtime: it first lets the runtime run what
//! is ready (a few scheduler rounds, each polling the I/O driver), then advances, then does the
//! same again, so timers that came due have fired when [`InProcess::advance`] returns (their
//! effects on other threads may still be under way).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread;
use std::time::{Duration, Instant};

use super::{audit_channel, Audit, AuditLog, AuditMatch, AuditTx, ConfigBuilder, Proxy, WAIT};

/// Scheduler rounds the clock task yields for before and after moving the clock: each round
/// polls every ready task and the I/O driver once, so work set off by bytes already in a
/// socket's buffer (a parsed head, an upgraded tunnel, an armed timer) has happened.
const SETTLE_ROUNDS: usize = 16;

/// How long [`InProcess::advance_until`] looks for its condition, in real time, before it moves
/// the clock another step.
const STEP_WAIT: Duration = Duration::from_millis(50);

/// A gateway a test drives over loopback: the binary ([`Proxy`]) or the library in this process
/// ([`InProcess`]); helpers that only send requests and read audit lines take either.
pub trait Gateway {
    /// The proxy listener.
    fn addr(&self) -> SocketAddr;
    /// The audit lines, in the order written.
    fn audits(&self) -> &AuditLog;
}

/// A request to the clock task: move the clock by the duration (zero: only let the runtime
/// run what is ready), then answer with the time the clock has moved since the start.
type Tick = (Duration, Sender<Duration>);

/// The gateway library running in this process on a paused clock (see the module docs).
pub struct InProcess {
    pub addr: SocketAddr,
    /// The HTTPS proxy listener, when the config has `tls_listen`.
    pub https: Option<SocketAddr>,
    /// The admin listener, when the config has `admin_listen`.
    pub admin: Option<SocketAddr>,
    pub audits: AuditLog,
    pub config_path: PathBuf,
    handle: tokio::runtime::Handle,
    clock: tokio::sync::mpsc::UnboundedSender<Tick>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    /// Dropped to end the blocking task that keeps the clock from auto-advancing.
    hold: Option<Sender<()>>,
    /// `run`'s result, sent when the gateway thread ends.
    done: Receiver<Result<(), String>>,
    _dir: tempfile::TempDir,
}

/// The audit writer's output: whole lines, each decoded strictly and passed to the test.
struct AuditLines {
    partial: Vec<u8>,
    tx: AuditTx,
}

// === impl Proxy ===

impl Gateway for Proxy {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn audits(&self) -> &AuditLog {
        &self.audits
    }
}

// === impl InProcess ===

impl InProcess {
    /// Run the gateway on the config `cfg` states.
    pub fn of(cfg: &ConfigBuilder) -> InProcess {
        InProcess::of_in(tempfile::tempdir().unwrap(), cfg)
    }

    /// Run the gateway on `cfg`, written as `chokepoint.toml` into `dir` (which holds the files
    /// it names: token files, certificates), as the binary would read it.
    pub fn of_in(dir: tempfile::TempDir, cfg: &ConfigBuilder) -> InProcess {
        let config_path = dir.path().join("chokepoint.toml");
        let text = cfg.to_toml();
        std::fs::write(&config_path, &text).unwrap();
        let config = chokepoint::config::parse(&config_path, &text)
            .unwrap_or_else(|e| panic!("the test config does not load: {e}\n{text}"));
        log_to_test_output();

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .unwrap();
        // Spawned before anything waits on the clock, and held until the gateway stops.
        let (hold, held) = mpsc::channel::<()>();
        rt.spawn_blocking(move || {
            let _ = held.recv();
        });
        let (listeners, addr, https, admin) = rt.block_on(async {
            let bind =
                |a: SocketAddr| async move { tokio::net::TcpListener::bind(a).await.unwrap() };
            let proxy = bind(config.listen).await;
            let tls = match config.tls_listen {
                Some(a) => Some(bind(a).await),
                None => None,
            };
            let admin = match config.admin_listen {
                Some(a) => Some(bind(a).await),
                None => None,
            };
            let local = |l: &tokio::net::TcpListener| l.local_addr().unwrap();
            let (addr, https, admin_at) = (
                local(&proxy),
                tls.as_ref().map(local),
                admin.as_ref().map(local),
            );
            let listeners = chokepoint::Listeners { proxy, tls, admin };
            (listeners, addr, https, admin_at)
        });
        let handle = rt.handle().clone();
        let (clock, ticks) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (atx, audits) = audit_channel();
        let (done_tx, done) = mpsc::channel();
        thread::Builder::new()
            .name("gateway".into())
            .spawn(move || {
                let result = rt.block_on(async move {
                    tokio::spawn(move_clock(ticks));
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    chokepoint::run(listeners, config, AuditLines::new(atx), shutdown).await
                });
                // Not waiting for blocking tasks: the hold task ends when the test lets go.
                rt.shutdown_background();
                let _ = done_tx.send(result.map_err(|e| error_chain(&e)));
            })
            .unwrap();
        let gateway = InProcess {
            addr,
            https,
            admin,
            audits,
            config_path,
            handle,
            clock,
            stop: Some(stop),
            hold: Some(hold),
            done,
            _dir: dir,
        };
        // The clock task first runs once `run` has been polled, which starts every part
        // (listeners, watcher, reaper) before it first waits: after this, the gateway serves.
        gateway.settle();
        gateway
    }

    /// The next audit line.
    pub fn audit(&self) -> Audit {
        self.audits.next()
    }

    /// The next audit line, which must match `m`.
    #[allow(clippy::needless_pass_by_value)] // `gw.expect_audit(AuditMatch::of(…))` reads best
    pub fn expect_audit(&self, m: AuditMatch) -> Audit {
        self.audits.expect(&m)
    }

    /// The first audit line matching `m`, skipping others (listed if none matches).
    #[allow(clippy::needless_pass_by_value)]
    pub fn find_audit(&self, m: AuditMatch) -> Audit {
        self.audits.find(&m)
    }

    /// Assert that no further audit line arrives within `d` (real time).
    pub fn no_audit_for(&self, d: Duration) {
        self.audits.none_for(d)
    }

    /// `http://127.0.0.1:PORT`, for `curl -x`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Let the gateway run what is ready, then move its clock by `d`, then let it run what
    /// came due. Returns how far the clock has moved since the gateway started.
    pub fn advance(&self, d: Duration) -> Duration {
        let (tx, rx) = mpsc::channel();
        if self.clock.send((d, tx)).is_err() {
            panic!("the gateway has stopped: {}", self.outcome());
        }
        match rx.recv_timeout(WAIT) {
            Ok(moved) => moved,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("the gateway's clock did not move within {WAIT:?}")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                panic!("the gateway has stopped: {}", self.outcome())
            }
        }
    }

    /// Let the gateway run what is ready (without moving its clock); returns how far the clock
    /// has moved since the gateway started.
    pub fn settle(&self) -> Duration {
        self.advance(Duration::ZERO)
    }

    /// Move the clock `step` at a time until `cond` holds, looking for it for a short real
    /// while after each step; fails if it does not hold once the clock has moved `limit`
    /// (and [`WAIT`] of real time has passed after that). Returns how far it moved.
    ///
    /// For effects that need the gateway to be in some state before its clock moves (a response
    /// stalled on a client that does not read, a timer armed only once a task has run): each
    /// step is taken only after the last one's effects had a real while to show.
    pub fn advance_until(
        &self,
        step: Duration,
        limit: Duration,
        what: &str,
        mut cond: impl FnMut() -> bool,
    ) -> Duration {
        let mut moved = Duration::ZERO;
        loop {
            let look = if moved >= limit { WAIT } else { STEP_WAIT };
            let deadline = Instant::now() + look;
            loop {
                if cond() {
                    return moved;
                }
                if Instant::now() >= deadline {
                    break;
                }
                thread::sleep(Duration::from_millis(2));
            }
            assert!(
                moved < limit,
                "{what}: not after the clock moved {moved:?} (and {WAIT:?} of real time)"
            );
            self.advance(step);
            moved += step;
        }
    }

    /// Tasks alive on the gateway's runtime (each client connection is one).
    pub fn tasks(&self) -> usize {
        self.handle.metrics().num_alive_tasks()
    }

    /// Stop the gateway as SIGTERM would (stop accepting, drain, flush the audit writer), with
    /// the clock let go so the grace period passes as soon as the gateway waits on it; returns
    /// `run`'s result.
    pub fn stop(mut self) -> Result<(), String> {
        self.begin_stop();
        self.done
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| Err(format!("the gateway did not stop within {WAIT:?}")))
    }

    fn begin_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.hold.take();
    }

    /// Why the gateway thread ended, once it has.
    fn outcome(&self) -> String {
        match self.done.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(())) => "run returned Ok".into(),
            Ok(Err(e)) => format!("run failed: {e}"),
            Err(_) => "its thread is gone".into(),
        }
    }
}

impl Gateway for InProcess {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn audits(&self) -> &AuditLog {
        &self.audits
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.begin_stop();
        // Bounded: a gateway that does not stop is left behind rather than hanging the test.
        let _ = self.done.recv_timeout(WAIT);
    }
}

// === impl AuditLines ===

impl AuditLines {
    fn new(tx: AuditTx) -> AuditLines {
        AuditLines {
            partial: Vec::new(),
            tx,
        }
    }
}

impl Write for AuditLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.partial.extend_from_slice(buf);
        while let Some(end) = self.partial.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.partial.drain(..=end).collect();
            let line = std::str::from_utf8(&line[..end])
                .unwrap_or_else(|e| panic!("audit line is not UTF-8: {e}: {line:?}"));
            // A test that no longer listens has finished; the line has nowhere to go.
            let _ = self.tx.line(line);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `e` and its sources, for a failure message.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// The gateway's diagnostic log, to the test's captured output when `CHOKEPOINT_LOG` is set
/// (as the binary reads it); once per process, as tracing allows.
fn log_to_test_output() {
    if let Ok(filter) = std::env::var("CHOKEPOINT_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_ansi(false)
            .with_test_writer()
            .try_init();
    }
}

/// The clock task: for each tick, settle, move the clock, settle, answer.
async fn move_clock(mut ticks: tokio::sync::mpsc::UnboundedReceiver<Tick>) {
    let start = tokio::time::Instant::now();
    while let Some((d, answer)) = ticks.recv().await {
        settle().await;
        if !d.is_zero() {
            tokio::time::advance(d).await;
            settle().await;
        }
        let _ = answer.send(start.elapsed());
    }
}

async fn settle() {
    for _ in 0..SETTLE_ROUNDS {
        tokio::task::yield_now().await;
    }
}
