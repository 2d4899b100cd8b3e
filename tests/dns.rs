//! DNS handling against a real DNS server the test runs itself on 127.0.0.1 (UDP, OS-chosen port).
//!
//! Every answer served is a loopback address: 127.0.0.1 is the reachable "public" destination and
//! 127.0.0.66 (inside the config's `deny_cidrs` 127.0.0.64/26) is the "internal" one. The server
//! records every query it receives, so each test can prove the proxy really asked (or did not).
//!
//! The DNS timeout case runs the gateway in this process on a paused clock ([`InProcess`]) and
//! moves the clock past `timeouts.dns` instead of waiting it out.

// The shared harness (tests/support) unwraps outside `#[test]` functions, which
// `allow-unwrap-in-tests` does not cover; this crate is test code throughout.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::*;

use std::cell::RefCell;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

/// The reachable destination.
const PUBLIC: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
/// A destination inside `deny_cidrs` (127.0.0.64/26).
const INTERNAL: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 66);

/// How the test DNS server answers one query.
#[derive(Clone, Copy, Debug)]
enum Reply {
    /// An A record with TTL 0 (a query of another type gets NOERROR with no answer).
    A(Ipv4Addr),
    /// A records with TTL 0, in this order (a query of another type gets NOERROR, no answer).
    Many(&'static [Ipv4Addr]),
    /// NOERROR with no answer (the name exists, with no record of that type).
    NoData,
    /// SERVFAIL.
    ServFail,
    /// NXDOMAIN.
    NxDomain,
    /// No answer at all.
    Silent,
}

/// Decides the reply from the query name (lowercase, no trailing dot), its type, and how many
/// queries of that name and type came before it.
type Answerer = dyn Fn(&str, RecordType, usize) -> Reply + Send + Sync;

/// A UDP DNS server on 127.0.0.1:0, run by a bounded background thread.
struct Dns {
    addr: SocketAddr,
    /// Every query received, (name, type), as the server thread reports them.
    reported: Receiver<(String, RecordType)>,
    /// The queries drained from `reported` so far.
    log: RefCell<Vec<(String, RecordType)>>,
    stop: Arc<AtomicBool>,
}

/// Upper bounds on the server thread: it never outlives a test run by much, whatever happens.
const DNS_LIFETIME: Duration = Duration::from_secs(180);
const DNS_MAX_TICKS: usize = 100_000;
const DNS_POLL: Duration = Duration::from_millis(50);

impl Dns {
    fn start(answer: impl Fn(&str, RecordType, usize) -> Reply + Send + Sync + 'static) -> Dns {
        let answer: Box<Answerer> = Box::new(answer);
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(DNS_POLL)).unwrap();
        let addr = sock.local_addr().unwrap();
        let (report, reported) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        thread::spawn(move || {
            let deadline = Instant::now() + DNS_LIFETIME;
            let mut buf = [0u8; 4096];
            let mut seen: Vec<(String, RecordType)> = Vec::new();
            for _ in 0..DNS_MAX_TICKS {
                if thread_stop.load(Ordering::SeqCst) || Instant::now() >= deadline {
                    break;
                }
                let Ok((n, peer)) = sock.recv_from(&mut buf) else {
                    continue; // read timeout: check stop and deadline again
                };
                // Traffic stays on loopback: never answer anything else.
                if !peer.ip().is_loopback() {
                    continue;
                }
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let Some(q) = query.queries().first().cloned() else {
                    continue;
                };
                let name = q.name().to_lowercase().to_ascii();
                let name = name.trim_end_matches('.').to_string();
                let qtype = q.query_type();
                let nth = seen
                    .iter()
                    .filter(|(n, t)| *n == name && *t == qtype)
                    .count();
                seen.push((name.clone(), qtype));
                // Reported before the reply is sent, so a finished request's query is counted.
                let _ = report.send((name.clone(), qtype));
                let reply = answer(&name, qtype, nth);
                let mut resp = Message::new();
                resp.set_id(query.id())
                    .set_message_type(MessageType::Response)
                    .set_op_code(OpCode::Query)
                    .set_authoritative(true)
                    .set_recursion_desired(query.recursion_desired())
                    .set_recursion_available(true)
                    .add_query(q.clone());
                match reply {
                    Reply::Silent => continue,
                    Reply::NxDomain => {
                        resp.set_response_code(ResponseCode::NXDomain);
                    }
                    Reply::ServFail => {
                        resp.set_response_code(ResponseCode::ServFail);
                    }
                    Reply::NoData => {}
                    Reply::A(ip) => add_a(&mut resp, &q, &[ip]),
                    Reply::Many(ips) => add_a(&mut resp, &q, ips),
                }
                let bytes = resp.to_vec().unwrap();
                let _ = sock.send_to(&bytes, peer);
            }
        });
        Dns {
            addr,
            reported,
            log: RefCell::new(Vec::new()),
            stop,
        }
    }

