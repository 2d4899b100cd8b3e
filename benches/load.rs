//! Question: what does the gateway cost as a real process under load — CPU per forwarded request,
//! per request inside a tunnel, per new tunnel, per GiB tunnelled, memory per idle tunnel — and how
//! close does it get to the same load sent straight to the origin? These are the issue-6 targets.
//!
//! The release binary runs with a generated config as in production: audit on (stdout to a file),
//! one agent whose policy has 1,000 allow rules, limits too high to interfere. The origin and the
//! load client are in this process, written on raw tokio sockets (HTTP/1.1, `Content-Length`
//! bodies only). With 2+ cores the proxy is pinned to CPU 0 and this process to CPU 1.
//!
//! Every byte stays on 127.0.0.0/8: the origin binds 127.0.0.1, `origin.test` is a static host,
//! and the proxy's nameserver is 127.0.0.1:9 (never asked). Every loop is bounded by a deadline or
//! a count, every socket operation by a timeout.
//!
//! Peers: when `squid` or `traffic_server` is on `PATH` (Debian: `apt-get install -y squid
//! trafficserver`), the selected scenarios run again through each, after chokepoint's, with the
//! same load code: one worker (`squid -N`; one Traffic Server event thread), no cache, access log
//! on, config generated in a temp dir, pinned like the proxy. Each listens on 127.0.0.1 only and
//! is only asked for `origin.test` (squid refuses anything else), which its hosts file maps to
//! 127.0.0.1; its only nameserver is 127.0.0.1 (Traffic Server may ask it; nothing answers). CPU
//! and memory are those of the peer's process tree. A second table, "peers", prints their rows
//! with chokepoint's throughput and CPU/op divided by theirs; their JSON ids are `a@squid`, …,
//! `e@trafficserver`.
//!
//! Run: `LOAD_SECS=5 cargo bench --bench load`. Environment:
//! `LOAD_SECS` (measured seconds per scenario, default 5), `LOAD_WARM_SECS` (warm-up, default 1),
//! `LOAD_IDLE_TUNNELS` (scenario e, default 9000), `LOAD_SCENARIOS` (e.g. `a,b`; default all),
//! `LOAD_JSON` (where the results are also written as JSON, one record per table row with ids
//! `a`, `a-noproxy`, …, `d-down`, `d-up`, `d3`, `e`, plus the run's commit and settings; default
//! `load-results.json` in `CARGO_TARGET_DIR` or the crate's `target`; `benches/chart.py` draws
//! it as SVG),
//! `LOAD_PERF_DIR` (record a `perf` profile of the proxy over each measured window there, as
//! `a.data`, `b.data`, `c.data`, `d-down.data`, `d-up.data`, `d3.data`; such a run's figures
//! are perturbed by perf), `LOAD_CALLGRIND_DIR` (run the proxy under valgrind's callgrind,
//! counts zeroed when each measured window starts and dumped when it ends, into
//! `callgrind.PID.1` there: user-space
//! instructions per request that other processes on the machine cannot perturb; the proxy runs
//! some 50x slower, so only the counts mean anything).

#![allow(missing_docs, clippy::expect_used)]

use std::fs::File;
use std::future::Future;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tokio_util::sync::CancellationToken;

/// Concurrent connections of the closed-loop scenarios (a, b, c).
const CONNS: usize = 64;
/// The name the proxy resolves (statically) to the origin.
const HOST: &str = "origin.test";
/// The origin's answer to every request that is not `/bulk/N`: 100 bytes of body.
const SMALL_RESPONSE: &[u8] = concat!(
    "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
    "0123456789012345678901234567890123456789012345678901234567890123456789",
    "012345678901234567890123456789"
)
.as_bytes();
const GIB: u64 = 1 << 30;
/// Bytes moved before each bulk measurement, so the connection's buffers have grown.
const BULK_WARM: u64 = 64 << 20;
/// Read and write size of bulk transfers (and the largest buffer any `Wire` grows to).
const BULK_CHUNK: usize = 256 * 1024;
/// Initial read buffer of a connection; enough for any head this bench sees.
const SMALL_BUF: usize = 4 * 1024;
/// Bound on one exchange (connect, CONNECT, request and small response).
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on one 1 GiB transfer.
const BULK_TIMEOUT: Duration = Duration::from_secs(300);
/// An origin connection that sends no request for this long is closed.
const ORIGIN_IDLE: Duration = Duration::from_secs(120);
/// How long the proxy may take to say where it listens, or to exit after SIGTERM.
const PROCESS_WAIT: Duration = Duration::from_secs(20);
/// Latency samples kept over all connections of one run (u32 µs each: 32 MiB).
const MAX_SAMPLES: usize = 8 << 20;
/// A bound on exchanges per worker and per origin connection, besides the deadline.
const MAX_EXCHANGES: u64 = 100_000_000;
/// File descriptors kept free for everything but the idle tunnels of scenario e.
const SPARE_FDS: u64 = 256;
/// Allow rules besides `origin.test:PORT`.
const FILLER_RULES: usize = 999;

static ZEROS: [u8; BULK_CHUNK] = [0; BULK_CHUNK];

fn main() {
    let mut notes = Vec::new();
    // Before pinning, which leaves this process one CPU.
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = pin_self(nproc, &mut notes);
    let nofile = raise_nofile(&mut notes);
    let settings = Settings::from_env(nproc, pinned, nofile, &mut notes);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a tokio runtime");
    let report = rt.block_on(run(&settings));
    report.print(&settings, &notes);
    match report.write_json(&settings, &notes) {
        Ok(()) => println!("\nresults as JSON: {}", settings.json.display()),
        Err(e) => eprintln!("could not write {}: {e}", settings.json.display()),
    }
}

/// What the environment asks for, after what the machine allows.
struct Settings {
    secs: Duration,
    warm: Duration,
    idle_tunnels: usize,
    scenarios: String,
    perf_dir: Option<PathBuf>,
    callgrind_dir: Option<PathBuf>,
    /// Where the results go as JSON.
    json: PathBuf,
    /// CPUs available to the bench before it pinned itself.
    nproc: usize,
    pinned: bool,
    clk_tck: f64,
}

impl Settings {
    fn from_env(nproc: usize, pinned: bool, nofile: u64, notes: &mut Vec<String>) -> Settings {
        // A window shorter than this measures nothing worth a number.
        let secs = env_number("LOAD_SECS", 5.0).max(0.1);
        let warm = env_number("LOAD_WARM_SECS", 1.0);
        let wanted = env_number("LOAD_IDLE_TUNNELS", 9000.0) as usize;
        // Each idle tunnel costs two descriptors here (client side, origin side) and two in the
        // proxy, which inherits this process's limit.
        let fit = usize::try_from(nofile.saturating_sub(SPARE_FDS) / 2).unwrap_or(usize::MAX);
        let idle_tunnels = if wanted > fit {
            notes.push(format!(
                "scenario e: {wanted} idle tunnels need {} open files but the limit is {nofile}: \
                 lowered to {fit}",
                2 * wanted as u64 + SPARE_FDS
            ));
            fit
        } else {
            wanted
        };
        Settings {
            secs: Duration::from_secs_f64(secs),
            warm: Duration::from_secs_f64(warm),
            idle_tunnels,
            scenarios: std::env::var("LOAD_SCENARIOS").unwrap_or_else(|_| "abcde".into()),
            perf_dir: std::env::var_os("LOAD_PERF_DIR").map(PathBuf::from),
            callgrind_dir: std::env::var_os("LOAD_CALLGRIND_DIR").map(PathBuf::from),
            json: json_path(),
            nproc,
            pinned,
            clk_tck: clk_tck(),
        }
    }

    fn wants(&self, scenario: char) -> bool {
        self.scenarios.contains(scenario)
    }
}

/// `LOAD_JSON`, else `load-results.json` in the target directory: `CARGO_TARGET_DIR` if set
/// (relative to the crate's directory), else the crate's `target`.
fn json_path() -> PathBuf {
    if let Some(path) = std::env::var_os("LOAD_JSON") {
        return path.into();
    }
    let krate = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| krate.join("target"), |t| krate.join(t));
    target.join("load-results.json")
}

fn env_number(name: &str, default: f64) -> f64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n >= 0.0)
            .unwrap_or_else(|| panic!("{name}={v}: expected a non-negative number")),
        Err(_) => default,
    }
}

// === the machine: pinning, open-file limit, /proc ===

/// Pin this process (load client and origin) to CPU 1; the proxy goes on CPU 0. Runs before any
/// thread exists, so every thread inherits the mask.
fn pin_self(cores: usize, notes: &mut Vec<String>) -> bool {
    if cores < 2 {
        notes.push(format!("{cores} core available: not pinned"));
        return false;
    }
    let pid = std::process::id().to_string();
    let status = Command::new("taskset")
        .args(["-cp", "1", &pid])
        .stdout(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {
            notes.push("pinned: proxy on CPU 0, load client and origin on CPU 1".into());
            true
        }
        Ok(s) => {
            notes.push(format!("taskset failed ({s}): not pinned"));
            false
        }
        Err(e) => {
            notes.push(format!("taskset is not installed ({e}): not pinned"));
            false
        }
    }
}

