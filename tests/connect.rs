//! CONNECT tunnels through the real binary: allowed tunnels carry bytes exactly, everything else
//! is refused before any upstream connection, and every case leaves an audit line. The head
//! timeout case runs the gateway in this process on a paused clock ([`InProcess`]) and moves
//! the clock past the bound instead of waiting it out.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use support::*;

#[test]
fn allowed_tunnel_with_curl_is_byte_exact() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}")),
    );
    let (code, body, err) = curl(&[
        "-p",
        "-x",
        &proxy.url(),
        &format!("http://origin.test:{port}/tunnelled?q=1"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "GET /tunnelled?q=1 HTTP/1.1\n");
    assert_eq!(origin.connections(), 1);

    let a = proxy.audit();
    assert_eq!(a.v, 1);
    assert_eq!(
        (a.event.as_str(), a.method.as_deref()),
        ("connect", Some("CONNECT"))
    );
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("allow", "allowed")
    );
    assert_eq!(a.host.as_deref(), Some("origin.test"));
    assert_eq!(a.port, Some(port));
    assert_eq!(a.rule, Some(format!("origin.test:{port}")));
    assert_eq!(a.agent.as_deref(), Some("tester"));
    assert_eq!(a.policy.as_deref(), Some("test"));
    assert_eq!(a.upstream, Some(format!("127.0.0.1:{port}")));
    assert_eq!(a.status, Some(200));
    assert_eq!(a.path, None);
    assert!(a.bytes_up > 0 && a.bytes_down > body.len() as u64, "{a:?}");
    assert_eq!(a.request_id.len(), 26, "ULID");
    assert!(a.ts.ends_with('Z') && a.ts.len() == 24, "{}", a.ts);
}

#[test]
fn raw_tunnel_carries_a_mebibyte_both_ways_and_counts_it() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["echo.test"])
            .allow(format!("echo.test:{port}")),
    );
    let mut s = raw(&proxy);
    // The request on its own; `eager_bytes_arrive_first…` sends payload in the same write.
    s.write_all(
        format!("CONNECT echo.test:{port} HTTP/1.1\r\nHost: echo.test:{port}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let payload: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let mut reader = s.try_clone().unwrap();
    let expect = payload.clone();
    let got = std::thread::spawn(move || {
        let mut got = vec![0u8; expect.len()];
        reader.read_exact(&mut got).unwrap();
        got == expect
    });
    s.write_all(&payload).unwrap();
    assert!(got.join().unwrap(), "echoed bytes differ");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());

    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("connect", "allowed")
    );
    assert_eq!(a.bytes_up, payload.len() as u64);
    assert_eq!(a.bytes_down, payload.len() as u64);
}

#[test]
fn host_off_the_allowlist_is_refused_and_origin_sees_nothing() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test", "evil.test"])
            .allow(format!("origin.test:{port}")),
    );
    let (code, out, _) = curl(&[
        "-p",
        "-x",
        &proxy.url(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_connect}",
        &format!("http://evil.test:{port}/"),
    ]);
    assert_ne!(code, 0);
    assert_eq!(out, "403");
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("deny", "host_not_allowed")
    );
    assert_eq!(a.status, Some(403));
    assert_eq!(a.upstream, None);
    assert_eq!(a.host.as_deref(), Some("evil.test"));
    assert_eq!(
        origin.connections(),
        0,
        "a refused host must not be contacted"
    );

    // The refusal itself, exactly as a client sees it.
    let mut s = raw(&proxy);
    s.write_all(format!("CONNECT evil.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
    assert!(
        head.contains("chokepoint-reason: host_not_allowed\r\n"),
        "{head}"
    );
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .parse()
        .unwrap();
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    let body = String::from_utf8(body).unwrap();
    assert_eq!(
        body,
        format!("403 chokepoint denied CONNECT evil.test:{port} for agent tester: host not on allowlist of policy test (to allow it, add `evil.test` to policy test) [policy decision: retrying will not help]\n")
    );
    proxy.audit();
    assert_eq!(origin.connections(), 0);
}

#[test]
fn wildcard_edges() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let names = [
        "a.wild.test",
        "x.y.wild.test",
        "wild.test",
        "badwild.test",
        "wild.test.evil.test",
    ];
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&names)
            .allow(format!("*.wild.test:{port}")),
    );
    let cases = [
        ("a.wild.test", "200", "allowed"),
        ("x.y.wild.test", "200", "allowed"),
        ("A.WILD.TEST.", "200", "allowed"),
        ("wild.test", "403", "host_not_allowed"),
        ("badwild.test", "403", "host_not_allowed"),
        ("wild.test.evil.test", "403", "host_not_allowed"),
    ];
    for (host, code, reason) in cases {
        let (_, out, _) = curl(&[
            "-p",
            "-x",
            &proxy.url(),
            "-o",
            "/dev/null",
            "-w",
            "%{http_connect}",
            &format!("http://{host}:{port}/"),
        ]);
        assert_eq!(out, code, "{host}");
        let a = proxy.audit();
        assert_eq!(a.reason, reason, "{host}");
        assert_eq!(
            a.host.as_deref(),
            Some(host.to_ascii_lowercase().trim_end_matches('.')),
            "{host}"
        );
        if reason == "allowed" {
            assert_eq!(a.rule, Some(format!("*.wild.test:{port}")));
        }
    }
    assert_eq!(origin.connections(), 3);
}

