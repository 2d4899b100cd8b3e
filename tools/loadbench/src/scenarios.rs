//! The scenarios, each run without the proxy (straight to the origin), then through it, and
//! the issue-6 targets checked against what was measured:
//!
//! - a: absolute-form GETs on 64 keep-alive connections, 100 B answers;
//! - b: 64 CONNECT tunnels, keep-alive GETs inside them;
//! - c: a new tunnel and one GET per exchange, 64 at a time;
//! - d: one tunnel, 1 GiB down then 1 GiB up; d3: a plain-HTTP GET of 1 GiB;
//! - e: proxy memory per idle tunnel (`LOAD_IDLE_TUNNELS` of them);
//! - i, j: TLS interception, per request in an established intercepted connection and per new
//!   one (only when `LOAD_SCENARIOS` names them);
//! - r: the agent's limits in-process and in Redis, side by side, under a's and c's load (only
//!   when named; see [`cluster`]).

mod cluster;

use crate::client::{closed_loop, down_and_up, idle_rss, plain_download, Script, GIB};
use crate::error::Error;
use crate::http::{connect_request, get_absolute, get_origin_form, HOST};
use crate::machine::installed;
use crate::origin::Origin;
use crate::peers::{run_bump_peer, run_peer, Interception, Peer};
use crate::proxy::Proxy;
use crate::report::Report;
use crate::settings::Settings;
use crate::tls::{Pki, SECURE_HOST};

/// Every selected scenario through chokepoint, then through each installed peer. `Err` only
/// for what the run cannot go on without (the origin, starting chokepoint); a scenario's own
/// failure is a row of the report.
pub(crate) async fn run(s: &Settings) -> Result<Report, Error> {
    let origin = Origin::start().await?;
    let mut report = Report::default();
    if s.wants('a') {
        plain_http(s, &origin, &mut report).await?;
    }
    if s.wants('b') {
        tunnelled_requests(s, &origin, &mut report).await?;
    }
    if s.wants('c') {
        new_tunnels(s, &origin, &mut report).await?;
    }
    if s.wants('d') {
        let done = bulk(s, &origin, &mut report).await;
        row_unless_fatal(&mut report, "d", done)?;
    }
    if s.wants('e') {
        let done = idle_tunnels(s, &origin, &mut report).await;
        row_unless_fatal(&mut report, "e", done)?;
    }
    // The TLS side of i and j, minted once: chokepoint and the peer that intercepts (Squid's
    // ssl-bump) get the same interception CA and the same TLS origin.
    let tls = if s.wants('i') || s.wants('j') {
        let pki = Pki::new()?;
        let tls_origin = Origin::start_with(Some(pki.origin.clone())).await?;
        Some((pki, tls_origin))
    } else {
        None
    };
    if let Some((pki, tls_origin)) = &tls {
        intercepted(s, &origin, pki, tls_origin, &mut report).await?;
    }
    if s.wants('r') {
        cluster::cluster_limits(s, &origin, &mut report).await?;
    }
    let peers = [
        Peer::Squid,
        Peer::TrafficServer,
        Peer::SquidBump,
        Peer::SquidPeekBump,
    ];
    for peer in peers {
        let name = peer.name();
        let bump = match &tls {
            // Squid's ssl-bump runs i and j only: not asked for, nothing to run.
            None if peer.intercepts() => continue,
            Some((pki, tls_origin)) if peer.intercepts() => Some(Interception {
                pki,
                tls_port: tls_origin.addr.port(),
            }),
            _ => None,
        };
        if !installed(peer.binary()) {
            report
                .notes
                .push(format!("{name}: not installed, no comparison"));
        } else if s.perf_dir.is_some() || s.callgrind_dir.is_some() {
            report.notes.push(format!(
                "{name}: not run (LOAD_PERF_DIR or LOAD_CALLGRIND_DIR profile chokepoint)"
            ));
        } else if let Some(bump) = bump {
            run_bump_peer(s, &origin, peer, bump, &mut report).await;
        } else {
            run_peer(s, &origin, peer, &mut report).await;
        }
    }
    Ok(report)
}

