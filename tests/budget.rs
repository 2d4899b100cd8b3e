//! What unidentified clients cannot do any more (issue #14, items 2 and 10): write audit lines
//! at line rate with refusals that come before any agent is charged, guess proxy tokens without
//! limit, exhaust descriptors through the admin listener, or turn connections refused at a cap
//! into a log line each. Every case runs the gateway in this process on a paused clock, so the
//! budget refills only when the test moves the clock; every client is on 127.0.0.0/8.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use base64::Engine;
use support::*;

/// The defaults (docs/configuration.md): 10 refusals a second, 50 at once, a summary every 10 s.
const BURST: usize = 50;
const SUMMARY: Duration = Duration::from_secs(10);

/// A 30 KB method: each audit line carried it before methods were bounded, so an unbounded
/// flood of these wrote megabytes of audit a second.
fn fat_method_head() -> Vec<u8> {
    let mut head = vec![b'A'; 30 * 1024];
    head.extend_from_slice(b" / HTTP/1.1\r\nHost: x.test\r\n\r\n");
    head
}

/// Send `head` on a fresh connection from `src` and read until the gateway closes it: the
/// response, or nothing at all for a dropped request.
fn send_from(gw: &InProcess, src: Ipv4Addr, head: &[u8]) -> Vec<u8> {
    let mut s = connect_from(src, gw.addr);
    s.write_all(head).unwrap();
    read_until_closed(&mut s)
}

/// `GET /metrics` on the admin listener.
fn scrape(admin: SocketAddr) -> String {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
        .unwrap();
    let (head, body) = read_response(&mut s);
    assert_eq!(status_of(&head), 200, "{head}");
    String::from_utf8(body).unwrap()
}

