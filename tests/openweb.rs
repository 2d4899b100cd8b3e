//! Issue #17: open-web policies and deny rules, through the real gateway on loopback.
//!
//! Loopback stands in for the internet: static `[dns] hosts` map the test's names to 127.0.0.1
//! (the one address the standard test config excepts from the built-in loopback deny), to
//! 127.0.0.70 (inside the config's `deny_cidrs` 127.0.0.64/26: "an internal network") or to
//! 127.0.0.2 (plain loopback, built-in deny). The origin listens on a random port, so the
//! open-web rule is `*:PORT`, the one-port form of `*`.
//!
//! The policy and vetting cases run the gateway in this process ([`InProcess`]); the reload of
//! a million-entry list runs the binary, since it is about the file watcher and the log.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

#[path = "../benches/fixtures/denylist.rs"]
mod deny_fixture;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use support::*;

/// A response as the client read it: status, the `chokepoint-reason` header, body.
#[derive(Debug)]
struct Answer {
    status: u16,
    reason: Option<String>,
    body: String,
}

/// One response (every answer here carries a Content-Length).
fn read_answer(s: &mut TcpStream) -> Answer {
    let (head, body) = read_response(s);
    let mut all = head.into_bytes();
    all.extend_from_slice(&body);
    parse_answer(&all)
}

fn parse_answer(bytes: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {text:?}"));
    let reason = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("chokepoint-reason")
            .then(|| v.trim().to_owned())
    });
    Answer {
        status,
        reason,
        body: body.to_owned(),
    }
}

/// A plain-HTTP GET through the gateway on a fresh connection.
fn get(gw: &impl Gateway, authority: &str) -> Answer {
    let mut s = raw(gw);
    write!(
        s,
        "GET http://{authority}/page HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_answer(&mut s)
}

/// A CONNECT through the gateway; when it is answered 200, one GET inside the tunnel.
fn connect(gw: &impl Gateway, authority: &str) -> Answer {
    let mut s = raw(gw);
    write!(
        s,
        "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
    )
    .unwrap();
    let head = read_head(&mut s);
    if !head.starts_with("HTTP/1.1 200") {
        let len: usize = head_header(&head, "content-length")
            .unwrap()
            .parse()
            .unwrap();
        let mut body = vec![0; len];
        s.read_exact(&mut body).unwrap();
        let mut all = head.into_bytes();
        all.extend_from_slice(&body);
        return parse_answer(&all);
    }
    write!(
        s,
        "GET /in-tunnel HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    read_answer(&mut s)
}

/// The standard test config with an open-web policy for the tester: `*:PORT`, a deny rule, and
/// a deny list `lists/exfil.txt` (written into the returned directory).
fn open_web(port: u16) -> (tempfile::TempDir, ConfigBuilder) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("lists")).unwrap();
    std::fs::write(
        dir.path().join("lists/exfil.txt"),
        "# test list\n||drop.test^\n0.0.0.0 catcher.test\n",
    )
    .unwrap();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&[
            "news.test",
            "a.b.c.any.test",
            "paste.test",
            "www.paste.test",
            "x.drop.test",
            "catcher.test",
        ])
        .host("internal.test", &["127.0.0.70"])
        .host("loop.test", &["127.0.0.2"])
        .policy(TEST_POLICY, |p| {
            p.allow = vec![format!("*:{port}")];
            p.deny = vec!["paste.test".into()];
            p.deny_files = vec!["lists/exfil.txt".into()];
        });
    (dir, cfg)
}

#[test]
fn open_web_reaches_any_name_that_passes_vetting() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let (dir, cfg) = open_web(port);
    let gw = InProcess::of_in(dir, &cfg);

    let a = get(&gw, &format!("news.test:{port}"));
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body, "GET /page HTTP/1.1\n");
    gw.expect_audit(
        AuditMatch::of("http", "allow", "allowed")
            .host(Some("news.test"))
            .rule(Some(&format!("*:{port}"))),
    );
    // Any name, any depth, through a tunnel too; and a name only a deny rule's neighbour.
    for name in ["a.b.c.any.test", "www.paste.test"] {
        let a = connect(&gw, &format!("{name}:{port}"));
        assert_eq!(a.status, 200, "{name}: {a:?}");
        assert_eq!(a.body, "GET /in-tunnel HTTP/1.1\n", "{name}");
        gw.expect_audit(
            AuditMatch::of("connect", "allow", "allowed")
                .host(Some(name))
                .rule(Some(&format!("*:{port}"))),
        );
    }
    // `*:PORT` admits that port only.
    let a = connect(&gw, "news.test:443");
    assert_eq!(
        (a.status, a.reason.as_deref()),
        (403, Some("port_not_allowed")),
        "{a:?}"
    );
    assert!(a.body.contains("open-web policy test"), "{a:?}");
    assert_eq!(origin.settled_connections(), 3);
}