/// Raise the soft open-file limit to the hard one (children inherit it); returns the soft limit.
fn raise_nofile(notes: &mut Vec<String>) -> u64 {
    let Some((soft, hard)) = nofile_limits() else {
        notes.push("cannot read the open-file limit; assuming 1024".into());
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    let pid = std::process::id().to_string();
    let raised = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status()
        .is_ok_and(|s| s.success());
    let now = nofile_limits().map_or(soft, |(s, _)| s);
    if !raised || now < hard {
        notes.push(format!(
            "could not raise the open-file limit from {soft} to {hard} (prlimit)"
        ));
    }
    now
}

/// (soft, hard) of `Max open files` in /proc/self/limits.
fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next()?.parse().ok()?;
    let hard = fields.next()?.parse().ok()?;
    Some((soft, hard))
}

/// Clock ticks per second of /proc/PID/stat.
fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (all threads), in clock ticks. `pid` may be "self".
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Children, grandchildren, … of a process (from /proc/PID/task/TID/children); a bounded walk.
fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    // Each pass takes one process off `next`; the bound stops a walk that /proc races could
    // make cyclic (pids are reused).
    for _ in 0..10_000 {
        let Some(parent) = next.pop() else { break };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

fn installed(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
}

// === one HTTP/1.1 connection, either side ===

/// What the bench needs from a request or response head.
#[derive(Debug, Default)]
struct Head {
    /// Status code of a response; 0 for a request.
    status: u16,
    /// For a request to `/bulk/N`: N, the size of the body asked for.
    bulk: Option<u64>,
    content_length: Option<u64>,
}

/// A TCP stream with a read buffer holding `buf[start..end]`.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Wire {
    fn new(stream: TcpStream, capacity: usize) -> Wire {
        // Requests and responses go out in one write each; Nagle would only add delay.
        let _ = stream.set_nodelay(true);
        Wire {
            stream,
            buf: vec![0; capacity],
            start: 0,
            end: 0,
        }
    }

    async fn connect(addr: SocketAddr, capacity: usize) -> io::Result<Wire> {
        Ok(Wire::new(TcpStream::connect(addr).await?, capacity))
    }

    /// Read one head; `None` if the peer closed before sending a byte of it.
    async fn read_head(&mut self) -> io::Result<Option<Head>> {
        let mut scanned = self.start;
        // Each pass reads at least one byte or returns; the buffer bounds the head.
        loop {
            let from = scanned.saturating_sub(3).max(self.start);
            if let Some(at) = find_blank_line(&self.buf[from..self.end]) {
                let head_end = from + at + 4;
                let head = parse_head(&self.buf[self.start..head_end])?;
                self.start = head_end;
                return Ok(Some(head));
            }
            scanned = self.end;
            if self.end == self.buf.len() {
                if self.start == 0 {
                    return Err(invalid("head larger than the read buffer"));
                }
                self.buf.copy_within(self.start..self.end, 0);
                scanned -= self.start;
                self.end -= self.start;
                self.start = 0;
            }
            let n = self.stream.read(&mut self.buf[self.end..]).await?;
            if n == 0 {
                return if self.start == self.end {
                    Ok(None)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                };
            }
            self.end += n;
        }
    }

    /// Read and drop `n` body bytes (buffered ones first). Any bytes read past them stay buffered.
    async fn discard(&mut self, n: u64) -> io::Result<()> {
        let buffered = (self.end - self.start) as u64;
        let take = n.min(buffered);
        self.start += take as usize;
        let mut left = n - take;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if left > BULK_CHUNK as u64 && self.buf.len() < BULK_CHUNK {
            self.buf.resize(BULK_CHUNK, 0);
        }
        // The buffer is empty whenever this loop reads; each pass consumes at least one byte.
        while left > 0 {
            let got = self.stream.read(&mut self.buf[..]).await?;
            if got == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if got as u64 > left {
                self.start = left as usize;
                self.end = got;
                left = 0;
            } else {
                left -= got as u64;
            }
        }
        Ok(())
    }

    /// Send `request`, read a `200` head and drop its body (a CONNECT answer has none).
    async fn exchange(&mut self, request: &[u8]) -> io::Result<Head> {
        self.stream.write_all(request).await?;
        self.read_response().await
    }

    /// Send a head announcing `n` body bytes, then `n` zero bytes; read the `200` answer.
    async fn upload(&mut self, head: &[u8], n: u64) -> io::Result<Head> {
        self.stream.write_all(head).await?;
        write_zeros(&mut self.stream, n).await?;
        self.read_response().await
    }

    async fn read_response(&mut self) -> io::Result<Head> {
        let head = self
            .read_head()
            .await?
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        if head.status != 200 {
            return Err(io::Error::other(format!("status {}", head.status)));
        }
        self.discard(head.content_length.unwrap_or(0)).await?;
        Ok(head)
    }
}

fn find_blank_line(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n")
}

fn parse_head(bytes: &[u8]) -> io::Result<Head> {
    let text = std::str::from_utf8(bytes).map_err(|_| invalid("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let (word, second) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let mut head = Head::default();
    if word.starts_with("HTTP/1.") {
        head.status = second.parse().map_err(|_| invalid("bad status code"))?;
    } else {
        head.bulk = second
            .split_once("/bulk/")
            .and_then(|(_, n)| n.parse().ok());
    }
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            let n = value.trim().parse().map_err(|_| invalid("bad length"))?;
            head.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "transfer-encoding: this bench reads Content-Length bodies only",
            ));
        }
    }
    Ok(head)
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

async fn write_zeros(stream: &mut TcpStream, n: u64) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(BULK_CHUNK as u64) as usize;
        stream.write_all(&ZEROS[..k]).await?;
        left -= k as u64;
    }
    Ok(())
}

/// `f`, failing with `TimedOut` after `limit`.
async fn within<T>(limit: Duration, f: impl Future<Output = io::Result<T>>) -> io::Result<T> {
    timeout(limit, f)
        .await
        .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()))
}

// === requests ===

fn get_absolute(port: u16, path: &str) -> Vec<u8> {
    format!("GET http://{HOST}:{port}{path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").into_bytes()
}

fn get_origin_form(port: u16, path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").into_bytes()
}

fn connect_request(port: u16) -> Vec<u8> {
    format!("CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n").into_bytes()
}

fn post_head(port: u16, len: u64) -> Vec<u8> {
    format!("POST /sink HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {len}\r\n\r\n")
        .into_bytes()
}

// === the origin ===

/// A keep-alive HTTP/1.1 origin on 127.0.0.1: `GET /bulk/N` gets N zero bytes, anything else
/// 100 bytes; a request body is read and dropped first.
struct Origin {
    addr: SocketAddr,
    stop: CancellationToken,
}

impl Origin {
    async fn start() -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the origin on 127.0.0.1");
        let addr = listener.local_addr().expect("origin address");
        let stop = CancellationToken::new();
        tokio::spawn(origin_accept(listener, stop.clone()));
        Origin { addr, stop }
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Accept until `stop`.
async fn origin_accept(listener: TcpListener, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(origin_serve(Wire::new(stream, SMALL_BUF), stop.clone()));
            }
            // Out of descriptors, most likely: the load side sees the failures.
            Err(_) => sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn origin_serve(mut wire: Wire, stop: CancellationToken) {
    for _ in 0..MAX_EXCHANGES {
        let head = tokio::select! {
            () = stop.cancelled() => return,
            r = timeout(ORIGIN_IDLE, wire.read_head()) => match r {
                Ok(Ok(Some(head))) => head,
                _ => return,
            },
        };
        if within(BULK_TIMEOUT, origin_answer(&mut wire, &head))
            .await
            .is_err()
        {
            return;
        }
    }
}

async fn origin_answer(wire: &mut Wire, head: &Head) -> io::Result<()> {
    wire.discard(head.content_length.unwrap_or(0)).await?;
    match head.bulk {
        Some(n) => {
            let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
            wire.stream.write_all(head.as_bytes()).await?;
            write_zeros(&mut wire.stream, n).await
        }
        None => wire.stream.write_all(SMALL_RESPONSE).await,
    }
}

// === the proxy process ===

/// A running `chokepoint` (release build) with audit lines going to a file, or a peer with its
/// access log going to one.
struct Proxy {
    child: Option<Child>,
    pid: u32,
    addr: SocketAddr,
    /// The audit log (chokepoint) or access log (a peer).
    audit: PathBuf,
    /// Set for a peer, whose CPU and memory are those of its process tree (helpers included).
    peer: Option<Peer>,
    _dir: tempfile::TempDir,
}

/// The audit (or access) log a proxy left.
struct AuditLog {
    bytes: u64,
    lines: u64,
}

impl Proxy {
    fn start(origin_port: u16, s: &Settings) -> Proxy {
        let dir = tempfile::tempdir().expect("create a temp dir");
        let config = dir.path().join("chokepoint.toml");
        std::fs::write(&config, config_toml(origin_port)).expect("write the proxy config");
        let audit = dir.path().join("audit.jsonl");
        let audit_out = File::create(&audit).expect("create the audit file");
        let bin = env!("CARGO_BIN_EXE_chokepoint");
        // Its own session, hence its own scheduling autogroup: with autogroups the kernel shares
        // CPU between groups first, and in this process's group the proxy's share of CPU 0
        // would depend on how busy the load client keeps CPU 1 (and on the proxy's own thread
        // count), not on its code. `setsid` and `taskset` exec in place: the pid is the proxy's.
        let mut cmd = Command::new("setsid");
        if s.pinned {
            cmd.args(["taskset", "-c", "0"]);
        }
        if let Some(dir) = &s.callgrind_dir {
            cmd.args([
                "valgrind",
                "--tool=callgrind",
                "--compress-strings=no",
                "--compress-pos=no",
            ])
            .arg(format!(
                "--callgrind-out-file={}/callgrind.%p",
                dir.display()
            ));
        }
        cmd.arg(bin);
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .env("CHOKEPOINT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(audit_out)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chokepoint");
        let stderr = child.stderr.take().expect("piped stderr");
        // Valgrind takes a while to translate the binary before it runs.
        let wait = PROCESS_WAIT * if s.callgrind_dir.is_some() { 10 } else { 1 };
        let addr = listen_addr(stderr)
            .recv_timeout(wait)
            .expect("chokepoint did not report its listen address");
        Proxy {
            pid: child.id(),
            child: Some(child),
            addr,
            audit,
            peer: None,
            _dir: dir,
        }
    }

