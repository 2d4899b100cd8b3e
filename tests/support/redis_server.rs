//! [`RedisServer`]: a real `redis-server` (Debian's package) on a loopback port of its own, for
//! the cluster-wide limit tests. No persistence (`--save '' --appendonly no`), its files in a
//! temporary directory, killed on drop. It can be stopped and started again on the same port
//! (the "store goes away, then comes back" tests).
//!
//! The port: redis cannot be told to pick one (`--port 0` means "no TCP"), so a free one is found
//! by binding 127.0.0.1:0 and closing it; if another process takes it in between, redis fails to
//! bind and the start is retried on a new port.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::WAIT;

/// A running (or stopped) `redis-server` owned by a test.
pub struct RedisServer {
    pub addr: SocketAddr,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// The ACL user and its password, when the server requires one.
    user: Option<(String, String)>,
}

impl RedisServer {
    /// Start a server without authentication.
    pub fn start() -> RedisServer {
        RedisServer::start_with(None)
    }

    /// Start a server whose only usable account is ACL user `user` with `password` (the default
    /// user is switched off).
    pub fn with_user(user: &str, password: &str) -> RedisServer {
        RedisServer::start_with(Some((user.to_owned(), password.to_owned())))
    }

    fn start_with(user: Option<(String, String)>) -> RedisServer {
        let mut server = RedisServer {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: None,
            dir: tempfile::tempdir().unwrap(),
            user,
        };
        for _ in 0..5 {
            server.addr.set_port(free_port());
            if server.spawn() {
                return server;
            }
            // Someone took the port between our probe and redis binding it: try another.
            server.kill();
        }
        panic!("redis-server did not start on a loopback port in 5 tries");
    }

    /// The same server, whose user's password is now `password` (after an `ACL SETUSER`).
    pub fn reauth(mut server: RedisServer, password: &str) -> RedisServer {
        if let Some((_, p)) = server.user.as_mut() {
            *p = password.to_owned();
        }
        server
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://{}/0", self.addr)
    }

    /// Start the process on `self.addr`; true once it answers PING.
    fn spawn(&mut self) -> bool {
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port"])
            .arg(self.addr.port().to_string())
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .args(["--daemonize", "no", "--loglevel", "warning", "--dir"])
            .arg(self.dir.path());
        if let Some((user, password)) = &self.user {
            cmd.args(["--user", "default", "off"]);
            cmd.args([
                "--user",
                user,
                "on",
                &format!(">{password}"),
                "~*",
                "&*",
                "+@all",
            ]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server (Debian package redis-server; .ci/run installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    return false; // exited: the port was taken
                }
            }
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// True when the server answers PING (authenticated when it has a user).
    pub fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut req = Vec::new();
        if let Some((user, password)) = &self.user {
            req.extend(command(&["AUTH", user, password]));
        }
        req.extend(command(&["PING"]));
        if s.write_all(&req).is_err() {
            return false;
        }
        let mut got = Vec::new();
        let mut buf = [0u8; 256];
        let want: &[u8] = if self.user.is_some() {
            b"+OK\r\n+PONG\r\n"
        } else {
            b"+PONG\r\n"
        };
        while got.len() < want.len() {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return false,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got == want
    }

    /// Run one command (test-side inspection: `DBSIZE`, `KEYS`, `ZCARD`); returns the raw reply.
    pub fn command(&self, args: &[&str]) -> String {
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2)).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut req = Vec::new();
        if let Some((user, password)) = &self.user {
            req.extend(command(&["AUTH", user, password]));
        }
        req.extend(command(args));
        s.write_all(&req).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the server has nothing more to say for a moment (replies are small).
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        match text.strip_prefix("+OK\r\n") {
            Some(rest) if self.user.is_some() => rest.to_owned(),
            _ => text,
        }
    }

    /// Stop the server (SIGKILL: as abrupt as a lost node); its data is gone.
    pub fn stop(&mut self) {
        self.kill();
    }

    /// Freeze the server (SIGSTOP): connections stay open, nothing is answered — a store slower
    /// than any timeout.
    pub fn pause(&self) {
        self.signal("STOP");
    }

    /// Thaw a paused server (SIGCONT).
    pub fn resume(&self) {
        self.signal("CONT");
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().expect("redis-server running").id();
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} redis-server");
    }

    /// Start it again on the same port, empty.
    pub fn restart(&mut self) {
        self.kill();
        // The port was ours a moment ago; a few tries cover a slow release of the socket.
        for _ in 0..50 {
            if self.spawn() {
                return;
            }
            self.kill();
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("redis-server did not restart on {}", self.addr);
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal("CONT"); // a paused server would not die of SIGKILL any slower, but be tidy
        }
        self.kill();
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A command in RESP (test-side only: the gateway talks to redis through redis-rs).
fn command(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend(format!("${}\r\n{a}\r\n", a.len()).into_bytes());
    }
    out
}
