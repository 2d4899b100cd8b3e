#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

//! Resource bounds that hold under abuse, on loopback: the connection cap across both
//! listeners, header count and line length, slowloris heads and quiet keep-alive connections, a
//! client that never reads its response, tunnels that hold their agent's permits while
//! handshaking or dialling, no state keyed by what unknown clients send, and 5,000 stalled
//! connections. Each case checks the refusal or cut, its audit line where one is written, and
//! that the gateway still serves a normal request afterwards. Every address is in 127.0.0.0/8.
//!
//! Cases that cross a timeout run the gateway in this process on a paused clock
//! ([`InProcess`]) and move the clock past the bound instead of waiting it out; the others run
//! the real binary ([`Proxy`]), whose descriptors and log lines they read.
//!
//! No case is timed and none measures memory: how soon a cut comes and what the gateway's RSS
//! does meanwhile are measured by the benchmarks.

mod support;

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use base64::Engine;
use socket2::{Domain, Socket, Type};
use support::*;

// === the gateway process: memory and descriptors ===

/// Open file descriptors of the gateway.
fn gateway_fds(proxy: &Proxy) -> usize {
    open_fds(proxy.pid())
}

// === client side ===

/// A normal request still works: `GET http://origin.test:PORT/after` is answered by the
/// origin and audited as allowed.
fn still_serves(proxy: &impl Gateway, origin: &Origin) {
    let port = origin.addr.port();
    let mut s = raw(proxy);
    s.write_all(
        format!(
            "GET http://origin.test:{port}/after HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let (head, body) = read_response(&mut s);
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(body.starts_with(b"GET /after HTTP/1.1\n"), "{body:?}");
    proxy
        .audits()
        .expect(&AuditMatch::of("http", "allow", "allowed").path(Some("/after")));
}

/// An origin on 127.0.0.1, and the standard test config allowing it as `origin.test:PORT`.
fn origin_and_config() -> (Origin, ConfigBuilder) {
    let origin = Origin::http();
    let port = origin.addr.port();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["origin.test"])
        .allow(format!("origin.test:{port}"));
    (origin, cfg)
}

// === 1. the connection cap covers the HTTPS listener ===

#[test]
fn https_listener_connections_count_against_max_connections() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), cert.signing_key.serialize_pem()).unwrap();
    let cfg = ConfigBuilder::new()
        .max_connections(2)
        .tls("tls.crt", "tls.key")
        .hosts_to_loopback(&["origin.test"])
        .allow(format!("origin.test:{port}"))
        // Long enough that neither held connection is cut by the head or handshake bound.
        .request_header(Duration::from_secs(20));
    let proxy = Proxy::of_in(dir, &cfg);
    let https = proxy.https.expect("the HTTPS listener is up");

    // Slot 1: a client of the HTTPS listener that has not started its handshake; slot 2: a
    // plain client that has sent nothing. Both are accepted (two more descriptors).
    let fds = gateway_fds(&proxy);
    let tls_client = TcpStream::connect(https).unwrap();
    let plain = raw(&proxy);
    wait_until(WAIT, "both connections accepted", || {
        gateway_fds(&proxy) >= fds + 2
    });

    // A third, on either listener, is closed at once without an answer.
    for (listener, addr) in [("plain", proxy.addr), ("https", https)] {
        let mut third = TcpStream::connect(addr).unwrap();
        third.set_read_timeout(Some(WAIT)).unwrap();
        let _ = third.write_all(b"GET http://origin.test/ HTTP/1.1\r\n\r\n");
        let got = read_until_closed(&mut third);
        assert!(
            got.is_empty(),
            "{listener}: the third connection got an answer"
        );
        proxy.wait_log("connection limit reached");
    }
    // Refused at accept, before any request: no audit line.
    proxy.no_audit_for(Duration::from_millis(300));

    // The HTTPS client leaves (mid-handshake: not audited); its slot serves a plain request.
    drop(tls_client);
    wait_until(WAIT, "the HTTPS slot is released", || {
        gateway_fds(&proxy) <= fds + 1
    });
    still_serves(&proxy, &origin);
    drop(plain);
    assert_eq!(origin.settled_connections(), 1, "only the normal request");
}

// === 2. header count, header line and request line length ===

