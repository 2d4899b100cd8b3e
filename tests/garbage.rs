//! Hostile bytes: a bounded batch of random and near-valid request heads must never crash or wedge
//! the gateway; every connection ends (answer or close) and a good request still works afterwards.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::*;

/// A small deterministic generator (xorshift): reproducible without a seed file.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

fn hostile_heads(n: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let methods = ["CONNECT", "GET", "POST", "OPTIONS", "G\0T", "", "PRI"];
    let targets = [
        "origin.test:1",
        "[::1]:80",
        "[::ffff:127.0.0.1]:80",
        "http://origin.test/",
        "http://[::1/",
        "http://a@b/",
        "*",
        "/",
        "xn--:443",
        "\u{7f}:1",
        "a:99999",
        "%00:80",
        "http://origin.test:0/",
        "0x7f.0.0.1:80",
        "[fe80::1%eth0]:443",
        "origin.test.:65535",
        "http://ex\u{e4}mple.test/",
    ];
    let headers = [
        "Host: a",
        "Host:",
        "Content-Length: 5",
        "Content-Length: -1",
        "Transfer-Encoding: chunked",
        "Transfer-Encoding: chunked, identity",
        "Content-Length: 1\r\nContent-Length: 2",
        " folded",
        "X: \0",
        "Proxy-Authorization: Basic !!!",
        "Expect: 100-continue",
        "Connection: upgrade",
    ];
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut head = if i % 4 == 0 {
            // Pure noise.
            (0..(rng.next() % 300)).map(|_| rng.next() as u8).collect()
        } else {
            let mut s = format!(
                "{} {} HTTP/1.{}\r\n",
                rng.pick(&methods),
                rng.pick(&targets),
                rng.next() % 3
            );
            for _ in 0..(rng.next() % 4) {
                s.push_str(rng.pick(&headers));
                s.push_str(if rng.next() % 5 == 0 { "\n" } else { "\r\n" });
            }
            s.push_str("\r\n");
            s.into_bytes()
        };
        if i % 7 == 0 {
            head.extend_from_slice(b"hello");
        }
        out.push(head);
    }
    out
}

#[test]
fn hostile_request_heads_never_crash_or_wedge_the_gateway() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let mut proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}")),
    );
    for head in hostile_heads(300) {
        let mut s = raw(&proxy);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&head);
        let _ = s.shutdown(std::net::Shutdown::Write);
        // Read until the proxy answers and closes: bounded by the request-header timeout (2 s).
        let mut sink = Vec::new();
        let r = s.read_to_end(&mut sink);
        assert!(
            r.is_ok(),
            "connection wedged for {:?}",
            String::from_utf8_lossy(&head)
        );
        assert!(
            proxy.is_running(),
            "gateway died on {:?}",
            String::from_utf8_lossy(&head)
        );
    }
    let (code, body, err) = curl(&[
        "-x",
        &proxy.url(),
        &format!("http://origin.test:{port}/after"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(body, "GET /after HTTP/1.1\n");
}