/// A failed exchange of scenario `id` becomes its row; anything else ends the run.
fn row_unless_fatal(report: &mut Report, id: &str, done: Result<(), Error>) -> Result<(), Error> {
    match done {
        Err(Error::Exchange(e)) => {
            report.failed(id, &e.to_string());
            Ok(())
        }
        other => other,
    }
}

/// What each connection through a proxy does in closed-loop scenario `id` (a, b or c).
pub(crate) fn via_script(id: char, port: u16) -> Script {
    match id {
        'a' => Script {
            preface: None,
            request: get_absolute(port, "/").into(),
            reconnect: false,
            tls: None,
        },
        _ => Script {
            preface: Some(connect_request(port).into()),
            request: get_origin_form(port, "/").into(),
            reconnect: id == 'c',
            tls: None,
        },
    }
}

/// a. Absolute-form GETs on 64 keep-alive connections, 100 B answers.
async fn plain_http(s: &Settings, origin: &Origin, report: &mut Report) -> Result<(), Error> {
    let port = origin.addr.port();
    let direct = Script {
        preface: None,
        request: get_origin_form(port, "/").into(),
        reconnect: false,
        tls: None,
    };
    let direct = closed_loop(origin.addr, &direct, s, None, "").await;
    let proxy = Proxy::start(port, s)?;
    let via = closed_loop(proxy.addr, &via_script('a', port), s, Some(&proxy), "a").await;
    let audit = proxy.stop().await;
    report.closed("a", "a: plain HTTP, keep-alive", "req/s", &via, &direct);
    report.notes.push(audit.note("a"));
    let cpu = via.cpu_per_op().unwrap_or(f64::NAN);
    let ratio = via.rate() / direct.rate();
    report.check(
        "a: ≤ 15 µs CPU/req, ≥ 0.6× no-proxy",
        format!("{cpu:.1} µs, {ratio:.2}×"),
        cpu <= 15.0 && ratio >= 0.6,
    );
    report.latency_check("a", &via, &direct);
    Ok(())
}

/// b. 64 CONNECT tunnels, keep-alive GETs inside them.
async fn tunnelled_requests(
    s: &Settings,
    origin: &Origin,
    report: &mut Report,
) -> Result<(), Error> {
    let port = origin.addr.port();
    let direct = Script {
        preface: None,
        request: get_origin_form(port, "/").into(),
        reconnect: false,
        tls: None,
    };
    let direct = closed_loop(origin.addr, &direct, s, None, "").await;
    let proxy = Proxy::start(port, s)?;
    let via = closed_loop(proxy.addr, &via_script('b', port), s, Some(&proxy), "b").await;
    let audit = proxy.stop().await;
    report.closed("b", "b: GETs in tunnels", "req/s", &via, &direct);
    report.notes.push(audit.note("b"));
    let cpu = via.cpu_per_op().unwrap_or(f64::NAN);
    let ratio = via.rate() / direct.rate();
    report.check(
        "b: ≤ 12 µs CPU/req, ≥ 0.95× no-proxy",
        format!("{cpu:.1} µs, {ratio:.2}×"),
        cpu <= 12.0 && ratio >= 0.95,
    );
    report.latency_check("b", &via, &direct);
    Ok(())
}

/// c. A new tunnel and one GET per exchange, 64 at a time.
async fn new_tunnels(s: &Settings, origin: &Origin, report: &mut Report) -> Result<(), Error> {
    let port = origin.addr.port();
    let direct = Script {
        preface: None,
        request: get_origin_form(port, "/").into(),
        reconnect: true,
        tls: None,
    };
    let direct = closed_loop(origin.addr, &direct, s, None, "").await;
    let proxy = Proxy::start(port, s)?;
    let via = closed_loop(proxy.addr, &via_script('c', port), s, Some(&proxy), "c").await;
    let audit = proxy.stop().await;
    report.closed("c", "c: new tunnel + 1 GET", "tunnels/s", &via, &direct);
    report.notes.push(audit.note("c"));
    let cpu = via.cpu_per_op().unwrap_or(f64::NAN);
    let ratio = via.rate() / direct.rate();
    report.check(
        "c: ≤ 60 µs CPU/tunnel, ≥ 0.9× no-proxy",
        format!("{cpu:.1} µs, {ratio:.2}×"),
        cpu <= 60.0 && ratio >= 0.9,
    );
    Ok(())
}