#[test]
fn header_count_and_line_length_are_bounded_and_audited() {
    let origin = Origin::http();
    let port = origin.addr.port();
    // `tester` (127.0.0.1) may send 4 KiB heads. `wide` (127.0.0.2) may send the most any
    // config allows, 256 KiB, which sizes every connection's read buffer (256 + 8 KiB): a URI
    // can then pass hyper's own URI limit (65,534 bytes) before the buffer fills.
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["origin.test"])
        .allow(format!("origin.test:{port}"))
        .test_limits(|l| l.max_request_header_bytes = Some(4096))
        .agent_first(Agent::cidrs("wide", &["127.0.0.2/32"], "wide"))
        .policy("wide", |p| {
            p.limits().max_request_header_bytes = Some(262_144)
        });
    let proxy = Proxy::of(&cfg);
    let target = format!("http://origin.test:{port}");
    let host = format!("Host: origin.test:{port}\r\n");

    // 100 header fields (Host and 99 more): the most hyper is configured to parse; forwarded.
    let mut head = format!("GET {target}/hundred HTTP/1.1\r\n{host}");
    for i in 1..100 {
        head.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    head.push_str("\r\n");
    assert!(head.len() < 4096);
    let mut s = raw(&proxy);
    s.write_all(head.as_bytes()).unwrap();
    let (resp, _) = read_response(&mut s);
    assert_eq!(status_of(&resp), 200, "100 headers: {resp}");
    let seen = origin.next_seen();
    assert!(seen.header("x-h99").is_some(), "{}", seen.head);
    assert_eq!(proxy.audit().reason, "allowed");

    // Each refusal: (what, bytes, from, status the client gets, chokepoint-reason present,
    // audit event). The head parser answers what it cannot parse (a bare 431 or 414, event
    // `reject`); the agent's cap answers what parses but is over it (431 with the reason).
    let long_value = "a".repeat(4200);
    let long_path = "p".repeat(4200);
    let huge_path = "p".repeat(300 * 1024);
    let uri_over_hyper = "u".repeat(70_000);
    let mut many = format!("GET {target}/many HTTP/1.1\r\n{host}");
    for i in 1..101 {
        many.push_str(&format!("X-H{i}: {i}\r\n"));
    }
    many.push_str("\r\n");
    let cases: Vec<(&str, String, Ipv4Addr, u16, bool, &str)> = vec![
        (
            "101 header fields",
            many,
            Ipv4Addr::LOCALHOST,
            431,
            false,
            "reject",
        ),
        (
            "one 4.2 KiB header line",
            format!("GET {target}/x HTTP/1.1\r\n{host}X-Long: {long_value}\r\n\r\n"),
            Ipv4Addr::LOCALHOST,
            431,
            true,
            "http",
        ),
        (
            "a 4.2 KiB request line",
            format!("GET {target}/{long_path} HTTP/1.1\r\n{host}\r\n"),
            Ipv4Addr::LOCALHOST,
            431,
            true,
            "http",
        ),
        (
            "a request line that never ends (past the read buffer)",
            format!("GET {target}/{huge_path}"),
            Ipv4Addr::LOCALHOST,
            431,
            false,
            "reject",
        ),
        (
            "a 70,000-byte URI within the agent's 256 KiB cap",
            format!("GET {target}/{uri_over_hyper} HTTP/1.1\r\n{host}\r\n"),
            Ipv4Addr::new(127, 0, 0, 2),
            414,
            false,
            "reject",
        ),
    ];
    for (what, bytes, from, status, ours, event) in cases {
        let mut s = connect_from(from, proxy.addr);
        // The gateway may answer and close before reading everything: write from a thread.
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let _ = w.write_all(bytes.as_bytes());
        });
        let resp = read_head_lenient(&mut s);
        writer.join().unwrap();
        // Past the read buffer the gateway closes with bytes unread, and the reset may destroy
        // the 431 before the client reads it; the audit line says what was sent.
        let reset_ok = what.contains("past the read buffer") && resp.is_empty();
        if !reset_ok {
            assert_eq!(status_of(&resp), status, "{what}: {resp}");
            assert_eq!(
                head_header(&resp, "chokepoint-reason") == Some("header_too_large"),
                ours,
                "{what}: {resp}"
            );
        }
        let a = proxy.audit();
        assert_eq!(
            (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
            (event, "deny", "header_too_large"),
            "{what}: {a:?}"
        );
        assert_eq!(
            a.status,
            Some(status),
            "{what}: the audit records what was sent"
        );
        assert_eq!(a.upstream, None, "{what}");
        assert!(a.client.starts_with(&format!("{from}:")), "{what}: {a:?}");
    }
    assert_eq!(
        origin.settled_connections(),
        1,
        "the origin saw only the 100-header request"
    );
    still_serves(&proxy, &origin);
}

