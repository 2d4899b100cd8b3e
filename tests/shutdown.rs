//! SIGTERM: stop accepting, let open tunnels finish within the grace period, then exit 0 with
//! every audit line written.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

fn open_tunnel(proxy: &Proxy, port: u16) -> TcpStream {
    let mut s = raw(proxy);
    s.write_all(format!("CONNECT echo.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));
    s
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut buf = vec![0; msg.len()];
    s.read_exact(&mut buf).unwrap();
    assert_eq!(buf, msg);
}

#[test]
fn sigterm_drains_an_open_tunnel_then_exits_zero() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let mut proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["echo.test"])
            .allow(format!("echo.test:{port}")),
    );
    let mut tunnel = open_tunnel(&proxy, port);
    round_trip(&mut tunnel, b"before");
    proxy.sigterm();
    // Wait until the proxy says it is draining, so the next checks race nothing.
    while !proxy
        .stderr
        .recv_timeout(WAIT)
        .unwrap()
        .contains("draining")
    {}

    // New connections are no longer accepted...
    assert!(
        TcpStream::connect(proxy.addr).is_err(),
        "listener should be closed"
    );
    // ...but the open tunnel keeps working.
    round_trip(&mut tunnel, b"during the grace period");
    assert!(proxy.is_running());
    drop(tunnel);

    let status = proxy.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("connect", "allowed")
    );
    assert_eq!(
        a.bytes_up,
        (b"before".len() + b"during the grace period".len()) as u64
    );
}

#[test]
fn tunnel_still_open_at_the_end_of_grace_is_closed_and_audited() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let cfg = ConfigBuilder::new()
        .hosts_to_loopback(&["echo.test"])
        .allow(format!("echo.test:{port}"))
        .shutdown_grace(Duration::from_secs(1));
    let mut proxy = Proxy::of(&cfg);
    let mut tunnel = open_tunnel(&proxy, port);
    round_trip(&mut tunnel, b"x");
    proxy.sigterm();
    let status = proxy.wait_exit(WAIT);
    assert!(status.success(), "{status:?}");
    let a = proxy.audit();
    assert_eq!(
        (a.event.as_str(), a.reason.as_str()),
        ("connect", "shutdown")
    );
    assert!(a.duration_ms >= 1000, "{a:?}");
    tunnel
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    assert_eq!(tunnel.read(&mut [0u8; 8]).unwrap_or(0), 0, "tunnel closed");
}