/// d. One tunnel: 1 GiB down, 1 GiB up; d3: a plain-HTTP GET of 1 GiB.
async fn bulk(s: &Settings, origin: &Origin, report: &mut Report) -> Result<(), Error> {
    let port = origin.addr.port();
    let (direct_down, direct_up) = down_and_up(s, origin.addr, None, port, None).await?;
    let proxy = Proxy::start(port, s)?;
    let connect = connect_request(port);
    let (down, up) = down_and_up(s, proxy.addr, Some(&connect), port, Some(&proxy)).await?;
    let get = get_absolute(port, &format!("/bulk/{GIB}"));
    let plain = plain_download(s, proxy.addr, &get, Some(&proxy)).await?;
    let audit = proxy.stop().await;
    report.bulk(
        "d-down",
        "d: tunnel, 1 GiB down",
        &down,
        &direct_down,
        false,
    );
    report.bulk("d-up", "d: tunnel, 1 GiB up", &up, &direct_up, false);
    report.bulk(
        "d3",
        "d3: plain HTTP, 1 GiB down",
        &plain,
        &direct_down,
        true,
    );
    if let (Some(dn), Some(up)) = (direct_down.load_cpu(), direct_up.load_cpu()) {
        report.notes.push(format!(
            "d, no proxy: client and origin together spent {dn:.2} s CPU per GiB down, \
             {up:.2} s per GiB up"
        ));
    }
    report.notes.push(audit.note("d"));
    for (name, t, base) in [("down", &down, &direct_down), ("up", &up, &direct_up)] {
        let ratio = t.gb_per_s() / base.gb_per_s();
        let cpu = t.proxy_cpu().unwrap_or(f64::NAN);
        report.check(
            &format!("d {name}: ≥ 0.8× no-proxy, ≤ 0.2 s CPU/GiB"),
            format!("{ratio:.2}×, {cpu:.2} s"),
            ratio >= 0.8 && cpu <= 0.2,
        );
    }
    let ratio = plain.gb_per_s() / direct_down.gb_per_s();
    report.check("d3: ≥ 0.6× no-proxy", format!("{ratio:.2}×"), ratio >= 0.6);
    Ok(())
}

/// What each connection through a proxy does in scenario i or j (`id`), and the rows' titles.
pub(crate) struct InterceptLoad {
    /// TLS to [`HOST`] in a plain tunnel (not intercepted): rows `i-tunnel`, `j-tunnel`.
    pub(crate) tunnel: Script,
    /// TLS with the proxy for [`SECURE_HOST`], which it intercepts: rows `i`, `j`.
    pub(crate) intercepted: Script,
    /// The title of the intercepted row.
    pub(crate) title: &'static str,
    /// The title of the plain-tunnel row.
    pub(crate) tunnel_title: &'static str,
    /// `req/s` (i) or `conns/s` (j).
    pub(crate) unit: &'static str,
}