// === 3. slowloris, and quiet keep-alive connections ===

#[test]
fn a_keep_alive_exchange_is_not_cut_while_the_clock_is_paused() {
    // What every in-process case here rests on (tests/support/inprocess.rs): while the
    // gateway's clock is paused, a connection waiting in real time for its client's next
    // request keeps waiting. Were the clock to jump to the next timer whenever the runtime is
    // idle (tokio's auto-advance), hyper's header timer would cut it between requests.
    let (origin, cfg) = origin_and_config();
    let proxy = InProcess::of(&cfg.request_header(Duration::from_secs(2)));
    let port = origin.addr.port();
    let mut s = raw(&proxy);
    for i in 0..3 {
        s.write_all(
            format!(
                "GET http://origin.test:{port}/ka{i} HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let (head, body) = read_response(&mut s);
        assert_eq!(status_of(&head), 200, "request {i}: {head}");
        let want = format!("GET /ka{i} HTTP/1.1\n");
        assert!(body.starts_with(want.as_bytes()), "request {i}: {body:?}");
        let path = format!("/ka{i}");
        proxy.expect_audit(AuditMatch::of("http", "allow", "allowed").path(Some(&path)));
        // Real time passes with the runtime idle and the head timer armed.
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(proxy.settle(), Duration::ZERO, "the paused clock moved");
    assert!(
        !is_closed(&s),
        "the connection was cut while the clock was paused"
    );
    // And it stops as the binary does on SIGTERM: the idle connection is closed, `run` ends.
    assert_eq!(proxy.stop(), Ok(()));
    assert!(read_until_closed(&mut s).is_empty());
}

#[test]
fn a_head_trickled_byte_by_byte_is_cut_at_request_header() {
    let bound = Duration::from_secs(2);
    let (origin, cfg) = origin_and_config();
    let proxy = InProcess::of(&cfg.request_header(bound));
    let port = origin.addr.port();
    let head = format!(
        "GET http://origin.test:{port}/slow HTTP/1.1\r\nHost: origin.test:{port}\r\nX-Slow: {}\r\n\r\n",
        "s".repeat(20)
    );
    let mut s = raw(&proxy);
    s.set_nodelay(true).unwrap();
    let client = s.local_addr().unwrap().to_string();
    // One byte every 100 ms of the gateway's clock: the whole head would take ~10 s, each byte
    // well inside any per-read timeout. A write fails once the gateway has closed the
    // connection (the first one after the close draws a reset).
    for b in head.bytes() {
        if s.write_all(&[b]).is_err() {
            break;
        }
        proxy.advance(Duration::from_millis(100));
    }
    let answer = read_until_closed(&mut s);
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    // Cut, though every byte came well inside any per-read bound: the bound counts from the
    // first read of the head (the whole head would have taken five times the bound).
    proxy.expect_audit(
        AuditMatch::of("reject", "deny", "header_timeout")
            .method(None)
            .and(format!("client == {client}"), move |a| a.client == client),
    );
    assert_eq!(origin.settled_connections(), 0);
    still_serves(&proxy, &origin);
}

#[test]
fn a_quiet_keep_alive_connection_is_closed_after_request_header_without_audit() {
    let bound = Duration::from_secs(2);
    let (origin, cfg) = origin_and_config();
    let proxy = InProcess::of(&cfg.request_header(bound));
    let port = origin.addr.port();
    let mut s = raw(&proxy);
    s.write_all(
        format!("GET http://origin.test:{port}/one HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let (head, _) = read_response(&mut s);
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(
        head_header(&head, "connection").is_none(),
        "kept alive: {head}"
    );
    assert_eq!(proxy.audit().reason, "allowed");

    // Quiet for the bound (and far less than `idle`): the head timer, armed again for the
    // next request, closes the connection.
    proxy.advance(bound);
    let rest = read_until_closed(&mut s);
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    // Going quiet between requests is not a refusal: no line.
    proxy.no_audit_for(Duration::from_millis(500));
    still_serves(&proxy, &origin);
}

// === 4. a client that never reads its response ===

/// An origin that answers `GET /bytes/N` with N zero bytes (Content-Length), writing for as long
/// as the reader takes them, and records how much it wrote and whether the reader went away.
struct BigOrigin {
    addr: SocketAddr,
    /// Bytes of body written, over all connections.
    written: Arc<AtomicU64>,
    /// Set when a write failed: the reader (the gateway) closed the connection.
    cut: Arc<AtomicBool>,
}

impl BigOrigin {
    fn start() -> BigOrigin {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let written = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let (w, c) = (written.clone(), cut.clone());
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (w, c) = (w.clone(), c.clone());
                thread::spawn(move || serve_big(stream, &w, &c));
            }
        });
        BigOrigin { addr, written, cut }
    }
}

fn serve_big(mut stream: TcpStream, written: &AtomicU64, cut: &AtomicBool) {
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream.set_write_timeout(Some(WAIT)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 64 * 1024 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let len: u64 = head
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.strip_prefix("/bytes/"))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\nconnection: close\r\n\r\n");
    if stream.write_all(resp.as_bytes()).is_err() {
        return;
    }
    let chunk = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        match stream.write(&chunk[..n]) {
            Ok(n) => {
                left -= n as u64;
                written.fetch_add(n as u64, Ordering::SeqCst);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => return,
            Err(_) => {
                cut.store(true, Ordering::SeqCst);
                return;
            }
        }
    }
}

#[test]
fn a_client_that_never_reads_is_cut_after_idle() {
    let big = BigOrigin::start();
    let bport = big.addr.port();
    let idle = Duration::from_secs(1);
    let (origin, cfg) = origin_and_config();
    let proxy = InProcess::of(
        &cfg.idle(idle)
            .hosts_to_loopback(&["big.test"])
            .allow(format!("big.test:{bport}"))
            .test_limits(|l| l.max_response_body_bytes = Some(2 << 30)),
    );
    let get = |n: u64| {
        format!(
            "GET http://big.test:{bport}/bytes/{n} HTTP/1.1\r\nHost: big.test:{bport}\r\nConnection: close\r\n\r\n"
        )
    };

    // Warm-up: 8 MiB read in full, so buffers and allocator arenas exist before the baseline.
    let mut s = raw(&proxy);
    s.write_all(get(8 << 20).as_bytes()).unwrap();
    let all = read_until_closed(&mut s);
    assert!(all.len() > 8 << 20, "{}", all.len());
    let a = proxy.audit();
    assert_eq!((a.reason.as_str(), a.bytes_down), ("allowed", 8 << 20));

    // 1 GiB asked for, not a byte read: the client's receive window fills, the response
    // stalls, and `idle` cuts it. The clock moves a tenth of `idle` at a time, each step after
    // a real while for bytes to move: `idle` passes only over ten steps in which none did.
    let mut s = raw(&proxy);
    s.write_all(get(1 << 30).as_bytes()).unwrap();
    proxy.advance_until(idle / 10, 100 * idle, "the stalled response cut", || {
        big.cut.load(Ordering::SeqCst)
    });
    let a = proxy.expect_audit(AuditMatch::of("http", "allow", "idle_timeout").status(200));
    assert!(a.bytes_down < 1 << 30, "{a:?}");
    assert!(
        big.written.load(Ordering::SeqCst) < 1 << 30,
        "the origin was not cut before it wrote the whole response"
    );
    // The client finds the connection closed after what was in flight; the origin was cut too.
    let buffered = read_until_closed(&mut s);
    assert!(buffered.len() < 256 << 20, "{}", buffered.len());
    wait_until(WAIT, "the upstream connection is closed", || {
        big.cut.load(Ordering::SeqCst)
    });
    still_serves(&proxy, &origin);
}

// === 5. tunnels hold their agent's permits while handshaking and dialling ===

/// A listener that never accepts, with its accept queue full: a connection attempt to it hangs
/// (Linux drops the SYN and the dialler retries it) until the dialler gives up, or until the
/// listener is closed and the next retried SYN is refused. Returns the listener, the queued
/// connections (kept open), and its address.
fn blackhole() -> (Socket, Vec<Socket>, SocketAddr) {
    let l = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    l.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .unwrap();
    l.listen(0).unwrap();
    let addr = l.local_addr().unwrap().as_socket().unwrap();
    let mut queued = Vec::new();
    for _ in 0..16 {
        let c = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        match c.connect_timeout(&addr.into(), Duration::from_millis(300)) {
            Ok(()) => queued.push(c),
            Err(_) => return (l, queued, addr),
        }
    }
    panic!("the accept queue of a backlog-0 listener never filled");
}

/// Connection attempts to `addr` still waiting for an answer to their SYN (`SYN_SENT` in
/// /proc/net/tcp).
fn syn_sent_to(addr: SocketAddr) -> usize {
    let want = format!("0100007F:{:04X}", addr.port());
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap()
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.get(2) == Some(&want.as_str()) && f.get(3) == Some(&"02")
        })
        .count()
}