#[test]
fn ip_literals_need_a_rule_and_still_get_vetted() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let internal = Origin::http_on("127.0.0.66:0");
    let iport = internal.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .allow(format!("127.0.0.1:{port}"))
            .allow(format!("127.0.0.66:{iport}")),
    );
    let connect = |authority: String| {
        let mut s = raw(&proxy);
        s.write_all(format!("CONNECT {authority} HTTP/1.1\r\n\r\n").as_bytes())
            .unwrap();
        let head = read_head(&mut s);
        drop(s); // an open tunnel is audited when it ends
        (head, proxy.audit())
    };
    let (head, a) = connect(format!("127.0.0.1:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(a.reason, "allowed");
    // Named, but on another port.
    let (head, a) = connect(format!("127.0.0.1:{iport}"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(a.reason, "port_not_allowed");
    // Not named by any rule: refused as an IP literal before any lookup or vetting.
    let (head, a) = connect(format!("127.0.0.2:{port}"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert_eq!(a.reason, "ip_literal_not_allowed");
    // Named by a rule, but inside deny_cidrs: vetting still refuses it.
    let (head, a) = connect(format!("127.0.0.66:{iport}"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.contains("chokepoint-reason: denied_address"), "{head}");
    assert_eq!(a.reason, "denied_address");
    // Non-canonical spellings of an address are malformed, never resolved.
    for weird in ["2130706433", "0x7f.1", "127.1", "0177.0.0.1"] {
        let (head, a) = connect(format!("{weird}:{port}"));
        assert!(head.starts_with("HTTP/1.1 400"), "{weird}: {head}");
        assert_eq!(a.reason, "malformed_request", "{weird}");
    }
    assert_eq!(internal.connections(), 0);
}

#[test]
fn port_rules() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["api.test"])
            .allow("api.test"),
    );
    let mut s = raw(&proxy);
    s.write_all(format!("CONNECT api.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    assert!(
        head.contains("chokepoint-reason: port_not_allowed"),
        "{head}"
    );
    let a = proxy.audit();
    assert_eq!(
        (a.reason.as_str(), a.port),
        ("port_not_allowed", Some(port))
    );
    assert_eq!(origin.connections(), 0);
}

#[test]
fn tunnel_to_the_proxy_itself_is_refused() {
    let free = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["self.test"])
        .allow(format!("self.test:{free}"))
        .allow(format!("127.0.0.1:{free}"))
        .server(|s| s.listen = format!("127.0.0.1:{free}"));
    let proxy = Proxy::of(&cfg);
    for target in ["self.test", "127.0.0.1"] {
        let mut s = raw(&proxy);
        s.write_all(format!("CONNECT {target}:{free} HTTP/1.1\r\n\r\n").as_bytes())
            .unwrap();
        let head = read_head(&mut s);
        assert!(
            head.contains("chokepoint-reason: denied_address"),
            "{target}: {head}"
        );
        let a = proxy.audit();
        assert_eq!(a.reason, "denied_address");
    }
}

#[test]
fn slow_request_head_is_cut_off_and_audited() {
    let cfg = ConfigBuilder::new();
    let bound = cfg.timeouts.request_header.unwrap();
    let proxy = InProcess::of(&cfg);
    let mut s = raw(&proxy);
    // Part of a head, then silence for request_header.
    s.write_all(b"CONNECT slow.test:443 HTTP/1.1\r\nX-A: ")
        .unwrap();
    proxy.advance(bound);
    let mut buf = [0u8; 256];
    let n = s.read(&mut buf).unwrap_or(0);
    let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        n == 0 || reply.starts_with("HTTP/1.1 408"),
        "connection should be closed: {reply}"
    );
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("reject", "header_timeout")
    );
    assert_eq!(a.decision, "deny");
    assert_eq!(a.method, None);
}

#[test]
fn idle_tunnel_is_closed_and_audited() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["echo.test"])
        .allow(format!("echo.test:{port}"))
        .idle(Duration::from_secs(1));
    let proxy = Proxy::of(&cfg);
    let mut s = raw(&proxy);
    s.write_all(format!("CONNECT echo.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));
    s.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    proxy.wait_log(RELAY); // the idle bound holds on the splice path too
                           // Now stay quiet: the proxy closes the tunnel after `idle`.
    let n = s.read(&mut [0u8; 16]).unwrap_or(0);
    assert_eq!(n, 0, "tunnel should be closed");
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("connect", "idle_timeout")
    );
    assert_eq!((a.bytes_up, a.bytes_down), (4, 4));
    assert!(a.duration_ms >= 1000, "{a:?}");
}