    fn cpu_ticks(&self) -> Option<u64> {
        if self.peer.is_none() {
            return cpu_ticks(&self.pid.to_string());
        }
        let mut total = cpu_ticks(&self.pid.to_string())?;
        for pid in descendants(self.pid) {
            // A helper that exited meanwhile no longer counts; its parent reaps it.
            total += cpu_ticks(&pid.to_string()).unwrap_or(0);
        }
        Some(total)
    }

    /// VmRSS of the proxy (of a peer's process tree), in KiB.
    fn rss_kib(&self) -> Option<u64> {
        let mut total = rss_kib(self.pid)?;
        if self.peer.is_some() {
            total += descendants(self.pid)
                .into_iter()
                .filter_map(rss_kib)
                .sum::<u64>();
        }
        Some(total)
    }

    /// SIGTERM, wait (bounded) for the audit log to be flushed, and measure it. The wait is
    /// async so the origin keeps serving: tunnels end only once it has seen their close.
    async fn stop(mut self) -> AuditLog {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            let deadline = Instant::now() + PROCESS_WAIT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                sleep(Duration::from_millis(20)).await;
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        AuditLog::read(&self.audit)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Drain the proxy's stderr on a thread (until it exits); the first `listen=ADDR` is sent back.
/// Warnings and errors are echoed.
fn listen_addr(stderr: ChildStderr) -> mpsc::Receiver<SocketAddr> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if line.contains("WARN") || line.contains("ERROR") {
                eprintln!("[chokepoint] {line}");
            }
            let addr = line
                .split("listen=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.parse().ok());
            if let Some(addr) = addr {
                let _ = tx.send(addr);
            }
        }
    });
    rx
}

/// Production-like: audit on, one agent with 1,000 allow rules (999 fillers, exact and
/// wildcard, plus the origin), limits that never bind.
fn config_toml(origin_port: u16) -> String {
    let mut rules: Vec<String> = (0..FILLER_RULES)
        .map(|i| {
            if i % 10 == 0 {
                format!("\"*.zone{i}.filler.test\"")
            } else {
                format!("\"api{i}.svc{}.filler.test:443\"", i % 37)
            }
        })
        .collect();
    rules.push(format!("\"{HOST}:{origin_port}\""));
    let big = GIB * 1024;
    format!(
        r#"[server]
listen = "127.0.0.1:0"
max_connections = 100000

[timeouts]
request_header = "10s"
connect = "5s"
dns = "5s"
idle = "300s"
shutdown_grace = "1s"

[dns]
nameservers = ["127.0.0.1:9"]
hosts = {{ "{HOST}" = ["127.0.0.1"] }}

[destinations]
allow_cidrs = ["127.0.0.1/32"]

[limits]
max_request_body_bytes = {big}
max_tunnel_upload_bytes = {big}
max_response_body_bytes = {big}
requests_per_second = 1000000.0
burst = 1000000
max_concurrent = 100000

[[agents]]
name = "bench"
source_cidrs = ["127.0.0.0/8"]
policy = "bench"

[policies.bench]
allow = [
  {rules}
]
"#,
        rules = rules.join(",\n  ")
    )
}

// === peers: other proxies under the same load ===

/// A proxy the scenarios also run against when it is installed, to compare with.
#[derive(Clone, Copy)]
enum Peer {
    Squid,
    TrafficServer,
}

/// What starts a peer: its command line, and the files its logs go to.
struct PeerLaunch {
    args: Vec<String>,
    /// The access log, one line per request or tunnel.
    access_log: PathBuf,
    /// Where it says why it did not start.
    diag_log: PathBuf,
}

impl Peer {
    fn name(self) -> &'static str {
        match self {
            Peer::Squid => "squid",
            Peer::TrafficServer => "trafficserver",
        }
    }

    /// The program looked for on `PATH`.
    fn binary(self) -> &'static str {
        match self {
            Peer::Squid => "squid",
            Peer::TrafficServer => "traffic_server",
        }
    }

    /// Write the peer's config into `dir`: listen on 127.0.0.1:`port`, forward to
    /// `origin.test:origin_port` only.
    fn prepare(self, dir: &Path, port: u16, origin_port: u16) -> io::Result<PeerLaunch> {
        match self {
            Peer::Squid => {
                let conf = dir.join("squid.conf");
                std::fs::write(&conf, squid_conf(port, origin_port, dir))?;
                Ok(PeerLaunch {
                    args: vec!["squid".into(), "-N".into(), "-f".into(), path_arg(&conf)],
                    access_log: dir.join("access.log"),
                    diag_log: dir.join("cache.log"),
                })
            }
            Peer::TrafficServer => trafficserver_layout(dir, port, origin_port),
        }
    }
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

