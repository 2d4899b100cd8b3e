#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

//! Per-agent limits through the real binary: request rate, concurrency, head and body caps,
//! tunnel upload cap, response cap, and report mode (limits and allowlist recorded as
//! `would_deny` and let through; destination vetting still enforced).

mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::RecvTimeoutError;
use std::thread;
use std::time::Duration;

use support::*;

/// An origin on 127.0.0.1 allowed as `origin.test:PORT`, and a proxy whose test policy has
/// the `limits` set.
fn setup(limits: impl FnOnce(&mut Limits)) -> (Origin, Proxy, u16) {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}"))
            .test_limits(limits),
    );
    (origin, proxy, port)
}

/// The status code of a response head.
fn status(head: &str) -> u16 {
    match status_of(head) {
        0 => panic!("no status line in {head:?}"),
        s => s,
    }
}

/// The value of header `name` in a response head.
fn header(head: &str, name: &str) -> Option<String> {
    head_header(head, name).map(String::from)
}

/// Decode a chunked body; returns the payload and whether the terminating chunk arrived.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut payload = Vec::new();
    loop {
        let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") else {
            return (payload, false);
        };
        let size = std::str::from_utf8(&raw[..eol]).unwrap();
        let n = usize::from_str_radix(size.split(';').next().unwrap().trim(), 16).unwrap();
        raw = &raw[eol + 2..];
        if n == 0 {
            return (payload, raw.starts_with(b"\r\n"));
        }
        if raw.len() < n + 2 {
            payload.extend_from_slice(&raw[..raw.len().min(n)]);
            return (payload, false);
        }
        payload.extend_from_slice(&raw[..n]);
        raw = &raw[n + 2..];
    }
}

/// Open a CONNECT tunnel to `authority` and return the socket after the 200.
fn open_tunnel(proxy: &Proxy, authority: &str) -> (TcpStream, String) {
    let mut s = raw(proxy);
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    (s, head)
}

/// Send `data` up a tunnel to an echo server and read it back.
fn echo_round_trip(s: &mut TcpStream, data: &[u8]) {
    s.write_all(data).unwrap();
    let mut back = vec![0; data.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, data, "echoed bytes differ");
}

#[test]
fn burst_then_rate_limited_with_retry_after() {
    // `tester` (127.0.0.1) gets a burst of 3 and then a cell per 100 s: no cell comes back
    // while the test runs, however slow the box. `refill` (127.0.0.2) gets 1 and a cell per
    // half second.
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}"))
            .test_limits(|l| {
                l.burst = Some(3);
                l.requests_per_second = Some(0.01);
            })
            .agent_first(Agent::cidrs("refill", &["127.0.0.2/32"], "refill"))
            .policy("refill", |p| {
                p.allow = vec![format!("origin.test:{port}")];
                p.limits().burst = Some(1);
                p.limits().requests_per_second = Some(2.0);
            }),
    );
    const N: usize = 8;
    // All requests pipelined in one write on one keep-alive connection: the proxy admits them
    // back to back, in order, within milliseconds.
    let mut s = raw(&proxy);
    let mut batch = String::new();
    for i in 0..N {
        batch.push_str(&format!(
            "GET http://origin.test:{port}/r{i} HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
        ));
    }
    s.write_all(batch.as_bytes()).unwrap();
    let responses: Vec<(String, Vec<u8>)> = (0..N).map(|_| read_response(&mut s)).collect();
    drop(s);

    let statuses: Vec<u16> = responses.iter().map(|(h, _)| status(h)).collect();
    assert_eq!(&statuses[..3], [200, 200, 200], "the burst: {statuses:?}");
    for (i, (head, body)) in responses.iter().enumerate().take(3) {
        assert_eq!(body, format!("GET /r{i} HTTP/1.1\n").as_bytes());
        assert!(head.contains("x-origin: yes"), "{head}");
    }
    let successes = statuses.iter().filter(|&&c| c == 200).count();
    assert_eq!(successes, 3, "{statuses:?}");
    for (head, body) in responses.iter().filter(|(h, _)| status(h) == 429) {
        assert!(
            head.contains("chokepoint-reason: rate_limited\r\n"),
            "{head}"
        );
        let retry: u64 = header(head, "retry-after")
            .unwrap_or_else(|| panic!("429 without Retry-After: {head}"))
            .parse()
            .unwrap();
        assert!(retry >= 1, "{head}");
        let body = String::from_utf8_lossy(body);
        assert!(body.starts_with("429 chokepoint denied GET"), "{body}");
    }
    let mut limited = 0;
    for _ in 0..N {
        let a = proxy.audit();
        assert_eq!(a.event, "http");
        assert_eq!(a.mode, "enforce");
        assert_eq!(a.agent.as_deref(), Some("tester"));
        match a.reason.as_str() {
            "allowed" => assert_eq!((a.decision.as_str(), a.status), ("allow", Some(200))),
            "rate_limited" => {
                limited += 1;
                assert_eq!((a.decision.as_str(), a.status), ("deny", Some(429)));
                assert_eq!(a.upstream, None, "{a:?}");
                assert_eq!((a.bytes_up, a.bytes_down), (0, 0));
            }
            other => panic!("unexpected reason {other}: {a:?}"),
        }
    }
    assert_eq!(limited, N - successes);
    // Counted in requests, not connections: the admitted ones share a pooled connection.
    assert_eq!(
        origin.seen.try_iter().count(),
        successes,
        "refusals never reach the origin"
    );

    // The budget refills: `refill` spends its one cell and is refused, then is admitted
    // again once a cell has come back.
    let refill_get = || {
        let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 2), proxy.addr);
        s.write_all(
            format!(
                "GET http://origin.test:{port}/later HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let (head, _) = read_response(&mut s);
        let a = proxy.audit();
        assert_eq!(a.agent.as_deref(), Some("refill"), "{a:?}");
        match status(&head) {
            200 => assert_eq!(a.reason, "allowed"),
            _ => assert_eq!(a.reason, "rate_limited"),
        }
        status(&head)
    };
    wait_until(WAIT, "refill refused once its cell is spent", || {
        refill_get() == 429
    });
    wait_until(WAIT, "the rate budget refilled", || refill_get() == 200);
}