    /// Every query received so far.
    fn log(&self) -> std::cell::Ref<'_, Vec<(String, RecordType)>> {
        // `try_iter` ends at the first empty poll: bounded by what the server has sent.
        self.log.borrow_mut().extend(self.reported.try_iter());
        self.log.borrow()
    }

    /// Queries received for `name` (any type).
    fn queries(&self, name: &str) -> usize {
        self.log().iter().filter(|(n, _)| n == name).count()
    }

    /// Queries received for `name` of type `qtype`.
    fn queries_of(&self, name: &str, qtype: RecordType) -> usize {
        let log = self.log();
        log.iter().filter(|(n, t)| n == name && *t == qtype).count()
    }

    fn total(&self) -> usize {
        self.log().len()
    }
}

/// Answer an A query with `ips` (TTL 0); other query types get no answer records.
fn add_a(resp: &mut Message, q: &Query, ips: &[Ipv4Addr]) {
    if q.query_type() != RecordType::A {
        return;
    }
    for &ip in ips {
        // Traffic stays on loopback: this server never hands out anything else.
        assert!(ip.is_loopback(), "the test DNS server serves loopback only");
        resp.add_answer(Record::from_rdata(q.name().clone(), 0, RData::A(A(ip))));
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The standard test config with the proxy's nameserver at `dns` and the DNS timeout
/// `dns_timeout`.
fn dns_config(dns: SocketAddr, dns_timeout: Duration) -> ConfigBuilder {
    ConfigBuilder::new()
        .nameserver(dns)
        .dns_timeout(dns_timeout)
}

/// An origin on 127.0.0.1 and another on 127.0.0.66, on the same port, so one name can point at
/// either and only the answered address decides which one is reached.
fn origin_pair() -> (Origin, Origin) {
    for _ in 0..20 {
        let public = Origin::http();
        let bind = format!("{INTERNAL}:{}", public.addr.port());
        if TcpListener::bind(&bind).is_ok() {
            // Released just now; the same port on 127.0.0.66 is all but certain to be free.
            return (public, Origin::http_on(&bind));
        }
    }
    panic!("no port free on both 127.0.0.1 and 127.0.0.66");
}

/// What curl got.
#[derive(Debug)]
struct Got {
    exit: i32,
    /// Final response status (`000` when there was none, e.g. a refused CONNECT).
    status: u16,
    /// The proxy's answer to CONNECT (0 when no CONNECT was sent).
    connect: u16,
    /// Every response head curl received, in order (CONNECT response first in a tunnel).
    heads: String,
    body: String,
    stderr: String,
}

impl Got {
    fn reason_header(&self) -> Option<String> {
        self.heads.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case("chokepoint-reason")
                .then(|| v.trim().to_string())
        })
    }
}

/// `curl -x proxy url`, through a CONNECT tunnel (`-p`) when `tunnel`.
fn fetch(proxy: &Proxy, url: &str, tunnel: bool) -> Got {
    fetch_via(&proxy.url(), url, tunnel)
}

