//! `chokepoint probe` against a real gateway on loopback. Every "outside" target is a loopback
//! address: a closed port stands for a blocked route, a listening one for a hole in the lock-down.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::net::{TcpListener, UdpSocket};
use std::process::Command;

use support::*;

fn closed_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn probe(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_chokepoint"))
        .arg("probe")
        .args(["--timeout", "3s"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
    )
}

#[test]
fn a_locked_down_seat_passes_every_check() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["allowed.test"])
            .hosts_to_loopback(&["denied.test"])
            .allow(format!("allowed.test:{port}")),
    );
    let closed = closed_tcp_port();
    // A UDP socket that never answers stands for a resolver the pod cannot reach.
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (code, out) = probe(&[
        "--proxy",
        &proxy.url(),
        "--allowed-url",
        &format!("https://allowed.test:{port}/"),
        "--denied-url",
        &format!("http://denied.test:{port}/"),
        "--direct",
        &format!("127.0.0.1:{closed}"),
        "--dns-server",
        &silent.local_addr().unwrap().to_string(),
        "--metadata",
        &format!("127.0.0.1:{closed}"),
    ]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    for name in [
        "direct-egress",
        "foreign-dns",
        "metadata",
        "gateway-allowed",
        "gateway-denied",
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("PASS") && l.contains(name)),
            "{name}: {out}"
        );
    }
    assert_eq!(lines[5], "5 of 5 checks passed");
    // The gateway saw the two probes through it.
    let a = proxy.audit();
    let b = proxy.audit();
    let mut reasons = [a.reason, b.reason];
    reasons.sort();
    assert_eq!(
        reasons,
        ["allowed".to_string(), "host_not_allowed".to_string()]
    );
}

#[test]
fn holes_in_the_lock_down_fail_the_probe() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["allowed.test"])
            .hosts_to_loopback(&["denied.test"])
            .allow(format!("allowed.test:{port}"))
            .allow(format!("denied.test:{port}")),
    );
    // The "outside" is reachable (origin listens), and a resolver answers.
    let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns_addr = dns.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        if let Ok((n, peer)) = dns.recv_from(&mut buf) {
            let _ = dns.send_to(&buf[..n], peer); // echo the query back: a "reply" with its id
        }
    });
    let (code, out) = probe(&[
        "--proxy",
        &proxy.url(),
        "--allowed-url",
        &format!("https://allowed.test:{port}/"),
        "--denied-url",
        &format!("http://denied.test:{port}/"),
        "--direct",
        &origin.addr.to_string(),
        "--dns-server",
        &dns_addr.to_string(),
        "--metadata",
        &origin.addr.to_string(),
    ]);
    assert_eq!(code, 1, "{out}");
    for name in ["direct-egress", "foreign-dns", "metadata", "gateway-denied"] {
        assert!(
            out.lines()
                .any(|l| l.starts_with("FAIL") && l.contains(name)),
            "{name}: {out}"
        );
    }
    assert!(out.contains("PASS gateway-allowed"), "{out}");
    assert!(out.ends_with("1 of 5 checks passed\n"), "{out}");
}

#[test]
fn token_classes_probe_with_a_token_file() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret-probe-token\n").unwrap();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["allowed.test"])
            .allow(format!("allowed.test:{port}"))
            .with(|c| c.agents = vec![Agent::token("coder", &token, TEST_POLICY)]),
    );
    let closed = closed_tcp_port();
    let silent = UdpSocket::bind("127.0.0.1:0").unwrap();
    let args = |with_token: bool| {
        let mut a = vec![
            "--proxy".to_string(),
            proxy.url(),
            "--allowed-url".into(),
            format!("https://allowed.test:{port}/"),
            "--denied-url".into(),
            format!("http://denied.test:{port}/"),
            "--direct".into(),
            format!("127.0.0.1:{closed}"),
            "--dns-server".into(),
            silent.local_addr().unwrap().to_string(),
            "--metadata".into(),
            format!("127.0.0.1:{closed}"),
        ];
        if with_token {
            a.extend([
                "--proxy-user".into(),
                "coder".into(),
                "--proxy-token-file".into(),
                token.display().to_string(),
            ]);
        }
        a
    };
    let (code, out) = probe(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("s3cret"), "{out}");
    // Without the token the gateway answers 407 to both: the allowed check fails.
    let (code, out) = probe(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("FAIL gateway-allowed"), "{out}");
}
