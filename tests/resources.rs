//! Resource bounds: the global connection cap holds, counts tunnels for as long as they are open,
//! and refuses the excess promptly without disturbing the connections already served.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::time::Duration;

use support::*;

#[test]
fn connections_beyond_max_connections_are_closed_at_once() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["echo.test"])
        .allow(format!("echo.test:{port}"))
        .max_connections(2)
        // Far beyond the wait: a close can only be the cap's.
        .request_header(Duration::from_secs(120));
    let proxy = Proxy::of(&cfg);

    // Slot 1: a tunnel (it keeps its slot after the HTTP exchange that opened it).
    let mut tunnel = raw(&proxy);
    tunnel
        .write_all(format!("CONNECT echo.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    assert!(read_head(&mut tunnel).starts_with("HTTP/1.1 200"));
    // Slot 2: a connection that has sent nothing yet.
    let fds = open_fds(proxy.pid());
    let mut idle = raw(&proxy);
    wait_until(WAIT, "slot 2 accepted", || open_fds(proxy.pid()) > fds);

    // A third is closed without an answer (not by the head timeout: that is far off).
    let mut third = raw(&proxy);
    let _ = third.write_all(b"CONNECT echo.test:1 HTTP/1.1\r\n\r\n");
    let got = read_until_closed(&mut third);
    assert!(got.is_empty(), "the third connection got an answer");
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
    wait_until(WAIT, "a slot came back", || {
        let mut s = raw(&proxy);
        s.write_all(format!("CONNECT echo.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
            .unwrap();
        read_head_lenient(&mut s).starts_with("HTTP/1.1 200")
    });
}
