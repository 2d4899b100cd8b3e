//! The proxy under test as a process: the release `chokepoint` with a generated,
//! production-like config, its CPU and memory, and the audit log it leaves. Peers
//! ([`crate::peers`]) are started as the same `Proxy`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tokio::net::TcpSocket;
use tokio::time::{sleep, Instant};

use crate::client::GIB;
use crate::error::Error;
use crate::http::HOST;
use crate::machine::{cpu_ticks, descendants, rss_kib};
use crate::peers::Peer;
use crate::settings::Settings;
use crate::tls::{Pki, SECURE_HOST};

/// How long a proxy may take to say where it listens, or to exit after SIGTERM.
pub(crate) const PROCESS_WAIT: Duration = Duration::from_secs(20);
/// Allow rules besides `origin.test:PORT`.
pub(crate) const FILLER_RULES: usize = 999;
/// `[cluster] key_prefix` of scenario r (the default, written out for [`REPLICAS_KEY`]).
const KEY_PREFIX: &str = "chokepoint:";
/// The key of the live replica set, there once a proxy's first heartbeat reached the store.
pub(crate) const REPLICAS_KEY: &str = "chokepoint:replicas";

/// A running `chokepoint` (release build) with audit lines going to a file, or a peer with its
/// access log going to one.
pub(crate) struct Proxy {
    /// The process, until it is stopped.
    pub(crate) child: Option<Child>,
    /// Its pid (setsid and taskset exec in place).
    pub(crate) pid: u32,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// The audit log (chokepoint) or access log (a peer).
    pub(crate) audit: PathBuf,
    /// Set for a peer, whose CPU and memory are those of its process tree (helpers included).
    pub(crate) peer: Option<Peer>,
    /// A peer's port, held from before it started until it is gone (see
    /// [`peers::reserve_port`](crate::peers::reserve_port)).
    pub(crate) _reserved: Option<TcpSocket>,
    /// Its config and logs; removed when the proxy is dropped.
    pub(crate) _dir: tempfile::TempDir,
}

/// The audit (or access) log a proxy left.
pub(crate) struct AuditLog {
    bytes: u64,
    lines: u64,
}

impl Proxy {
    /// The release binary with a config for this bench in a temp dir, pinned to CPU 0 when the
    /// bench is pinned; returns once it has logged where it listens.
    pub(crate) fn start(origin_port: u16, s: &Settings) -> Result<Proxy, Error> {
        Proxy::start_with(&config_toml(origin_port, &[], ""), &[], s)
    }

    /// The proxy for scenario r: the usual config, whose limits (rate, burst, concurrency, too
    /// high to refuse) are evaluated in the store at `redis` (`[cluster]`, `fail_mode =
    /// "closed"`, so a store the proxy stopped using shows as refused requests, never as
    /// cheaper in-process admissions; the default `timeout`, 50 ms), or in-process without it.
    pub(crate) fn start_limited(
        origin_port: u16,
        redis: Option<&str>,
        s: &Settings,
    ) -> Result<Proxy, Error> {
        // The default timeout (50 ms), except under callgrind: a proxy running some 50x slower
        // takes longer than that to see an answer, and would stop using the store.
        let timeout = if s.callgrind_dir.is_some() {
            "5s"
        } else {
            "50ms"
        };
        let extra = redis.map_or_else(String::new, |url| {
            format!(
                r#"
[cluster]
redis = "{url}"
timeout = "{timeout}"
fail_mode = "closed"
key_prefix = "{KEY_PREFIX}"
"#
            )
        });
        Proxy::start_with(&config_toml(origin_port, &[], &extra), &[], s)
    }