#[test]
fn malformed_requests_get_400_and_an_audit_line() {
    let proxy = Proxy::of(&ConfigBuilder::new());
    let cases: [(&[u8], &str); 5] = [
        (
            b"CONNECT user@host.test:443 HTTP/1.1\r\n\r\n",
            "malformed_request",
        ),
        (b"CONNECT host.test HTTP/1.1\r\n\r\n", "malformed_request"),
        (b"CONNECT host.test:0 HTTP/1.1\r\n\r\n", "malformed_request"),
        (
            b"CONNECT [fe80::1%25lo]:443 HTTP/1.1\r\n\r\n",
            "malformed_request",
        ),
        (b"\x00\x01garbage\r\n\r\n", "malformed_request"),
    ];
    for (bytes, reason) in cases {
        let mut s = raw(&proxy);
        s.write_all(bytes).unwrap();
        let head = read_head(&mut s);
        assert!(
            head.starts_with("HTTP/1.1 400"),
            "{:?}: {head}",
            String::from_utf8_lossy(bytes)
        );
        let a = proxy.audit();
        assert_eq!(a.reason, reason, "{:?}", String::from_utf8_lossy(bytes));
        assert_eq!(a.status, Some(400));
    }
    proxy.no_audit_for(Duration::from_millis(200));
}

// === the splice path (Linux): the tunnels above already run on it; these pin down its edges ===

/// The relay the proxy logs for a tunnel on this OS.
const RELAY: &str = if cfg!(target_os = "linux") {
    "relay=splice"
} else {
    "relay=copy"
};

/// An origin for one connection, driven by `script` on its own thread; `join` returns what the
/// script returns.
fn scripted_origin<T: Send + 'static>(
    script: impl FnOnce(std::net::TcpStream) -> T + Send + 'static,
) -> (u16, std::thread::JoinHandle<T>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let handle = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        script(s)
    });
    (port, handle)
}

fn tunnel_proxy(port: u16, limits: impl FnOnce(&mut Limits)) -> Proxy {
    Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}"))
            .test_limits(limits),
    )
}

fn read_all(s: &mut std::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    out
}

/// A client that sends its first bytes in the same write as the `CONNECT` (hyper reads them
/// with the head): they reach the upstream first and in order, and are counted once. Then the
/// client half-closes first: the upstream sees EOF, and its answer still comes back.
#[test]
fn eager_bytes_arrive_first_and_client_half_close_is_passed_on() {
    let (port, origin) = scripted_origin(|mut s| {
        let got = read_all(&mut s); // to the client's EOF
        s.write_all(b"answer after your EOF").unwrap();
        got
    });
    let proxy = tunnel_proxy(port, |_| {});
    let mut s = raw(&proxy);
    s.write_all(
        format!("CONNECT origin.test:{port} HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\nhello, ")
            .as_bytes(),
    )
    .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));
    s.write_all(b"world").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut s), b"answer after your EOF");
    assert_eq!(origin.join().unwrap(), b"hello, world");
    proxy.wait_log(RELAY);
    let a = proxy.audit();
    assert_eq!(
        (a.reason.as_str(), a.bytes_up, a.bytes_down),
        ("allowed", 12, 21)
    );
}