/// Send a CONNECT for `authority` on a fresh connection.
fn send_connect(proxy: &impl Gateway, authority: &str) -> TcpStream {
    let mut s = raw(proxy);
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .unwrap();
    s
}

/// The third CONNECT while two are open: 429 `too_many_concurrent`, audited, never dialled.
fn third_is_refused(proxy: &impl Gateway, authority: &str) {
    let mut s = send_connect(proxy, authority);
    let head = read_head(&mut s);
    assert_eq!(status_of(&head), 429, "{head}");
    assert_eq!(
        head_header(&head, "chokepoint-reason"),
        Some("too_many_concurrent")
    );
    assert_eq!(head_header(&head, "retry-after"), Some("1"));
    let a = proxy.audits().next();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("connect", "deny", "too_many_concurrent"),
        "{a:?}"
    );
    assert_eq!((a.status, a.upstream), (Some(429), None));
}

#[test]
fn tunnels_hold_their_permits_while_handshaking_and_dialling() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let (hole_listener, queued, hole) = blackhole();
    let hport = hole.port();
    let origin = Origin::http();
    let oport = origin.addr.port();
    let hello_bound = Duration::from_secs(4);
    let proxy = InProcess::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["echo.test", "hole.test", "origin.test"])
            .allow(format!("echo.test:{port}"))
            .allow(format!("hole.test:{hport}"))
            .allow(format!("origin.test:{oport}"))
            .test_limits(|l| l.max_concurrent = Some(2))
            .sni_ports(&[port])
            // The hello bound is what is cut at, once the clock is moved past it (the third
            // CONNECT is judged while both wait). The dial bound is never reached: the clock
            // does not move while the dials hang, and they are ended by closing the listener
            // once the third has been judged.
            .request_header(hello_bound)
            .connect(Duration::from_secs(30)),
    );
    let echo_at = format!("echo.test:{port}");

    // Two tunnels to an `[sni] ports` port whose clients never send their ClientHello.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut s = send_connect(&proxy, &echo_at);
        let head = read_head(&mut s);
        assert_eq!(status_of(&head), 200, "{head}");
        waiting.push(s);
    }
    third_is_refused(&proxy, &echo_at);
    // The hello bound cuts both; nothing reached the upstream, and each is audited.
    proxy.advance(hello_bound);
    for mut s in waiting {
        let got = read_until_closed(&mut s);
        assert!(got.is_empty());
    }
    for _ in 0..2 {
        proxy.expect_audit(
            AuditMatch::of("connect", "deny", "not_tls")
                .status(200)
                .bytes_up(0),
        );
    }
    // Their permits are back: a new tunnel is admitted (and closed by its client).
    let mut s = send_connect(&proxy, &echo_at);
    assert_eq!(status_of(&read_head(&mut s)), 200);
    drop(s);
    assert_eq!(proxy.audit().reason, "client_closed");

    // Two CONNECTs whose upstream connection attempt hangs. Both hold a permit from admission
    // until the dial ends.
    let hole_at = format!("hole.test:{hport}");
    let dialling: Vec<TcpStream> = (0..2).map(|_| send_connect(&proxy, &hole_at)).collect();
    wait_until(WAIT, "both upstream dials pending", || {
        syn_sent_to(hole) == 2
    });
    third_is_refused(&proxy, &echo_at);
    // The upstream goes away: the next retried SYN of each dial is refused.
    drop(hole_listener);
    drop(queued);
    for mut s in dialling {
        let head = read_head(&mut s);
        assert_eq!(status_of(&head), 502, "{head}");
        assert_eq!(
            head_header(&head, "chokepoint-reason"),
            Some("upstream_connect_failed")
        );
    }
    for _ in 0..2 {
        let a = proxy.audit();
        assert_eq!(
            (a.event.as_str(), a.reason.as_str(), a.status),
            ("connect", "upstream_connect_failed", Some(502)),
            "{a:?}"
        );
    }
    let mut s = send_connect(&proxy, &echo_at);
    assert_eq!(status_of(&read_head(&mut s)), 200);
    drop(s);
    assert_eq!(proxy.audit().reason, "client_closed");
    still_serves(&proxy, &origin);
}