/// [`fetch`] through the proxy at `proxy_url` (`http://127.0.0.1:PORT`).
fn fetch_via(proxy_url: &str, url: &str, tunnel: bool) -> Got {
    let dir = tempfile::tempdir().unwrap();
    let heads_path = dir.path().join("heads");
    let heads_arg = heads_path.to_str().unwrap();
    let mut args = vec![
        "-x",
        proxy_url,
        "-D",
        heads_arg,
        "-w",
        "\n@@%{http_code} %{http_connect}",
    ];
    if tunnel {
        args.push("-p");
    }
    args.push(url);
    let (exit, out, stderr) = curl(&args);
    let (body, codes) = out
        .rsplit_once("\n@@")
        .unwrap_or_else(|| panic!("no -w trailer in curl output: {out:?} ({stderr})"));
    let (status, connect) = codes.split_once(' ').unwrap();
    Got {
        exit,
        status: status.trim().parse().unwrap(),
        connect: connect.trim().parse().unwrap(),
        heads: std::fs::read_to_string(&heads_path).unwrap_or_default(),
        body: body.to_string(),
        stderr,
    }
}

#[test]
fn name_answered_with_allowed_address_is_reached() {
    let dns = Dns::start(|_, _, _| Reply::A(PUBLIC));
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy =
        Proxy::of(&dns_config(dns.addr, Duration::from_secs(2)).allow(format!("name.test:{port}")));

    let got = fetch(&proxy, &format!("http://name.test:{port}/x"), false);
    assert_eq!(got.exit, 0, "{got:?}");
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, "GET /x HTTP/1.1\n");
    assert_eq!(got.reason_header(), None);
    let seen = origin.next_seen();
    assert_eq!(seen.request_line(), "GET /x HTTP/1.1");
    assert_eq!(
        seen.header("host").as_deref(),
        Some(&*format!("name.test:{port}"))
    );

    let a = proxy.audit();
    assert_eq!(a.event, "http");
    assert_eq!(a.decision, "allow");
    assert_eq!(a.reason, "allowed");
    assert_eq!(a.host.as_deref(), Some("name.test"));
    assert_eq!(a.port, Some(port));
    assert_eq!(a.path.as_deref(), Some("/x"));
    assert_eq!(a.rule.as_deref(), Some(&*format!("name.test:{port}")));
    assert_eq!(a.upstream.as_deref(), Some(&*format!("127.0.0.1:{port}")));
    assert_eq!(a.status, Some(200));

    assert_eq!(dns.queries_of("name.test", RecordType::A), 1);
    assert_eq!(dns.queries("name.test"), 1, "one lookup, A only");
}

#[test]
fn name_answered_with_denied_address_is_refused_before_dialling() {
    let dns = Dns::start(|_, _, _| Reply::A(INTERNAL));
    let internal = Origin::http_on(&format!("{INTERNAL}:0"));
    let port = internal.addr.port();
    let proxy = Proxy::of(
        &dns_config(dns.addr, Duration::from_secs(2)).allow(format!("internal.test:{port}")),
    );

    let got = fetch(
        &proxy,
        &format!("http://internal.test:{port}/secret"),
        false,
    );
    assert_eq!(got.exit, 0, "{got:?}");
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.reason_header().as_deref(), Some("denied_address"));
    assert!(got.body.contains("127.0.0.66"), "{got:?}");

    let a = proxy.audit();
    assert_eq!(a.event, "http");
    assert_eq!(a.decision, "deny");
    assert_eq!(a.reason, "denied_address");
    assert_eq!(a.host.as_deref(), Some("internal.test"));
    assert_eq!(a.port, Some(port));
    assert_eq!(a.upstream, None);
    assert_eq!(a.status, Some(403));

    assert_eq!(dns.queries("internal.test"), 1);
    assert_eq!(
        internal.settled_connections(),
        0,
        "the denied address was dialled"
    );
}