#[test]
fn concurrent_tunnels_over_the_limit_get_429_until_one_closes() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["echo.test"])
            .allow(format!("echo.test:{port}"))
            .test_limits(|l| l.max_concurrent = Some(2)),
    );
    let authority = format!("echo.test:{port}");
    let (mut t1, head) = open_tunnel(&proxy, &authority);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (mut t2, head) = open_tunnel(&proxy, &authority);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_round_trip(&mut t1, b"one");
    echo_round_trip(&mut t2, b"two");

    // A third tunnel while two are open.
    let mut s = raw(&proxy);
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 429 "), "{head}");
    assert!(
        head.contains("chokepoint-reason: too_many_concurrent\r\n"),
        "{head}"
    );
    assert_eq!(header(&head, "retry-after").as_deref(), Some("1"), "{head}");
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("max_concurrent"), "{body}");
    drop(s);
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("connect", "deny", "too_many_concurrent")
    );
    assert_eq!((a.status, a.upstream), (Some(429), None));
    assert_eq!(echo.connections(), 2, "a refused tunnel is never dialled");

    // A plain request counts against the same limit.
    let mut s = raw(&proxy);
    s.write_all(
        format!("GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 429 "), "{head}");
    drop(s);
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("http", "too_many_concurrent")
    );
    assert_eq!(echo.connections(), 2);

    // Close one tunnel: its audit line comes, and its slot frees (bounded retry: the slot is
    // released right after the line is written).
    t1.shutdown(Shutdown::Both).unwrap();
    drop(t1);
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("connect", "allow", "allowed")
    );
    assert_eq!((a.bytes_up, a.bytes_down), (3, 3));

    let mut t3 = None;
    wait_until(WAIT, "the closed tunnel's slot released", || {
        let (s, head) = open_tunnel(&proxy, &authority);
        if head.starts_with("HTTP/1.1 200") {
            t3 = Some(s);
            return true;
        }
        assert!(head.starts_with("HTTP/1.1 429 "), "{head}");
        assert_eq!(proxy.audit().reason, "too_many_concurrent");
        false
    });
    let mut t3 = t3.unwrap();
    echo_round_trip(&mut t3, b"three");
    echo_round_trip(&mut t2, b"still open");
    assert_eq!(echo.connections(), 3);
    drop(t2);
    drop(t3);
    for _ in 0..2 {
        let a = proxy.audit();
        assert_eq!(
            (a.event.as_str(), a.reason.as_str()),
            ("connect", "allowed")
        );
    }
}

