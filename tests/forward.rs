//! Plain-HTTP forwarding through the real binary: absolute-form requests reach the origin in
//! origin-form with hop-by-hop headers gone, bodies stream both ways byte for byte, keep-alive
//! works, and refusals never reach the origin. The upstream-fault case, which waits on a DNS
//! timeout, runs the gateway in this process on a paused clock ([`InProcess`]) and moves the
//! clock instead of waiting it out.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::*;

fn setup(names: &[&str]) -> (Origin, Proxy, u16) {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(names)
            .allow(format!("origin.test:{port}")),
    );
    (origin, proxy, port)
}

#[test]
fn get_is_forwarded_in_origin_form_without_hop_by_hop_headers() {
    let (origin, proxy, port) = setup(&["origin.test"]);
    let (code, out, err) = curl(&[
        "-i",
        "-x",
        &proxy.url(),
        "-H",
        "Connection: X-Hop",
        "-H",
        "X-Hop: secret-per-hop",
        "-H",
        "Proxy-Authorization: Basic dGVzdGVyOnNlY3JldA==",
        "-H",
        "Keep-Alive: timeout=1",
        "-H",
        "TE: trailers",
        "-H",
        "Upgrade: websocket",
        "-H",
        "X-End-To-End: kept",
        &format!("http://origin.test:{port}/path?token=s3cret"),
    ]);
    assert_eq!(code, 0, "{err}");
    let seen = origin.next_seen();
    assert_eq!(seen.request_line(), "GET /path?token=s3cret HTTP/1.1");
    assert_eq!(seen.header("host"), Some(format!("origin.test:{port}")));
    assert_eq!(seen.header("x-end-to-end").as_deref(), Some("kept"));
    for gone in [
        "x-hop",
        "proxy-authorization",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-connection",
    ] {
        assert_eq!(seen.header(gone), None, "{gone} reached the origin");
    }
    // The origin's own hop-by-hop response headers do not reach the client either.
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("x-origin: yes"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("keep-alive: timeout"),
        "{head}"
    );
    assert_eq!(body, "GET /path?token=s3cret HTTP/1.1\n");

    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.decision.as_str(), a.reason.as_str()),
        ("http", "allow", "allowed")
    );
    assert_eq!(a.method.as_deref(), Some("GET"));
    assert_eq!(
        a.path.as_deref(),
        Some("/path"),
        "query strings are not audited"
    );
    assert_eq!(a.status, Some(200));
    assert_eq!(a.bytes_down, body.len() as u64);
    assert_eq!(a.upstream, Some(format!("127.0.0.1:{port}")));
}

#[test]
fn chunked_post_streams_byte_for_byte_with_curl() {
    let (origin, proxy, port) = setup(&["origin.test"]);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("body.bin");
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&file, &payload).unwrap();
    let resp_file = dir.path().join("response.bin");
    let (code, _, err) = curl(&[
        "-x",
        &proxy.url(),
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", file.display()),
        "-o",
        resp_file.to_str().unwrap(),
        &format!("http://origin.test:{port}/upload"),
    ]);
    assert_eq!(code, 0, "{err}");
    let seen = origin.next_seen();
    assert_eq!(seen.request_line(), "POST /upload HTTP/1.1");
    assert_eq!(seen.header("content-length"), None);
    assert!(seen
        .header("transfer-encoding")
        .unwrap()
        .contains("chunked"));
    assert_eq!(seen.body, payload);
    let mut expect = b"POST /upload HTTP/1.1\n".to_vec();
    expect.extend_from_slice(&payload);
    assert!(
        std::fs::read(&resp_file).unwrap() == expect,
        "response body differs"
    );
    let a = proxy.audit();
    assert_eq!(a.method.as_deref(), Some("POST"));
    assert_eq!(a.bytes_up, payload.len() as u64);
    assert_eq!(a.bytes_down, expect.len() as u64);
}

#[test]
fn streamed_body_through_a_rust_client_honouring_the_proxy() {
    let (origin, proxy, port) = setup(&["origin.test"]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let chunks: Vec<Vec<u8>> = (0..64u8).map(|i| vec![i; 1000]).collect();
    let expect: Vec<u8> = chunks.concat();
    let body = rt.block_on(async {
        let client = reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(proxy.url()).unwrap())
            .build()
            .unwrap();
        let stream = futures_util::stream::iter(chunks.into_iter().map(Ok::<_, std::io::Error>));
        let resp = client
            .put(format!("http://origin.test:{port}/stream"))
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp.bytes().await.unwrap()
    });
    let seen = origin.next_seen();
    assert_eq!(seen.request_line(), "PUT /stream HTTP/1.1");
    assert_eq!(seen.body, expect);
    assert_eq!(
        &body[..],
        [b"PUT /stream HTTP/1.1\n".as_slice(), &expect].concat()
    );
    let a = proxy.audit();
    assert_eq!(
        (a.reason.as_str(), a.bytes_up),
        ("allowed", expect.len() as u64)
    );
}

