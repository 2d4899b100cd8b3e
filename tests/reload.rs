//! Hot reload: a changed file (or SIGHUP) swaps the config atomically; open tunnels the new
//! config still admits keep running (those it revokes: tests/revoke.rs); a broken file keeps the
//! old config serving; rate-limit state of agents that still exist survives.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use support::*;

/// Replace a file atomically, as editors and `kubectl` do (write aside, rename over).
fn replace(path: &Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The standard test config with `a.test` and `b.test` on 127.0.0.1, allowing `rules`.
fn cfg(rules: &[String]) -> ConfigBuilder {
    rules.iter().fold(
        ConfigBuilder::new().hosts_to_loopback(&["a.test", "b.test"]),
        |c, r| c.allow(r.clone()),
    )
}

fn status_of(proxy: &Proxy, url: &str) -> String {
    let (_, out, _) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-x",
        &proxy.url(),
        url,
    ]);
    out
}

/// Poll (bounded) until `url` answers `want`; each probe leaves one audit line, drained here.
fn until_status(proxy: &Proxy, url: &str, want: &str) {
    wait_until(WAIT, &format!("{url} answers {want}"), || {
        let got = status_of(proxy, url);
        proxy.audit();
        got == want
    });
}

fn open_tunnel(proxy: &Proxy, authority: &str) -> TcpStream {
    let mut s = raw(proxy);
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

fn echo(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut back = vec![0; msg.len()];
    s.read_exact(&mut back).unwrap();
    assert_eq!(back, msg);
}

#[test]
fn reload_applies_to_new_requests_while_an_open_tunnel_still_allowed_survives() {
    let echo_srv = Echo::start("127.0.0.1:0");
    let port = echo_srv.addr.port();
    let before = cfg(&[format!("a.test:{port}")]).to_toml();
    let proxy = Proxy::start(&before);
    let b = format!("http://b.test:{port}/");

    let mut tunnel = open_tunnel(&proxy, &format!("a.test:{port}"));
    echo(&mut tunnel, b"before reload");
    assert_eq!(status_of(&proxy, &b), "403");
    assert_eq!(proxy.audit().reason, "host_not_allowed");

    replace(
        &proxy.config_path,
        &cfg(&[format!("b.test:{port}"), format!("a.test:{port}")]).to_toml(),
    );
    proxy.wait_log("config reloaded");
    // New requests see the new allowlist...
    let (_, out, _) = curl(&[
        "-p",
        "-x",
        &proxy.url(),
        "-o",
        "/dev/null",
        "-w",
        "%{http_connect}",
        &b,
    ]);
    assert_eq!(out, "200");
    let allowed = proxy.audit();
    assert_eq!(
        (allowed.reason.as_str(), allowed.rule),
        ("allowed", Some(format!("b.test:{port}")))
    );

    // ...while the tunnel opened under the old one, still allowed by the new one, keeps working
    // (tests/revoke.rs: one the new config no longer allows is closed).
    echo(&mut tunnel, b"after reload");
    drop(tunnel);
    let old = proxy.audit();
    assert_eq!(
        (old.event.as_str(), old.reason.as_str()),
        ("connect", "allowed")
    );
    assert_eq!(old.rule, Some(format!("a.test:{port}")));
    assert_eq!(
        old.bytes_up,
        (b"before reload".len() + b"after reload".len()) as u64
    );
}

#[test]
fn a_broken_file_keeps_the_old_config_serving() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let good = cfg(&[format!("a.test:{port}")]);
    let proxy = Proxy::of(&good);
    let a = format!("http://a.test:{port}/");

    // Valid TOML, invalid config (`*` is a rule only alone): every issue is logged, nothing
    // is applied.
    replace(
        &proxy.config_path,
        &good
            .policy(TEST_POLICY, |p| p.allow.insert(0, "*".into()))
            .to_toml(),
    );
    let line = proxy.wait_log("config reload failed");
    assert!(line.contains("policies.test.allow[0]"), "{line}");
    assert_eq!(status_of(&proxy, &a), "200");
    assert_eq!(proxy.audit().reason, "allowed");

    // Not even TOML.
    replace(&proxy.config_path, "[server\nlisten = ");
    proxy.wait_log("config reload failed");
    assert_eq!(status_of(&proxy, &a), "200");
    proxy.audit();

    // Fixed: the next good file applies.
    replace(
        &proxy.config_path,
        &cfg(&[format!("b.test:{port}")]).to_toml(),
    );
    proxy.wait_log("config reloaded");
    until_status(&proxy, &a, "403");
}