impl InterceptLoad {
    /// i: keep-alive GETs on 64 connections; j: a new connection per GET. The TLS origin
    /// listens on `tls_port`.
    pub(crate) fn new(id: char, tls_port: u16, pki: &Pki) -> InterceptLoad {
        let reconnect = id == 'j';
        let secure = format!(
            "CONNECT {SECURE_HOST}:{tls_port} HTTP/1.1\r\nHost: {SECURE_HOST}:{tls_port}\r\n\r\n"
        );
        let request = format!("GET / HTTP/1.1\r\nHost: {SECURE_HOST}:{tls_port}\r\n\r\n");
        let (title, tunnel_title, unit) = if reconnect {
            (
                "j: new intercepted connection + 1 GET",
                "j: new TLS tunnel + 1 GET (not intercepted)",
                "conns/s",
            )
        } else {
            (
                "i: GETs in intercepted connections",
                "i: TLS GETs in plain tunnels (not intercepted)",
                "req/s",
            )
        };
        InterceptLoad {
            tunnel: Script {
                preface: Some(connect_request(tls_port).into()),
                request: get_origin_form(tls_port, "/").into(),
                reconnect,
                tls: Some((pki.to_origin.clone(), HOST)),
            },
            intercepted: Script {
                preface: Some(secure.into_bytes().into()),
                request: request.into_bytes().into(),
                reconnect,
                tls: Some((pki.to_gateway.clone(), SECURE_HOST)),
            },
            title,
            tunnel_title,
            unit,
        }
    }
}

/// i and j: TLS interception, against the same TLS load through a plain tunnel (the cost the
/// proxy had before: splice, no TLS of its own) and straight to the origin.
///
/// - i: 64 intercepted connections, keep-alive GETs inside (TLS with the client, HTTP parsed,
///   an audit line per request, verified TLS upstream on a pooled connection);
/// - j: a new intercepted connection and one GET per exchange (CONNECT, a TLS handshake on
///   each side with a cached leaf, the upstream connection, one request).
///
/// Issue #15's targets: i at most 2× the proxy CPU per request of scenario b, j at most 2× that
/// of scenario c plus one TLS handshake each side. The b and c rows of the same run (plain
/// HTTP in the tunnel) are the reference; the TLS-in-a-plain-tunnel rows show what TLS alone
/// costs the load side.
async fn intercepted(
    s: &Settings,
    origin: &Origin,
    pki: &Pki,
    tls_origin: &Origin,
    report: &mut Report,
) -> Result<(), Error> {
    let tls_port = tls_origin.addr.port();
    let proxy = Proxy::start_intercepting(origin.addr.port(), tls_port, pki, s)?;
    for (id, reconnect) in [('i', false), ('j', true)] {
        if !s.wants(id) {
            continue;
        }
        let direct = Script {
            preface: None,
            request: get_origin_form(tls_port, "/").into(),
            reconnect,
            tls: Some((pki.to_origin.clone(), HOST)),
        };
        let direct = closed_loop(tls_origin.addr, &direct, s, None, "").await;
        let load = InterceptLoad::new(id, tls_port, pki);
        let plain_id = format!("{id}-tunnel");
        let plain = closed_loop(proxy.addr, &load.tunnel, s, Some(&proxy), &plain_id).await;
        let id_str = id.to_string();
        let via = closed_loop(proxy.addr, &load.intercepted, s, Some(&proxy), &id_str).await;
        report.closed(&plain_id, load.tunnel_title, load.unit, &plain, &direct);
        report.closed(&id_str, load.title, load.unit, &via, &direct);
        let cpu = via.cpu_per_op().unwrap_or(f64::NAN);
        let tunnel_cpu = plain.cpu_per_op().unwrap_or(f64::NAN);
        if reconnect {
            // "One TLS handshake each side": what the client and the origin spend together on
            // a new TLS connection and its GET when they talk straight to each other.
            let handshakes = direct.load_per_op().unwrap_or(f64::NAN);
            let bound = 2.0 * tunnel_cpu + handshakes;
            report.check(
                "j (#15): ≤ 2× CPU of a new plain TLS tunnel + one handshake each side",
                format!("{cpu:.1} µs ≤ 2 × {tunnel_cpu:.1} + {handshakes:.1} = {bound:.1} µs"),
                cpu <= bound,
            );
        } else {
            report.check(
                "i (#15): ≤ 2× CPU/req of TLS GETs in a plain tunnel",
                format!(
                    "{cpu:.1} µs vs {tunnel_cpu:.1} µs ({:.2}×)",
                    cpu / tunnel_cpu
                ),
                cpu <= 2.0 * tunnel_cpu,
            );
            let profiled = s.perf_dir.is_some() || s.callgrind_dir.is_some();
            if s.rounds > 1 && !profiled {
                intercept_rounds(s, &proxy, origin.addr.port(), &load, report).await;
            }
        }
    }
    let audit = proxy.stop().await;
    report.notes.push(audit.note("i/j"));
    Ok(())
}