/// The upstream half-closes first: the client sees EOF after the upstream's bytes, and can
/// still send; the upstream gets it all.
#[test]
fn upstream_half_close_is_passed_on() {
    let (port, origin) = scripted_origin(|mut s| {
        s.write_all(b"greeting, then my EOF").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        read_all(&mut s)
    });
    let proxy = tunnel_proxy(port, |_| {});
    let mut s = raw(&proxy);
    s.write_all(format!("CONNECT origin.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));
    assert_eq!(read_all(&mut s), b"greeting, then my EOF");
    let late = vec![7u8; 300_000];
    s.write_all(&late).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(origin.join().unwrap() == late, "late upload differs");
    let a = proxy.audit();
    assert_eq!(
        (a.reason.as_str(), a.bytes_up, a.bytes_down),
        ("allowed", 300_000, 21)
    );
}

/// Past the upload cap the upstream has received exactly the cap, the tunnel is closed, and the
/// audit line says so with the exact count.
#[test]
fn spliced_upload_is_cut_at_exactly_the_cap() {
    let (port, origin) = scripted_origin(|mut s| read_all(&mut s).len());
    let proxy = tunnel_proxy(port, |l| l.max_tunnel_upload_bytes = Some(100_000));
    let mut s = raw(&proxy);
    s.write_all(format!("CONNECT origin.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));
    for _ in 0..64 {
        if s.write_all(&[1u8; 16 * 1024]).is_err() {
            break; // the tunnel is gone
        }
    }
    let received = origin.join().unwrap();
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("deny", "upload_cap")
    );
    if cfg!(target_os = "linux") {
        assert_eq!((received, a.bytes_up), (100_000, 100_000));
    } else {
        // The copy drops the whole read that crosses the cap.
        assert!(
            received as u64 == a.bytes_up && a.bytes_up <= 100_000,
            "{a:?}"
        );
    }
}

/// `CONNECT … HTTP/1.0` with an `Upgrade` header: hyper ignores Upgrade outside HTTP/1.1 (as
/// RFC 9110 §7.8 asks) and with it the CONNECT's own upgrade, so it would answer 200 and close
/// the connection. Refused with 400 before any dial instead. Before the fix: a dial, a 200, a
/// dropped connection and an `allow`/`client_closed` line. The controls tunnel.
#[test]
fn connect_in_http_1_0_with_upgrade_is_refused_before_dialling() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let gw = InProcess::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["echo.test"])
            .allow(format!("echo.test:{port}")),
    );
    for upgrade in [
        "Upgrade: websocket\r\n",
        "upgrade: h2c\r\nConnection: upgrade\r\n",
    ] {
        let mut s = raw(&gw);
        s.write_all(format!("CONNECT echo.test:{port} HTTP/1.0\r\n{upgrade}\r\n").as_bytes())
            .unwrap();
        let head = read_head(&mut s);
        assert_eq!(status_of(&head), 400, "{head}");
        assert_eq!(
            head_header(&head, "chokepoint-reason"),
            Some("malformed_request"),
            "{head}"
        );
        gw.expect_audit(
            AuditMatch::of("connect", "deny", "malformed_request")
                .status(400)
                .upstream(None),
        );
    }
    assert_eq!(echo.connections(), 0, "nothing was dialled");

    // Without Upgrade an HTTP/1.0 CONNECT tunnels; in HTTP/1.1 an Upgrade header does not stop it.
    for request in [
        format!("CONNECT echo.test:{port} HTTP/1.0\r\n\r\n"),
        format!("CONNECT echo.test:{port} HTTP/1.1\r\nHost: echo.test:{port}\r\nUpgrade: websocket\r\n\r\n"),
    ] {
        let mut s = raw(&gw);
        s.write_all(request.as_bytes()).unwrap();
        let head = read_head(&mut s);
        assert_eq!(status_of(&head), 200, "{request:?}: {head}");
        s.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        s.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping", "{request:?}");
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let _ = read_all(&mut s);
        gw.expect_audit(
            AuditMatch::of("connect", "allow", "allowed")
                .bytes_up(4)
                .bytes_down(4),
        );
    }
}
