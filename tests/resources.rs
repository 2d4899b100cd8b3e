//! Resource bounds: the global connection cap holds, counts tunnels for as long as they are open,
//! and refuses the excess promptly without disturbing the connections already served.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::*;

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let cfg = config(
        "\"echo.test\" = [\"127.0.0.1\"]",
        &[format!("echo.test:{port}")],
        "",
    )
    .replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\nmax_connections = 2\n",
    )
    .replace("request_header = \"2s\"", "request_header = \"20s\"");
    let proxy = Proxy::start(&cfg);

    // Slot 1: a tunnel (it keeps its slot after the HTTP exchange that opened it).
    let mut tunnel = raw(&proxy);
    tunnel
        .write_all(format!("CONNECT echo.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    assert!(read_head(&mut tunnel).starts_with("HTTP/1.1 200"));
    // Slot 2: a connection that has sent nothing yet.
    let mut idle = raw(&proxy);
    std::thread::sleep(Duration::from_millis(100));

    // A third is closed without an answer, long before the 20 s head timeout.
    let started = Instant::now();
    let mut third = raw(&proxy);
    let _ = third.write_all(b"CONNECT echo.test:1 HTTP/1.1\r\n\r\n");
    let n = third.read(&mut [0u8; 64]).unwrap_or(0);
    assert_eq!(n, 0, "the third connection should be closed");
    assert!(started.elapsed() < Duration::from_secs(10));
    proxy.wait_log("connection limit reached");

    // The served connections keep working.
    tunnel.write_all(b"still here").unwrap();
    let mut back = [0u8; 10];
    tunnel.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"still here");
    idle.write_all(format!("CONNECT echo.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    assert!(read_head(&mut idle).starts_with("HTTP/1.1 200"));
    drop(idle);
    drop(tunnel);
    proxy.audit();
    proxy.audit();

    // Slots come back when tunnels close.
    let deadline = Instant::now() + WAIT;
    loop {
        let mut s = raw(&proxy);
        s.write_all(format!("CONNECT echo.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .unwrap();
        let head = read_head(&mut s);
        if head.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "no slot came back");
        std::thread::sleep(Duration::from_millis(100));
    }
}
