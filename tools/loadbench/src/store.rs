//! The limit store of scenario r: a `redis-server` (Debian's package) this tool starts on
//! 127.0.0.1, and what it did over a measured window — its CPU (`utime + stime` from `/proc`)
//! and the commands it ran (`INFO commandstats`, read with the redis crate before and after).
//!
//! The server: `--bind 127.0.0.1 --port P --save '' --appendonly no`, protected mode on, no
//! service manager, files in a temp dir, killed when dropped (also when the scenario fails).
//! Redis cannot be told to pick its own port (`--port 0` means no TCP), so the port is one held
//! for it as for the peers ([`reserve_port`]): Redis sets `SO_REUSEADDR` on its listening
//! socket, so it binds the held port while no one else can take it.
//!
//! Pinning: on CPU 1 with the load client and the origin, in a session (scheduling autogroup)
//! of its own. The proxy's core stays the proxy's alone, as in production, where the store is
//! another machine; CPU 1 has room to spare in a and c (the proxy is their bottleneck), and the
//! report shows the client core's use.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;

use crate::error::Error;
use crate::machine::cpu_ticks;
use crate::peers::{reserve_port, tail};
use crate::proxy::PROCESS_WAIT;
use crate::settings::Settings;

/// Bound on each read of `INFO` (and on connecting for it).
const INFO_TIMEOUT: Duration = Duration::from_secs(2);

/// Commands the proxy's Lua scripts run inside the server (`src/limits/cluster/scripts.rs`).
/// `INFO commandstats` counts those too, but they are no round trips: a round trip is a
/// command a client sent (the proxy sends only `EVALSHA`, and `SCRIPT LOAD` when the server
/// does not know a script yet). Every other command but this tool's own `INFO` counts as one,
/// so a command the proxy starts sending is counted, never missed.
const INSIDE_SCRIPTS: [&str; 11] = [
    "time",
    "zrem",
    "zremrangebyscore",
    "zcard",
    "get",
    "set",
    "zadd",
    "pexpire",
    "pexpireat",
    "pttl",
    "incrby",
];

/// The command this tool sends itself.
const OWN: &str = "info";

/// A running `redis-server` on 127.0.0.1 and a connection to it for `INFO`.
pub(crate) struct Redis {
    child: Option<Child>,
    /// Its pid (`setsid` and `taskset` exec in place).
    pid: u32,
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    /// This tool's connection, for `INFO` (made once, before any window).
    conn: Option<redis::Connection>,
    /// Its log (stdout and stderr).
    log: PathBuf,
    /// The port, held until the server is gone.
    _reserved: TcpSocket,
    /// Its working directory; removed when dropped.
    _dir: tempfile::TempDir,
}

/// The store's counters at one instant.
#[derive(Default)]
pub(crate) struct Snapshot {
    ticks: Option<u64>,
    /// `INFO commandstats`: calls per command (`evalsha`, `client|setinfo`, …).
    calls: BTreeMap<String, u64>,
    /// `INFO stats` `total_commands_processed` (commands inside scripts included).
    total: Option<u64>,
    /// `INFO stats` `total_reads_processed`: reads from client sockets.
    reads: Option<u64>,
    /// Why `INFO` could not be read, if it could not.
    error: Option<String>,
}

/// What the store did over one or more measured windows.
#[derive(Default, Clone)]
pub(crate) struct StoreUse {
    /// CPU seconds of the server's process (all its threads).
    pub(crate) cpu: Option<f64>,
    /// Calls per command over the windows.
    pub(crate) calls: BTreeMap<String, u64>,
    /// Commands the server processed, those inside scripts included.
    pub(crate) commands: Option<u64>,
    /// Reads from client sockets: fewer than round trips when a client sends several commands
    /// in one write.
    pub(crate) reads: Option<u64>,
    /// Why some figure is missing.
    pub(crate) error: Option<String>,
}

// === impl Redis ===