/// i's check in `LOAD_ROUNDS` alternating rounds. Each round measures, back to back through the
/// same proxy process, the proxy CPU per request of b's load (plain GETs in plain tunnels), of
/// TLS GETs in plain tunnels and of GETs in intercepted connections, in reverse order every
/// other round. The machine's background load moves by more than the margin the check is about
/// within a minute: each round's ratios are taken within seconds of each other, and the checks
/// are their medians, against b (the words) and against the TLS tunnel.
async fn intercept_rounds(
    s: &Settings,
    proxy: &Proxy,
    plain_port: u16,
    load: &InterceptLoad,
    report: &mut Report,
) {
    let b = via_script('b', plain_port);
    let windows = [
        (&b, "i-round-b"),
        (&load.tunnel, "i-round-tunnel"),
        (&load.intercepted, "i-round"),
    ];
    let mut vs_b = Vec::with_capacity(s.rounds);
    let mut vs_tunnel = Vec::with_capacity(s.rounds);
    let mut each = Vec::with_capacity(s.rounds);
    for round in 0..s.rounds {
        let order = if round % 2 == 0 { [0, 1, 2] } else { [2, 1, 0] };
        let mut cpu = [f64::NAN; 3];
        for k in order {
            let (script, name) = windows[k];
            let window = closed_loop(proxy.addr, script, s, Some(proxy), name).await;
            cpu[k] = window.cpu_per_op().unwrap_or(f64::NAN);
        }
        vs_b.push(cpu[2] / cpu[0]);
        vs_tunnel.push(cpu[2] / cpu[1]);
        each.push(format!("{:.1}/{:.1}/{:.1}", cpu[0], cpu[1], cpu[2]));
    }
    let (vs_b, vs_tunnel) = (median(vs_b), median(vs_tunnel));
    let rounds = s.rounds;
    report.notes.push(format!(
        "i in {rounds} alternating rounds, proxy CPU/req of b / TLS GETs in a plain tunnel / \
         intercepted GETs: {} µs",
        each.join(", ")
    ));
    report.check(
        &format!("i (#15): ≤ 2× CPU/req of b, median of {rounds} rounds"),
        format!("{vs_b:.2}×"),
        vs_b <= 2.0,
    );
    report.check(
        &format!("i (#15): ≤ 2× CPU/req of TLS GETs in a plain tunnel, median of {rounds} rounds"),
        format!("{vs_tunnel:.2}×"),
        vs_tunnel <= 2.0,
    );
}

/// The median of `v` (the mean of the middle two for an even count); NaN if any is NaN.
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() || v.iter().any(|x| x.is_nan()) {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// e. Proxy memory per idle tunnel.
async fn idle_tunnels(s: &Settings, origin: &Origin, report: &mut Report) -> Result<(), Error> {
    let proxy = Proxy::start(origin.addr.port(), s)?;
    let idle = idle_rss(s, origin, &proxy).await?;
    let audit = proxy.stop().await;
    let per = idle.per_tunnel_kib();
    report.idle(idle);
    report.notes.push(audit.note("e"));
    report.check(
        "e: ≤ 10 KiB per idle tunnel",
        format!("{per:.2} KiB"),
        per <= 10.0,
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts_and_nan() {
        assert_eq!(median(vec![2.1, 1.7, 1.9]), 1.9);
        assert_eq!(median(vec![2.0, 1.0, 4.0, 3.0]), 2.5);
        assert!(median(vec![1.0, f64::NAN, 3.0]).is_nan());
        assert!(median(Vec::new()).is_nan());
    }
}