    /// The proxy with interception (scenarios i and j): `SECURE_HOST:tls_port` intercepted
    /// (no credential injected, no rules: the cost of the path itself), `HOST:tls_port` a
    /// plain tunnel to the same TLS origin, whose CA is the proxy's `upstream_ca`.
    pub(crate) fn start_intercepting(
        origin_port: u16,
        tls_port: u16,
        pki: &Pki,
        s: &Settings,
    ) -> Result<Proxy, Error> {
        let rules = [
            format!("{HOST}:{tls_port}"),
            format!("{SECURE_HOST}:{tls_port}"),
        ];
        let extra = format!(
            r#"
[[policies.bench.intercept]]
host = "{SECURE_HOST}:{tls_port}"

[intercept]
ca_cert = "gateway-ca.crt"
ca_key = "gateway-ca.key"
upstream_ca = ["origin-ca.crt"]
"#
        );
        let files = [
            ("gateway-ca.crt", pki.gateway_ca.0.as_str()),
            ("gateway-ca.key", pki.gateway_ca.1.as_str()),
            ("origin-ca.crt", pki.origin_ca.as_str()),
        ];
        Proxy::start_with(&config_toml(origin_port, &rules, &extra), &files, s)
    }

    /// The release binary on `config_text`, with `files` (name, content) beside the config.
    fn start_with(config_text: &str, files: &[(&str, &str)], s: &Settings) -> Result<Proxy, Error> {
        let dir = tempfile::tempdir().map_err(Error::io("create a temp dir"))?;
        for (name, content) in files {
            let path = dir.path().join(name);
            std::fs::write(&path, content)
                .map_err(Error::io(format!("write {}", path.display())))?;
        }
        let config = dir.path().join("chokepoint.toml");
        std::fs::write(&config, config_text)
            .map_err(Error::io(format!("write {}", config.display())))?;
        let audit = dir.path().join("audit.jsonl");
        let audit_out =
            File::create(&audit).map_err(Error::io(format!("create {}", audit.display())))?;
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
        cmd.arg(&s.chokepoint);
        let mut child = cmd
            .arg("--config")
            .arg(&config)
            .env("CHOKEPOINT_LOG", "info")
            .stdin(Stdio::null())
            .stdout(audit_out)
            .stderr(Stdio::piped())
            .spawn()
            .map_err(Error::io(format!("start {}", s.chokepoint.display())))?;
        let mut proxy = Proxy {
            pid: child.id(),
            child: None,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            audit,
            peer: None,
            _reserved: None,
            _dir: dir,
        };
        let stderr = child.stderr.take();
        // From here on, dropping `proxy` kills the child.
        proxy.child = Some(child);
        let stderr = stderr.ok_or_else(|| Error::Io {
            what: "read chokepoint's stderr".into(),
            source: io::ErrorKind::BrokenPipe.into(),
        })?;
        // Valgrind takes a while to translate the binary before it runs.
        let wait = PROCESS_WAIT * if s.callgrind_dir.is_some() { 10 } else { 1 };
        proxy.addr = listen_addr(stderr)
            .recv_timeout(wait)
            .map_err(|_| Error::NoListenAddr(wait))?;
        Ok(proxy)
    }

    /// CPU ticks of the proxy (of a peer's process tree).
    pub(crate) fn cpu_ticks(&self) -> Option<u64> {
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
    pub(crate) fn rss_kib(&self) -> Option<u64> {
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
    pub(crate) async fn stop(mut self) -> AuditLog {
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
fn config_toml(origin_port: u16, more_rules: &[String], extra: &str) -> String {
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
    rules.extend(more_rules.iter().map(|r| format!("\"{r}\"")));
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
hosts = {{ "{HOST}" = ["127.0.0.1"], "{SECURE_HOST}" = ["127.0.0.1"] }}

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
{extra}"#,
        rules = rules.join(",\n  ")
    )
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

    /// The audit log of `scenario`: its size.
    pub(crate) fn note(&self, scenario: &str) -> String {
        self.note_as("audit log", scenario)
    }

    /// `what` (audit log, access log) of `scenario`: its size.
    pub(crate) fn note_as(&self, what: &str, scenario: &str) -> String {
        format!(
            "{what} of {scenario} (warm-up included): {:.1} MB, {} lines, {} B/line",
            self.bytes as f64 / 1e6,
            self.lines,
            self.bytes.checked_div(self.lines).unwrap_or(0),
        )
    }
}
