//! The admin listener and the metrics: what an operator's Prometheus and kubelet see. A live
//! scrape must pass `promtool check metrics`: skipped where promtool is missing, a failure under
//! CI (`CI=true`, where `.ci/run` installs it).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use support::*;

fn get(proxy: &Proxy, path: &str) -> (String, String) {
    let (_, out, err) = curl(&[
        "-o",
        "-",
        "-w",
        "\n%{http_code}",
        &format!("http://{}{path}", proxy.admin.unwrap()),
    ]);
    let (body, code) = out
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("{out} {err}"));
    (code.to_string(), body.to_string())
}

/// The value of the series whose line starts with `series` (labels in Prometheus's sorted order).
fn value(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn health_ready_and_metrics_after_traffic() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}"))
            .admin(),
    );
    assert_eq!(get(&proxy, "/healthz"), ("200".into(), "ok\n".into()));
    assert_eq!(get(&proxy, "/readyz").0, "200");

    curl(&["-x", &proxy.url(), &format!("http://origin.test:{port}/x")]);
    curl(&["-x", &proxy.url(), "http://evil.test/"]);
    curl(&[
        "-p",
        "-x",
        &proxy.url(),
        &format!("http://origin.test:{port}/y"),
    ]);
    for _ in 0..3 {
        proxy.audit();
    }
    let (code, scrape) = get(&proxy, "/metrics");
    assert_eq!(code, "200");
    let want = [
        (
            r#"chokepoint_requests_total{agent="tester",decision="allow",kind="http",reason="allowed"}"#,
            1.0,
        ),
        (
            r#"chokepoint_requests_total{agent="tester",decision="deny",kind="http",reason="host_not_allowed"}"#,
            1.0,
        ),
        (
            r#"chokepoint_requests_total{agent="tester",decision="allow",kind="connect",reason="allowed"}"#,
            1.0,
        ),
        (r#"chokepoint_active_tunnels{agent="tester"}"#, 0.0),
        (
            r#"chokepoint_request_duration_seconds_count{kind="http"}"#,
            2.0,
        ),
        (r#"chokepoint_config_reloads_total{result="error"}"#, 0.0),
        ("chokepoint_upstream_connect_seconds_count", 2.0),
        ("chokepoint_audit_lines_total", 3.0),
        ("chokepoint_audit_queue_lines", 0.0),
    ];
    for (series, v) in want {
        assert_eq!(value(&scrape, series), Some(v), "{series}\n{scrape}");
    }
    assert!(
        value(
            &scrape,
            r#"chokepoint_bytes_total{agent="tester",direction="down"}"#
        )
        .unwrap()
            > 0.0
    );
    assert!(
        scrape.contains("chokepoint_build_info{version=\""),
        "{scrape}"
    );
    assert!(scrape.contains("process_resident_memory_bytes"), "{scrape}");
    // Labels never carry a host, path or address.
    assert!(
        !scrape.contains("origin.test")
            && !scrape.contains("evil.test")
            && !scrape.contains("127.0.0.1")
    );

    if let Ok(promtool) = which("promtool") {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(scrape.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        skip_unless_ci(
            "promtool is not installed: `promtool check metrics` did not run (.ci/run installs it)",
        );
    }
}

/// Without promtool the scrape check above is skipped on a workstation, and fails under CI
/// (`CI=true`), where a check that did not run must not pass.
#[test]
fn a_missing_promtool_fails_the_scrape_check_under_ci() {
    let test = "health_ready_and_metrics_after_traffic";
    // curl fetches the scrape; `sh` is how the test looks for promtool.
    let keep = ["curl", "sh"];
    let ci = rerun_without_tools(test, &keep, true);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert!(
        !ci.status.success() && text(&ci).contains("promtool is not installed"),
        "under CI without promtool the test must fail:\n{}",
        text(&ci)
    );
    let local = rerun_without_tools(test, &keep, false);
    assert!(
        local.status.success() && text(&local).contains("SKIPPED: promtool"),
        "without CI the test skips the check and passes:\n{}",
        text(&local)
    );
}

fn which(cmd: &str) -> Result<String, ()> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .map_err(|_| ())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(())
    }
}

