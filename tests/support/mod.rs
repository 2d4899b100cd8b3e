//! Test support: the real `chokepoint` binary on 127.0.0.1:0 ([`Proxy`]) or the library in this
//! process on a paused clock ([`InProcess`]), real origins on loopback, audit lines captured
//! (from the binary's stdout, or from the library's audit writer) and decoded strictly.
//!
//! Traffic never leaves loopback: origins bind 127.0.0.1, and "denied" destinations are loopback
//! addresses the test config puts in `deny_cidrs` (or leaves in the built-in deny set).

#![allow(
    dead_code,
    unreachable_pub,
    missing_docs,
    clippy::unwrap_used,
    clippy::expect_used
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

mod audit;
mod builder;
mod inprocess;
mod redis_server;
pub use audit::*;
pub use builder::*;
pub use inprocess::*;
#[allow(unused_imports)] // only tests/cluster.rs runs a store
pub use redis_server::*;

/// How long any single wait in a test may take before it fails (generous: CI is a busy 2-core box).
pub const WAIT: Duration = Duration::from_secs(20);

/// A running gateway process.
pub struct Proxy {
    pub addr: SocketAddr,
    /// The HTTPS proxy listener, when the config has `tls_listen`.
    pub https: Option<SocketAddr>,
    /// The admin listener, when the config has `admin_listen`.
    pub admin: Option<SocketAddr>,
    child: Child,
    pub audits: AuditLog,
    pub stderr: Receiver<String>,
    _dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Proxy {
    /// Start the binary on `config` (a full TOML file whose `[server] listen` should be
    /// "127.0.0.1:0"), and wait until it says where it listens.
    pub fn start(config: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("chokepoint.toml");
        std::fs::write(&config_path, config).unwrap();
        Self::start_at(dir, config_path)
    }

    /// Start the binary on the config `cfg` states.
    pub fn of(cfg: &ConfigBuilder) -> Proxy {
        Proxy::start(&cfg.to_toml())
    }

    /// Start the binary on `cfg`, written as `chokepoint.toml` into `dir` (which holds the
    /// files it names: token files, certificates).
    pub fn of_in(dir: tempfile::TempDir, cfg: &ConfigBuilder) -> Proxy {
        let path = dir.path().join("chokepoint.toml");
        std::fs::write(&path, cfg.to_toml()).unwrap();
        Proxy::start_at(dir, path)
    }

    /// Start the binary on an existing config file (kept alive with `dir`).
    pub fn start_at(dir: tempfile::TempDir, config_path: PathBuf) -> Proxy {
        let mut child = Command::new(env!("CARGO_BIN_EXE_chokepoint"))
            .arg("--config")
            .arg(&config_path)
            .env("CHOKEPOINT_LOG", "info,chokepoint=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start chokepoint");

        let (atx, audits) = audit_channel();
        let stdout = child.stdout.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if !atx.line(&line) {
                    break;
                }
            }
        });
        let (etx, stderr) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("[chokepoint] {line}");
                if etx.send(line).is_err() {
                    // Keep draining so the child never blocks on a full pipe.
                    continue;
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut admin = None;
        let mut https = None;
        let addr = loop {
            let line = stderr
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .expect("chokepoint did not report its listen address");
            if let Some(rest) = line.split("https=").nth(1) {
                https = Some(rest.split_whitespace().next().unwrap().parse().unwrap());
            }
            if let Some(rest) = line.split("admin=").nth(1) {
                admin = Some(rest.split_whitespace().next().unwrap().parse().unwrap());
            }
            if let Some(rest) = line.split("listen=").nth(1) {
                break rest.split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        Proxy {
            addr,
            https,
            admin,
            child,
            audits,
            stderr,
            _dir: dir,
            config_path,
        }
    }

    /// The next audit line.
    pub fn audit(&self) -> Audit {
        self.audits.next()
    }

    /// The next audit line, which must match `m`.
    #[allow(clippy::needless_pass_by_value)] // `proxy.expect_audit(AuditMatch::of(…))` reads best
    pub fn expect_audit(&self, m: AuditMatch) -> Audit {
        self.audits.expect(&m)
    }

    /// The first audit line matching `m`, skipping others (listed if none matches).
    #[allow(clippy::needless_pass_by_value)]
    pub fn find_audit(&self, m: AuditMatch) -> Audit {
        self.audits.find(&m)
    }

    /// Assert that no further audit line arrives within `d`.
    pub fn no_audit_for(&self, d: Duration) {
        self.audits.none_for(d)
    }

    /// `http://127.0.0.1:PORT`, for `curl -x`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Send SIGTERM.
    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for the process to exit, bounded.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "chokepoint did not exit in {within:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The gateway's process id (for /proc/PID/status, /proc/PID/fd).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Wait (bounded) for a diagnostic log line containing `needle`; returns it.
    pub fn wait_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line containing {needle:?} within {WAIT:?}"),
            }
        }
    }

    /// Send a signal by name (e.g. "HUP").
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A request as an origin received it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub head: String,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }
}