// === 6. no state keyed by what unknown clients send ===

/// The series of the gateway's `chokepoint_*` metric families (names and labels, no values).
fn metric_series(proxy: &Proxy) -> BTreeSet<String> {
    let mut s = TcpStream::connect(proxy.admin.expect("admin listener")).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .unwrap();
    let text = String::from_utf8(read_until_closed(&mut s)).unwrap();
    text.lines()
        .filter(|l| l.starts_with("chokepoint_"))
        .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
        .collect()
}

/// Request `i` from an unknown client: from one of 127.0.0.2–9 (no agent has those addresses),
/// to a host of its own, without credentials, with a long token for an agent that does not
/// exist, or with a wrong token for the token agent; checks the 407 and its audit line.
fn unknown_client(proxy: &Proxy, i: usize) {
    let src = Ipv4Addr::new(127, 0, 0, 2 + (i % 8) as u8);
    let label = "x".repeat(60);
    let host = format!("h{i}.{label}.{label}.{label}.unknown.test");
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    let (request, reason) = match i % 3 {
        0 => (
            format!("CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n"),
            "auth_required",
        ),
        1 => (
            format!(
                "CONNECT {host}:443 HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
                b64(format!("ghost{i}:{}{i}", "t".repeat(3000)))
            ),
            "auth_failed",
        ),
        _ => (
            format!(
                "GET http://{host}/p{i}?q={i} HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n",
                b64(format!("tok:wrong-{i}"))
            ),
            "auth_failed",
        ),
    };
    let mut s = connect_from(src, proxy.addr);
    s.write_all(request.as_bytes()).unwrap();
    let (head, _) = read_response(&mut s);
    assert_eq!(status_of(&head), 407, "{i}: {head}");
    assert_eq!(head_header(&head, "chokepoint-reason"), Some(reason));
    drop(s);
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str(), a.agent.as_deref()),
        ("deny", reason, None),
        "{i}: {a:?}"
    );
    assert!(a.client.starts_with(&format!("{src}:")), "{i}: {a:?}");
}