#[test]
fn the_admin_port_never_proxies() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}"))
            .admin(),
    );
    let admin = format!("http://{}", proxy.admin.unwrap());
    let (_, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        &admin,
        &format!("http://origin.test:{port}/"),
    ]);
    assert_eq!(out, "404");
    let (_, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_connect}",
        "-p",
        "-x",
        &admin,
        &format!("http://origin.test:{port}/"),
    ]);
    assert_eq!(out, "405");
    assert_eq!(get(&proxy, "/nope").0, "404");
    assert_eq!(origin.connections(), 0);
    proxy.no_audit_for(std::time::Duration::from_millis(200));
}

#[test]
fn readyz_fails_while_draining() {
    let echo = Echo::start("127.0.0.1:0");
    let port = echo.addr.port();
    let mut proxy = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["echo.test"])
            .allow(format!("echo.test:{port}"))
            .admin(),
    );
    let mut tunnel = raw(&proxy);
    tunnel
        .write_all(format!("CONNECT echo.test:{port} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    assert!(read_head(&mut tunnel).starts_with("HTTP/1.1 200"));
    let (_, scrape) = get(&proxy, "/metrics");
    assert_eq!(
        value(&scrape, r#"chokepoint_active_tunnels{agent="tester"}"#),
        Some(1.0)
    );

    proxy.sigterm();
    proxy.wait_log("draining");
    assert_eq!(get(&proxy, "/readyz").0, "503", "not ready while draining");
    assert_eq!(get(&proxy, "/healthz").0, "200", "still alive");
    drop(tunnel);
    assert!(proxy.wait_exit(WAIT).success());
    proxy.audit();
}

#[test]
fn a_burst_of_thousands_of_requests_leaves_exactly_one_audit_line_each() {
    const CONNS: usize = 8;
    const PER_CONN: usize = 400;
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &ConfigBuilder::new()
            .admin()
            .hosts_to_loopback(&["origin.test"])
            .allow(format!("origin.test:{port}"))
            .test_limits(|l| {
                l.requests_per_second = Some(100_000.0);
                l.burst = Some(100_000);
                l.max_concurrent = Some(1000);
            }),
    );
    let addr = proxy.addr;
    let threads: Vec<_> = (0..CONNS)
        .map(|c| {
            std::thread::spawn(move || {
                use std::io::{BufRead, BufReader, Read};
                let s = std::net::TcpStream::connect(addr).unwrap();
                s.set_read_timeout(Some(WAIT)).unwrap();
                // Buffered: a read per response, not per byte.
                let mut s = BufReader::new(s);
                for i in 0..PER_CONN {
                    s.get_mut().write_all(
                        format!("GET http://origin.test:{port}/c{c}/r{i} HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n")
                            .as_bytes(),
                    )
                    .unwrap();
                    let mut head = String::new();
                    while !head.ends_with("\r\n\r\n") {
                        assert!(s.read_line(&mut head).unwrap() > 0, "closed: {head}");
                    }
                    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                    let len: usize = head_header(&head, "content-length")
                        .unwrap()
                        .parse()
                        .unwrap();
                    let mut body = vec![0; len];
                    s.read_exact(&mut body).unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut ids = std::collections::HashSet::new();
    for _ in 0..CONNS * PER_CONN {
        let a = proxy.audit();
        assert_eq!(a.reason, "allowed");
        assert!(ids.insert(a.request_id), "duplicate request id");
    }
    proxy.no_audit_for(std::time::Duration::from_millis(300));
    let (_, scrape) = get(&proxy, "/metrics");
    assert_eq!(
        value(&scrape, "chokepoint_audit_lines_total"),
        Some((CONNS * PER_CONN) as f64)
    );
}