/// A plain HTTP/1.1 origin on 127.0.0.1:0 written on std sockets, so what it records is exactly
/// the bytes on the wire: it answers every request with `200` and a body of
/// `"<request line>\n"` followed by the request body it received (de-chunked).
pub struct Origin {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
    pub seen: Receiver<Seen>,
}

impl Origin {
    pub fn http() -> Origin {
        Self::http_on("127.0.0.1:0")
    }

    pub fn http_on(bind: &str) -> Origin {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let (tx, seen) = mpsc::channel();
        let count = connections.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                count.fetch_add(1, Ordering::SeqCst);
                let tx = tx.clone();
                thread::spawn(move || serve_http(stream, &tx));
            }
        });
        Origin {
            addr,
            connections,
            seen,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn next_seen(&self) -> Seen {
        self.seen.recv_timeout(WAIT).expect("origin saw no request")
    }
}

fn serve_http(stream: TcpStream, tx: &mpsc::Sender<Seen>) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    loop {
        let mut head = String::new();
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
            head.push_str(&line);
        }
        let mut seen = Seen {
            head,
            body: Vec::new(),
        };
        if seen
            .header("transfer-encoding")
            .is_some_and(|v| v.contains("chunked"))
        {
            loop {
                // A body cut short (the proxy aborted it) ends this connection quietly.
                let mut size = String::new();
                if reader.read_line(&mut size).unwrap_or(0) == 0 {
                    return;
                }
                let Ok(n) = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                else {
                    return;
                };
                let mut chunk = vec![0; n + 2];
                if reader.read_exact(&mut chunk).is_err() {
                    return;
                }
                if n == 0 {
                    break;
                }
                seen.body.extend_from_slice(&chunk[..n]);
            }
        } else if let Some(len) = seen.header("content-length") {
            let mut body = vec![0; len.parse().unwrap()];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            seen.body = body;
        }
        let mut body = format!("{}\n", seen.request_line()).into_bytes();
        body.extend_from_slice(&seen.body);
        let resp = format!(
            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-origin: yes\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\n\r\n",
            body.len()
        );
        let _ = tx.send(seen);
        // One write: a head and a body written apart meet Nagle's algorithm and the reader's
        // delayed ACK, 40 ms per response.
        let mut all = resp.into_bytes();
        all.extend_from_slice(&body);
        if out.write_all(&all).is_err() {
            return;
        }
    }
}

/// A TCP echo server on `bind`, counting connections.
pub struct Echo {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicUsize>,
}

impl Echo {
    pub fn start(bind: &str) -> Echo {
        let listener = TcpListener::bind(bind).unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                count.fetch_add(1, Ordering::SeqCst);
                thread::spawn(move || {
                    let mut r = stream.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut stream);
                });
            }
        });
        Echo { addr, connections }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

/// True when the tests run under CI: `CI` is set to anything but empty, `0` or `false` (CI
/// services set `CI=true`). CI installs every tool the tests use (`.ci/run`), so there a missing
/// tool is a failure, never a skip.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"))
}

/// A test cannot do its job here because `what` is missing (a tool, or what it needs from the
/// kernel). Under CI ([`under_ci`]) that fails the test: a check that silently did not run must
/// not pass. Elsewhere it says so on stderr, and the caller returns (a skip).
pub fn skip_unless_ci(what: &str) {
    assert!(
        !under_ci(),
        "{what}: under CI (CI is set) a missing tool fails the test rather than skip it"
    );
    eprintln!("SKIPPED: {what} (under CI, CI=true, this fails instead)");
}