#[test]
fn oversized_request_head_gets_431_and_never_reaches_the_origin() {
    let (origin, proxy, port) = setup(|l| l.max_request_header_bytes = Some(2048));
    // Exactly at the cap (request line, headers and the blank line: 2048 bytes): forwarded.
    let wire = |pad: &str| {
        format!(
            "GET http://origin.test:{port}/small HTTP/1.1\r\nHost: origin.test:{port}\r\nX-Big: {pad}\r\n\r\n"
        )
    };
    let small = "a".repeat(2048 - wire("").len());
    let request = wire(&small);
    assert_eq!(request.len(), 2048);
    let mut s = raw(&proxy);
    s.write_all(request.as_bytes()).unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(origin.next_seen().header("x-big"), Some(small.clone()));
    assert_eq!(proxy.audit().reason, "allowed");

    // One byte over the cap: refused.
    let mut s = raw(&proxy);
    s.write_all(wire(&format!("{small}a")).as_bytes()).unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 431 "), "2049 bytes: {head}");
    assert_eq!(proxy.audit().reason, "header_too_large");
    let connections = origin.connections();

    let mut s = raw(&proxy);
    let big = "a".repeat(4096);
    s.write_all(
        format!(
            "GET http://origin.test:{port}/big HTTP/1.1\r\nHost: origin.test:{port}\r\nX-Big: {big}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
    assert!(
        head.contains("chokepoint-reason: header_too_large\r\n"),
        "{head}"
    );
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("max_request_header_bytes is 2048"), "{body}");
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("http", "deny", "header_too_large")
    );
    assert_eq!((a.status, a.upstream), (Some(431), None));
    assert_eq!(a.path.as_deref(), Some("/big"));
    assert_eq!(origin.connections(), connections, "no upstream connection");
    assert!(origin.seen.try_recv().is_err());
}