/// The value of the series `series` in a scrape (0 when absent).
fn value(scrape: &str, series: &str) -> u64 {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// === item 2: refusals before identification spend a per-address budget ===

/// The issue's measurement: 200 malformed heads with a 30 KB method from one client. Today
/// every one is answered and audited (6 MB of audit); with the budget, the first 50 are, the
/// rest are closed unanswered, and one summary line counts them.
#[test]
fn a_flood_of_malformed_heads_writes_bounded_audit() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let gw = InProcess::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}"))
            .admin(),
    );
    let head = fat_method_head();
    let flooder = Ipv4Addr::new(127, 0, 0, 1);
    let mut answered = 0;
    for _ in 0..200 {
        let got = send_from(&gw, flooder, &head);
        if !got.is_empty() {
            assert!(got.starts_with(b"HTTP/1.1 400 "), "{:?}", &got[..40]);
            answered += 1;
        }
    }
    assert_eq!(answered, BURST, "answered within the budget only");
    for _ in 0..BURST {
        gw.expect_audit(
            AuditMatch::of("reject", "deny", "malformed_request").client_ip("127.0.0.1"),
        );
    }
    gw.no_audit_for(Duration::from_millis(300));
    // What the flood cost in audit: the lines within the budget, however fat, and nothing
    // per dropped request (a line is bounded at 2 KiB, whatever the head).
    let cap = (BURST as u64 + 1) * 2 * 1024;
    assert!(
        gw.audits.bytes() <= cap,
        "{} bytes of audit for 200 refusals (at most {cap})",
        gw.audits.bytes()
    );

    // Another address has a budget of its own; an agent's own traffic from the flooding
    // address is not refused (it spends the agent's rate, not the address's budget).
    let other = send_from(&gw, Ipv4Addr::new(127, 0, 0, 2), &head);
    assert!(other.starts_with(b"HTTP/1.1 400 "), "127.0.0.2 is answered");
    gw.expect_audit(AuditMatch::of("reject", "deny", "malformed_request").client_ip("127.0.0.2"));
    let mut s = raw(&gw);
    s.write_all(
        format!("GET http://origin.test:{port}/ok HTTP/1.1\r\nHost: origin.test:{port}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let (head_ok, _) = read_response(&mut s);
    assert_eq!(status_of(&head_ok), 200, "{head_ok}");
    gw.expect_audit(AuditMatch::of("http", "allow", "allowed").client_ip("127.0.0.1"));

    // The budget refills at its rate: a tenth of a second pays for one more answer.
    gw.advance(Duration::from_millis(100));
    let got = send_from(&gw, flooder, &head);
    assert!(got.starts_with(b"HTTP/1.1 400 "), "refilled");
    gw.expect_audit(AuditMatch::of("reject", "deny", "malformed_request").client_ip("127.0.0.1"));
    assert!(send_from(&gw, flooder, &head).is_empty(), "and spent again");

    // One summary per address and interval, with the count per reason.
    gw.advance(SUMMARY);
    let d = gw
        .audits
        .find_dropped("127.0.0.1", |d| d.client.as_deref() == Some("127.0.0.1"));
    assert_eq!(
        (
            d.v,
            d.event.as_str(),
            d.cause.as_str(),
            d.listener.as_deref()
        ),
        (1, "dropped", "refusal_budget", None)
    );
    assert_eq!(d.count, 151);
    assert_eq!(
        d.reasons.into_iter().collect::<Vec<_>>(),
        [("malformed_request".to_string(), 151)]
    );
    assert_eq!(d.interval_ms, 10_000);
    gw.audits.no_dropped_for(Duration::from_millis(300));
    let m = scrape(gw.admin.unwrap());
    assert_eq!(
        value(
            &m,
            r#"chokepoint_refusals_dropped_total{reason="malformed_request"}"#
        ),
        151
    );
}

/// Heads the parser refuses (bare 400) and heads that never complete spend the same budget.
#[test]
fn unparseable_heads_spend_the_same_budget() {
    let gw = InProcess::of(&ConfigBuilder::new());
    let src = Ipv4Addr::new(127, 0, 0, 5);
    for _ in 0..BURST {
        let got = send_from(&gw, src, b"\x16\x03\x01garbage\r\n\r\n");
        assert!(got.starts_with(b"HTTP/1.1 400 "), "{got:?}");
        gw.expect_audit(AuditMatch::of("reject", "deny", "malformed_request"));
    }
    for _ in 0..5 {
        let got = send_from(&gw, src, b"\x16\x03\x01garbage\r\n\r\n");
        // hyper's own 400 is written before the gateway sees the error; the audit line is not.
        assert!(
            got.is_empty() || got.starts_with(b"HTTP/1.1 400 "),
            "{got:?}"
        );
    }
    gw.no_audit_for(Duration::from_millis(300));
    gw.advance(SUMMARY);
    let d = gw
        .audits
        .find_dropped("127.0.0.5", |d| d.client.as_deref() == Some("127.0.0.5"));
    assert_eq!(d.reasons.get("malformed_request"), Some(&5), "{d:?}");
}

const TOKEN: &str = "tok-7Qx2vLp9-correct-horse-battery";

/// Token guessing from one address is cut off: past the budget, credentials are not even
/// checked, so the right token gets no answer either until the budget refills.
#[test]
fn token_guessing_is_cut_off() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("coder.token"), TOKEN).unwrap();
    let gw = InProcess::of_in(
        dir,
        &ConfigBuilder::bare()
            .hosts_to_loopback(&["origin.test"])
            .dest_allow("127.0.0.1/32")
            .agent(Agent::token("coder", "coder.token", "coding"))
            .policy("coding", |p| p.allow = vec![format!("origin.test:{port}")]),
    );
    let request = |token: &str| {
        let creds = base64::engine::general_purpose::STANDARD.encode(format!("coder:{token}"));
        format!(
            "GET http://origin.test:{port}/x HTTP/1.1\r\nHost: origin.test:{port}\r\nProxy-Authorization: Basic {creds}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes()
    };
    let guesser = Ipv4Addr::new(127, 0, 0, 9);
    let mut answered = 0;
    for i in 0..120 {
        let got = send_from(&gw, guesser, &request(&format!("guess-{i}")));
        if !got.is_empty() {
            assert!(
                got.starts_with(b"HTTP/1.1 407 "),
                "{:?}",
                String::from_utf8_lossy(&got)
            );
            answered += 1;
        }
    }
    assert_eq!(
        answered, BURST,
        "a burst of guesses answered, the rest cut off"
    );
    for _ in 0..BURST {
        gw.expect_audit(AuditMatch::of("http", "deny", "auth_failed"));
    }
    // The right token is not checked either while the address is past its budget.
    assert!(send_from(&gw, guesser, &request(TOKEN)).is_empty());
    // Another address is served (its own budget).
    let got = send_from(&gw, Ipv4Addr::new(127, 0, 0, 10), &request(TOKEN));
    assert!(
        got.starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    gw.expect_audit(AuditMatch::of("http", "allow", "allowed").agent(Some("coder")));
    // Once the budget refills by one, the guesser's credentials are checked again.
    gw.advance(Duration::from_millis(100));
    let got = send_from(&gw, guesser, &request(TOKEN));
    assert!(
        got.starts_with(b"HTTP/1.1 200 "),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    gw.expect_audit(AuditMatch::of("http", "allow", "allowed").client_ip("127.0.0.9"));

    gw.advance(SUMMARY);
    let d = gw
        .audits
        .find_dropped("127.0.0.9", |d| d.client.as_deref() == Some("127.0.0.9"));
    assert_eq!(d.count, 71, "{d:?}");
    assert_eq!(d.reasons.get("credentials_unchecked"), Some(&71), "{d:?}");
}

// === item 10: connection caps, counted and summarised ===

/// Connections refused at `server.max_connections` are counted per listener and summarised in
/// one line per interval (not a log or audit line each).
#[test]
fn connections_refused_at_the_cap_are_counted_and_summarised() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let gw = InProcess::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}"))
            .max_connections(2)
            .admin()
            .request_header(Duration::from_secs(120)),
    );
    // Two kept-alive connections, each served once (so surely accepted), hold both slots.
    let held: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = raw(&gw);
            s.write_all(
                format!(
                    "GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
                )
                .as_bytes(),
            )
            .unwrap();
            assert_eq!(status_of(&read_response(&mut s).0), 200);
            gw.expect_audit(AuditMatch::of("http", "allow", "allowed"));
            s
        })
        .collect();
    for _ in 0..7 {
        let mut s = raw(&gw);
        let _ = s.write_all(b"CONNECT x.test:443 HTTP/1.1\r\n\r\n");
        assert!(read_until_closed(&mut s).is_empty(), "closed unanswered");
    }
    gw.no_audit_for(Duration::from_millis(200));
    let m = scrape(gw.admin.unwrap());
    assert_eq!(
        value(
            &m,
            r#"chokepoint_connections_refused_total{listener="proxy"}"#
        ),
        7
    );
    assert!(
        m.contains(r#"chokepoint_connections_refused_total{listener="admin"} 0"#),
        "every listener is exported from the start"
    );
    gw.advance(SUMMARY);
    let d = gw
        .audits
        .find_dropped("proxy cap", |d| d.cause == "max_connections");
    assert_eq!(
        (d.client.as_deref(), d.listener.as_deref(), d.count),
        (None, Some("proxy"), 7)
    );
    assert!(d.reasons.is_empty());
    // Nothing refused in the next interval: no line.
    gw.advance(SUMMARY);
    gw.audits.no_dropped_for(Duration::from_millis(300));
    drop(held);
}

