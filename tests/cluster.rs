//! Cluster-wide limits (`[cluster]`): several gateways sharing one real `redis-server` on
//! loopback (started by the test, see `support::RedisServer`).

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use chokepoint::limits::cluster::RELEASE_AFTER;
use support::*;

/// The test store itself: answers, goes away, comes back empty on the same port.
#[test]
fn redis_helper_starts_stops_and_restarts_on_its_port() {
    let mut redis = RedisServer::start();
    assert!(redis.addr.ip().is_loopback());
    assert!(redis.ping());
    assert!(redis.command(&["SET", "k", "v"]).starts_with("+OK"));
    let port = redis.addr.port();
    redis.stop();
    assert!(!redis.ping());
    redis.restart();
    assert_eq!(redis.addr.port(), port);
    assert!(redis.ping());
    assert_eq!(redis.command(&["DBSIZE"]), ":0\r\n", "restarted empty");

    let secured = RedisServer::with_user("gateway", "s3cret");
    assert!(secured.ping());
    assert!(secured.command(&["DBSIZE"]).starts_with(':'));
}

/// `n` gateway processes on `cfg` (which has an admin listener), each once its store is in
/// use (its first heartbeat done).
fn fleet(n: usize, cfg: &ConfigBuilder) -> Vec<Proxy> {
    (0..n)
        .map(|_| {
            let p = Proxy::of(cfg);
            wait_until(WAIT, "the limit store in use", || in_use(&p));
            p
        })
        .collect()
}

/// `GET path` on the admin listener: (status, body).
fn admin_get(p: &Proxy, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(p.admin.expect("an admin listener")).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let mut out = String::new();
    std::io::Read::read_to_string(&mut s, &mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status_of(head), body.to_owned())
}

