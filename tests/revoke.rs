//! Revocation reaches open connections (#14 item 1): after a reload or a token change, every open
//! tunnel and client connection is checked again, those no longer admitted are closed at once
//! and audited `revoked`, and the others are left alone.
//!
//! Binary tests: the changes arrive the way an operator makes them (file replaced, SIGHUP, a
//! Secret's token file rewritten). "At once" is asserted as closed within 1 s of the log line
//! that says the change was applied: the check runs on that event, not on a timer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use support::*;

/// How soon after the change is applied a revoked connection must be closed.
const REVOKED_WITHIN: Duration = Duration::from_secs(1);

/// Replace a file atomically, as editors, kubectl and the kubelet do.
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn basic(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
}

/// Open a tunnel on `s` to `authority` with extra head lines `extra`.
fn connect_on(mut s: TcpStream, authority: &str, extra: &str) -> TcpStream {
    s.write_all(
        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n").as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

/// Read until `s` is closed; panics if that takes longer than `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> Duration {
    let start = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("still open {within:?} after the change was applied")
            }
            Err(_) => return start.elapsed(),
        }
    }
}

/// One keep-alive GET on `s` through the proxy; returns the status.
fn get_on(s: &mut TcpStream, url: &str, extra: &str) -> u16 {
    let host = url.split('/').nth(2).unwrap();
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n").as_bytes())
        .unwrap();
    let head = read_head(s);
    let len: usize = head_header(&head, "content-length").map_or(0, |v| v.parse().unwrap());
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    status_of(&head)
}

/// The standard config with `a.test` and `b.test` on 127.0.0.1, allowing `rules`.
fn cfg(rules: &[String]) -> ConfigBuilder {
    rules.iter().fold(
        ConfigBuilder::new().hosts_to_loopback(&["a.test", "b.test"]),
        |c, r| c.allow(r.clone()),
    )
}

#[test]
fn a_reload_closes_the_tunnels_it_revokes_and_leaves_the_others() {
    let origin = Echo::start("127.0.0.1:0");
    let port = origin.addr.port();
    let (a, b) = (format!("a.test:{port}"), format!("b.test:{port}"));
    let proxy = Proxy::start(&cfg(&[a.clone(), b.clone()]).to_toml());
    let mut kept = connect_on(raw(&proxy), &a, "");
    let mut cut = connect_on(raw(&proxy), &b, "");
    echo(&mut kept, b"before");
    echo(&mut cut, b"before");

    // An unrelated reload (a rule added) drops nothing.
    replace(
        &proxy.config_path,
        &cfg(&[a.clone(), b.clone(), "c.test:443".into()]).to_toml(),
    );
    proxy.signal("HUP");
    proxy.wait_log("config reloaded");
    echo(&mut kept, b"after an unrelated reload");
    echo(&mut cut, b"after an unrelated reload");

    // b.test leaves the allowlist: its tunnel closes, a.test's stays.
    replace(&proxy.config_path, &cfg(std::slice::from_ref(&a)).to_toml());
    proxy.signal("HUP");
    proxy.wait_log("config reloaded");
    let took = closed_within(&mut cut, REVOKED_WITHIN);
    eprintln!("revoked tunnel closed {took:?} after the reload was logged");
    let line = proxy.expect_audit(
        AuditMatch::of("connect", "deny", "revoked")
            .host(Some("b.test"))
            .status(200),
    );
    let sent = (b"before".len() + b"after an unrelated reload".len()) as u64;
    assert_eq!((line.bytes_up, line.bytes_down), (sent, sent));
    echo(&mut kept, b"still open");
    drop(kept);
    proxy.expect_audit(AuditMatch::of("connect", "allow", "allowed").host(Some("a.test")));
}

#[test]
fn an_agent_removed_by_a_reload_loses_its_tunnel_and_its_keep_alive_connection() {
    let echo_srv = Echo::start("127.0.0.1:0");
    let origin = Origin::http();
    let (eport, oport) = (echo_srv.addr.port(), origin.addr.port());
    let rules = [format!("a.test:{eport}"), format!("a.test:{oport}")];
    // `guest` (127.0.0.2) is matched before `tester` (all of 127/8).
    let with_guest = cfg(&rules).agent_first(Agent::cidrs("guest", &["127.0.0.2/32"], TEST_POLICY));
    let proxy = Proxy::start(&with_guest.to_toml());
    let url = format!("http://a.test:{oport}/");

    let mut guest_tunnel = connect_on(
        connect_from(Ipv4Addr::new(127, 0, 0, 2), proxy.addr),
        &format!("a.test:{eport}"),
        "",
    );
    let mut guest_conn = connect_from(Ipv4Addr::new(127, 0, 0, 2), proxy.addr);
    assert_eq!(get_on(&mut guest_conn, &url, ""), 200);
    let mut tester_conn = raw(&proxy);
    assert_eq!(get_on(&mut tester_conn, &url, ""), 200);
    proxy.expect_audit(AuditMatch::of("http", "allow", "allowed").agent(Some("guest")));
    proxy.expect_audit(AuditMatch::of("http", "allow", "allowed").agent(Some("tester")));
    echo(&mut guest_tunnel, b"hello");

    // Without `guest`, 127.0.0.2 would be `tester`: another agent, so guest's connections end.
    replace(&proxy.config_path, &cfg(&rules).to_toml());
    proxy.signal("HUP");
    proxy.wait_log("config reloaded");
    closed_within(&mut guest_tunnel, REVOKED_WITHIN);
    closed_within(&mut guest_conn, REVOKED_WITHIN);
    proxy.expect_audit(AuditMatch::of("connect", "deny", "revoked").agent(Some("guest")));
    // The tester's kept-alive connection serves its next request.
    assert_eq!(get_on(&mut tester_conn, &url, ""), 200);
    proxy.expect_audit(AuditMatch::of("http", "allow", "allowed").agent(Some("tester")));
}