impl Proxy {
    /// `peer` with a config for this bench in a temp dir, pinned like chokepoint; ready once a
    /// GET through it gets the origin's answer (Traffic Server holds the first requests for
    /// seconds after it listens). `Err` carries why it did not start, with the end of its
    /// stderr and of its own log.
    async fn start_peer(peer: Peer, origin_port: u16, s: &Settings) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let path = dir.path();
        // Started as root, a peer drops to its own user, which writes its logs here.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
            .map_err(|e| format!("chmod {}: {e}", path.display()))?;
        let port = free_port().map_err(|e| format!("no free port on 127.0.0.1: {e}"))?;
        let hosts = path.join("hosts");
        std::fs::write(&hosts, format!("127.0.0.1 {HOST}\n"))
            .map_err(|e| format!("write {}: {e}", hosts.display()))?;
        let launch = peer
            .prepare(path, port, origin_port)
            .map_err(|e| format!("writing its config in {}: {e}", path.display()))?;
        let stderr_path = path.join("stderr");
        let stderr = File::create(&stderr_path).map_err(|e| format!("stderr file: {e}"))?;
        // As for chokepoint: its own session (autogroup), and `taskset` execs in place.
        let mut cmd = Command::new("setsid");
        if s.pinned {
            cmd.args(["taskset", "-c", "0"]);
        }
        let child = cmd
            .args(&launch.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .map_err(|e| format!("{} did not start: {e}", peer.name()))?;
        let mut proxy = Proxy {
            pid: child.id(),
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            audit: launch.access_log,
            peer: Some(peer),
            _dir: dir,
        };
        let why = |what: String| {
            format!(
                "{what}; stderr: {}; {}: {}",
                tail(&stderr_path, 5),
                launch.diag_log.display(),
                tail(&launch.diag_log, 5)
            )
        };
        let deadline = Instant::now() + PROCESS_WAIT;
        // Each pass sleeps; the deadline bounds them.
        loop {
            if let Some(Ok(Some(status))) = proxy.child.as_mut().map(Child::try_wait) {
                proxy.child = None;
                return Err(why(format!("{} exited ({status})", peer.name())));
            }
            let probe = get_absolute(origin_port, "/");
            let answered = within(Duration::from_secs(1), async {
                Wire::connect(proxy.addr, SMALL_BUF)
                    .await?
                    .exchange(&probe)
                    .await
            })
            .await;
            if answered.is_ok() {
                return Ok(proxy);
            }
            if Instant::now() >= deadline {
                // Dropping `proxy` kills it.
                return Err(why(format!(
                    "{} did not answer a GET on {} within {PROCESS_WAIT:?}",
                    peer.name(),
                    proxy.addr
                )));
            }
            sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Where Debian's Traffic Server package keeps its config; copied, then adjusted.
const TRAFFICSERVER_ETC: &str = "/etc/trafficserver";

/// Traffic Server (9.2) in `dir` as a runroot: the package's config files copied to `dir/etc`
/// and adjusted — listen on 127.0.0.1:`port` only, forward proxy (no remap), no cache (no
/// storage, no RAM cache), one event thread (it runs on one pinned core, like squid's one
/// worker), access log on (the package's `squid` format, as text), CONNECT allowed to the
/// origin's port only, and names from `dir/hosts` with nameserver 127.0.0.1 (never asked), so
/// it only ever connects to 127.0.0.1.
fn trafficserver_layout(dir: &Path, port: u16, origin_port: u16) -> io::Result<PeerLaunch> {
    let etc = dir.join("etc");
    let [run, log, cache] = ["run", "log", "cache"].map(|d| dir.join(d));
    for d in [&etc, &run, &log, &cache] {
        std::fs::create_dir(d)?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777))?;
    }
    for entry in std::fs::read_dir(TRAFFICSERVER_ETC)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            let to = etc.join(entry.file_name());
            std::fs::copy(entry.path(), &to)?;
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    std::fs::write(etc.join("storage.config"), "")?;
    let logging = std::fs::read_to_string(etc.join("logging.yaml"))?;
    std::fs::write(
        etc.join("logging.yaml"),
        logging.replace("mode: binary", "mode: ascii"),
    )?;
    let dir_s = dir.display();
    // records.config: a variable set again further down overrides the package's value.
    let mut records = std::fs::read_to_string(etc.join("records.config"))?;
    records.push_str(&format!(
        "\n# chokepoint's load bench\n\
         CONFIG proxy.config.http.server_ports STRING {port}:ipv4:ip-in=127.0.0.1\n\
         CONFIG proxy.config.url_remap.remap_required INT 0\n\
         CONFIG proxy.config.reverse_proxy.enabled INT 0\n\
         CONFIG proxy.config.http.cache.http INT 0\n\
         CONFIG proxy.config.cache.ram_cache.size INT 0\n\
         CONFIG proxy.config.exec_thread.autoconfig INT 0\n\
         CONFIG proxy.config.exec_thread.limit INT 1\n\
         CONFIG proxy.config.exec_thread.affinity INT 0\n\
         CONFIG proxy.config.accept_threads INT 0\n\
         CONFIG proxy.config.task_threads INT 1\n\
         CONFIG proxy.config.dns.nameservers STRING 127.0.0.1\n\
         CONFIG proxy.config.dns.resolv_conf STRING NULL\n\
         CONFIG proxy.config.hostdb.host_file.path STRING {dir_s}/hosts\n\
         CONFIG proxy.config.http.connect_ports STRING {origin_port}\n\
         CONFIG proxy.config.log.logfile_dir STRING {dir_s}/log\n\
         CONFIG proxy.config.log.rolling_enabled INT 0\n\
         CONFIG proxy.config.body_factory.template_sets_dir STRING {TRAFFICSERVER_ETC}/body_factory\n"
    ));
    std::fs::write(etc.join("records.config"), records)?;
    let runroot = dir.join("runroot.yaml");
    std::fs::write(
        &runroot,
        format!(
            "prefix: /usr\nexec_prefix: /usr\nbindir: /usr/bin\nsbindir: /usr/sbin\n\
             sysconfdir: {etc}\ndatadir: {cache}\nincludedir: /usr/include\n\
             libdir: /usr/lib/trafficserver\nlibexecdir: /usr/lib/trafficserver/modules\n\
             localstatedir: {run}\nruntimedir: {run}\nlogdir: {log}\ncachedir: {cache}\n",
            etc = etc.display(),
            cache = cache.display(),
            run = run.display(),
            log = log.display(),
        ),
    )?;
    Ok(PeerLaunch {
        args: vec![
            "traffic_server".into(),
            format!("--run-root={}", runroot.display()),
        ],
        access_log: log.join("squid.log"),
        diag_log: log.join("diags.log"),
    })
}

/// A port on 127.0.0.1 nothing listens on (as of now).
fn free_port() -> io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The last `n` lines of a file, joined with " | "; "-" if it is empty or unreadable.
fn tail(file: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines[lines.len().saturating_sub(n)..].join(" | ");
    if last.is_empty() {
        "-".into()
    } else {
        last
    }
}

/// Whether this process runs as root (effective uid 0, from /proc/self/status).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            Some(line.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

/// Squid as the issue measured it, on loopback: one worker, no cache (disk or memory), access
/// log on (its default `daemon` module, so a `log_file_daemon` helper writes it). It forwards
/// only to `origin.test:PORT`, which its hosts file maps to 127.0.0.1; its only nameserver is
/// 127.0.0.1, which nothing answers and which the hosts file keeps it from asking. ICP, HTCP,
/// the pinger and netdb are off, so it sends nothing anywhere else.
fn squid_conf(port: u16, origin_port: u16, dir: &Path) -> String {
    let dir = dir.display();
    let user = if is_root() {
        "cache_effective_user proxy\n"
    } else {
        ""
    };
    format!(
        r#"http_port 127.0.0.1:{port}
workers 1
{user}visible_hostname chokepoint-bench
pid_filename {dir}/squid.pid
coredump_dir {dir}
cache_log {dir}/cache.log
access_log daemon:{dir}/access.log squid
cache_store_log none
cache deny all
cache_mem 0 MB
shutdown_lifetime 0 seconds
hosts_file {dir}/hosts
dns_nameservers 127.0.0.1
icp_port 0
htcp_port 0
pinger_enable off
netdb_filename none
acl bench_client src 127.0.0.0/8
acl bench_origin dstdomain {HOST}
acl bench_port port {origin_port}
http_access allow bench_client bench_origin bench_port
http_access deny all
"#
    )
}

/// The selected scenarios against `peer`, the same load as chokepoint's; stops at the first
/// scenario the peer could not be started for.
async fn run_peer(s: &Settings, origin: &Origin, peer: Peer, report: &mut Report) {
    let closed = [
        ('a', "a: plain HTTP, keep-alive", "req/s"),
        ('b', "b: GETs in tunnels", "req/s"),
        ('c', "c: new tunnel + 1 GET", "tunnels/s"),
    ];
    for (id, name, unit) in closed {
        if !s.wants(id) {
            continue;
        }
        let port = origin.addr.port();
        let proxy = match Proxy::start_peer(peer, port, s).await {
            Ok(p) => p,
            Err(e) => return peer_down(report, peer, &id.to_string(), &e),
        };
        let tag = format!("{id}@{}", peer.name());
        let via = closed_loop(proxy.addr, &via_script(id, port), s, Some(&proxy), &tag).await;
        let log = proxy.stop().await;
        report.peer_closed(&id.to_string(), name, unit, peer, &via);
        report.notes.push(log.note_as("access log", &tag));
    }
    if s.wants('d') {
        let proxy = match Proxy::start_peer(peer, origin.addr.port(), s).await {
            Ok(p) => p,
            Err(e) => return peer_down(report, peer, "d", &e),
        };
        match peer_bulk(s, origin, &proxy).await {
            Ok((down, up, plain)) => {
                report.peer_bulk("d-down", "d: tunnel, 1 GiB down", peer, &down);
                report.peer_bulk("d-up", "d: tunnel, 1 GiB up", peer, &up);
                report.peer_bulk("d3", "d3: plain HTTP, 1 GiB down", peer, &plain);
            }
            Err(e) => report.peer_failed("d", peer, &e.to_string()),
        }
        let log = proxy.stop().await;
        report
            .notes
            .push(log.note_as("access log", &format!("d@{}", peer.name())));
    }
    if s.wants('e') {
        let proxy = match Proxy::start_peer(peer, origin.addr.port(), s).await {
            Ok(p) => p,
            Err(e) => return peer_down(report, peer, "e", &e),
        };
        match idle_rss(s, origin, &proxy).await {
            Ok(idle) => report.peer_idle(peer, idle),
            Err(e) => report.peer_failed("e", peer, &e.to_string()),
        }
        let log = proxy.stop().await;
        report
            .notes
            .push(log.note_as("access log", &format!("e@{}", peer.name())));
    }
}

/// The peer did not start for scenario `id`: a failed row and a note with the reason.
fn peer_down(report: &mut Report, peer: Peer, id: &str, error: &str) {
    report.peer_failed(id, peer, "did not start (see the notes)");
    report.notes.push(format!(
        "{}: did not start for {id}, its other scenarios skipped: {error}",
        peer.name()
    ));
}

/// d and d3 through a peer, as `bulk` runs them through chokepoint.
async fn peer_bulk(
    s: &Settings,
    origin: &Origin,
    proxy: &Proxy,
) -> io::Result<(Transfer, Transfer, Transfer)> {
    let port = origin.addr.port();
    let connect = connect_request(port);
    let (down, up) = down_and_up(s, proxy.addr, Some(&connect), port, Some(proxy)).await?;
    let get = get_absolute(port, &format!("/bulk/{GIB}"));
    let plain = plain_download(s, proxy.addr, &get, Some(proxy)).await?;
    Ok((down, up, plain))
}

// === AuditLog ===

impl AuditLog {
    fn read(path: &Path) -> AuditLog {
        let mut log = AuditLog { bytes: 0, lines: 0 };
        let Ok(mut file) = File::open(path) else {
            return log;
        };
        let mut buf = vec![0u8; 1 << 20];
        // Bounded by the file's size: each pass reads at least one byte or stops.
        while let Ok(n @ 1..) = file.read(&mut buf) {
            log.bytes += n as u64;
            log.lines += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
        }
        log
    }

    fn note(&self, scenario: &str) -> String {
        self.note_as("audit log", scenario)
    }