#[test]
fn unknown_clients_leave_no_state_behind() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tok.token"), "the-real-token\n").unwrap();
    let cfg = ConfigBuilder::new()
        .admin()
        .hosts_to_loopback(&["origin.test"])
        .allow(format!("origin.test:{port}"))
        .edit_agent(TESTER, |a| {
            a.source_cidrs = Some(vec!["127.0.0.1/32".into()])
        })
        .agent(Agent::token("tok", "tok.token", TEST_POLICY))
        // Every refusal answered and audited: this case is about what the gateway keeps, not
        // about the per-address budget (tests/budget.rs), which would cut these clients off.
        .refusal_budget(1_000_000.0, 1_000_000);
    let proxy = Proxy::of_in(dir, &cfg);

    // Warm-up: every kind of refusal, so each metric series exists.
    for i in 0..300 {
        unknown_client(&proxy, i);
    }
    let series = metric_series(&proxy);
    // Each further request carries a distinct ~4 KiB token and a ~200-byte host, from one of
    // eight addresses. (What the gateway's memory does over such a flood is benchmarked.)
    const N: usize = 2000;
    for i in 300..300 + N {
        unknown_client(&proxy, i);
    }
    assert_eq!(
        metric_series(&proxy),
        series,
        "no metric series is keyed by client input"
    );
    still_serves(&proxy, &origin);
}

// === 7. 5,000 stalled connections ===