#[test]
fn declared_body_over_the_cap_is_refused_before_any_upstream_connection() {
    let (origin, proxy, port) = setup(|l| l.max_request_body_bytes = Some(1000));
    let mut s = raw(&proxy);
    // Only the head is sent: the refusal must not wait for the body.
    s.write_all(
        format!(
            "POST http://origin.test:{port}/upload HTTP/1.1\r\nHost: origin.test:{port}\r\nContent-Length: 5000\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
    assert!(
        head.contains("chokepoint-reason: body_too_large\r\n"),
        "{head}"
    );
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains("5000 bytes") && body.contains("max_request_body_bytes is 1000"),
        "{body}"
    );
    assert!(
        body.ends_with("[policy decision: retrying will not help]\n"),
        "{body}"
    );
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("http", "deny", "body_too_large")
    );
    assert_eq!((a.status, a.upstream), (Some(413), None));
    assert_eq!(a.bytes_up, 0);
    assert_eq!(origin.connections(), 0);

    // At the cap exactly: forwarded.
    let (code, out, err) = curl(&[
        "-x",
        &proxy.url(),
        "--data-binary",
        &"b".repeat(1000),
        &format!("http://origin.test:{port}/exact"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("POST /exact HTTP/1.1\n{}", "b".repeat(1000)));
    assert_eq!(origin.next_seen().body.len(), 1000);
    let a = proxy.audit();
    assert_eq!((a.reason.as_str(), a.bytes_up), ("allowed", 1000));
}

#[test]
fn chunked_body_passing_the_cap_aborts_the_upstream_request() {
    let (origin, proxy, port) = setup(|l| l.max_request_body_bytes = Some(1000));
    let mut s = raw(&proxy);
    s.write_all(
        format!(
            "POST http://origin.test:{port}/upload HTTP/1.1\r\nHost: origin.test:{port}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    // 10 chunks of 500 bytes; the proxy may cut the connection part-way, so write errors end it.
    for i in 0..10u8 {
        let mut chunk = b"1f4\r\n".to_vec();
        chunk.extend_from_slice(&[b'a' + i; 500]);
        chunk.extend_from_slice(b"\r\n");
        if s.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let head = read_head_lenient(&mut s);
    if !head.is_empty() {
        assert!(head.starts_with("HTTP/1.1 413 "), "{head}");
        assert!(
            head.contains("chokepoint-reason: body_too_large\r\n"),
            "{head}"
        );
    }
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("http", "deny", "body_too_large")
    );
    assert!(a.bytes_up <= 1000, "{a:?}");
    assert_eq!(a.status, Some(413));
    // The origin reports a request only once its body is complete: it must never get one.
    match origin.seen.recv_timeout(Duration::from_secs(1)) {
        Err(RecvTimeoutError::Timeout) => {}
        Ok(seen) => assert!(seen.body.len() < 5000, "origin got the whole body"),
        Err(RecvTimeoutError::Disconnected) => unreachable!("origin thread holds the sender"),
    }
}

#[test]
fn tunnel_upload_past_the_cap_is_closed() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["echo.test"])
            .allow(format!("echo.test:{port}"))
            .test_limits(|l| l.max_tunnel_upload_bytes = Some(10_000)),
    );
    let (mut s, head) = open_tunnel(&proxy, &format!("echo.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let kib = |i: usize| vec![(i % 251) as u8; 1024];
    // The first 9 KiB one write at a time, each echoed back before the next, so they are
    // certainly counted as separate reads under the cap.
    for i in 0..9 {
        echo_round_trip(&mut s, &kib(i));
    }
    let mut reader = s.try_clone().unwrap();
    let echoed_after = thread::spawn(move || read_until_closed(&mut reader).len());
    for i in 9..64 {
        if s.write_all(&kib(i)).is_err() {
            break; // the tunnel is gone
        }
    }
    let echoed = 9 * 1024 + echoed_after.join().unwrap();
    assert!(
        echoed <= 10_000,
        "echo got {echoed} bytes through the tunnel"
    );

    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("connect", "deny", "upload_cap")
    );
    assert_eq!(a.status, Some(200), "the CONNECT itself was answered 200");
    assert!(
        (9 * 1024..=10_000).contains(&a.bytes_up),
        "bytes_up {} (the read crossing the cap is not forwarded)",
        a.bytes_up
    );
    assert!(a.bytes_down <= a.bytes_up, "{a:?}");
    assert!(echoed as u64 <= a.bytes_up, "{a:?}");
}

#[test]
fn response_declared_over_the_cap_is_502() {
    let (origin, proxy, port) = setup(|l| l.max_response_body_bytes = Some(100));
    // Under the cap: passed on.
    let (code, out, err) = curl(&[
        "-x",
        &proxy.url(),
        &format!("http://origin.test:{port}/small"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "GET /small HTTP/1.1\n");
    origin.next_seen();
    assert_eq!(proxy.audit().reason, "allowed");

    // The origin echoes the 500-byte body after the request line, with a Content-Length.
    let payload = "p".repeat(500);
    let mut s = raw(&proxy);
    s.write_all(
        format!(
            "POST http://origin.test:{port}/big HTTP/1.1\r\nHost: origin.test:{port}\r\nContent-Length: 500\r\n\r\n{payload}"
        )
        .as_bytes(),
    )
    .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 502 "), "{head}");
    assert!(
        head.contains("chokepoint-reason: response_cap\r\n"),
        "{head}"
    );
    assert!(!head.contains("x-origin"), "{head}");
    let body = String::from_utf8(body).unwrap();
    assert!(
        body.contains("max_response_body_bytes is 100") && !body.contains(&payload),
        "{body}"
    );
    let seen = origin.next_seen();
    assert_eq!(seen.request_line(), "POST /big HTTP/1.1");
    assert_eq!(seen.body, payload.as_bytes());

    let a = proxy.audit();
    // Refused up front or cut while streaming, the same cap is audited the same way.
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("http", "deny", "response_cap")
    );
    assert_eq!(a.status, Some(502));
    assert_eq!((a.bytes_up, a.bytes_down), (500, 0));
    assert_eq!(a.upstream, Some(format!("127.0.0.1:{port}")));
}

#[test]
fn streamed_response_passing_the_cap_is_cut() {
    // An origin that streams 5000 bytes in chunks of 50, with no Content-Length.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    thread::spawn(move || {
        let Ok((mut c, _)) = listener.accept() else {
            return;
        };
        c.set_read_timeout(Some(WAIT)).unwrap();
        let _ = read_head_lenient(&mut c);
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        for i in 0..100u8 {
            let mut chunk = b"32\r\n".to_vec();
            chunk.extend_from_slice(&[b'A' + i % 26; 50]);
            chunk.extend_from_slice(b"\r\n");
            if c.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = c.write_all(b"0\r\n\r\n");
        let _ = read_until_closed(&mut c);
    });
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["stream.test"])
            .allow(format!("stream.test:{port}"))
            .test_limits(|l| l.max_response_body_bytes = Some(100)),
    );
    let mut s = raw(&proxy);
    s.write_all(
        format!("GET http://stream.test:{port}/ HTTP/1.1\r\nHost: stream.test:{port}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        header(&head, "transfer-encoding").is_some_and(|v| v.contains("chunked")),
        "{head}"
    );
    let rest = read_until_closed(&mut s);
    let (payload, complete) = dechunk(&rest);
    assert!(!complete, "a cut body must not look complete to the client");
    assert!(payload.len() <= 100, "client got {} bytes", payload.len());

    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("http", "deny", "response_cap")
    );
    assert_eq!(a.status, Some(200));
    assert!(a.bytes_down <= 100, "{a:?}");
}