    /// `what` (audit log, access log) of `scenario`: its size.
    fn note_as(&self, what: &str, scenario: &str) -> String {
        format!(
            "{what} of {scenario} (warm-up included): {:.1} MB, {} lines, {} B/line",
            self.bytes as f64 / 1e6,
            self.lines,
            self.bytes.checked_div(self.lines).unwrap_or(0),
        )
    }
}

// === CPU accounting ===

/// CPU time of the proxy, of this process and of the whole machine at one instant.
#[derive(Clone, Copy)]
struct Usage {
    at: Instant,
    proxy: Option<u64>,
    own: Option<u64>,
    machine: Option<u64>,
}

/// CPU seconds over a window, and its length.
#[derive(Clone, Copy, Default)]
struct Spent {
    wall: f64,
    proxy: Option<f64>,
    own: Option<f64>,
    /// Busy CPU time of everything else on the machine: a noisy neighbour shows up here.
    others: Option<f64>,
}

impl Usage {
    fn now(proxy: Option<&Proxy>) -> Usage {
        Usage {
            at: Instant::now(),
            proxy: proxy.and_then(Proxy::cpu_ticks),
            own: cpu_ticks("self"),
            machine: machine_busy_ticks(),
        }
    }

    fn until(self, later: Usage, clk_tck: f64) -> Spent {
        let diff = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / clk_tck);
        let proxy = diff(self.proxy, later.proxy);
        let own = diff(self.own, later.own);
        let machine = diff(self.machine, later.machine);
        Spent {
            wall: (later.at - self.at).as_secs_f64(),
            proxy,
            own,
            others: machine.map(|m| (m - proxy.unwrap_or(0.0) - own.unwrap_or(0.0)).max(0.0)),
        }
    }
}

/// Busy ticks of all CPUs (the `cpu` line of /proc/stat without idle and iowait).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4);
    Some(busy.map(|(_, t)| t).sum())
}

// === closed-loop load (a, b, c) ===

/// What each client connection does.
#[derive(Clone)]
struct Script {
    /// Sent once on each new connection (a CONNECT), if any.
    preface: Option<Arc<[u8]>>,
    /// One exchange.
    request: Arc<[u8]>,
    /// A new connection (and preface) for every exchange, timed with it.
    reconnect: bool,
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
}

/// A closed-loop run: exchanges completed in the window, their sorted latencies, CPU spent.
struct Closed {
    ops: u64,
    samples: Vec<u32>,
    spent: Spent,
    errors: u64,
    first_error: Option<String>,
}

impl Closed {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.spent.wall
    }

    /// Nearest-rank percentile of the latencies, in µs; `None` without samples.
    fn percentile(&self, p: f64) -> Option<u32> {
        if self.samples.is_empty() {
            return None;
        }
        let rank = ((p * self.samples.len() as f64).ceil() as usize).clamp(1, self.samples.len());
        Some(self.samples[rank - 1])
    }

    /// Proxy CPU µs per exchange.
    fn cpu_per_op(&self) -> Option<f64> {
        Some(self.spent.proxy? * 1e6 / self.ops.max(1) as f64)
    }

    /// CPU µs per exchange of this process: the load client and the origin together.
    fn load_per_op(&self) -> Option<f64> {
        Some(self.spent.own? * 1e6 / self.ops.max(1) as f64)
    }
}

/// `CONNS` connections to `addr` running `script` back to back: warm-up, then the measured window.
async fn closed_loop(
    addr: SocketAddr,
    script: &Script,
    s: &Settings,
    proxy: Option<&Proxy>,
    name: &str,
) -> Closed {
    let now = Instant::now();
    let window = Window {
        start: now + s.warm,
        end: now + s.warm + s.secs,
    };
    let cap = MAX_SAMPLES / CONNS;
    let workers: Vec<_> = (0..CONNS)
        .map(|_| tokio::spawn(worker(addr, script.clone(), window, cap)))
        .collect();
    sleep_until(window.start).await;
    let perf = start_perf(s, proxy, name);
    let before = Usage::now(proxy);
    sleep_until(window.end).await;
    let spent = before.until(Usage::now(proxy), s.clk_tck);
    stop_perf(perf).await;
    let mut out = Closed {
        ops: 0,
        samples: Vec::new(),
        spent,
        errors: 0,
        first_error: None,
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
    }
    out.samples.sort_unstable();
    out
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
            None => open(addr, script.preface.as_deref()).await?,
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

/// A new connection to `addr`, with the CONNECT `preface` answered if there is one.
async fn open(addr: SocketAddr, preface: Option<&[u8]>) -> io::Result<Wire> {
    within(IO_TIMEOUT, async {
        let mut wire = Wire::connect(addr, SMALL_BUF).await?;
        if let Some(p) = preface {
            wire.exchange(p).await?;
        }
        Ok(wire)
    })
    .await
}

/// What profiles a measured window: a `perf record` of the proxy into `LOAD_PERF_DIR/NAME.data`,
/// and/or callgrind's collection switched on in a proxy running under it; until [`stop_perf`].
struct Profiling {
    perf: Option<Child>,
    callgrind: Option<u32>,
}

/// Start profiling the window, when asked for (perf: software clock, so it works in VMs
/// without hardware counters).
fn start_perf(s: &Settings, proxy: Option<&Proxy>, name: &str) -> Profiling {
    let callgrind = match (&s.callgrind_dir, proxy) {
        (Some(_), Some(p)) => {
            callgrind_control(&["-z"], p.pid); // counts start from zero here
            Some(p.pid)
        }
        _ => None,
    };
    let perf = match (&s.perf_dir, proxy) {
        (Some(dir), Some(proxy)) => {
            let out = dir.join(format!("{name}.data"));
            let args = [
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "999",
                "--call-graph",
                "dwarf",
            ];
            Command::new("perf")
                .args(args)
                .args(["-p", &proxy.pid.to_string(), "-o"])
                .arg(out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| eprintln!("perf did not start: {e}"))
                .ok()
        }
        _ => None,
    };
    Profiling { perf, callgrind }
}

/// `callgrind_control ARGS PID`, bounded by the tool's own timeout handling.
fn callgrind_control(args: &[&str], pid: u32) {
    let status = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("callgrind_control {args:?} {pid} failed: {status:?}");
    }
}

/// Stop profiling: dump callgrind's counts since the window started; stop `perf record`
/// (SIGINT makes it write its file) and wait for it, bounded; the wait is async so the load
/// winds down meanwhile.
async fn stop_perf(p: Profiling) {
    if let Some(pid) = p.callgrind {
        callgrind_control(&["-d"], pid);
    }
    let Some(mut perf) = p.perf else { return };
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(120);
    while matches!(perf.try_wait(), Ok(None)) && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }
    let _ = perf.kill();
    let _ = perf.wait();
}

// === bulk transfers (d) ===

/// One timed transfer of `GIB` bytes.
struct Transfer {
    spent: Spent,
}

impl Transfer {
    fn gb_per_s(&self) -> f64 {
        GIB as f64 / self.spent.wall / 1e9
    }

    /// Proxy CPU seconds per GiB.
    fn proxy_cpu(&self) -> Option<f64> {
        self.spent.proxy
    }