#[test]
fn keep_alive_serves_several_requests_on_one_client_connection() {
    let (origin, proxy, port) = setup(&["origin.test"]);
    let mut s = raw(&proxy);
    for i in 0..3 {
        s.write_all(
            format!(
                "GET http://origin.test:{port}/r{i} HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n"
            )
            .as_bytes(),
        )
        .unwrap();
        let head = read_head(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let expect = format!("GET /r{i} HTTP/1.1\n");
        let mut body = vec![0; expect.len()];
        s.read_exact(&mut body).unwrap();
        assert_eq!(body, expect.as_bytes());
    }
    let clients: Vec<String> = (0..3).map(|_| proxy.audit().client).collect();
    assert!(
        clients.iter().all(|c| *c == clients[0]),
        "one client connection: {clients:?}"
    );
    assert_eq!(
        origin.connections(),
        1,
        "the upstream connection is kept alive and reused"
    );
}

#[test]
fn host_header_must_match_the_target() {
    let (origin, proxy, port) = setup(&["origin.test", "evil.test"]);
    let mut s = raw(&proxy);
    s.write_all(
        format!("GET http://origin.test:{port}/ HTTP/1.1\r\nHost: evil.test:{port}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(head.contains("chokepoint-reason: host_mismatch"), "{head}");
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str()),
        ("deny", "host_mismatch")
    );
    assert_eq!(origin.connections(), 0);
}

#[test]
fn requests_that_are_not_proxy_requests() {
    let (origin, proxy, port) = setup(&["origin.test"]);
    // Talking to the proxy as if it were the origin.
    let (_, out, _) = curl(&["-i", &format!("{}/some/path", proxy.url())]);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(
        out.contains("chokepoint-reason: not_proxy_request"),
        "{out}"
    );
    assert!(out.contains("this is a forward proxy"), "{out}");
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("reject", "not_proxy_request")
    );
    assert_eq!((a.host, a.agent), (None, None));

    // https in absolute form: must be a CONNECT.
    let mut s = raw(&proxy);
    s.write_all(format!("GET https://origin.test:{port}/ HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    assert!(
        head.contains("chokepoint-reason: unsupported_scheme"),
        "{head}"
    );
    assert_eq!(proxy.audit().reason, "unsupported_scheme");
    assert_eq!(origin.connections(), 0);
}

#[test]
fn unknown_client_address_is_refused() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["origin.test"])
        .allow(format!("origin.test:{port}"))
        .edit_agent(TESTER, |a| {
            a.source_cidrs = Some(vec!["127.0.0.10/32".into()])
        });
    let proxy = Proxy::of(&cfg);
    let url = format!("http://origin.test:{port}/");
    let (_, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--interface",
        "127.0.0.20",
        "-x",
        &proxy.url(),
        &url,
    ]);
    assert_eq!(out, "403");
    let a = proxy.audit();
    assert_eq!((a.reason.as_str(), a.agent), ("unknown_agent", None));
    assert!(a.client.starts_with("127.0.0.20:"), "{}", a.client);
    let (_, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--interface",
        "127.0.0.10",
        "-x",
        &proxy.url(),
        &url,
    ]);
    assert_eq!(out, "200");
    assert_eq!(proxy.audit().agent.as_deref(), Some("tester"));
    assert_eq!(origin.connections(), 1);
}

#[test]
fn upstream_faults_are_502_with_the_reason() {
    // A port nothing listens on: bind, learn the port, close.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["down.test"])
        .allow(format!("down.test:{closed}"))
        .allow(format!("nxdomain.test:{closed}"));
    let dns_timeout = cfg.timeouts.dns.unwrap();
    let proxy = InProcess::of(&cfg);
    let (_, out, _) = curl(&[
        "-i",
        "-x",
        &proxy.url(),
        &format!("http://down.test:{closed}/"),
    ]);
    assert!(out.starts_with("HTTP/1.1 502"), "{out}");
    assert!(
        out.contains("chokepoint-reason: upstream_connect_failed"),
        "{out}"
    );
    assert!(
        out.contains("chokepoint could not complete GET down.test"),
        "{out}"
    );
    let a = proxy.audit();
    assert_eq!(
        (a.decision.as_str(), a.reason.as_str(), a.status),
        ("allow", "upstream_connect_failed", Some(502))
    );

    // The test config's nameserver is a closed loopback port: resolution fails, at once or
    // when the lookup's deadline passes, as the clock is moved a second at a time.
    let (proxy_url, url) = (proxy.url(), format!("http://nxdomain.test:{closed}/"));
    let out = std::thread::scope(|scope| {
        let curl = scope.spawn(|| curl(&["-i", "-x", &proxy_url, &url]).1);
        proxy.advance_until(
            Duration::from_secs(1),
            // Room for curl's request to arrive after the first steps.
            10 * dns_timeout,
            "the lookup ends",
            || curl.is_finished(),
        );
        curl.join().unwrap()
    });
    assert!(
        out.starts_with("HTTP/1.1 502") || out.starts_with("HTTP/1.1 504"),
        "{out}"
    );
    let a = proxy.audit();
    assert!(a.reason.starts_with("dns_"), "{a:?}");
    proxy.no_audit_for(Duration::from_millis(100));
}