/// First answer 127.0.0.1, every later one 127.0.0.66 (TTL 0): the request is sent to the address
/// that was vetted, and the next request, which gets the rebound answer, is refused.
fn rebind_to_internal(tunnel: bool) {
    let dns = Dns::start(|_, _, nth| Reply::A(if nth == 0 { PUBLIC } else { INTERNAL }));
    let (public, internal) = origin_pair();
    let port = public.addr.port();
    let proxy = Proxy::of(
        &dns_config(dns.addr, Duration::from_secs(2)).allow(format!("rebind.test:{port}")),
    );
    let url = format!("http://rebind.test:{port}/r");
    let event = if tunnel { "connect" } else { "http" };

    let got = fetch(&proxy, &url, tunnel);
    assert_eq!(got.exit, 0, "{got:?}");
    assert_eq!(got.status, 200, "{got:?}");
    if tunnel {
        assert_eq!(got.connect, 200, "{got:?}");
    }
    assert_eq!(got.body, "GET /r HTTP/1.1\n");
    assert_eq!(public.next_seen().request_line(), "GET /r HTTP/1.1");
    assert_eq!(dns.queries("rebind.test"), 1, "one lookup for one request");

    let a = proxy.audit();
    assert_eq!(a.event, event);
    assert_eq!(a.decision, "allow");
    assert_eq!(a.reason, "allowed");
    assert_eq!(a.host.as_deref(), Some("rebind.test"));
    assert_eq!(a.port, Some(port));
    assert_eq!(a.upstream.as_deref(), Some(&*format!("127.0.0.1:{port}")));
    assert_eq!(a.status, Some(200));

    // The rebound answer: refused, and the internal origin still untouched.
    let got = fetch(&proxy, &url, tunnel);
    if tunnel {
        assert_eq!(got.connect, 403, "{got:?}");
        assert_ne!(got.exit, 0, "curl reports a refused CONNECT: {got:?}");
        assert!(got.stderr.contains("403"), "{got:?}");
    } else {
        assert_eq!(got.exit, 0, "{got:?}");
        assert_eq!(got.status, 403, "{got:?}");
    }
    assert_eq!(got.reason_header().as_deref(), Some("denied_address"));
    assert_eq!(dns.queries("rebind.test"), 2, "one lookup per request");

    let a = proxy.audit();
    assert_eq!(a.event, event);
    assert_eq!(a.decision, "deny");
    assert_eq!(a.reason, "denied_address");
    assert_eq!(a.host.as_deref(), Some("rebind.test"));
    assert_eq!(a.upstream, None);
    assert_eq!(a.status, Some(403));

    assert_eq!(
        internal.settled_connections(),
        0,
        "the rebound address was dialled"
    );
    assert_eq!(public.settled_connections(), 1);
}