    /// CPU seconds per GiB of this process: the load client and the origin together.
    fn load_cpu(&self) -> Option<f64> {
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
async fn down_and_up(
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
async fn plain_download(
    s: &Settings,
    addr: SocketAddr,
    request: &[u8],
    proxy: Option<&Proxy>,
) -> io::Result<Transfer> {
    let mut wire = within(IO_TIMEOUT, Wire::connect(addr, BULK_CHUNK)).await?;
    timed(s, proxy, "d3", wire.exchange(request)).await
}

// === the report ===

/// One line of the results table, every cell formatted, and the same figures as numbers.
struct Row {
    name: String,
    cells: [String; 10],
    record: Record,
}

/// A row's figures as numbers, for the `LOAD_JSON` file; `None` (null) where the table has "-".
#[derive(Serialize, Default)]
struct Record {
    /// `a`, `a-noproxy`, `b`, `b-noproxy`, `c`, `c-noproxy`, `d-down`, `d-up`, `d3` or `e`;
    /// a peer's row is the scenario's id, `@` and the peer (`a@squid`).
    id: String,
    label: String,
    throughput: Option<Quantity>,
    /// The no-proxy throughput `ratio` divides by, in `throughput`'s unit.
    no_proxy: Option<f64>,
    ratio: Option<f64>,
    p50_us: Option<u32>,
    p99_us: Option<u32>,
    p999_us: Option<u32>,
    /// The table's "proxy CPU/op": µs per request or tunnel (a, b, c), s per GiB (d, d3), or
    /// memory, KiB per idle tunnel (e).
    proxy_per_op: Option<Quantity>,
    /// CPU of the load client and origin together (this process), in `proxy_per_op`'s unit.
    /// On a no-proxy row it is what the exchange costs both ends without a proxy: the kernel
    /// work of a connection's two ends, which a proxy, being both ends, repeats.
    load_per_op: Option<Quantity>,
    proxy_core_pct: Option<f64>,
    client_core_pct: Option<f64>,
    /// Set when other processes were busy during a window this row's figures come from.
    busy_note: Option<String>,
    /// e only.
    idle: Option<Idle>,
    /// Why the scenario has no figures.
    error: Option<String>,
    /// A peer's row: the proxy measured instead of chokepoint (`squid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<&'static str>,
    /// A peer's row: chokepoint's `throughput` in the same scenario of this run ÷ the peer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    chokepoint_throughput_ratio: Option<f64>,
    /// A peer's row: chokepoint's `proxy_per_op` in the same scenario of this run ÷ the peer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    chokepoint_per_op_ratio: Option<f64>,
}

impl Record {
    /// The figures of a closed-loop run through a proxy, against `no_proxy` (its rate).
    fn closed(
        id: String,
        label: String,
        unit: &'static str,
        via: &Closed,
        no_proxy: Option<f64>,
    ) -> Record {
        let micros = |value| Quantity { value, unit: "µs" };
        Record {
            id,
            label,
            throughput: Some(Quantity {
                value: via.rate(),
                unit,
            }),
            no_proxy,
            ratio: no_proxy.map(|n| via.rate() / n),
            p50_us: via.percentile(0.50),
            p99_us: via.percentile(0.99),
            p999_us: via.percentile(0.999),
            proxy_per_op: via.cpu_per_op().map(micros),
            load_per_op: via.load_per_op().map(micros),
            proxy_core_pct: core_pct(via.spent.proxy, via.spent.wall),
            client_core_pct: core_pct(via.spent.own, via.spent.wall),
            ..Record::default()
        }
    }

    /// The figures of a 1 GiB transfer through a proxy, against `no_proxy` (its GB/s).
    fn bulk(id: String, label: String, via: &Transfer, no_proxy: Option<f64>) -> Record {
        let per_gib = |value| Quantity {
            value,
            unit: "s/GiB",
        };
        Record {
            id,
            label,
            throughput: Some(Quantity {
                value: via.gb_per_s(),
                unit: "GB/s",
            }),
            no_proxy,
            ratio: no_proxy.map(|n| via.gb_per_s() / n),
            proxy_per_op: via.proxy_cpu().map(per_gib),
            load_per_op: via.load_cpu().map(per_gib),
            proxy_core_pct: core_pct(via.spent.proxy, via.spent.wall),
            client_core_pct: core_pct(via.spent.own, via.spent.wall),
            ..Record::default()
        }
    }
}

#[derive(Serialize)]
struct Quantity {
    value: f64,
    unit: &'static str,
}

/// Scenario e: tunnels held open and the proxy's `VmRSS` before and after opening them.
#[derive(Serialize)]
struct Idle {
    tunnels: usize,
    rss_before_kib: u64,
    rss_after_kib: u64,
}

impl Idle {
    fn per_tunnel_kib(&self) -> f64 {
        self.rss_after_kib.saturating_sub(self.rss_before_kib) as f64 / self.tunnels.max(1) as f64
    }

    fn rss_cell(&self) -> String {
        format!(
            "RSS {:.1} → {:.1} MiB",
            self.rss_before_kib as f64 / 1024.0,
            self.rss_after_kib as f64 / 1024.0
        )
    }
}

/// An issue-6 target next to what was measured.
#[derive(Serialize)]
struct Check {
    target: String,
    measured: String,
    met: bool,
}

#[derive(Default)]
struct Report {
    rows: Vec<Row>,
    /// The same scenarios against peers, in `PEER_COLUMNS`.
    peer_rows: Vec<Row>,
    checks: Vec<Check>,
    notes: Vec<String>,
}

const COLUMNS: [&str; 11] = [
    "scenario",
    "throughput",
    "no-proxy",
    "ratio",
    "p50",
    "p99",
    "p99.9",
    "proxy CPU/op",
    "load CPU/op",
    "proxy core",
    "client core",
];

const PEER_COLUMNS: [&str; 11] = [
    "scenario",
    "throughput",
    "chokepoint ÷ peer",
    "p50",
    "p99",
    "p99.9",
    "proxy CPU/op",
    "chokepoint ÷ peer",
    "load CPU/op",
    "proxy core",
    "client core",
];

/// CPU time `busy` over a window of `wall` seconds, as a percentage of one core.
fn core_pct(busy: Option<f64>, wall: f64) -> Option<f64> {
    busy.map(|b| 100.0 * b / wall)
}

fn pct(pct: Option<f64>) -> String {
    pct.map_or("-".into(), |p| format!("{p:.0}%"))
}

fn micros(us: Option<u32>) -> String {
    us.map_or("-".into(), |us| format!("{us} µs"))
}

fn micros_f(us: Option<f64>) -> String {
    us.map_or("-".into(), |us| format!("{us:.1} µs"))
}

fn times(ratio: Option<f64>) -> String {
    ratio.map_or("-".into(), |r| format!("{r:.2}×"))
}

impl Report {
    /// Rows `id` and `id-noproxy` of a closed-loop scenario.
    fn closed(&mut self, id: &str, name: &str, unit: &'static str, via: &Closed, direct: &Closed) {
        let direct_name = format!("{name}, no proxy");
        let [via_busy, direct_busy] =
            [(via, name), (direct, direct_name.as_str())].map(|(run, label)| {
                let busy = self.neighbours(label, &run.spent);
                self.failures(label, run);
                busy
            });
        let ratio = via.rate() / direct.rate();
        let cpu = via.cpu_per_op();
        let record = Record {
            busy_note: via_busy,
            ..Record::closed(id.into(), name.into(), unit, via, Some(direct.rate()))
        };
        self.rows.push(Row {
            name: name.into(),
            cells: [
                format!("{:.0} {unit}", via.rate()),
                format!("{:.0} {unit}", direct.rate()),
                format!("{ratio:.2}×"),
                micros(record.p50_us),
                micros(record.p99_us),
                micros(record.p999_us),
                cpu.map_or("-".into(), |c| format!("{c:.1} µs")),
                micros_f(via.load_per_op()),
                pct(record.proxy_core_pct),
                pct(record.client_core_pct),
            ],
            record,
        });
        let record = Record {
            id: format!("{id}-noproxy"),
            label: direct_name.clone(),
            throughput: Some(Quantity {
                value: direct.rate(),
                unit,
            }),
            p50_us: direct.percentile(0.50),
            p99_us: direct.percentile(0.99),
            p999_us: direct.percentile(0.999),
            load_per_op: direct
                .load_per_op()
                .map(|value| Quantity { value, unit: "µs" }),
            client_core_pct: core_pct(direct.spent.own, direct.spent.wall),
            busy_note: direct_busy,
            ..Record::default()
        };
        self.rows.push(Row {
            name: direct_name,
            cells: [
                format!("{:.0} {unit}", direct.rate()),
                "-".into(),
                "-".into(),
                micros(record.p50_us),
                micros(record.p99_us),
                micros(record.p999_us),
                "-".into(),
                micros_f(direct.load_per_op()),
                "-".into(),
                pct(record.client_core_pct),
            ],
            record,
        });
    }

    /// Row `id` of a 1 GiB transfer through the proxy, against `direct`.
    /// `direct_seen`: `direct` is a window an earlier row already checked for neighbours.
    fn bulk(&mut self, id: &str, name: &str, via: &Transfer, direct: &Transfer, direct_seen: bool) {
        let direct_busy = if direct_seen {
            None
        } else {
            self.neighbours(&format!("{name}, no proxy"), &direct.spent)
        };
        let busy: Vec<String> = [self.neighbours(name, &via.spent), direct_busy]
            .into_iter()
            .flatten()
            .collect();
        let ratio = via.gb_per_s() / direct.gb_per_s();
        let per_gib = via.proxy_cpu();
        let record = Record {
            busy_note: (!busy.is_empty()).then(|| busy.join("; ")),
            ..Record::bulk(id.into(), name.into(), via, Some(direct.gb_per_s()))
        };
        self.rows.push(Row {
            name: name.into(),
            cells: [
                format!("{:.2} GB/s", via.gb_per_s()),
                format!("{:.2} GB/s", direct.gb_per_s()),
                format!("{ratio:.2}×"),
                "-".into(),
                "-".into(),
                "-".into(),
                per_gib.map_or("-".into(), |c| format!("{c:.2} s/GiB")),
                via.load_cpu()
                    .map_or("-".into(), |c| format!("{c:.2} s/GiB")),
                pct(record.proxy_core_pct),
                pct(record.client_core_pct),
            ],
            record,
        });
    }

    /// Chokepoint's row `id` of this run: (throughput, proxy_per_op, no-proxy throughput).
    fn ours(&self, id: &str) -> (Option<f64>, Option<f64>, Option<f64>) {
        let Some(r) = self.rows.iter().find(|r| r.record.id == id) else {
            return (None, None, None);
        };
        let r = &r.record;
        let value = |q: &Option<Quantity>| q.as_ref().map(|q| q.value);
        (value(&r.throughput), value(&r.proxy_per_op), r.no_proxy)
    }

    /// Peer row `id@peer` of a closed-loop scenario, next to chokepoint's row `id`.
    fn peer_closed(&mut self, id: &str, name: &str, unit: &'static str, peer: Peer, via: &Closed) {
        let label = format!("{name} ({})", peer.name());
        if via.ops == 0 {
            let why = via
                .first_error
                .as_deref()
                .unwrap_or("no exchange completed");
            return self.peer_failed(id, peer, &format!("no exchange completed; first: {why}"));
        }
        let busy = self.neighbours(&label, &via.spent);
        self.failures(&label, via);
        let (ours, ours_cpu, no_proxy) = self.ours(id);
        let cpu = via.cpu_per_op();
        let record = Record {
            busy_note: busy,
            peer: Some(peer.name()),
            chokepoint_throughput_ratio: ours.map(|o| o / via.rate()),
            chokepoint_per_op_ratio: ours_cpu.zip(cpu).map(|(o, p)| o / p),
            ..Record::closed(
                format!("{id}@{}", peer.name()),
                label.clone(),
                unit,
                via,
                no_proxy,
            )
        };
        self.peer_rows.push(Row {
            name: label,
            cells: [
                format!("{:.0} {unit}", via.rate()),
                times(record.chokepoint_throughput_ratio),
                micros(record.p50_us),
                micros(record.p99_us),
                micros(record.p999_us),
                micros_f(cpu),
                times(record.chokepoint_per_op_ratio),
                micros_f(via.load_per_op()),
                pct(record.proxy_core_pct),
                pct(record.client_core_pct),
            ],
            record,
        });
    }

    /// Peer row `id@peer` of a 1 GiB transfer, next to chokepoint's row `id`.
    fn peer_bulk(&mut self, id: &str, name: &str, peer: Peer, via: &Transfer) {
        let label = format!("{name} ({})", peer.name());
        let busy = self.neighbours(&label, &via.spent);
        let (ours, ours_cpu, no_proxy) = self.ours(id);
        let per_gib = via.proxy_cpu();
        let s_per_gib = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.2} s/GiB"));
        let record = Record {
            busy_note: busy,
            peer: Some(peer.name()),
            chokepoint_throughput_ratio: ours.map(|o| o / via.gb_per_s()),
            chokepoint_per_op_ratio: ours_cpu.zip(per_gib).map(|(o, p)| o / p),
            ..Record::bulk(
                format!("{id}@{}", peer.name()),
                label.clone(),
                via,
                no_proxy,
            )
        };
        self.peer_rows.push(Row {
            name: label,
            cells: [
                format!("{:.2} GB/s", via.gb_per_s()),
                times(record.chokepoint_throughput_ratio),
                "-".into(),
                "-".into(),
                "-".into(),
                s_per_gib(per_gib),
                times(record.chokepoint_per_op_ratio),
                s_per_gib(via.load_cpu()),
                pct(record.proxy_core_pct),
                pct(record.client_core_pct),
            ],
            record,
        });
    }

    /// Peer row `e@peer`: memory per idle tunnel, next to chokepoint's row `e`.
    fn peer_idle(&mut self, peer: Peer, idle: Idle) {
        let label = format!("e: idle tunnels ({})", peer.name());
        let per = idle.per_tunnel_kib();
        let (_, ours, _) = self.ours("e");
        let ratio = ours.map(|o| o / per);
        let mut cells: [String; 10] = Default::default();
        cells[0] = format!("{} idle tunnels", idle.tunnels);
        cells[1] = idle.rss_cell();
        cells[5] = format!("{per:.2} KiB/tunnel");
        cells[6] = times(ratio);
        self.peer_rows.push(Row {
            name: label.clone(),
            cells,
            record: Record {
                id: format!("e@{}", peer.name()),
                label,
                proxy_per_op: Some(Quantity {
                    value: per,
                    unit: "KiB/tunnel",
                }),
                idle: Some(idle),
                peer: Some(peer.name()),
                chokepoint_per_op_ratio: ratio,
                ..Record::default()
            },
        });
    }

    /// Peer row `id@peer`: the scenario failed with `error`.
    fn peer_failed(&mut self, id: &str, peer: Peer, error: &str) {
        let id = format!("{id}@{}", peer.name());
        let mut cells: [String; 10] = Default::default();
        cells[0] = format!("failed: {error}");
        self.peer_rows.push(Row {
            name: id.clone(),
            cells,
            record: Record {
                id: id.clone(),
                label: id,
                error: Some(error.into()),
                peer: Some(peer.name()),
                ..Record::default()
            },
        });
    }

    /// Say so when connections of a closed-loop run failed.
    fn failures(&mut self, label: &str, run: &Closed) {
        if run.errors > 0 {
            self.notes.push(format!(
                "{label}: {} connections failed; first: {}",
                run.errors,
                run.first_error.as_deref().unwrap_or("?")
            ));
        }
    }

    /// Say so when other processes took more than 5% of a core during a measurement; the note,
    /// if any, is also returned.
    fn neighbours(&mut self, label: &str, spent: &Spent) -> Option<String> {
        let others = spent.others.filter(|o| *o > 0.05 * spent.wall)?;
        let note = format!(
            "{label}: other processes were busy {:.0}% of a core during the window",
            100.0 * others / spent.wall
        );
        self.notes.push(note.clone());
        Some(note)
    }

    /// The latency target of a and b: p99 through the proxy minus p99 without it, ≤ 0.3 ms.
    fn latency_check(&mut self, id: &str, via: &Closed, direct: &Closed) {
        let (Some(p99), Some(base)) = (via.percentile(0.99), direct.percentile(0.99)) else {
            return;
        };
        let added = (f64::from(p99) - f64::from(base)) / 1000.0;
        self.check(
            &format!("{id}: p99 added ≤ 0.3 ms"),
            format!("{added:+.2} ms"),
            added <= 0.3,
        );
    }

    fn check(&mut self, target: &str, measured: String, met: bool) {
        self.checks.push(Check {
            target: target.into(),
            measured,
            met,
        });
    }

    /// Row `id`: the scenario failed with `error`.
    fn failed(&mut self, id: &str, error: &str) {
        let mut cells: [String; 10] = Default::default();
        cells[0] = format!("failed: {error}");
        self.rows.push(Row {
            name: id.into(),
            cells,
            record: Record {
                id: id.into(),
                label: id.into(),
                error: Some(error.into()),
                ..Record::default()
            },
        });
    }

    /// Write the rows, checks and notes with the run's settings as JSON to `s.json`.
    fn write_json(&self, s: &Settings, notes: &[String]) -> io::Result<()> {
        let results = Results {
            timestamp: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            commit: git(&["rev-parse", "--short", "HEAD"]),
            dirty: git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
            nproc: s.nproc,
            pinned: s.pinned,
            load_secs: s.secs.as_secs_f64(),
            load_warm_secs: s.warm.as_secs_f64(),
            idle_tunnels: s.idle_tunnels,
            scenarios: &s.scenarios,
            rows: self
                .rows
                .iter()
                .chain(&self.peer_rows)
                .map(|r| &r.record)
                .collect(),
            checks: &self.checks,
            notes: notes
                .iter()
                .chain(&self.notes)
                .map(String::as_str)
                .collect(),
        };
        let json = serde_json::to_string_pretty(&results).map_err(io::Error::other)?;
        if let Some(dir) = s.json.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&s.json, json + "\n")
    }

    fn print(&self, s: &Settings, notes: &[String]) {
        println!();
        println!(
            "chokepoint load bench: {} s measured per scenario after {} s warm-up, {CONNS} \
             connections, audit on, {} allow rules",
            s.secs.as_secs_f64(),
            s.warm.as_secs_f64(),
            FILLER_RULES + 1
        );
        println!();
        let mut table: Vec<Vec<String>> = vec![COLUMNS.iter().map(|c| c.to_string()).collect()];
        for r in &self.rows {
            let mut line = vec![r.name.clone()];
            line.extend(r.cells.iter().cloned());
            table.push(line);
        }
        print_markdown(&table);
        if !self.peer_rows.is_empty() {
            println!();
            println!(
                "peers: the same scenarios and load through other proxies; \"chokepoint ÷ peer\" \
                 divides chokepoint's throughput, then its proxy CPU/op (memory for e), by the \
                 peer's"
            );
            println!();
            let mut table: Vec<Vec<String>> =
                vec![PEER_COLUMNS.iter().map(|c| c.to_string()).collect()];
            for r in &self.peer_rows {
                let mut line = vec![r.name.clone()];
                line.extend(r.cells.iter().cloned());
                table.push(line);
            }
            print_markdown(&table);
        }
        if !self.checks.is_empty() {
            println!();
            let mut checks = vec![vec![
                "issue-6 target".into(),
                "measured".into(),
                "met".into(),
            ]];
            for c in &self.checks {
                let met = if c.met { "yes" } else { "NO" };
                checks.push(vec![c.target.clone(), c.measured.clone(), met.into()]);
            }
            print_markdown(&checks);
        }
        println!();
        for n in notes.iter().chain(&self.notes) {
            println!("- {n}");
        }
    }
}

/// The `LOAD_JSON` file.
#[derive(Serialize)]
struct Results<'a> {
    /// When the run ended, RFC 3339, UTC.
    timestamp: String,
    /// `git rev-parse --short HEAD` of the crate's checkout; null outside one.
    commit: Option<String>,
    /// Whether tracked files differed from `commit`.
    dirty: Option<bool>,
    nproc: usize,
    pinned: bool,
    load_secs: f64,
    load_warm_secs: f64,
    idle_tunnels: usize,
    scenarios: &'a str,
    rows: Vec<&'a Record>,
    checks: &'a [Check],
    notes: Vec<&'a str>,
}