#[test]
fn deny_rules_and_lists_refuse_and_name_the_rule() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let (dir, cfg) = open_web(port);
    let gw = InProcess::of_in(dir, &cfg);

    let cases = [
        (
            "paste.test",
            "paste.test",
            "host is denied by rule `paste.test` of policy test [",
        ),
        (
            "x.drop.test",
            "*.drop.test",
            "host is denied by rule `*.drop.test` of policy test (deny list lists/exfil.txt, line 2)",
        ),
        (
            "catcher.test",
            "catcher.test",
            "(deny list lists/exfil.txt, line 3)",
        ),
    ];
    for (name, rule, says) in cases {
        for (a, event) in [
            (get(&gw, &format!("{name}:{port}")), "http"),
            (connect(&gw, &format!("{name}:{port}")), "connect"),
        ] {
            assert_eq!(
                (a.status, a.reason.as_deref()),
                (403, Some("host_denied")),
                "{event} {name}: {a:?}"
            );
            assert!(a.body.contains(says), "{event} {name}: {a:?}");
            assert!(a
                .body
                .ends_with("[policy decision: retrying will not help]\n"));
            gw.expect_audit(
                AuditMatch::of(event, "deny", "host_denied")
                    .host(Some(name))
                    .rule(Some(rule))
                    .status(403),
            );
        }
    }
    assert_eq!(
        origin.settled_connections(),
        0,
        "a denied host is never contacted"
    );
}

#[test]
fn vetting_still_refuses_internal_addresses_and_ip_literals() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let (dir, cfg) = open_web(port);
    let gw = InProcess::of_in(dir, &cfg);

    for name in ["internal.test", "loop.test"] {
        for (a, event) in [
            (get(&gw, &format!("{name}:{port}")), "http"),
            (connect(&gw, &format!("{name}:{port}")), "connect"),
        ] {
            assert_eq!(
                (a.status, a.reason.as_deref()),
                (403, Some("denied_address")),
                "{event} {name}: {a:?}"
            );
            gw.expect_audit(
                AuditMatch::of(event, "deny", "denied_address")
                    .host(Some(name))
                    .rule(Some(&format!("*:{port}"))),
            );
        }
    }
    // The origin's own address, as a literal: `*` matches names only.
    for (a, event) in [
        (get(&gw, &format!("127.0.0.1:{port}")), "http"),
        (connect(&gw, &format!("127.0.0.1:{port}")), "connect"),
    ] {
        assert_eq!(
            (a.status, a.reason.as_deref()),
            (403, Some("ip_literal_not_allowed")),
            "{event}: {a:?}"
        );
        assert!(a.body.contains("admits host names only"), "{a:?}");
        gw.expect_audit(AuditMatch::of(event, "deny", "ip_literal_not_allowed"));
    }
    assert_eq!(origin.settled_connections(), 0);
}

#[test]
fn a_deny_rule_wins_over_every_allow_rule() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let names = [
        "ok.example.test",
        "exact.example.test",
        "y.bad.example.test",
    ];
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&names)
        .allow(format!("*.example.test:{port}"))
        .allow(format!("exact.example.test:{port}"))
        .policy(TEST_POLICY, |p| {
            p.deny = vec![
                "exact.example.test".into(),
                format!("*.bad.example.test:{port}"),
            ];
        })
        // A second agent whose policy is in report mode: a deny rule is reported, not enforced.
        .agent_first(Agent::cidrs("watcher", &["127.0.0.9/32"], "watching"))
        .policy("watching", |p| {
            p.allow = vec![format!("*.example.test:{port}")];
            p.deny = vec!["ok.example.test".into()];
            p.mode = Some("report".into());
        });
    let gw = InProcess::of(&cfg);

    let a = get(&gw, &format!("ok.example.test:{port}"));
    assert_eq!(a.status, 200, "{a:?}");
    gw.expect_audit(
        AuditMatch::of("http", "allow", "allowed").rule(Some(&format!("*.example.test:{port}"))),
    );
    // Denied though an exact allow rule names it (and a wildcard covers it).
    let a = get(&gw, &format!("exact.example.test:{port}"));
    assert_eq!(
        (a.status, a.reason.as_deref()),
        (403, Some("host_denied")),
        "{a:?}"
    );
    gw.expect_audit(AuditMatch::of("http", "deny", "host_denied").rule(Some("exact.example.test")));
    // A ported deny rule below an allowed wildcard.
    let a = connect(&gw, &format!("y.bad.example.test:{port}"));
    assert_eq!(
        (a.status, a.reason.as_deref()),
        (403, Some("host_denied")),
        "{a:?}"
    );
    gw.expect_audit(
        AuditMatch::of("connect", "deny", "host_denied")
            .rule(Some(&format!("*.bad.example.test:{port}"))),
    );

    // Report mode: recorded as would_deny with the deny rule, and let through.
    let mut s = connect_from("127.0.0.9".parse().unwrap(), gw.addr());
    write!(
        s,
        "GET http://ok.example.test:{port}/page HTTP/1.1\r\nHost: ok.example.test:{port}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let a = read_answer(&mut s);
    assert_eq!(a.status, 200, "{a:?}");
    gw.expect_audit(
        AuditMatch::of("http", "would_deny", "host_denied")
            .agent(Some("watcher"))
            .rule(Some("ok.example.test"))
            .mode("report"),
    );
    assert_eq!(origin.settled_connections(), 2);
}