impl Redis {
    /// Start `redis-server` on a held port of 127.0.0.1, pinned to CPU 1 when the bench is
    /// pinned; returns once this tool's connection to it answers `PING`.
    pub(crate) fn start(s: &Settings) -> Result<Redis, Error> {
        let dir = tempfile::tempdir().map_err(Error::io("create a temp dir"))?;
        let (reserved, port) = reserve_port().map_err(Error::io("hold a port for redis"))?;
        let log = dir.path().join("redis.log");
        let out = File::create(&log).map_err(Error::io(format!("create {}", log.display())))?;
        let err = out.try_clone().map_err(Error::io("redis's log"))?;
        // Its own session (autogroup), as the proxy: its share of CPU 1 does not depend on how
        // busy the load client keeps it.
        let mut cmd = Command::new("setsid");
        if s.pinned {
            cmd.args(["taskset", "-c", "1"]);
        }
        let child = cmd
            .args(["redis-server", "--bind", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning", "--dir"])
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(Error::io(
                "start redis-server (Debian: apt-get install -y redis-server)",
            ))?;
        let mut redis = Redis {
            pid: child.id(),
            child: Some(child),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            conn: None,
            log,
            _reserved: reserved,
            _dir: dir,
        };
        // From here on, dropping `redis` kills the server.
        redis.conn = Some(redis.wait_ready()?);
        Ok(redis)
    }

    /// `redis://127.0.0.1:PORT/0`, for `[cluster] redis`.
    pub(crate) fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// A connection that answers `PING`, within [`PROCESS_WAIT`]; `Err` if the server exits or
    /// never answers.
    fn wait_ready(&mut self) -> Result<redis::Connection, Error> {
        let deadline = Instant::now() + PROCESS_WAIT;
        let client = redis::Client::open(self.url()).map_err(|e| self.failed(&e.to_string()))?;
        let mut last = String::new();
        // Each pass sleeps; the deadline bounds them.
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return Err(self.failed(&format!("exited ({status})")));
            }
            match ping(&client) {
                Ok(conn) => return Ok(conn),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(self.failed(&format!(
            "did not answer PING within {PROCESS_WAIT:?}: {last}"
        )))
    }

    /// A start failure, with the end of the server's log.
    fn failed(&self, what: &str) -> Error {
        Error::Io {
            what: format!(
                "redis-server on {}: {what}; log: {}",
                self.addr,
                tail(&self.log, 5)
            ),
            source: std::io::ErrorKind::Other.into(),
        }
    }

    /// Whether a key exists (the proxy's replica set: its first heartbeat is done).
    pub(crate) fn exists(&mut self, key: &str) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        redis::cmd("EXISTS")
            .arg(key)
            .query::<u32>(conn)
            .is_ok_and(|n| n == 1)
    }

    /// The server's CPU ticks and command counts now: one `INFO stats commandstats`.
    pub(crate) fn snapshot(&mut self) -> Snapshot {
        let ticks = cpu_ticks(&self.pid.to_string());
        let Some(conn) = self.conn.as_mut() else {
            return Snapshot {
                ticks,
                error: Some("no connection to redis".into()),
                ..Snapshot::default()
            };
        };
        match redis::cmd("INFO")
            .arg("stats")
            .arg("commandstats")
            .query::<String>(conn)
        {
            Ok(info) => Snapshot {
                ticks,
                ..Snapshot::parse(&info)
            },
            Err(e) => Snapshot {
                ticks,
                error: Some(format!("INFO: {e}")),
                ..Snapshot::default()
            },
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Connect and `PING`, each bounded by [`INFO_TIMEOUT`].
fn ping(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let mut conn = client.get_connection_with_timeout(INFO_TIMEOUT)?;
    conn.set_read_timeout(Some(INFO_TIMEOUT))?;
    conn.set_write_timeout(Some(INFO_TIMEOUT))?;
    redis::cmd("PING").query::<String>(&mut conn)?;
    Ok(conn)
}

// === impl Snapshot ===

impl Snapshot {
    /// The counters in the text of `INFO stats commandstats`: `total_commands_processed:N` and
    /// `cmdstat_NAME:calls=N,usec=…` lines.
    fn parse(info: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        for line in info.lines() {
            let line = line.trim_end();
            if let Some(n) = line.strip_prefix("total_commands_processed:") {
                snap.total = n.parse().ok();
            } else if let Some(n) = line.strip_prefix("total_reads_processed:") {
                snap.reads = n.parse().ok();
            } else if let Some(rest) = line.strip_prefix("cmdstat_") {
                let Some((name, fields)) = rest.split_once(':') else {
                    continue;
                };
                let calls = fields
                    .split(',')
                    .find_map(|f| f.strip_prefix("calls="))
                    .and_then(|n| n.parse().ok());
                if let Some(calls) = calls {
                    snap.calls.insert(name.to_owned(), calls);
                }
            }
        }
        snap
    }

    /// What happened from `self` to `later`.
    pub(crate) fn until(&self, later: &Snapshot, clk_tck: f64) -> StoreUse {
        let cpu = match (self.ticks, later.ticks) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / clk_tck),
            _ => None,
        };
        let calls = later
            .calls
            .iter()
            .map(|(name, n)| {
                let before = self.calls.get(name).copied().unwrap_or(0);
                (name.clone(), n.saturating_sub(before))
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        let delta = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?));
        StoreUse {
            cpu,
            calls,
            commands: delta(self.total, later.total),
            reads: delta(self.reads, later.reads),
            error: self.error.clone().or_else(|| later.error.clone()),
        }
    }
}

// === impl StoreUse ===

impl StoreUse {
    /// The sum of two windows' use.
    pub(crate) fn add(&mut self, other: &StoreUse) {
        self.cpu = self.cpu.zip(other.cpu).map(|(a, b)| a + b);
        for (name, n) in &other.calls {
            *self.calls.entry(name.clone()).or_default() += n;
        }
        self.commands = self.commands.zip(other.commands).map(|(a, b)| a + b);
        self.reads = self.reads.zip(other.reads).map(|(a, b)| a + b);
        self.error = self.error.take().or_else(|| other.error.clone());
    }

    /// Round trips: commands clients sent (every command but those the proxy's scripts run
    /// inside the server, and this tool's `INFO`).
    pub(crate) fn round_trips(&self) -> u64 {
        self.calls
            .iter()
            .filter(|(name, _)| !INSIDE_SCRIPTS.contains(&name.as_str()) && *name != OWN)
            .map(|(_, n)| n)
            .sum()
    }

    /// Calls of one command.
    pub(crate) fn calls_of(&self, name: &str) -> u64 {
        self.calls.get(name).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The counters of `INFO stats commandstats` as Redis 7 writes them, and round trips
    /// counted without the commands run inside scripts and without `INFO`.
    #[test]
    fn info_is_parsed_and_round_trips_leave_out_script_commands() {
        let before = Snapshot::parse(
            "# Stats\r\ntotal_connections_received:3\r\ntotal_commands_processed:10\r\n\
             total_reads_processed:12\r\n\
             # Commandstats\r\n\
             cmdstat_evalsha:calls=4,usec=75,usec_per_call=18.75,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_info:calls=1,usec=9,usec_per_call=9.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let after = Snapshot::parse(
            "# Stats\r\ntotal_commands_processed:131\r\ntotal_reads_processed:40\r\n\
             # Commandstats\r\n\
             cmdstat_evalsha:calls=24,usec=75,usec_per_call=3.1,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_zrem:calls=5,usec=10,usec_per_call=2.0,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_client|setinfo:calls=2,usec=1,usec_per_call=0.5,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_time:calls=20,usec=9,usec_per_call=0.4,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_zadd:calls=20,usec=9,usec_per_call=0.4,rejected_calls=0,failed_calls=0\r\n\
             cmdstat_info:calls=2,usec=9,usec_per_call=9.00,rejected_calls=0,failed_calls=0\r\n",
        );
        let used = before.until(&after, 100.0);
        assert_eq!(used.commands, Some(121));
        assert_eq!(used.reads, Some(28));
        assert_eq!(used.calls_of("evalsha"), 20);
        assert_eq!(used.calls_of("zrem"), 5);
        assert_eq!(
            used.round_trips(),
            20 + 2,
            "evalsha and client|setinfo; zrem runs inside the scripts"
        );
        let mut twice = used.clone();
        twice.add(&used);
        assert_eq!(twice.round_trips(), 44);
        assert_eq!(twice.commands, Some(242));
    }
}