/// 5,000 connections that each send a few bytes of a head and stall: all accepted, all cut and
/// audited at `request_header`, every socket released, and the gateway still serves. (Their
/// memory, about 19 KiB each while open, is benchmarked; see docs/security.md.)
///
/// In this process: each connection is one task on the gateway's runtime, which owns its
/// socket, so "accepted" is a task more and "released" is that task gone.
#[test]
fn five_thousand_stalled_connections_are_all_cut_and_released() {
    const N: usize = 5000;
    const BATCH: usize = 100;
    // The bound the gateway uses; it cuts only when the clock is moved past it, once all
    // 5,000 are open.
    let bound = Duration::from_secs(10);
    // Both ends of every connection are in this process.
    raise_fd_limit(2 * N + 1000);
    let (origin, cfg) = origin_and_config();
    // A budget for 5,000 refusals from one address, so each cut is audited (the budget itself
    // is tests/budget.rs's).
    let proxy = InProcess::of(
        &cfg.max_connections(6000)
            .request_header(bound)
            .refusal_budget(1.0, N as u64),
    );
    let tasks = proxy.tasks();

    // Opened in batches the gateway accepts before the next: a burst beyond the listen backlog
    // (128, tokio's default) would have the kernel drop SYNs, and the retried connections
    // arrive a second late.
    let mut conns = Vec::with_capacity(N);
    for batch in 0..N / BATCH {
        for i in 0..BATCH {
            let mut s = TcpStream::connect(proxy.addr)
                .unwrap_or_else(|e| panic!("connection {}: {e}", batch * BATCH + i));
            s.write_all(b"GET http://origin.test/ HTTP/1.1\r\nX-St")
                .unwrap();
            conns.push(s);
        }
        wait_until(WAIT, "a batch of connections accepted", || {
            proxy.tasks() >= tasks + conns.len()
        });
    }

    // The head bound cuts every one of them (the gateway holds no socket more than before),
    // each with its audit line, and each client sees its connection closed.
    proxy.advance(bound);
    wait_until(WAIT, "all stalled connections cut", || {
        proxy.tasks() <= tasks
    });
    for _ in 0..N {
        proxy.expect_audit(AuditMatch::of("reject", "deny", "header_timeout"));
    }
    let still_open = conns.iter().filter(|s| !is_closed(s)).count();
    assert_eq!(still_open, 0, "connections the gateway never closed");
    drop(conns);
    still_serves(&proxy, &origin);
}

// === 8. every audit and log line stays bounded, whatever the client sends ===

/// Longest audit line (and stderr log line) any input may produce.
const MAX_LINE: usize = 2048;

/// A TLS ClientHello asking for `name`, in records of at most 16 KiB.
fn client_hello(name: &[u8]) -> Vec<u8> {
    let mut list = vec![0];
    list.extend_from_slice(&(name.len() as u16).to_be_bytes());
    list.extend_from_slice(name);
    let mut data = (list.len() as u16).to_be_bytes().to_vec();
    data.extend_from_slice(&list);
    let mut exts = vec![0, 0];
    exts.extend_from_slice(&(data.len() as u16).to_be_bytes());
    exts.extend_from_slice(&data);
    let mut body = vec![3, 3];
    body.extend_from_slice(&[7; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]); // one suite, null compression
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);
    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut out = Vec::new();
    for part in hs.chunks(16 * 1024) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(part.len() as u16).to_be_bytes());
        out.extend_from_slice(part);
    }
    out
}