/// The admin listener has a cap of its own: a client that opens connections to it cannot
/// take the process's descriptors, and the proxy's slots are untouched.
#[test]
fn the_admin_listener_has_its_own_connection_cap() {
    let gw = InProcess::of(&ConfigBuilder::new().admin().admin_max_connections(2));
    let admin = gw.admin.unwrap();
    let open = |n| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let s = TcpStream::connect(admin).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                s
            })
            .collect()
    };
    let healthy = || {
        let Ok(mut s) = TcpStream::connect(admin) else {
            return false;
        };
        s.set_read_timeout(Some(WAIT)).unwrap();
        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
        status_of(&read_head_lenient(&mut s)) == 200
    };
    let held = open(2);
    gw.settle();
    for mut s in open(5) {
        assert!(read_until_closed(&mut s).is_empty(), "closed at accept");
    }
    // The proxy still serves.
    let mut p = raw(&gw);
    p.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(status_of(&read_head(&mut p)), 400);
    drop(held);
    // Slots come back once the held connections are gone.
    wait_until(WAIT, "an admin slot is free again", healthy);
    let m = scrape(admin);
    assert_eq!(
        value(
            &m,
            r#"chokepoint_connections_refused_total{listener="admin"}"#
        ),
        5
    );
    gw.advance(SUMMARY);
    let d = gw
        .audits
        .find_dropped("admin cap", |d| d.cause == "admin_max_connections");
    assert_eq!((d.listener.as_deref(), d.count), (Some("admin"), 5));
}

/// An admin connection that does not finish its head, or keeps a connection open without
/// asking anything, is closed after the admin head timeout (5 s); one that keeps asking is
/// closed after its lifetime (60 s), so no client holds an admin slot for long.
#[test]
fn admin_connections_are_bounded_in_time() {
    let gw = InProcess::of(&ConfigBuilder::new().admin());
    let admin = gw.admin.unwrap();
    let connect = || {
        let s = TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s
    };
    let mut partial = connect();
    partial.write_all(b"GET /metr").unwrap();
    let mut quiet = connect();
    gw.settle();
    gw.advance(Duration::from_secs(4));
    assert!(
        !is_closed(&partial) && !is_closed(&quiet),
        "within the bound"
    );
    gw.advance(Duration::from_secs(2));
    assert!(read_until_closed(&mut partial).is_empty());
    assert!(read_until_closed(&mut quiet).is_empty());

    let mut busy = connect();
    let mut asked = 0;
    loop {
        if busy
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n")
            .is_err()
        {
            break;
        }
        let head = read_head_lenient(&mut busy);
        if head.is_empty() {
            break;
        }
        assert_eq!(status_of(&head), 200, "{head}");
        let mut body = [0u8; 3];
        std::io::Read::read_exact(&mut busy, &mut body).unwrap();
        asked += 1;
        assert!(asked < 100, "still open after {asked} requests 4 s apart");
        gw.advance(Duration::from_secs(4));
    }
    assert!(
        (15..=17).contains(&asked),
        "closed after about 60 s: {asked} requests"
    );
}