#[test]
fn a_rotated_token_closes_the_tunnels_opened_with_the_old_one() {
    let origin = Echo::start("127.0.0.1:0");
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("coder.token");
    std::fs::write(&token, "old-token\n").unwrap();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["a.test"])
        .agent_first(Agent::token("coder", &token, "coding"))
        .policy("coding", |p| p.allow = vec![format!("a.test:{port}")]);
    let proxy = Proxy::of_in(dir, &cfg);
    let auth = format!(
        "Proxy-Authorization: Basic {}\r\n",
        basic("coder", "old-token")
    );
    let mut tunnel = connect_on(raw(&proxy), &format!("a.test:{port}"), &auth);
    echo(&mut tunnel, b"with the old token");

    // No SIGHUP and no config change: the token file alone.
    replace(&token, "new-token\n");
    proxy.wait_log("proxy token rotated");
    let took = closed_within(&mut tunnel, REVOKED_WITHIN);
    eprintln!("tunnel closed {took:?} after the rotation was logged");
    let line =
        proxy.expect_audit(AuditMatch::of("connect", "deny", "revoked").agent(Some("coder")));
    assert_eq!(line.bytes_up, b"with the old token".len() as u64);

    // The new token opens tunnels; the old one is refused.
    let new_auth = format!(
        "Proxy-Authorization: Basic {}\r\n",
        basic("coder", "new-token")
    );
    let mut again = connect_on(raw(&proxy), &format!("a.test:{port}"), &new_auth);
    echo(&mut again, b"with the new token");
}

#[test]
fn a_keep_alive_connection_is_identified_on_every_request() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("coder.token");
    std::fs::write(&token, "the-token\n").unwrap();
    let cfg = ConfigBuilder::bare()
        .dest_allow("127.0.0.1/32")
        .hosts_to_loopback(&["a.test"])
        .agent(Agent::token("coder", &token, "coding"))
        .policy("coding", |p| p.allow = vec![format!("a.test:{port}")]);
    let proxy = Proxy::of_in(dir, &cfg);
    let url = format!("http://a.test:{port}/");
    let good = format!(
        "Proxy-Authorization: Basic {}\r\n",
        basic("coder", "the-token")
    );
    let bad = format!(
        "Proxy-Authorization: Basic {}\r\n",
        basic("coder", "guessed")
    );

    let mut conn = raw(&proxy);
    assert_eq!(get_on(&mut conn, &url, &good), 200);
    assert_eq!(get_on(&mut conn, &url, &bad), 407);
    assert_eq!(get_on(&mut conn, &url, ""), 407);
    proxy.expect_audit(AuditMatch::of("http", "allow", "allowed").agent(Some("coder")));
    proxy.expect_audit(AuditMatch::of("http", "deny", "auth_failed"));
    proxy.expect_audit(AuditMatch::of("http", "deny", "auth_required"));
}

/// An origin that answers one request with a head promising more body than it sends, then
/// holds the connection open: a response in flight for as long as the test needs.
fn stalled_origin() -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = read_head(&mut s);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nfirst part")
            .unwrap();
        // Held until the gateway closes its side.
        let mut buf = [0u8; 64];
        while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
    });
    (addr, t)
}

#[test]
fn a_response_in_flight_to_a_host_no_longer_allowed_is_cut_and_audited_revoked() {
    let (addr, origin) = stalled_origin();
    let rule = format!("a.test:{}", addr.port());
    let proxy = Proxy::start(&cfg(&[rule, "b.test:443".into()]).to_toml());
    let mut conn = raw(&proxy);
    let url = format!("http://a.test:{}/slow", addr.port());
    conn.write_all(
        format!("GET {url} HTTP/1.1\r\nHost: a.test:{}\r\n\r\n", addr.port()).as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut conn);
    assert_eq!(status_of(&head), 200, "{head}");

    replace(&proxy.config_path, &cfg(&["b.test:443".into()]).to_toml());
    proxy.signal("HUP");
    proxy.wait_log("config reloaded");
    closed_within(&mut conn, REVOKED_WITHIN);
    proxy.expect_audit(
        AuditMatch::of("http", "deny", "revoked")
            .path(Some("/slow"))
            .status(200),
    );
    origin.join().unwrap();
}