#[test]
fn report_mode_lets_allowlist_and_rate_refusals_through_but_vets_destinations() {
    let origin = Origin::http();
    let port = origin.addr.port();
    // An origin on an "internal" address (127.0.0.66 is in the test config's deny_cidrs).
    let internal = Origin::http_on("127.0.0.66:0");
    let iport = internal.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test", "listed.test"])
            .host("internal.test", &["127.0.0.66"])
            .allow("listed.test")
            .policy(TEST_POLICY, |p| {
                p.mode = Some("report".into());
                p.limits().burst = Some(1);
                p.limits().requests_per_second = Some(0.01);
            }),
    );
    for i in 0..3 {
        let (code, out, err) = curl(&[
            "-i",
            "-x",
            &proxy.url(),
            &format!("http://origin.test:{port}/r{i}"),
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(!out.contains("chokepoint-reason"), "{out}");
        assert!(out.ends_with(&format!("GET /r{i} HTTP/1.1\n")), "{out}");
        assert_eq!(
            origin.next_seen().request_line(),
            format!("GET /r{i} HTTP/1.1")
        );
        let a = proxy.audit();
        assert_eq!(
            (a.decision.as_str(), a.reason.as_str(), a.mode.as_str()),
            ("would_deny", "host_not_allowed", "report"),
            "the first would-be refusal is recorded (requests 2 and 3 are also over the rate)"
        );
        assert_eq!((a.status, a.rule), (Some(200), None));
        assert_eq!(a.upstream, Some(format!("127.0.0.1:{port}")));
    }

    // Destination vetting is not a policy choice: enforced in report mode too.
    let (code, out, _) = curl(&[
        "-i",
        "-x",
        &proxy.url(),
        &format!("http://internal.test:{iport}/secret"),
    ]);
    assert_eq!(code, 0);
    assert!(out.starts_with("HTTP/1.1 403"), "{out}");
    assert!(out.contains("chokepoint-reason: denied_address"), "{out}");
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str(), a.mode.as_str()),
        ("deny", "denied_address", "report")
    );
    assert_eq!((a.status, a.upstream), (Some(403), None));

    // The same through a tunnel.
    let (s, head) = open_tunnel(&proxy, &format!("internal.test:{iport}"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(
        head.contains("chokepoint-reason: denied_address\r\n"),
        "{head}"
    );
    drop(s);
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("connect", "deny", "denied_address")
    );
    assert_eq!(
        internal.connections(),
        0,
        "the internal origin was contacted"
    );
    assert!(internal.seen.try_recv().is_err());
}