/// First answer 127.0.0.66, every later one 127.0.0.1: the first request is refused and nothing
/// is dialled for it; the next request reaches 127.0.0.1.
fn rebind_to_public(tunnel: bool) {
    let dns = Dns::start(|_, _, nth| Reply::A(if nth == 0 { INTERNAL } else { PUBLIC }));
    let (public, internal) = origin_pair();
    let port = public.addr.port();
    let proxy =
        Proxy::of(&dns_config(dns.addr, Duration::from_secs(2)).allow(format!("flip.test:{port}")));
    let url = format!("http://flip.test:{port}/f");
    let event = if tunnel { "connect" } else { "http" };

    let got = fetch(&proxy, &url, tunnel);
    if tunnel {
        assert_eq!(got.connect, 403, "{got:?}");
        assert_ne!(got.exit, 0, "curl reports a refused CONNECT: {got:?}");
        assert!(got.stderr.contains("403"), "{got:?}");
    } else {
        assert_eq!(got.exit, 0, "{got:?}");
        assert_eq!(got.status, 403, "{got:?}");
    }
    assert_eq!(got.reason_header().as_deref(), Some("denied_address"));
    assert_eq!(dns.queries("flip.test"), 1, "one lookup for one request");

    let a = proxy.audit();
    assert_eq!(a.event, event);
    assert_eq!(a.decision, "deny");
    assert_eq!(a.reason, "denied_address");
    assert_eq!(a.host.as_deref(), Some("flip.test"));
    assert_eq!(a.port, Some(port));
    assert_eq!(a.upstream, None);
    assert_eq!(a.status, Some(403));

    assert_eq!(
        public.settled_connections(),
        0,
        "a refused request dialled something"
    );
    assert_eq!(
        internal.settled_connections(),
        0,
        "the denied address was dialled"
    );

    let got = fetch(&proxy, &url, tunnel);
    assert_eq!(got.exit, 0, "{got:?}");
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, "GET /f HTTP/1.1\n");
    assert_eq!(dns.queries("flip.test"), 2, "one lookup per request");

    let a = proxy.audit();
    assert_eq!(a.event, event);
    assert_eq!(a.decision, "allow");
    assert_eq!(a.reason, "allowed");
    assert_eq!(a.upstream.as_deref(), Some(&*format!("127.0.0.1:{port}")));
    assert_eq!(a.status, Some(200));

    assert_eq!(public.settled_connections(), 1);
    assert_eq!(internal.settled_connections(), 0);
}

#[test]
fn rebinding_to_internal_through_tunnel_dials_the_vetted_address() {
    rebind_to_internal(true);
}

#[test]
fn rebinding_to_internal_through_plain_http_dials_the_vetted_address() {
    rebind_to_internal(false);
}

#[test]
fn rebinding_from_internal_through_tunnel_refuses_the_first_request() {
    rebind_to_public(true);
}

#[test]
fn rebinding_from_internal_through_plain_http_refuses_the_first_request() {
    rebind_to_public(false);
}

#[test]
fn nxdomain_is_a_502_dns_failed() {
    let dns = Dns::start(|_, _, _| Reply::NxDomain);
    let origin = Origin::http();
    let port = origin.addr.port();
    let proxy = Proxy::of(
        &dns_config(dns.addr, Duration::from_secs(2)).allow(format!("missing.test:{port}")),
    );

    let got = fetch(&proxy, &format!("http://missing.test:{port}/"), false);
    assert_eq!(got.exit, 0, "{got:?}");
    assert_eq!(got.status, 502, "{got:?}");
    assert_eq!(got.reason_header().as_deref(), Some("dns_failed"));

    // ctx.rs `deny`: a fault on the way to an allowed destination (5xx) keeps decision "allow".
    let a = proxy.audit();
    assert_eq!(a.event, "http");
    assert_eq!(a.decision, "allow");
    assert_eq!(a.reason, "dns_failed");
    assert_eq!(a.host.as_deref(), Some("missing.test"));
    assert_eq!(a.port, Some(port));
    assert_eq!(a.rule.as_deref(), Some(&*format!("missing.test:{port}")));
    assert_eq!(a.upstream, None);
    assert_eq!(a.status, Some(502));

    assert_eq!(dns.queries_of("missing.test", RecordType::A), 1);
    assert_eq!(origin.settled_connections(), 0);
}