/// Hostile input aimed at the audit log and the stderr log: 30 KB methods, hosts and Host
/// headers far past DNS's 253 bytes, a 30 KB path full of characters JSON escapes, a 60 KB TLS
/// server name, a 255-byte one made of quotes and backslashes, 30 KB user agents and header
/// values, oversized credentials. Every line either log gets stays within 2 KiB. Before the
/// bounds, the method case alone wrote a 30 KB audit line and the server-name case a 60 KB one
/// (and the same into the log).
#[test]
fn hostile_input_cannot_write_long_audit_or_log_lines() {
    let (origin, cfg) = origin_and_config();
    let o = origin.addr.port();
    let echo = Echo::start("127.0.0.1:0");
    let e = echo.addr.port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("robot.token"), "s3cret").unwrap();
    let proxy = Proxy::of_in(
        dir,
        &cfg.hosts_to_loopback(&["echo.test"])
            .allow(format!("echo.test:{e}"))
            .sni_ports(&[e])
            .edit_agent(TESTER, |a| {
                a.source_cidrs = Some(vec!["127.0.0.1/32".into()]);
            })
            .agent(Agent::token("robot", "robot.token", TEST_POLICY))
            .test_limits(|l| {
                l.requests_per_second = Some(1000.0);
                l.burst = Some(1000);
            }),
    );
    let kb30 = |c: char| c.to_string().repeat(30_000);
    let labels = |n: usize| vec!["a".repeat(63); n].join(".");
    let quotes = "\"\\".repeat(127) + "\"";
    let basic = |user: &str, token: &str| {
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
    };
    // (client address, request bytes, what follows a 200)
    let cases: Vec<(Ipv4Addr, String, Option<Vec<u8>>)> = vec![
        (Ipv4Addr::LOCALHOST, format!("{} http://origin.test:{o}/ HTTP/1.1\r\n\r\n", kb30('M')), None),
        (Ipv4Addr::LOCALHOST, format!("{} origin.test:{o} HTTP/1.1\r\n\r\n", kb30('C')), None),
        (Ipv4Addr::LOCALHOST, format!("CONNECT {}:443 HTTP/1.1\r\n\r\n", kb30('h')), None),
        (Ipv4Addr::LOCALHOST, format!("CONNECT {}:443 HTTP/1.1\r\n\r\n", labels(60)), None),
        (Ipv4Addr::LOCALHOST, format!("GET http://{}.{}/ HTTP/1.1\r\n\r\n", labels(3), "b".repeat(61)), None),
        (Ipv4Addr::LOCALHOST, format!("GET http://{}/ HTTP/1.1\r\n\r\n", kb30('h')), None),
        (Ipv4Addr::LOCALHOST, format!("GET http://origin.test:{o}/{} HTTP/1.1\r\nConnection: close\r\n\r\n", kb30('x')), None),
        (Ipv4Addr::LOCALHOST, format!("GET http://origin.test:{o}/{} HTTP/1.1\r\nConnection: close\r\n\r\n", "\"\\".repeat(15_000)), None),
        (Ipv4Addr::LOCALHOST, format!("GET /{} HTTP/1.1\r\n\r\n", kb30('p')), None),
        (Ipv4Addr::LOCALHOST, format!("GET http://origin.test:{o}/ HTTP/1.1\r\nHost: {}\r\n\r\n", kb30('h')), None),
        (Ipv4Addr::LOCALHOST, format!("GET http://origin.test:{o}/ HTTP/1.1\r\nUser-Agent: {}\r\nConnection: close\r\n\r\n", kb30('u')), None),
        (Ipv4Addr::LOCALHOST, format!("GET http://origin.test:{o}/ HTTP/1.1\r\nX-Long: {}\r\nTransfer-Encoding: {}\r\n\r\n", kb30('v'), "gzip,".repeat(500)), None),
        (Ipv4Addr::LOCALHOST, format!("CONNECT echo.test:{e} HTTP/1.1\r\n\r\n"), Some(client_hello(&[b'a'; 60_000]))),
        (Ipv4Addr::LOCALHOST, format!("CONNECT echo.test:{e} HTTP/1.1\r\n\r\n"), Some(client_hello(quotes.as_bytes()))),
        (Ipv4Addr::new(127, 0, 0, 9), format!("GET http://origin.test:{o}/ HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n", basic("robot", &"t".repeat(3000))), None),
        (Ipv4Addr::new(127, 0, 0, 9), format!("GET http://origin.test:{o}/ HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n", basic(&"r".repeat(3000), "s3cret")), None),
        (Ipv4Addr::new(127, 0, 0, 9), format!("GET http://origin.test:{o}/ HTTP/1.1\r\nProxy-Authorization: Basic {}\r\n\r\n", kb30('=')), None),
        (Ipv4Addr::new(127, 0, 0, 9), format!("GET http://origin.test:{o}/ HTTP/1.1\r\nProxy-Authorization: {}\r\n\r\n", kb30('B')), None),
    ];
    let mut longest = (0, String::new());
    for (i, (from, request, then)) in cases.iter().enumerate() {
        let mut s = connect_from(*from, proxy.addr);
        // Closed after the answer: a kept-alive connection would wait out `request_header`.
        let request = match then {
            None if !request.contains("Connection: close") => {
                request.replacen(" HTTP/1.1\r\n", " HTTP/1.1\r\nConnection: close\r\n", 1)
            }
            _ => request.clone(),
        };
        s.write_all(request.as_bytes()).unwrap();
        let head = read_head_lenient(&mut s);
        if let Some(bytes) = then {
            assert_eq!(status_of(&head), 200, "case {i}: {head}");
            let _ = s.write_all(bytes);
        }
        let _ = read_until_closed(&mut s);
        let a = proxy.audit();
        if a.line_len > longest.0 {
            longest = (a.line_len, format!("case {i}: {a}"));
        }
        assert!(
            a.line_len <= MAX_LINE,
            "case {i} wrote a {}-byte audit line: {a}",
            a.line_len
        );
    }
    eprintln!("longest audit line: {} bytes ({})", longest.0, longest.1);
    // Every case refused what it should, or let the request through without quoting it.
    still_serves(&proxy, &origin);
    // The log lines those cases caused have been written by now (they precede their audit
    // lines); whatever has reached the reader is checked.
    let logged: Vec<String> = proxy.stderr.try_iter().collect();
    assert!(!logged.is_empty());
    for line in &logged {
        assert!(
            line.len() <= MAX_LINE,
            "a {}-byte log line: {}…",
            line.len(),
            line.chars().take(200).collect::<String>()
        );
    }
}