#[test]
fn sighup_reloads_at_once() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::start(&cfg(&[format!("a.test:{port}")]).to_toml());
    proxy.signal("HUP");
    proxy.wait_log("config reloaded");
    assert_eq!(status_of(&proxy, &format!("http://a.test:{port}/")), "200");
    proxy.audit();
}

#[test]
fn kubernetes_configmap_symlink_swap_is_picked_up() {
    use std::os::unix::fs::symlink;
    let origin = Origin::http();
    let port = origin.addr.port();
    // The layout kubelet makes for a ConfigMap volume:
    //   chokepoint.toml -> ..data/chokepoint.toml, ..data -> ..v1 (swapped atomically to ..v2).
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(
        v1.join("chokepoint.toml"),
        cfg(&[format!("a.test:{port}")]).to_toml(),
    )
    .unwrap();
    symlink("..v1", dir.path().join("..data")).unwrap();
    symlink("..data/chokepoint.toml", dir.path().join("chokepoint.toml")).unwrap();
    let path = dir.path().join("chokepoint.toml");
    let proxy = Proxy::start_at(dir, path.clone());
    assert_eq!(status_of(&proxy, &format!("http://a.test:{port}/")), "200");
    proxy.audit();

    let root = path.parent().unwrap();
    let v2 = root.join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(
        v2.join("chokepoint.toml"),
        cfg(&[format!("b.test:{port}")]).to_toml(),
    )
    .unwrap();
    symlink("..v2", root.join("..data_tmp")).unwrap();
    std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
    std::fs::remove_dir_all(root.join("..v1")).unwrap();

    proxy.wait_log("config reloaded");
    until_status(&proxy, &format!("http://b.test:{port}/"), "200");
    assert_eq!(status_of(&proxy, &format!("http://a.test:{port}/")), "403");
    proxy.audit();
}

#[test]
fn rate_state_survives_a_reload() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let limits = |l: &mut Limits| {
        l.requests_per_second = Some(0.01);
        l.burst = Some(2);
    };
    let proxy = Proxy::start(
        &cfg(&[format!("a.test:{port}")])
            .test_limits(limits)
            .to_toml(),
    );
    let a = format!("http://a.test:{port}/");
    for _ in 0..2 {
        assert_eq!(status_of(&proxy, &a), "200");
        proxy.audit();
    }
    // Same agent, same quota, another rule: the spent burst must not come back.
    replace(
        &proxy.config_path,
        &cfg(&[format!("a.test:{port}"), format!("b.test:{port}")])
            .test_limits(limits)
            .to_toml(),
    );
    proxy.wait_log("config reloaded");
    assert_eq!(status_of(&proxy, &format!("http://b.test:{port}/")), "429");
    let a429 = proxy.audit();
    assert_eq!(
        (a429.reason.as_str(), a429.decision.as_str()),
        ("rate_limited", "deny")
    );
}

/// `chokepoint_config_reloads_total{result="ok"}` from the admin listener.
fn reloads_ok(proxy: &Proxy) -> u64 {
    let (_, scrape, _) = curl(&["-s", &format!("http://{}/metrics", proxy.admin.unwrap())]);
    let series = r#"chokepoint_config_reloads_total{result="ok"} "#;
    scrape
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {scrape}"))
}

#[test]
fn a_config_written_in_place_in_two_steps_is_applied_once_whole() {
    let proxy = Proxy::of(&cfg(&["a.test".into()]).admin());
    let base = std::fs::read_to_string(&proxy.config_path).unwrap();
    assert_eq!(reloads_ok(&proxy), 0);
    // The file is polled once a second at a phase the test does not know: three revisions,
    // each started a third of a second later in that cycle, so one of the 0.6 s windows in
    // which only the first part is there spans a poll.
    for revision in 1..=3u64 {
        std::thread::sleep(Duration::from_millis(350 * revision));
        // A writer that truncates and writes (shell redirection, many editors): first a
        // prefix that is itself a valid config, the rest 0.6 s later.
        let head = format!("{base}\n# revision {revision}, first part\n");
        let whole = format!("{head}# revision {revision}, the rest\n");
        std::fs::write(&proxy.config_path, &head).unwrap();
        std::thread::sleep(Duration::from_millis(600));
        std::fs::write(&proxy.config_path, &whole).unwrap();
        wait_until(WAIT, "the revision is applied", || {
            reloads_ok(&proxy) >= revision
        });
        // Past the next poll: the first part never counts as a revision of its own.
        std::thread::sleep(Duration::from_millis(1300));
        assert_eq!(reloads_ok(&proxy), revision, "one reload per revision");
    }
}