/// `git ARGS` in the crate's directory: its trimmed output, or `None` (no git, not a checkout).
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout)
        .ok()
        .map(|s| s.trim().to_string())
}

fn print_markdown(table: &[Vec<String>]) {
    let columns = table.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            table
                .iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (n, row) in table.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("| {} |", cells.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("| {} |", rule.join(" | "));
        }
    }
}

// === the scenarios ===

async fn run(s: &Settings) -> Report {
    let origin = Origin::start().await;
    let mut report = Report::default();
    if s.wants('a') {
        plain_http(s, &origin, &mut report).await;
    }
    if s.wants('b') {
        tunnelled_requests(s, &origin, &mut report).await;
    }
    if s.wants('c') {
        new_tunnels(s, &origin, &mut report).await;
    }
    if s.wants('d') {
        if let Err(e) = bulk(s, &origin, &mut report).await {
            report.failed("d", &e.to_string());
        }
    }
    if s.wants('e') {
        if let Err(e) = idle_tunnels(s, &origin, &mut report).await {
            report.failed("e", &e.to_string());
        }
    }
    for peer in [Peer::Squid, Peer::TrafficServer] {
        let name = peer.name();
        if !installed(peer.binary()) {
            report
                .notes
                .push(format!("{name}: not installed, no comparison"));
        } else if s.perf_dir.is_some() || s.callgrind_dir.is_some() {
            report.notes.push(format!(
                "{name}: not run (LOAD_PERF_DIR or LOAD_CALLGRIND_DIR profile chokepoint)"
            ));
        } else {
            run_peer(s, &origin, peer, &mut report).await;
        }
    }
    report
}