#[test]
fn report_mode_records_caps_and_lets_the_bytes_through() {
    let (origin, proxy, port, echo) = {
        let origin = Origin::http();
        let port = origin.addr.port();
        let echo = Echo::start("127.0.0.1:0");
        let cfg = ConfigBuilder::new()
            .mode("report")
            .hosts_to_loopback(&["origin.test", "echo.test"])
            .allow(format!("origin.test:{port}"))
            .allow(format!("echo.test:{}", echo.addr.port()))
            .test_limits(|l| {
                l.max_request_header_bytes = Some(1024);
                l.max_request_body_bytes = Some(1000);
                l.max_response_body_bytes = Some(100);
                l.max_tunnel_upload_bytes = Some(10_000);
            });
        (origin, Proxy::of(&cfg), port, echo)
    };

    // Declared body over the cap: forwarded in full.
    let payload = "q".repeat(5000);
    let mut s = raw(&proxy);
    s.write_all(
        format!(
            "POST http://origin.test:{port}/up HTTP/1.1\r\nHost: origin.test:{port}\r\nContent-Length: 5000\r\n\r\n{payload}"
        )
        .as_bytes(),
    )
    .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, format!("POST /up HTTP/1.1\n{payload}").as_bytes());
    assert_eq!(origin.next_seen().body, payload.as_bytes());
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str(), a.mode.as_str()),
        ("would_deny", "body_too_large", "report")
    );
    assert_eq!((a.status, a.bytes_up), (Some(200), 5000));
    assert_eq!(
        a.bytes_down,
        body.len() as u64,
        "the response cap was not enforced"
    );

    // A chunked body over the cap, and a small response: only the body cap is recorded.
    let (code, out, err) = curl(&[
        "-x",
        &proxy.url(),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &"c".repeat(3000),
        &format!("http://origin.test:{port}/c"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.len(), "POST /c HTTP/1.1\n".len() + 3000);
    assert_eq!(origin.next_seen().body.len(), 3000);
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("would_deny", "body_too_large")
    );

    // A head over the cap: forwarded, recorded.
    let big = "h".repeat(2000);
    let mut s = raw(&proxy);
    s.write_all(
        format!("GET http://origin.test:{port}/h HTTP/1.1\r\nHost: origin.test:{port}\r\nX-Big: {big}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let (head, _) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(origin.next_seen().header("x-big"), Some(big));
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("would_deny", "header_too_large")
    );

    // A response over the cap (declared): passed on in full, recorded.
    let mut s = raw(&proxy);
    s.write_all(
        format!(
            "GET http://origin.test:{port}/{} HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n",
            "r".repeat(200)
        )
        .as_bytes(),
    )
    .unwrap();
    let (head, body) = read_response(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(body.len() > 200, "{}", body.len());
    origin.next_seen();
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str(), a.status),
        ("would_deny", "response_cap", Some(200))
    );
    assert_eq!(a.bytes_down, body.len() as u64);

    // A tunnel upload past the cap: every byte goes through and comes back, recorded.
    let (mut t, head) = open_tunnel(&proxy, &format!("echo.test:{}", echo.addr.port()));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    for i in 0..32 {
        echo_round_trip(&mut t, &[i; 1024]);
    }
    t.shutdown(Shutdown::Write).unwrap();
    assert!(read_until_closed(&mut t).is_empty());
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("connect", "would_deny", "upload_cap")
    );
    assert_eq!((a.bytes_up, a.bytes_down), (32 * 1024, 32 * 1024));
}

#[test]
fn head_responses_are_not_held_to_the_response_cap() {
    // The origin answers HEAD with a Content-Length far over the cap, and no body.
    let (_origin, proxy, port) = setup(|l| l.max_response_body_bytes = Some(10));
    let (code, out, err) = curl(&[
        "-sS",
        "-I",
        "-x",
        &proxy.url(),
        &format!("http://origin.test:{port}/big.iso"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("allow", "allowed")
    );
}

#[test]
fn report_mode_tunnels_keep_the_would_be_reason_to_the_end() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["other.test"])
            .allow("listed.test")
            .policy(TEST_POLICY, |p| p.mode = Some("report".into())),
    );
    let (mut s, head) = open_tunnel(&proxy, &format!("other.test:{port}"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    echo_round_trip(&mut s, b"ping");
    drop(s);
    let a = proxy.audit();
    assert_eq!(
        (
            a.event.as_str(),
            a.decision.as_str(),
            a.reason.as_str(),
            a.mode.as_str()
        ),
        ("connect", "would_deny", "host_not_allowed", "report")
    );
    assert_eq!((a.bytes_up, a.bytes_down), (4, 4));
}