#[test]
fn query_without_path_and_foreign_transfer_codings() {
    let (origin, proxy, port) = setup(&["origin.test"]);
    let mut s = raw(&proxy);
    s.write_all(
        format!("GET http://origin.test:{port}?x=1 HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(origin.next_seen().request_line(), "GET /?x=1 HTTP/1.1");
    drop(s);
    assert_eq!(proxy.audit().path.as_deref(), Some("/"));

    // gzip would reach the origin still coded but labelled plain: refused instead.
    let mut s = raw(&proxy);
    s.write_all(
        format!(
            "POST http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.contains("chokepoint-reason: malformed_request"),
        "{head}"
    );
    assert_eq!(proxy.audit().reason, "malformed_request");
    assert_eq!(origin.connections(), 1);
}

/// A target whose path is empty once the fragment is gone (`http://host:port#x`) reaches the
/// origin as `/`, the query kept; a fragment never reaches it. Before the fix the origin got
/// `GET  HTTP/1.1` (an empty request target) while the audit line said `/`.
#[test]
fn an_empty_path_is_forwarded_as_slash_and_a_fragment_never() {
    let (origin, proxy, port) = setup(&["origin.test"]);
    let mut s = raw(&proxy);
    for (target, line, path) in [
        (
            format!("http://origin.test:{port}#x"),
            "GET / HTTP/1.1",
            "/",
        ),
        (format!("http://origin.test:{port}#"), "GET / HTTP/1.1", "/"),
        (
            format!("http://origin.test:{port}?q=1#x"),
            "GET /?q=1 HTTP/1.1",
            "/",
        ),
        (
            format!("http://origin.test:{port}/p/q#x?y"),
            "GET /p/q HTTP/1.1",
            "/p/q",
        ),
    ] {
        s.write_all(
            format!("GET {target} HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n").as_bytes(),
        )
        .unwrap();
        let (head, body) = read_response(&mut s);
        assert!(head.starts_with("HTTP/1.1 200"), "{target}: {head}");
        assert_eq!(origin.next_seen().request_line(), line, "{target}");
        // The origin echoes the request line it read.
        assert_eq!(
            String::from_utf8_lossy(&body),
            format!("{line}\n"),
            "{target}"
        );
        let a = proxy.audit();
        assert_eq!(
            (a.reason.as_str(), a.path.as_deref()),
            ("allowed", Some(path)),
            "{target}"
        );
    }
    assert_eq!(
        origin.connections(),
        1,
        "one kept-alive upstream connection"
    );
}

#[test]
fn a_malformed_head_after_a_good_request_is_audited_too() {
    let (_origin, proxy, port) = setup(&["origin.test"]);
    let mut s = raw(&proxy);
    s.write_all(
        format!("GET http://origin.test:{port}/ok HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut body = vec![0; "GET /ok HTTP/1.1\n".len()];
    s.read_exact(&mut body).unwrap();
    assert_eq!(proxy.audit().reason, "allowed");
    s.write_all(b"GET http://origin.test/ HTTP/1.1\r\nBad Header\r\n\r\n")
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str(), a.status),
        ("reject", "malformed_request", Some(400))
    );
}

#[test]
fn an_early_answer_does_not_end_the_exchange_before_the_upload() {
    // An origin that answers as soon as it has the head, then reads the body to its end.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, body_seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            seen.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .unwrap();
        while !seen.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        tx.send(seen).unwrap();
    });
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["early.test"])
            .allow(format!("early.test:{port}")),
    );
    let mut s = raw(&proxy);
    s.write_all(
        format!("POST http://early.test:{port}/up HTTP/1.1\r\nHost: early.test:{port}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            .as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // The response is out, but the upload is not finished: no audit line yet.
    proxy.no_audit_for(Duration::from_millis(300));
    s.write_all(b"5\r\nworld\r\n0\r\n\r\n").unwrap();
    let a = proxy.audit();
    assert_eq!((a.reason.as_str(), a.bytes_up), ("allowed", 10));
    let seen = String::from_utf8(body_seen.recv_timeout(WAIT).unwrap()).unwrap();
    assert!(seen.contains("hello") && seen.contains("world"), "{seen}");
}