#[test]
fn silent_nameserver_is_a_504_dns_timeout() {
    let dns = Dns::start(|_, _, _| Reply::Silent);
    let origin = Origin::http();
    let port = origin.addr.port();
    let dns_timeout = Duration::from_secs(1);
    let proxy =
        InProcess::of(&dns_config(dns.addr, dns_timeout).allow(format!("slow.test:{port}")));

    let (proxy_url, url) = (proxy.url(), format!("http://slow.test:{port}/"));
    let got = thread::scope(|scope| {
        let curl = scope.spawn(|| fetch_via(&proxy_url, &url, false));
        // The lookup's deadline was set before its query went out: once the nameserver has the
        // query, moving the clock by the DNS timeout ends the lookup.
        wait_until(WAIT, "the proxy asks the nameserver", || {
            dns.queries_of("slow.test", RecordType::A) >= 1
        });
        proxy.advance(dns_timeout);
        curl.join().unwrap()
    });
    assert_eq!(got.exit, 0, "{got:?}");
    assert_eq!(got.status, 504, "{got:?}");
    assert_eq!(got.reason_header().as_deref(), Some("dns_timeout"));

    let a = proxy.audit();
    assert_eq!(a.event, "http");
    assert_eq!(a.decision, "allow");
    assert_eq!(a.reason, "dns_timeout");
    assert_eq!(a.host.as_deref(), Some("slow.test"));
    assert_eq!(a.port, Some(port));
    assert_eq!(a.upstream, None);
    assert_eq!(a.status, Some(504));

    assert!(
        dns.queries_of("slow.test", RecordType::A) >= 1,
        "the proxy never asked"
    );
    assert_eq!(origin.settled_connections(), 0);
}

#[test]
fn static_hosts_win_over_dns() {
    // DNS would send everything to the internal address.
    let dns = Dns::start(|_, _, _| Reply::A(INTERNAL));
    let (public, internal) = origin_pair();
    let port = public.addr.port();
    let proxy = Proxy::of(
        &dns_config(dns.addr, Duration::from_secs(2))
            .hosts_to_loopback(&["static.test"])
            .allow(format!("static.test:{port}"))
            .allow(format!("dynamic.test:{port}")),
    );

    let got = fetch(&proxy, &format!("http://static.test:{port}/s"), false);
    assert_eq!(got.exit, 0, "{got:?}");
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.body, "GET /s HTTP/1.1\n");

    let a = proxy.audit();
    assert_eq!(a.event, "http");
    assert_eq!(a.decision, "allow");
    assert_eq!(a.reason, "allowed");
    assert_eq!(a.host.as_deref(), Some("static.test"));
    assert_eq!(a.port, Some(port));
    assert_eq!(a.upstream.as_deref(), Some(&*format!("127.0.0.1:{port}")));
    assert_eq!(a.status, Some(200));
    assert_eq!(
        dns.queries("static.test"),
        0,
        "a static name was looked up in DNS"
    );
    assert_eq!(dns.total(), 0);

    // The nameserver is live and used for names that are not static.
    let got = fetch(&proxy, &format!("http://dynamic.test:{port}/d"), false);
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.reason_header().as_deref(), Some("denied_address"));
    let a = proxy.audit();
    assert_eq!(a.host.as_deref(), Some("dynamic.test"));
    assert_eq!(a.decision, "deny");
    assert_eq!(a.reason, "denied_address");
    assert_eq!(a.upstream, None);
    assert_eq!(a.status, Some(403));
    assert_eq!(dns.queries("dynamic.test"), 1);
    assert_eq!(dns.queries("static.test"), 0);

    assert_eq!(public.settled_connections(), 1);
    assert_eq!(internal.settled_connections(), 0);
}

/// SERVFAIL and NODATA (NOERROR, no record) end like NXDOMAIN: 502 `dns_failed` (resolve.rs maps
/// "no records found" to `dns_failed`), decision still "allow" (a 5xx fault, ctx.rs `deny`).
#[test]
fn servfail_and_nodata_are_502_with_their_own_reasons() {
    let dns = Dns::start(|name, _, _| match name {
        "servfail.test" => Reply::ServFail,
        _ => Reply::NoData,
    });
    let origin = Origin::http();
    let port = origin.addr.port();
    let names = ["servfail.test", "nodata.test"];
    let allow: Vec<String> = names.iter().map(|n| format!("{n}:{port}")).collect();
    let proxy = Proxy::of(&dns_config(dns.addr, Duration::from_secs(2)).allow_all(&allow));

    for (name, reason) in names.into_iter().zip(["dns_failed", "dns_no_addresses"]) {
        let got = fetch(&proxy, &format!("http://{name}:{port}/"), false);
        assert_eq!(got.exit, 0, "{name}: {got:?}");
        assert_eq!(got.status, 502, "{name}: {got:?}");
        assert_eq!(got.reason_header().as_deref(), Some(reason), "{name}");

        let a = proxy.audit();
        assert_eq!(a.event, "http");
        assert_eq!(a.decision, "allow", "{name}");
        assert_eq!(a.reason, reason, "{name}");
        assert_eq!(a.host.as_deref(), Some(name));
        assert_eq!(a.port, Some(port));
        assert_eq!(a.upstream, None);
        assert_eq!(a.status, Some(502));
        assert_eq!(dns.queries_of(name, RecordType::A), 1, "{name}");
    }
    assert_eq!(origin.settled_connections(), 0);
}