/// Issue #17 item 5: a 1,000,000-entry list loads (the binary starts on it) and is replaced
/// while a client keeps sending requests: every request is answered, some of them while the
/// new list is being read, and the new list's rule applies once the reload is logged. How long
/// the load takes is measured by `cargo bench --bench allowlist -- denylist_load` (a timed
/// assertion here would flake on a busy machine; this test is about not dropping requests).
#[test]
fn a_million_entry_list_reloads_without_dropping_requests() {
    const ENTRIES: usize = 1_000_000;
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let list = dir.path().join("big.txt");
    std::fs::write(&list, deny_fixture::text(ENTRIES)).unwrap();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["news.test", "newly.test"])
        .policy(TEST_POLICY, |p| {
            p.allow = vec![format!("*:{port}")];
            p.deny_files = vec!["big.txt".into()];
        })
        // The client below sends as fast as it can: keep it clear of the rate limit.
        .test_limits(|l| {
            l.requests_per_second = Some(1_000_000.0);
            l.burst = Some(1_000_000);
        });
    let proxy = Proxy::of_in(dir, &cfg);
    let addr = proxy.addr;

    // Denied by the list as loaded at start.
    let first = format!("{}:{port}", deny_fixture::name(ENTRIES - 2));
    let a = get(&proxy, &first);
    assert_eq!(
        (a.status, a.reason.as_deref()),
        (403, Some("host_denied")),
        "{a:?}"
    );
    assert_eq!(get(&proxy, &format!("newly.test:{port}")).status, 200);

    // A client sending requests one after the other until told to stop (at most 100,000).
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let client = {
        let (stop, count) = (stop.clone(), count.clone());
        thread::spawn(move || {
            let mut answered = Vec::new();
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                write!(
                    s,
                    "GET http://news.test:{port}/ HTTP/1.1\r\nHost: news.test:{port}\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let a = read_answer(&mut s);
                answered.push((Instant::now(), a.status));
                count.fetch_add(1, Ordering::Relaxed);
            }
            answered
        })
    };
    wait_until(WAIT, "the client's first requests", || {
        count.load(Ordering::Relaxed) >= 3
    });

    // Replace the list atomically with one that also denies `newly.test`.
    let list_path = proxy.config_path.parent().unwrap().join("big.txt");
    let tmp = list_path.with_extension("new");
    let mut text = deny_fixture::text(ENTRIES);
    text.push_str("newly.test\n");
    std::fs::write(&tmp, text).unwrap();
    let replaced = Instant::now();
    std::fs::rename(&tmp, &list_path).unwrap();
    proxy.wait_log("config reloaded");
    let reloaded = Instant::now();
    // A few more requests on the new config, then stop the client.
    thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let answered = client.join().unwrap();

    let not_ok: Vec<u16> = answered
        .iter()
        .map(|&(_, s)| s)
        .filter(|&s| s != 200)
        .collect();
    assert!(
        not_ok.is_empty(),
        "{} of {} requests not answered 200 (first: {:?})",
        not_ok.len(),
        answered.len(),
        not_ok.first()
    );
    let during = answered
        .iter()
        .filter(|(at, _)| *at > replaced && *at < reloaded)
        .count();
    assert!(
        during > 0,
        "no request was served while the new list was read"
    );
    eprintln!(
        "{} requests answered, {during} of them between the rename and the reload ({:?})",
        answered.len(),
        reloaded - replaced
    );
    let a = get(&proxy, &format!("newly.test:{port}"));
    assert_eq!(
        (a.status, a.reason.as_deref()),
        (403, Some("host_denied")),
        "{a:?}"
    );
    assert!(
        a.body.contains("(deny list big.txt, line 1000001)"),
        "{a:?}"
    );
}