/// Run the test `name` of the current test binary again, in a child process whose `PATH` holds
/// only `keep` (each looked up on this process's `PATH`), with `CI=true` or without `CI`: how a
/// test that needs a tool is shown to fail under CI, and only skip elsewhere, when the tool is
/// missing. Returns the child's output.
pub fn rerun_without_tools(name: &str, keep: &[&str], ci: bool) -> std::process::Output {
    let bin = tempfile::tempdir().unwrap();
    for tool in keep {
        let out = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .unwrap();
        let found = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(
            out.status.success() && !found.is_empty(),
            "{tool} is not on PATH"
        );
        std::os::unix::fs::symlink(&found, bin.path().join(tool)).unwrap();
    }
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env("PATH", bin.path())
        .env_remove("CI");
    if ci {
        cmd.env("CI", "true");
    }
    cmd.output().unwrap()
}

/// Run curl with `args`; returns (exit code, stdout, stderr).
pub fn curl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .expect("curl is installed (.ci/run installs it)");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A raw client connection to the proxy, for exact bytes.
pub fn raw(gateway: &impl Gateway) -> TcpStream {
    let s = TcpStream::connect(gateway.addr()).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Poll `cond` every 20 ms until it holds; fails after `within`, naming `what`.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A client connection from `src` (bind before connect) to `dst`, with a read timeout.
pub fn connect_from(src: std::net::Ipv4Addr, dst: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    sock.bind(&SocketAddr::from((src, 0)).into()).unwrap();
    sock.connect_timeout(&dst.into(), WAIT).unwrap();
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// Read a response head, tolerating a close or reset (possibly before any byte): returns what
/// arrived. Fails if the peer neither answers nor closes within the read timeout.
pub fn read_head_lenient(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            Ok(_) => break,
            Err(e) if is_timeout(&e) => {
                panic!("no response and no close within the wait; got {head:?}")
            }
            Err(_) => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// One response with a Content-Length body.
pub fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    let head = read_head(s);
    assert!(head.ends_with("\r\n\r\n"), "incomplete head: {head:?}");
    let len: usize = head_header(&head, "content-length")
        .unwrap_or_else(|| panic!("no content-length in {head}"))
        .parse()
        .unwrap();
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    (head, body)
}

/// Read until the peer closes or resets; returns the bytes read. Fails if it does neither
/// within the read timeout.
pub fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if is_timeout(&e) => {
                panic!("still open after the wait ({} bytes read)", out.len())
            }
            Err(_) => return out,
        }
    }
}

/// True once the peer has closed (or reset) `s`; never blocks.
pub fn is_closed(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 1024];
    let closed = loop {
        match (&*s).read(&mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break false,
            Err(_) => break true,
        }
    };
    s.set_nonblocking(false).unwrap();
    closed
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// Raise this process's soft open-file limit to at least `n` (up to the hard limit), so a test
/// that opens thousands of sockets does not depend on the shell's `ulimit -n`. The gateway a
/// test starts afterwards inherits the limit. Fails if the hard limit is below `n`.
pub fn raise_fd_limit(n: usize) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let n = n as u64;
    let now = getrlimit(Resource::Nofile);
    if now.current.map_or(true, |c| c >= n) {
        return;
    }
    assert!(
        now.maximum.map_or(true, |m| m >= n),
        "the hard open-file limit {:?} is below the {n} this test needs",
        now.maximum
    );
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(n),
            maximum: now.maximum,
        },
    )
    .expect("raise the open-file limit");
}

/// Open file descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Read one HTTP response head (up to the blank line) from `s`.
pub fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(0) => break,
            Ok(_) => head.push(byte[0]),
            Err(e) => panic!("reading response head: {e}"),
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

impl Origin {
    /// The connections this origin has accepted, counted only once every connection made before
    /// the call has been accepted: a probe connection is made and seen to be served (accepts are
    /// handled in order), and is not counted. So "the origin saw nothing" cannot pass merely
    /// because a connection a buggy proxy just made has not been counted yet.
    pub fn settled_connections(&self) -> usize {
        let mut probe = TcpStream::connect(self.addr).unwrap();
        probe.set_read_timeout(Some(WAIT)).unwrap();
        probe.shutdown(std::net::Shutdown::Write).unwrap();
        // The origin closes a connection that ends before a request, after counting it.
        let n = probe
            .read(&mut [0u8; 1])
            .expect("origin did not serve the probe");
        assert_eq!(n, 0, "the origin answered a probe that sent nothing");
        self.connections.fetch_sub(1, Ordering::SeqCst) - 1
    }
}

/// The status code of a response head (`HTTP/1.1 403 Forbidden` → 403); 0 if there is none.
pub fn status_of(head: &str) -> u16 {
    head.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

/// The value of header `name` in a response head, if present (first occurrence).
pub fn head_header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().skip(1).find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}