/// An answer mixing a denied and an allowed address: only the allowed one is dialled, even when
/// the denied one comes first.
#[test]
fn mixed_answer_dials_only_the_allowed_address() {
    let dns = Dns::start(|_, _, _| Reply::Many(&[INTERNAL, PUBLIC]));
    let (public, internal) = origin_pair();
    let port = public.addr.port();
    let proxy = Proxy::of(
        &dns_config(dns.addr, Duration::from_secs(2)).allow(format!("mixed.test:{port}")),
    );

    for tunnel in [false, true] {
        let got = fetch(&proxy, &format!("http://mixed.test:{port}/m"), tunnel);
        assert_eq!(got.exit, 0, "{got:?}");
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.body, "GET /m HTTP/1.1\n");

        let a = proxy.audit();
        assert_eq!(a.event, if tunnel { "connect" } else { "http" });
        assert_eq!(a.decision, "allow");
        assert_eq!(a.reason, "allowed");
        assert_eq!(a.host.as_deref(), Some("mixed.test"));
        assert_eq!(a.upstream.as_deref(), Some(&*format!("127.0.0.1:{port}")));
        assert_eq!(a.status, Some(200));
    }
    assert_eq!(dns.queries("mixed.test"), 2);
    assert_eq!(public.settled_connections(), 2);
    assert_eq!(internal.settled_connections(), 0);
}

/// Only the first `MAX_ADDRS` (8) addresses of an answer are vetted: an allowed ninth address is
/// ignored, so eight denied ones followed by 127.0.0.1 is a refusal.
#[test]
fn addresses_past_the_eighth_are_ignored() {
    const LONG: [Ipv4Addr; 9] = [
        Ipv4Addr::new(127, 0, 0, 65),
        Ipv4Addr::new(127, 0, 0, 66),
        Ipv4Addr::new(127, 0, 0, 67),
        Ipv4Addr::new(127, 0, 0, 68),
        Ipv4Addr::new(127, 0, 0, 69),
        Ipv4Addr::new(127, 0, 0, 70),
        Ipv4Addr::new(127, 0, 0, 71),
        Ipv4Addr::new(127, 0, 0, 72),
        PUBLIC,
    ];
    let dns = Dns::start(|_, _, _| Reply::Many(&LONG));
    let (public, internal) = origin_pair();
    let port = public.addr.port();
    let proxy =
        Proxy::of(&dns_config(dns.addr, Duration::from_secs(2)).allow(format!("long.test:{port}")));

    let got = fetch(&proxy, &format!("http://long.test:{port}/"), false);
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.reason_header().as_deref(), Some("denied_address"));
    let a = proxy.audit();
    assert_eq!(a.decision, "deny");
    assert_eq!(a.reason, "denied_address");
    assert_eq!(a.host.as_deref(), Some("long.test"));
    assert_eq!(a.upstream, None);
    assert_eq!(a.status, Some(403));
    assert_eq!(dns.queries("long.test"), 1);
    assert_eq!(public.settled_connections(), 0);
    assert_eq!(internal.settled_connections(), 0);
}