/// What each connection through a proxy does in closed-loop scenario `id` (a, b or c).
fn via_script(id: char, port: u16) -> Script {
    match id {
        'a' => Script {
            preface: None,
            request: get_absolute(port, "/").into(),
            reconnect: false,
        },
        _ => Script {
            preface: Some(connect_request(port).into()),
            request: get_origin_form(port, "/").into(),
            reconnect: id == 'c',
        },
    }
}

/// a. Absolute-form GETs on 64 keep-alive connections, 100 B answers.
async fn plain_http(s: &Settings, origin: &Origin, report: &mut Report) {
    let port = origin.addr.port();
    let direct = Script {
        preface: None,
        request: get_origin_form(port, "/").into(),
        reconnect: false,
    };
    let direct = closed_loop(origin.addr, &direct, s, None, "").await;
    let proxy = Proxy::start(port, s);
    let via = closed_loop(proxy.addr, &via_script('a', port), s, Some(&proxy), "a").await;
    let audit = proxy.stop().await;
    report.closed("a", "a: plain HTTP, keep-alive", "req/s", &via, &direct);
    report.notes.push(audit.note("a"));
    let cpu = via.cpu_per_op().unwrap_or(f64::NAN);
    let ratio = via.rate() / direct.rate();
    report.check(
        "a: ≤ 15 µs CPU/req, ≥ 0.6× no-proxy",
        format!("{cpu:.1} µs, {ratio:.2}×"),
        cpu <= 15.0 && ratio >= 0.6,
    );
    report.latency_check("a", &via, &direct);
}

/// b. 64 CONNECT tunnels, keep-alive GETs inside them.
async fn tunnelled_requests(s: &Settings, origin: &Origin, report: &mut Report) {
    let port = origin.addr.port();
    let direct = Script {
        preface: None,
        request: get_origin_form(port, "/").into(),
        reconnect: false,
    };
    let direct = closed_loop(origin.addr, &direct, s, None, "").await;
    let proxy = Proxy::start(port, s);
    let via = closed_loop(proxy.addr, &via_script('b', port), s, Some(&proxy), "b").await;
    let audit = proxy.stop().await;
    report.closed("b", "b: GETs in tunnels", "req/s", &via, &direct);
    report.notes.push(audit.note("b"));
    let cpu = via.cpu_per_op().unwrap_or(f64::NAN);
    let ratio = via.rate() / direct.rate();
    report.check(
        "b: ≤ 12 µs CPU/req, ≥ 0.95× no-proxy",
        format!("{cpu:.1} µs, {ratio:.2}×"),
        cpu <= 12.0 && ratio >= 0.95,
    );
    report.latency_check("b", &via, &direct);
}

/// c. A new tunnel and one GET per exchange, 64 at a time.
async fn new_tunnels(s: &Settings, origin: &Origin, report: &mut Report) {
    let port = origin.addr.port();
    let direct = Script {
        preface: None,
        request: get_origin_form(port, "/").into(),
        reconnect: true,
    };
    let direct = closed_loop(origin.addr, &direct, s, None, "").await;
    let proxy = Proxy::start(port, s);
    let via = closed_loop(proxy.addr, &via_script('c', port), s, Some(&proxy), "c").await;
    let audit = proxy.stop().await;
    report.closed("c", "c: new tunnel + 1 GET", "tunnels/s", &via, &direct);
    report.notes.push(audit.note("c"));
    let cpu = via.cpu_per_op().unwrap_or(f64::NAN);
    let ratio = via.rate() / direct.rate();
    report.check(
        "c: ≤ 60 µs CPU/tunnel, ≥ 0.9× no-proxy",
        format!("{cpu:.1} µs, {ratio:.2}×"),
        cpu <= 60.0 && ratio >= 0.9,
    );
}

/// d. One tunnel: 1 GiB down, 1 GiB up; d3: a plain-HTTP GET of 1 GiB.
async fn bulk(s: &Settings, origin: &Origin, report: &mut Report) -> io::Result<()> {
    let port = origin.addr.port();
    let (direct_down, direct_up) = down_and_up(s, origin.addr, None, port, None).await?;
    let proxy = Proxy::start(port, s);
    let connect = connect_request(port);
    let (down, up) = down_and_up(s, proxy.addr, Some(&connect), port, Some(&proxy)).await?;
    let get = get_absolute(port, &format!("/bulk/{GIB}"));
    let plain = plain_download(s, proxy.addr, &get, Some(&proxy)).await?;
    let audit = proxy.stop().await;
    report.bulk(
        "d-down",
        "d: tunnel, 1 GiB down",
        &down,
        &direct_down,
        false,
    );
    report.bulk("d-up", "d: tunnel, 1 GiB up", &up, &direct_up, false);
    report.bulk(
        "d3",
        "d3: plain HTTP, 1 GiB down",
        &plain,
        &direct_down,
        true,
    );
    if let (Some(dn), Some(up)) = (direct_down.load_cpu(), direct_up.load_cpu()) {
        report.notes.push(format!(
            "d, no proxy: client and origin together spent {dn:.2} s CPU per GiB down, \
             {up:.2} s per GiB up"
        ));
    }
    report.notes.push(audit.note("d"));
    for (name, t, base) in [("down", &down, &direct_down), ("up", &up, &direct_up)] {
        let ratio = t.gb_per_s() / base.gb_per_s();
        let cpu = t.proxy_cpu().unwrap_or(f64::NAN);
        report.check(
            &format!("d {name}: ≥ 0.8× no-proxy, ≤ 0.2 s CPU/GiB"),
            format!("{ratio:.2}×, {cpu:.2} s"),
            ratio >= 0.8 && cpu <= 0.2,
        );
    }
    let ratio = plain.gb_per_s() / direct_down.gb_per_s();
    report.check("d3: ≥ 0.6× no-proxy", format!("{ratio:.2}×"), ratio >= 0.6);
    Ok(())
}

/// e. Proxy memory per idle tunnel.
async fn idle_tunnels(s: &Settings, origin: &Origin, report: &mut Report) -> io::Result<()> {
    let proxy = Proxy::start(origin.addr.port(), s);
    let idle = idle_rss(s, origin, &proxy).await?;
    let audit = proxy.stop().await;
    let per = idle.per_tunnel_kib();
    let mut cells: [String; 10] = Default::default();
    cells[0] = format!("{} idle tunnels", idle.tunnels);
    cells[1] = idle.rss_cell();
    cells[6] = format!("{per:.2} KiB/tunnel");
    report.rows.push(Row {
        name: "e: idle tunnels".into(),
        cells,
        record: Record {
            id: "e".into(),
            label: "e: idle tunnels".into(),
            proxy_per_op: Some(Quantity {
                value: per,
                unit: "KiB/tunnel",
            }),
            idle: Some(idle),
            ..Record::default()
        },
    });
    report.notes.push(audit.note("e"));
    report.check(
        "e: ≤ 10 KiB per idle tunnel",
        format!("{per:.2} KiB"),
        per <= 10.0,
    );
    Ok(())
}

/// The proxy's RSS before and after opening `LOAD_IDLE_TUNNELS` tunnels through it (closed
/// again before this returns).
async fn idle_rss(s: &Settings, origin: &Origin, proxy: &Proxy) -> io::Result<Idle> {
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
                tokio::spawn(async move { open(addr, Some(&connect)).await })
            })
            .collect();
        for handle in batch {
            all.push(handle.await.map_err(io::Error::other)??);
        }
    }
    Ok(all)
}