/// The value of an unlabelled metric.
fn metric(p: &Proxy, name: &str) -> f64 {
    let (_, body) = admin_get(p, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in the scrape"))
}

/// The value of a series, given as it appears in the scrape (name and labels).
fn metric_of(p: &Proxy, series: &str) -> f64 {
    let (_, body) = admin_get(p, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in the scrape"))
}

/// True while the gateway uses its limit store (not in fallback).
fn in_use(p: &Proxy) -> bool {
    metric(p, "chokepoint_limit_store_fallback") == 0.0
}

/// The standard test config with an origin (`origin.test`) and an echo server (`echo.test`)
/// allowed, the test agent's limits set by `limits`, and `[cluster]` on `redis`.
fn config(
    redis: &RedisServer,
    origin: &Origin,
    echo: &Echo,
    limits: impl FnOnce(&mut Limits),
    cluster: impl FnOnce(&mut Cluster),
) -> ConfigBuilder {
    ConfigBuilder::new()
        .hosts_to_loopback(&["origin.test", "echo.test"])
        .allow(format!("origin.test:{}", origin.addr.port()))
        .allow(format!("echo.test:{}", echo.addr.port()))
        .test_limits(limits)
        .admin()
        .cluster(&redis.url(), cluster)
}

/// One keep-alive GET through `s`; returns the response head.
fn get(s: &mut TcpStream, port: u16) -> String {
    s.write_all(
        format!("GET http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    read_response(s).0
}

/// Open a tunnel to the echo server; returns the socket and the response head.
fn tunnel(proxy: &Proxy, echo: &Echo) -> (TcpStream, String) {
    let mut s = raw(proxy);
    let at = format!("echo.test:{}", echo.addr.port());
    s.write_all(format!("CONNECT {at} HTTP/1.1\r\nHost: {at}\r\n\r\n").as_bytes())
        .unwrap();
    let head = read_head(&mut s);
    (s, head)
}

/// Item 7: one agent driven through four gateways at once is admitted at its configured rate,
/// not four times it. Counts what was admitted over the whole run (never the timing of one
/// request), against what GCRA allows over the same wall time: burst + rate × elapsed.
#[test]
fn four_gateways_admit_one_rate_between_them() {
    const RATE: f64 = 20.0;
    const BURST: u64 = 5;
    let redis = RedisServer::start();
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let port = origin.addr.port();
    let cfg = config(
        &redis,
        &origin,
        &echo,
        |l| {
            l.requests_per_second = Some(RATE);
            l.burst = Some(BURST);
            l.max_concurrent = Some(1000);
        },
        |_| {},
    );
    let gateways = fleet(4, &cfg);
    let run = Duration::from_secs(10);
    let start = Instant::now();
    let tallies: Vec<(u64, u64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = gateways
            .iter()
            .map(|g| {
                let at = g.addr;
                scope.spawn(move || {
                    let mut s = TcpStream::connect(at).unwrap();
                    s.set_read_timeout(Some(WAIT)).unwrap();
                    let (mut admitted, mut limited) = (0u64, 0u64);
                    // Bounded in time and in count.
                    for _ in 0..50_000 {
                        if start.elapsed() >= run {
                            break;
                        }
                        let head = get(&mut s, port);
                        match status_of(&head) {
                            200 => admitted += 1,
                            429 => {
                                assert!(head.contains("chokepoint-reason: rate_limited"), "{head}");
                                assert!(head_header(&head, "retry-after").is_some(), "{head}");
                                limited += 1;
                            }
                            other => panic!("unexpected {other}: {head}"),
                        }
                    }
                    (admitted, limited)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let admitted: u64 = tallies.iter().map(|t| t.0).sum();
    let limited: u64 = tallies.iter().map(|t| t.1).sum();
    let expected = BURST as f64 + RATE * elapsed;
    let off = (admitted as f64 - expected).abs() / expected;
    eprintln!("admitted {admitted}, limited {limited} in {elapsed:.2}s; expected {expected:.0}; per gateway {tallies:?}");
    assert!(
        limited > admitted,
        "the agent was driven well past its rate: {tallies:?}"
    );
    assert!(
        off <= 0.05,
        "admitted {admitted} over {elapsed:.2}s, expected {expected:.0} (±5%): {tallies:?}"
    );
    assert!(
        tallies.iter().all(|t| t.0 > 0),
        "every gateway admitted some: {tallies:?}"
    );
}

/// Item 7: `max_concurrent = 8` holds across four gateways; beyond it 429
/// `too_many_concurrent`; a closed tunnel's slot comes back.
#[test]
fn four_gateways_share_one_concurrency_cap() {
    let redis = RedisServer::start();
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let cfg = config(
        &redis,
        &origin,
        &echo,
        |l| {
            l.requests_per_second = Some(1000.0);
            l.burst = Some(1000);
            l.max_concurrent = Some(8);
        },
        |_| {},
    );
    let gateways = fleet(4, &cfg);
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..12 {
        let (s, head) = tunnel(&gateways[i % 4], &echo);
        match status_of(&head) {
            200 => open.push(s),
            429 => {
                assert!(
                    head.contains("chokepoint-reason: too_many_concurrent"),
                    "{head}"
                );
                refused += 1;
            }
            other => panic!("unexpected {other}: {head}"),
        }
    }
    assert_eq!(
        (open.len(), refused),
        (8, 4),
        "8 open across the gateways, the rest refused"
    );
    assert_eq!(
        redis.command(&["ZCARD", "chokepoint:{tester}:leases"]),
        ":8\r\n",
        "one lease per open tunnel"
    );
    // Close two: their leases are given back, and two more open (through any gateway).
    open.truncate(6);
    wait_until(WAIT, "two slots come back", || {
        let (s, head) = tunnel(&gateways[3], &echo);
        if status_of(&head) == 200 {
            open.push(s);
        }
        open.len() == 8
    });
    let (_s, head) = tunnel(&gateways[0], &echo);
    assert_eq!(status_of(&head), 429, "{head}");
}

/// A counter of `INFO stats` (`total_reads_processed`, …).
fn info_stat(redis: &RedisServer, name: &str) -> u64 {
    let info = redis.command(&["INFO", "stats"]);
    info.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in INFO stats: {info}"))
}

/// Item 8: a busy agent costs the store one round trip per request. A finished request's lease
/// goes back inside the agent's next admission on the same gateway, not in a call of its own:
/// for sequential requests the store reads one message per request (giving each lease back
/// with a separate ZREM made it two). The last request's lease, which no admission follows,
/// the release task gives back on its own.
#[test]
fn a_finished_requests_lease_goes_back_with_the_next_admission() {
    const N: u64 = 200;
    let redis = RedisServer::start();
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let port = origin.addr.port();
    let cfg = config(
        &redis,
        &origin,
        &echo,
        |l| {
            l.requests_per_second = Some(100_000.0);
            l.burst = Some(100_000);
            l.max_concurrent = Some(1000);
        },
        |_| {},
    );
    let gateway = fleet(1, &cfg).remove(0);
    let mut s = raw(&gateway);
    assert!(get(&mut s, port).starts_with("HTTP/1.1 200"));
    let before = info_stat(&redis, "total_reads_processed");
    let started = Instant::now();
    for i in 0..N {
        let head = get(&mut s, port);
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
    }
    let took = started.elapsed();
    let reads = info_stat(&redis, "total_reads_processed") - before;
    // Besides the admissions, at most: this test's INFO, a heartbeat a second and a renewal
    // every 3 s (each one read, rounded up), and a release call per RELEASE_AFTER.
    let secs = took.as_secs() + 1;
    let releases = (took.as_millis() / RELEASE_AFTER.as_millis()) as u64 + 1;
    let bound = N + 1 + 2 * secs + releases;
    eprintln!("{reads} store reads for {N} requests in {took:?} (at most {bound})");
    assert!(
        reads <= bound,
        "{reads} store reads for {N} requests in {took:?} (at most {bound})"
    );
    let leases = "chokepoint:{tester}:leases";
    wait_until(WAIT, "the last lease is given back", || {
        redis.command(&["ZCARD", leases]) == ":0\r\n"
    });
}

/// Item 7: a gateway killed with SIGKILL while holding 4 leases frees them within the lease
/// TTL: the agent can open 8 again through the others.
#[test]
fn a_killed_gateway_frees_its_leases_within_the_ttl() {
    let redis = RedisServer::start();
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let cfg = config(
        &redis,
        &origin,
        &echo,
        |l| {
            l.requests_per_second = Some(1000.0);
            l.burst = Some(1000);
            l.max_concurrent = Some(8);
        },
        |_| {},
    );
    let mut gateways = fleet(3, &cfg);
    let mut held_by_doomed = Vec::new();
    for _ in 0..4 {
        let (s, head) = tunnel(&gateways[0], &echo);
        assert_eq!(status_of(&head), 200, "{head}");
        held_by_doomed.push(s);
    }
    let mut open = Vec::new();
    for _ in 0..4 {
        let (s, head) = tunnel(&gateways[1], &echo);
        assert_eq!(status_of(&head), 200, "{head}");
        open.push(s);
    }
    let (_s, head) = tunnel(&gateways[2], &echo);
    assert_eq!(status_of(&head), 429, "at the cap: {head}");
    let doomed = gateways.remove(0);
    drop(doomed); // SIGKILL: no lease is given back
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "the dead gateway's leases expire",
        || {
            let (s, head) = tunnel(&gateways[1], &echo);
            if status_of(&head) == 200 {
                open.push(s);
            }
            std::thread::sleep(Duration::from_millis(200));
            open.len() == 8
        },
    );
    let took = killed.elapsed();
    eprintln!("8 open again {took:?} after the kill");
    assert!(
        took <= Duration::from_secs(15),
        "leases outlived the TTL: {took:?}"
    );
    drop(held_by_doomed);
}

/// Every audit line that arrives within `quiet` of the previous one.
fn drain(p: &Proxy, quiet: Duration) -> Vec<Audit> {
    std::iter::from_fn(|| p.audits.next_within(quiet)).collect()
}

/// The most a request may wait on the store: `timeout` + 100 ms (item 5 and 7).
const STORE_TIMEOUT: Duration = Duration::from_millis(50);
const WAIT_BOUND_MS: u64 = 150;

/// Item 5/7, `fail_mode = "closed"`: with the store gone every request is refused with 503
/// `limit_store_unavailable` without waiting on it, `/readyz` says not ready (`/healthz` stays
/// ok); once the store is back the gateway uses it again within a second, without a restart.
#[test]
fn closed_mode_refuses_while_the_store_is_down_and_recovers_on_its_own() {
    let mut redis = RedisServer::start();
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let port = origin.addr.port();
    let cfg = config(
        &redis,
        &origin,
        &echo,
        |l| {
            l.requests_per_second = Some(1000.0);
            l.burst = Some(1000);
        },
        |c| {
            c.fail_mode = Some("closed".into());
            c.timeout = Some(STORE_TIMEOUT);
        },
    );
    let gw = fleet(1, &cfg).remove(0);
    let mut s = raw(&gw);
    assert_eq!(status_of(&get(&mut s, port)), 200);
    assert_eq!(admin_get(&gw, "/readyz").0, 200);

    redis.stop();
    let mut refused = 0;
    wait_until(WAIT, "requests refused with 503", || {
        let head = get(&mut s, port);
        if status_of(&head) == 503 {
            assert!(
                head.contains("chokepoint-reason: limit_store_unavailable"),
                "{head}"
            );
            assert_eq!(head_header(&head, "retry-after"), Some("1"), "{head}");
            refused += 1;
        }
        refused >= 20
    });
    assert_eq!(admin_get(&gw, "/readyz").0, 503, "not ready in closed mode");
    assert_eq!(
        admin_get(&gw, "/healthz").0,
        200,
        "a bad store never fails /healthz"
    );
    let lines = drain(&gw, Duration::from_millis(500));
    let slowest = lines.iter().map(|a| a.duration_ms).max().unwrap();
    assert!(
        lines
            .iter()
            .any(|a| a.reason == "limit_store_unavailable" && a.decision == "deny"),
        "{}",
        list(&lines)
    );
    assert!(
        slowest <= WAIT_BOUND_MS,
        "a request waited {slowest} ms on the store"
    );

    redis.restart();
    let back = Instant::now();
    wait_until(WAIT, "cluster-wide limits resume", || {
        status_of(&get(&mut s, port)) == 200
    });
    let took = back.elapsed();
    eprintln!("store in use again {took:?} after it came back");
    assert!(took < Duration::from_secs(2), "recovery took {took:?}");
    wait_until(WAIT, "ready again", || admin_get(&gw, "/readyz").0 == 200);
}

/// Item 5/7: a store that stops answering (SIGSTOP: connections open, no replies) costs a
/// request at most `timeout`; `fail_mode = "open"` then admits what the store would refuse,
/// and once it answers again its state (the agent's spent rate) applies again.
#[test]
fn open_mode_admits_while_the_store_hangs_and_no_request_waits_past_the_timeout() {
    let redis = RedisServer::start();
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let port = origin.addr.port();
    let cfg = config(
        &redis,
        &origin,
        &echo,
        |l| {
            l.requests_per_second = Some(0.01);
            l.burst = Some(1);
        },
        |c| {
            c.fail_mode = Some("open".into());
            c.timeout = Some(STORE_TIMEOUT);
        },
    );
    let gw = fleet(1, &cfg).remove(0);
    let mut s = raw(&gw);
    assert_eq!(status_of(&get(&mut s, port)), 200, "the burst");
    assert_eq!(status_of(&get(&mut s, port)), 429, "over the rate");
    drain(&gw, Duration::from_millis(300));

    redis.pause();
    for i in 0..20 {
        let head = get(&mut s, port);
        assert_eq!(
            status_of(&head),
            200,
            "request {i} admitted while the store hangs: {head}"
        );
    }
    let lines = drain(&gw, Duration::from_millis(500));
    assert_eq!(lines.len(), 20, "{}", list(&lines));
    let slowest = lines.iter().map(|a| a.duration_ms).max().unwrap();
    assert!(
        slowest <= WAIT_BOUND_MS,
        "a request waited {slowest} ms: {}",
        list(&lines)
    );
    assert_eq!(metric(&gw, "chokepoint_limit_store_fallback"), 1.0);

    redis.resume();
    wait_until(WAIT, "the store's verdict again", || {
        status_of(&get(&mut s, port)) == 429
    });
    wait_until(WAIT, "fallback gauge back to 0", || in_use(&gw));
}

/// Item 5/7, `fail_mode = "local"`: with the store gone each of the 2 live replicas enforces
/// its share: `max_concurrent = 8` becomes 4 per replica.
#[test]
fn local_mode_divides_the_limits_by_the_live_replicas() {
    let mut redis = RedisServer::start();
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let cfg = config(
        &redis,
        &origin,
        &echo,
        |l| {
            l.requests_per_second = Some(1000.0);
            l.burst = Some(1000);
            l.max_concurrent = Some(8);
        },
        |_| {},
    );
    let gateways = fleet(2, &cfg);
    // Both replicas have counted each other (heartbeats every second).
    wait_until(WAIT, "two replicas registered", || {
        redis.command(&["ZCARD", "chokepoint:replicas"]) == ":2\r\n"
    });
    std::thread::sleep(Duration::from_millis(1500));
    redis.stop();
    wait_until(WAIT, "fallback", || !in_use(&gateways[0]));
    let mut open = Vec::new();
    for _ in 0..6 {
        let (s, head) = tunnel(&gateways[0], &echo);
        open.push((status_of(&head), s));
    }
    let statuses: Vec<u16> = open.iter().map(|o| o.0).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "8 / 2 replicas = 4"
    );
}

/// Item 7: a reload that changes one agent's rate keeps the store's state: the other agent is
/// still out of budget, and so is the changed one (its GCRA state is kept, not reset to a full
/// burst).
#[test]
fn a_reload_keeps_the_store_state_of_agents() {
    let redis = RedisServer::start();
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let port = origin.addr.port();
    let allow = format!("origin.test:{port}");
    let cfg = |other_rate: f64| {
        config(
            &redis,
            &origin,
            &echo,
            |l| {
                l.requests_per_second = Some(0.01);
                l.burst = Some(1);
            },
            |_| {},
        )
        .agent_first(Agent::cidrs("other", &["127.0.0.2/32"], "other"))
        .policy("other", |p| {
            p.allow = vec![allow.clone()];
            p.limits().requests_per_second = Some(other_rate);
            p.limits().burst = Some(1);
        })
    };
    let gw = fleet(1, &cfg(0.01)).remove(0);
    let mut tester = raw(&gw);
    let mut other = connect_from(std::net::Ipv4Addr::new(127, 0, 0, 2), gw.addr);
    other.set_read_timeout(Some(WAIT)).unwrap();
    for s in [&mut tester, &mut other] {
        assert_eq!(status_of(&get(s, port)), 200);
        assert_eq!(status_of(&get(s, port)), 429);
    }
    std::fs::write(&gw.config_path, cfg(0.02).to_toml()).unwrap();
    gw.wait_log("config reloaded");
    assert_eq!(
        status_of(&get(&mut tester, port)),
        429,
        "unchanged agent: state kept"
    );
    assert_eq!(
        status_of(&get(&mut other, port)),
        429,
        "changed rate: no fresh burst"
    );
    assert!(in_use(&gw), "the store stayed in use across the reload");
}

/// `username` + `password_file`: the gateway authenticates as an ACL user; a rotated password
/// is read from the file and used without a restart (the store refuses the old one meanwhile).
#[test]
fn acl_user_password_file_is_reread_when_it_changes() {
    let redis = RedisServer::with_user("gateway", "first-secret");
    let (origin, echo) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("redis-password");
    std::fs::write(&pw, "first-secret\n").unwrap();
    let cfg = config(
        &redis,
        &origin,
        &echo,
        |l| {
            l.requests_per_second = Some(0.01);
            l.burst = Some(1);
        },
        |c| {
            c.username = Some("gateway".into());
            c.password_file = Some(path_str(&pw));
            c.fail_mode = Some("closed".into());
        },
    );
    let gw = Proxy::of_in(dir, &cfg);
    wait_until(WAIT, "the limit store in use", || in_use(&gw));
    let mut s = raw(&gw);
    assert_eq!(status_of(&get(&mut s, port)), 200);
    assert_eq!(status_of(&get(&mut s, port)), 429, "the store's rate");

    // Rotate: the store accepts only the new password and drops the gateway's connections.
    let set = redis.command(&["ACL", "SETUSER", "gateway", "resetpass", ">second-secret"]);
    assert!(set.starts_with("+OK"), "{set}");
    let redis = RedisServer::reauth(redis, "second-secret");
    redis.command(&["CLIENT", "KILL", "USER", "gateway"]);
    wait_until(WAIT, "the old password fails", || !in_use(&gw));
    std::fs::write(&pw, "second-secret\n").unwrap();
    let rotated = Instant::now();
    wait_until(WAIT, "the new password is used", || in_use(&gw));
    eprintln!(
        "in use again {:?} after the password file changed",
        rotated.elapsed()
    );
    // A new connection: the old one idled past timeouts.request_header.
    let mut s = raw(&gw);
    assert_eq!(
        status_of(&get(&mut s, port)),
        429,
        "the store's state is still there"
    );
    let log: Vec<String> = gw.stderr.try_iter().collect();
    assert!(
        !log.iter()
            .any(|l| l.contains("first-secret") || l.contains("second-secret")),
        "a password was logged"
    );
}

/// Send `n` bytes up a tunnel to the echo server and read them back.
fn echo(s: &mut TcpStream, n: usize) {
    let data = vec![b'x'; n];
    s.write_all(&data).unwrap();
    let mut back = vec![0; n];
    std::io::Read::read_exact(s, &mut back).unwrap();
}

/// Wait (bounded) until the gateway closes the tunnel `s`.
fn closed_soon(s: &mut TcpStream) {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = [0u8; 64 * 1024];
    loop {
        match std::io::Read::read(s, &mut buf) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

/// Item 4 without `[cluster]`: the budget is this process's; a tunnel that passes it is closed
/// and audited `byte_budget`, and the next request is refused with 429 until the window ends.
#[test]
fn a_per_process_byte_budget_closes_the_tunnel_and_refuses_the_next_request() {
    let (origin, echo_srv) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let port = origin.addr.port();
    let gw = Proxy::of(
        &ConfigBuilder::new()
            .hosts_to_loopback(&["origin.test", "echo.test"])
            .allow(format!("origin.test:{port}"))
            .allow(format!("echo.test:{}", echo_srv.addr.port()))
            .test_limits(|l| l.max_download_bytes_per_hour = Some(100_000))
            .admin(),
    );
    let (mut t, head) = tunnel(&gw, &echo_srv);
    assert_eq!(status_of(&head), 200, "{head}");
    echo(&mut t, 60_000);
    echo(&mut t, 60_000); // 120 000 down: past the budget
    closed_soon(&mut t);
    let cut = gw.find_audit(AuditMatch::of("connect", "deny", "byte_budget"));
    assert!(cut.bytes_down >= 100_000, "{cut:?}");
    let mut s = raw(&gw);
    let head = get(&mut s, port);
    assert_eq!(status_of(&head), 429, "{head}");
    assert!(head.contains("chokepoint-reason: byte_budget"), "{head}");
    let retry: u64 = head_header(&head, "retry-after").unwrap().parse().unwrap();
    assert!(
        (1..=3600).contains(&retry),
        "to the end of the hour: {head}"
    );
    assert!(metric_of(&gw, "chokepoint_byte_budget_used_ratio{agent=\"tester\"}") >= 1.0);
}

/// Item 7: a budget crossed by a tunnel on one gateway and a download on another: both count
/// (in the store), the tunnel is cut, and the next request is refused with 429 `byte_budget`.
#[test]
fn a_cluster_byte_budget_counts_every_gateway() {
    let redis = RedisServer::start();
    let (origin, echo_srv) = (Origin::http(), Echo::start("127.0.0.1:0"));
    let port = origin.addr.port();
    let cfg = config(
        &redis,
        &origin,
        &echo_srv,
        |l| l.max_download_bytes_per_hour = Some(200_000),
        |_| {},
    );
    let gateways = fleet(2, &cfg);
    let (mut t, head) = tunnel(&gateways[0], &echo_srv);
    assert_eq!(status_of(&head), 200, "{head}");
    echo(&mut t, 80_000);
    // A download through the other gateway: the origin echoes the request body back.
    let mut s = raw(&gateways[1]);
    let body = vec![b'y'; 80_000];
    s.write_all(
        format!(
            "POST http://origin.test:{port}/ HTTP/1.1\r\nHost: origin.test:{port}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&body).unwrap();
    let (head, got) = read_response(&mut s);
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(got.len() >= 80_000);
    let key = "chokepoint:{tester}:bytes:down:hour";
    wait_until(WAIT, "both gateways' bytes in the store", || {
        let v = redis.command(&["GET", key]);
        let n: u64 = v.lines().nth(1).and_then(|l| l.parse().ok()).unwrap_or(0);
        n >= 160_000
    });
    let ttl = redis.command(&["PTTL", key]);
    let ttl: i64 = ttl.trim().trim_start_matches(':').parse().unwrap();
    assert!(
        (1..=3_600_000).contains(&ttl),
        "expires at the end of the hour: {ttl}"
    );
    echo(&mut t, 60_000); // 220 000 down across the gateways
    closed_soon(&mut t);
    gateways[0].find_audit(AuditMatch::of("connect", "deny", "byte_budget"));
    let mut s = raw(&gateways[1]);
    let head = get(&mut s, port);
    assert_eq!(status_of(&head), 429, "{head}");
    assert!(head.contains("chokepoint-reason: byte_budget"), "{head}");
}
