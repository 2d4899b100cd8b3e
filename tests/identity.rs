//! Identity through the real binary: agents told apart by source address and by proxy token (or
//! both), each held to its own allowlist and its own `allow_cidrs`; token refusals are 407s that
//! never reach the origin and never leak the token; a rotated token file takes effect without a
//! restart.
//!
//! All traffic stays on 127.0.0.0/8: curl picks its source address with `--interface 127.0.0.N`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};

use base64::Engine;
use support::*;

/// The standard listener, bounds and resolver with `hosts` on 127.0.0.1 and 127.0.0.1 excepted
/// from the loopback deny; no agents or policies yet.
fn loopback_hosts(hosts: &[&str]) -> ConfigBuilder {
    ConfigBuilder::bare()
        .hosts_to_loopback(hosts)
        .dest_allow("127.0.0.1/32")
}

/// Write a token file the way a Secret update lands: a temp file in the same directory, renamed
/// over the old one.
fn write_token(path: &Path, token: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, format!("{token}\n")).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn basic(user: &str, token: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{token}"))
}

/// A response as curl printed it with `-i`.
#[derive(Debug)]
struct Resp {
    status: u16,
    head: String,
    body: String,
}

impl Resp {
    fn parse(out: &str) -> Resp {
        let (head, body) = out
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no response head in {out:?}"));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no status in {head:?}"));
        Resp {
            status,
            head: head.to_string(),
            body: body.to_string(),
        }
    }

    fn header(&self, name: &str) -> Option<String> {
        header_in(&self.head, name)
    }

    fn reason(&self) -> Option<String> {
        self.header("chokepoint-reason")
    }
}

fn header_in(head: &str, name: &str) -> Option<String> {
    head_header(head, name).map(String::from)
}

/// A plain-HTTP GET through the proxy from source address `from`, with extra curl arguments.
fn get(proxy: &Proxy, from: &str, url: &str, extra: &[&str]) -> Resp {
    let proxy_url = proxy.url();
    let mut args = vec!["-i", "--interface", from, "-x", proxy_url.as_str()];
    args.extend_from_slice(extra);
    args.push(url);
    let (code, out, err) = curl(&args);
    assert_eq!(code, 0, "curl {args:?}: {err}");
    Resp::parse(&out)
}

/// A CONNECT through the proxy with curl (`-p`) from source address `from`. Returns the proxy's
/// CONNECT status, its `chokepoint-reason` header (from curl's verbose trace) and the body that
/// came through the tunnel (empty when refused).
fn tunnel(proxy: &Proxy, from: &str, url: &str) -> (u16, Option<String>, String) {
    let proxy_url = proxy.url();
    let (_, out, err) = curl(&[
        "-v",
        "-p",
        "--interface",
        from,
        "-x",
        &proxy_url,
        "-w",
        "\n%{http_connect}",
        url,
    ]);
    let (body, code) = out.rsplit_once('\n').unwrap();
    let reason = err.lines().find_map(|l| {
        let (k, v) = l.strip_prefix("< ")?.split_once(':')?;
        k.eq_ignore_ascii_case("chokepoint-reason")
            .then(|| v.trim().to_string())
    });
    (code.parse().unwrap(), reason, body.to_string())
}

/// A raw CONNECT from 127.0.0.1 with an optional literal `Proxy-Authorization` value; returns the
/// open socket and the response head.
fn raw_connect(proxy: &Proxy, authority: &str, auth: Option<&str>) -> (TcpStream, String) {
    let mut s = raw(proxy);
    let auth = auth.map_or(String::new(), |v| format!("Proxy-Authorization: {v}\r\n"));
    s.write_all(
        format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{auth}\r\n").as_bytes(),
    )
    .unwrap();
    let head = read_head(&mut s);
    (s, head)
}

/// The fields every audit line of a decided request must have.
#[track_caller]
fn check_audit(
    a: &Audit,
    who: (Option<&str>, Option<&str>),
    client_ip: &str,
    outcome: (&str, &str),
    status: u16,
) {
    let mut m = AuditMatch::any()
        .and("v == 1", |a| a.v == 1)
        .agent(who.0)
        .policy(who.1)
        .client_ip(client_ip)
        .decision(outcome.0)
        .reason(outcome.1)
        .status(status)
        .mode("enforce");
    if outcome.0 == "deny" {
        // A refusal has no upstream.
        m = m.upstream(None);
    }
    m.assert(a);
}

/// A refusal response: status, reason header, and (for 407) the challenge.
#[track_caller]
fn check_refusal(r: &Resp, status: u16, reason: &str) {
    assert_eq!(r.status, status, "{r:?}");
    assert_eq!(r.reason().as_deref(), Some(reason), "{r:?}");
    assert!(
        r.body.starts_with(&format!("{status} chokepoint denied ")),
        "{r:?}"
    );
    if status == 407 {
        assert_eq!(
            r.header("proxy-authenticate").as_deref(),
            Some("Basic realm=\"chokepoint\""),
            "{r:?}"
        );
    }
}

/// Nothing the gateway printed (audit lines, diagnostic log) may contain `secrets`.
#[track_caller]
fn assert_never_logged(proxy: &Proxy, audits: &[Audit], secrets: &[&str]) {
    let logs: Vec<String> = proxy.stderr.try_iter().collect();
    assert!(!logs.is_empty(), "the gateway logged nothing to check");
    for secret in secrets {
        for a in audits {
            assert!(
                !format!("{a:?}").contains(secret),
                "audit line leaks {secret:?}: {a:?}"
            );
        }
        for l in &logs {
            assert!(!l.contains(secret), "log line leaks {secret:?}: {l}");
        }
    }
}

/// Two agents told apart by source address: alpha on 127.0.0.10 (policy `alpha-apis`), beta on
/// 127.0.0.11 (`beta-apis`).
fn two_agents(c: ConfigBuilder) -> ConfigBuilder {
    c.agent(Agent::cidrs("alpha", &["127.0.0.10/32"], "alpha-apis"))
        .agent(Agent::cidrs("beta", &["127.0.0.11/32"], "beta-apis"))
}

#[test]
fn agents_by_source_address_each_get_their_own_allowlist() {
    let origin_a = Origin::http();
    let origin_b = Origin::http();
    let (pa, pb) = (origin_a.addr.port(), origin_b.addr.port());
    let proxy = Proxy::of(
        &two_agents(loopback_hosts(&["a.test", "b.test"]))
            .policy("alpha-apis", |p| p.allow = vec![format!("a.test:{pa}")])
            .policy("beta-apis", |p| p.allow = vec![format!("b.test:{pb}")]),
    );
    let alpha = (Some("alpha"), Some("alpha-apis"));
    let beta = (Some("beta"), Some("beta-apis"));
    let url_a = format!("http://a.test:{pa}/from-alpha");
    let url_b = format!("http://b.test:{pb}/from-beta");

    // alpha reaches a.test.
    let r = get(&proxy, "127.0.0.10", &url_a, &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "GET /from-alpha HTTP/1.1\n");
    assert_eq!(
        r.reason(),
        None,
        "an allowed response carries no refusal reason"
    );
    let a = proxy.audit();
    check_audit(&a, alpha, "127.0.0.10", ("allow", "allowed"), 200);
    assert_eq!(a.event, "http");
    assert_eq!(a.host.as_deref(), Some("a.test"));
    assert_eq!(a.rule, Some(format!("a.test:{pa}")));
    assert_eq!(a.upstream, Some(format!("127.0.0.1:{pa}")));
    assert_eq!(
        origin_a.next_seen().request_line(),
        "GET /from-alpha HTTP/1.1"
    );

    // alpha may not reach b.test: refused before any upstream connection.
    let r = get(&proxy, "127.0.0.10", &url_b, &[]);
    check_refusal(&r, 403, "host_not_allowed");
    assert!(
        r.body.contains("for agent alpha") && r.body.contains("policy alpha-apis"),
        "{r:?}"
    );
    let a = proxy.audit();
    check_audit(&a, alpha, "127.0.0.10", ("deny", "host_not_allowed"), 403);
    assert_eq!(a.host.as_deref(), Some("b.test"));
    assert_eq!(
        origin_b.connections(),
        0,
        "a refused host must not be contacted"
    );

    // The same holds for a tunnel.
    let (code, reason, body) = tunnel(&proxy, "127.0.0.10", &url_b);
    assert_eq!((code, reason.as_deref()), (403, Some("host_not_allowed")));
    assert_eq!(body, "");
    let a = proxy.audit();
    check_audit(&a, alpha, "127.0.0.10", ("deny", "host_not_allowed"), 403);
    assert_eq!(
        (a.event.as_str(), a.host.as_deref()),
        ("connect", Some("b.test"))
    );
    assert_eq!(
        origin_b.connections(),
        0,
        "a refused host must not be contacted"
    );

    // beta reaches b.test, and not a.test.
    let r = get(&proxy, "127.0.0.11", &url_b, &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "GET /from-beta HTTP/1.1\n");
    let a = proxy.audit();
    check_audit(&a, beta, "127.0.0.11", ("allow", "allowed"), 200);
    assert_eq!(a.rule, Some(format!("b.test:{pb}")));
    assert_eq!(a.upstream, Some(format!("127.0.0.1:{pb}")));
    assert_eq!(
        origin_b.next_seen().request_line(),
        "GET /from-beta HTTP/1.1"
    );
    assert_eq!(origin_b.connections(), 1);

    let connections_a = origin_a.connections();
    let r = get(&proxy, "127.0.0.11", &url_a, &[]);
    check_refusal(&r, 403, "host_not_allowed");
    assert!(r.body.contains("for agent beta"), "{r:?}");
    let a = proxy.audit();
    check_audit(&a, beta, "127.0.0.11", ("deny", "host_not_allowed"), 403);
    assert_eq!(a.host.as_deref(), Some("a.test"));
    assert_eq!(origin_a.connections(), connections_a);

    // A client from an address no agent claims is nobody (no agent uses tokens: 403, no challenge).
    let connections_b = origin_b.connections();
    for url in [&url_a, &url_b] {
        let r = get(&proxy, "127.0.0.12", url, &[]);
        check_refusal(&r, 403, "unknown_agent");
        assert_eq!(r.header("proxy-authenticate"), None, "{r:?}");
        assert!(r.body.contains("for client 127.0.0.12"), "{r:?}");
        let a = proxy.audit();
        check_audit(
            &a,
            (None, None),
            "127.0.0.12",
            ("deny", "unknown_agent"),
            403,
        );
        assert_eq!(a.rule, None);
    }
    assert_eq!(origin_a.connections(), connections_a);
    assert_eq!(origin_b.connections(), connections_b);
    assert!(origin_a.seen.try_recv().is_err() && origin_b.seen.try_recv().is_err());

    // Credentials change nothing when no agent uses tokens: still 403 for a stranger...
    let r = get(
        &proxy,
        "127.0.0.12",
        &url_a,
        &["--proxy-user", "alpha:guess"],
    );
    check_refusal(&r, 403, "unknown_agent");
    assert_eq!(r.header("proxy-authenticate"), None, "{r:?}");
    proxy.audit();
    // ...and an agent identified by its address is not refused for sending some other scheme.
    let r = get(
        &proxy,
        "127.0.0.10",
        &url_a,
        &["-H", "Proxy-Authorization: Bearer for-another-proxy"],
    );
    assert_eq!(r.status, 200, "{r:?}");
    check_audit(
        &proxy.audit(),
        alpha,
        "127.0.0.10",
        ("allow", "allowed"),
        200,
    );
}

const TOKEN: &str = "tok-7Qx2vLp9-correct-horse-battery";

/// One token-only agent `coder` whose policy allows the origin on `port`.
fn coder_config(token_path: &Path, port: u16) -> ConfigBuilder {
    loopback_hosts(&["origin.test"])
        // The rotation tests poll with a refused token until the new one applies (two watcher
        // ticks, up to 2 s): more 407s than the default refusal budget pays for
        // (tests/budget.rs covers the budget).
        .refusal_budget(1000.0, 1000)
        .agent(Agent::token("coder", token_path, "coding"))
        .policy("coding", |p| p.allow = vec![format!("origin.test:{port}")])
}

/// A token-only agent `coder` (token in a temp dir) allowed `origin.test:PORT`.
fn token_setup(token: &str) -> (Origin, Proxy, tempfile::TempDir, PathBuf) {
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("coder.token");
    // Surrounding whitespace is not part of the token.
    std::fs::write(&token_path, format!("  {token}\n\n")).unwrap();
    let proxy = Proxy::of(&coder_config(&token_path, port));
    (origin, proxy, dir, token_path)
}

#[test]
fn proxy_token_is_required_checked_stripped_and_never_logged() {
    let (origin, proxy, _dir, _) = token_setup(TOKEN);
    let port = origin.addr.port();
    let url = format!("http://origin.test:{port}/work");
    let coder = (Some("coder"), Some("coding"));
    let good = format!("coder:{TOKEN}");
    let mut audits = Vec::new();

    // No credentials at all: a challenge.
    let r = get(&proxy, "127.0.0.1", &url, &[]);
    check_refusal(&r, 407, "auth_required");
    assert!(r.body.contains("for client 127.0.0.1"), "{r:?}");
    let a = proxy.audit();
    check_audit(
        &a,
        (None, None),
        "127.0.0.1",
        ("deny", "auth_required"),
        407,
    );
    assert_eq!(
        (a.event.as_str(), a.host.as_deref()),
        ("http", Some("origin.test"))
    );
    audits.push(a);

    // Wrong token, unknown agent name, the right token under another name, malformed headers.
    let refused: [(&[&str], &str); 7] = [
        (&["--proxy-user", "coder:not-the-token"], "wrong token"),
        (&["--proxy-user", "coder:"], "empty token"),
        (&["--proxy-user", "stranger:whatever"], "unknown agent"),
        (
            &["--proxy-user", &format!("stranger:{TOKEN}")],
            "right token, wrong name",
        ),
        (
            &["--proxy-user", &format!("coder:{TOKEN}x")],
            "token with a suffix",
        ),
        (&["-H", "Proxy-Authorization: Bearer abc"], "not Basic"),
        (
            &["-H", "Proxy-Authorization: Basic !!!not-base64"],
            "bad base64",
        ),
    ];
    for (args, what) in refused {
        let r = get(&proxy, "127.0.0.1", &url, args);
        assert_eq!(r.status, 407, "{what}: {r:?}");
        check_refusal(&r, 407, "auth_failed");
        let a = proxy.audit();
        check_audit(&a, (None, None), "127.0.0.1", ("deny", "auth_failed"), 407);
        audits.push(a);
    }
    assert_eq!(
        origin.connections(),
        0,
        "a refused client must not reach the origin"
    );

    // The right token: through, and the origin never sees the proxy credentials.
    let r = get(&proxy, "127.0.0.1", &url, &["--proxy-user", &good]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.reason(), None);
    assert_eq!(r.body, "GET /work HTTP/1.1\n");
    let seen = origin.next_seen();
    assert_eq!(seen.request_line(), "GET /work HTTP/1.1");
    assert_eq!(seen.header("proxy-authorization"), None, "{}", seen.head);
    assert!(!seen.head.contains(TOKEN), "{}", seen.head);
    let a = proxy.audit();
    check_audit(&a, coder, "127.0.0.1", ("allow", "allowed"), 200);
    assert_eq!(a.upstream, Some(format!("127.0.0.1:{port}")));
    audits.push(a);

    // The same header sent by hand (not curl's), for plain HTTP.
    let mut s = raw(&proxy);
    s.write_all(
        format!(
            "GET http://origin.test:{port}/by-hand HTTP/1.1\r\nHost: origin.test:{port}\r\nProxy-Authorization: Basic {}\r\n\r\n",
            basic("coder", TOKEN)
        )
        .as_bytes(),
    )
    .unwrap();
    let (head, body) = read_response(&mut s);
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(body, b"GET /by-hand HTTP/1.1\n");
    let seen = origin.next_seen();
    assert_eq!(seen.header("proxy-authorization"), None, "{}", seen.head);
    drop(s);
    let a = proxy.audit();
    check_audit(&a, coder, "127.0.0.1", ("allow", "allowed"), 200);
    audits.push(a);

    // CONNECT: no credentials, wrong ones, right ones.
    let authority = format!("origin.test:{port}");
    let before = origin.connections();
    let (_s, head) = raw_connect(&proxy, &authority, None);
    assert_eq!(status_of(&head), 407, "{head}");
    assert_eq!(
        header_in(&head, "chokepoint-reason").as_deref(),
        Some("auth_required")
    );
    assert_eq!(
        header_in(&head, "proxy-authenticate").as_deref(),
        Some("Basic realm=\"chokepoint\"")
    );
    let a = proxy.audit();
    check_audit(
        &a,
        (None, None),
        "127.0.0.1",
        ("deny", "auth_required"),
        407,
    );
    assert_eq!(
        (a.event.as_str(), a.method.as_deref()),
        ("connect", Some("CONNECT"))
    );
    audits.push(a);

    for auth in [
        format!("Basic {}", basic("coder", "wrong")),
        format!("Basic {}", basic("nobody", TOKEN)),
        "Basic".to_string(),
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(TOKEN)
        ),
    ] {
        let (_s, head) = raw_connect(&proxy, &authority, Some(&auth));
        assert_eq!(status_of(&head), 407, "{auth}: {head}");
        assert_eq!(
            header_in(&head, "chokepoint-reason").as_deref(),
            Some("auth_failed"),
            "{auth}: {head}"
        );
        let a = proxy.audit();
        check_audit(&a, (None, None), "127.0.0.1", ("deny", "auth_failed"), 407);
        audits.push(a);
    }
    assert_eq!(
        origin.connections(),
        before,
        "a refused tunnel must not be opened"
    );

    let (mut s, head) = raw_connect(
        &proxy,
        &authority,
        Some(&format!("Basic {}", basic("coder", TOKEN))),
    );
    assert_eq!(status_of(&head), 200, "{head}");
    s.write_all(format!("GET /tunnelled HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .unwrap();
    let (head, body) = read_response(&mut s);
    assert_eq!(status_of(&head), 200, "{head}");
    assert_eq!(body, b"GET /tunnelled HTTP/1.1\n");
    assert_eq!(origin.next_seen().request_line(), "GET /tunnelled HTTP/1.1");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let a = proxy.audit();
    check_audit(&a, coder, "127.0.0.1", ("allow", "allowed"), 200);
    assert_eq!(a.event, "connect");
    audits.push(a);

    // The token, and the credentials that carry it, appear in no audit line and no log line.
    assert_never_logged(&proxy, &audits, &[TOKEN, &basic("coder", TOKEN)]);
}

#[test]
fn rotated_token_file_takes_effect_without_restart() {
    const OLD: &str = "old-token-Hk3mW8qZ";
    const NEW: &str = "new-token-Rt5nY2sV";
    let (origin, proxy, dir, token_path) = token_setup(OLD);
    let url = format!("http://origin.test:{}/rotate", origin.addr.port());
    let old = format!("coder:{OLD}");
    let new = format!("coder:{NEW}");
    let coder = (Some("coder"), Some("coding"));
    let mut audits = Vec::new();

    let r = get(&proxy, "127.0.0.1", &url, &["--proxy-user", &old]);
    assert_eq!(r.status, 200, "{r:?}");
    let a = proxy.audit();
    check_audit(&a, coder, "127.0.0.1", ("allow", "allowed"), 200);
    audits.push(a);
    let r = get(&proxy, "127.0.0.1", &url, &["--proxy-user", &new]);
    check_refusal(&r, 407, "auth_failed");
    audits.push(proxy.audit());

    // The Secret is updated: a new file renamed over the old one, in the same directory.
    write_token(&token_path, NEW);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "temp file left behind"
    );

    wait_until(WAIT, "the rotated token accepted", || {
        let r = get(&proxy, "127.0.0.1", &url, &["--proxy-user", &new]);
        let a = proxy.audit();
        let accepted = r.status == 200;
        if accepted {
            check_audit(&a, coder, "127.0.0.1", ("allow", "allowed"), 200);
        } else {
            check_refusal(&r, 407, "auth_failed");
            check_audit(&a, (None, None), "127.0.0.1", ("deny", "auth_failed"), 407);
        }
        audits.push(a);
        accepted
    });

    // From then on the old token is refused, and the new one keeps working.
    let r = get(&proxy, "127.0.0.1", &url, &["--proxy-user", &old]);
    check_refusal(&r, 407, "auth_failed");
    let a = proxy.audit();
    check_audit(&a, (None, None), "127.0.0.1", ("deny", "auth_failed"), 407);
    audits.push(a);
    let r = get(&proxy, "127.0.0.1", &url, &["--proxy-user", &new]);
    assert_eq!(r.status, 200, "{r:?}");
    let a = proxy.audit();
    check_audit(&a, coder, "127.0.0.1", ("allow", "allowed"), 200);
    audits.push(a);

    assert_never_logged(&proxy, &audits, &[OLD, NEW]);
}

/// Every 407 `auth_failed` says the same text, so a client cannot tell a wrong token for a real
/// agent from a made-up agent name, from a real agent refused at its address, from malformed
/// credentials: the cause is in the audit line's `detail` only. Before the fix the response
/// said "wrong proxy token for this agent" for a real name and "proxy credentials match no agent
/// allowed from this address" otherwise.
#[test]
fn auth_failures_all_answer_one_text_and_audit_the_cause() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("pinned.token");
    std::fs::write(&token_path, TOKEN).unwrap();
    let proxy = Proxy::of(
        &loopback_hosts(&["origin.test"])
            .agent(
                Agent::token("pinned", &token_path, "pinned-apis").with_cidrs(&["127.0.0.20/32"]),
            )
            .policy("pinned-apis", |p| {
                p.allow = vec![format!("origin.test:{port}")]
            }),
    );
    let url = format!("http://origin.test:{port}/who");
    let good = format!("pinned:{TOKEN}");
    let cases: [(&str, Vec<&str>, &str); 4] = [
        // A real agent, the wrong token.
        (
            "127.0.0.20",
            vec!["--proxy-user", "pinned:wrong"],
            "wrong proxy token for agent pinned",
        ),
        // A made-up agent name.
        (
            "127.0.0.20",
            vec!["--proxy-user", "nobody:wrong"],
            "proxy credentials match no agent allowed from this address",
        ),
        // A real agent with its token, from an address it may not use.
        (
            "127.0.0.21",
            vec!["--proxy-user", &good],
            "proxy credentials match no agent allowed from this address",
        ),
        // Not Basic credentials at all.
        (
            "127.0.0.20",
            vec!["-H", "Proxy-Authorization: Bearer abc"],
            "malformed Proxy-Authorization: expected one `Basic base64(agent:token)`",
        ),
    ];
    let mut bodies = Vec::new();
    for (from, extra, detail) in &cases {
        let r = get(&proxy, from, &url, extra);
        check_refusal(&r, 407, "auth_failed");
        // The only difference the client may see is its own address.
        bodies.push(r.body.replace(from, "CLIENT"));
        let a = proxy.audit();
        check_audit(&a, (None, None), from, ("deny", "auth_failed"), 407);
        assert_eq!(a.detail.as_deref(), Some(*detail), "{extra:?}");
        assert!(!r.body.contains("pinned"), "{}", r.body);
    }
    assert!(
        bodies.iter().all(|b| *b == bodies[0]),
        "407 texts differ: {bodies:#?}"
    );
    // Other refusals keep their text in the response and write no detail.
    let r = get(&proxy, "127.0.0.20", &url, &[]);
    check_refusal(&r, 407, "auth_required");
    proxy.expect_audit(AuditMatch::of("http", "deny", "auth_required").detail(None));
    assert_eq!(origin.connections(), 0);
}

#[test]
fn token_and_source_address_must_both_hold() {
    let origin = Origin::http();
    let port = origin.addr.port();
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("pinned.token");
    std::fs::write(&token_path, TOKEN).unwrap();
    let proxy = Proxy::of(
        &loopback_hosts(&["origin.test"])
            .agent(
                Agent::token("pinned", &token_path, "pinned-apis").with_cidrs(&["127.0.0.20/32"]),
            )
            .policy("pinned-apis", |p| {
                p.allow = vec![format!("origin.test:{port}")]
            }),
    );
    let url = format!("http://origin.test:{port}/pinned");
    let good = format!("pinned:{TOKEN}");
    let mut audits = Vec::new();

    // The right token from the wrong address.
    for from in ["127.0.0.21", "127.0.0.1"] {
        let r = get(&proxy, from, &url, &["--proxy-user", &good]);
        check_refusal(&r, 407, "auth_failed");
        let a = proxy.audit();
        check_audit(&a, (None, None), from, ("deny", "auth_failed"), 407);
        audits.push(a);
    }
    // The right address without a token, and with a wrong one.
    let r = get(&proxy, "127.0.0.20", &url, &[]);
    check_refusal(&r, 407, "auth_required");
    let a = proxy.audit();
    check_audit(
        &a,
        (None, None),
        "127.0.0.20",
        ("deny", "auth_required"),
        407,
    );
    audits.push(a);
    let r = get(
        &proxy,
        "127.0.0.20",
        &url,
        &["--proxy-user", "pinned:wrong"],
    );
    check_refusal(&r, 407, "auth_failed");
    let a = proxy.audit();
    check_audit(&a, (None, None), "127.0.0.20", ("deny", "auth_failed"), 407);
    audits.push(a);
    assert_eq!(
        origin.connections(),
        0,
        "a refused client must not reach the origin"
    );

    // Both right.
    let r = get(&proxy, "127.0.0.20", &url, &["--proxy-user", &good]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.body, "GET /pinned HTTP/1.1\n");
    let seen = origin.next_seen();
    assert_eq!(seen.header("proxy-authorization"), None, "{}", seen.head);
    let a = proxy.audit();
    check_audit(
        &a,
        (Some("pinned"), Some("pinned-apis")),
        "127.0.0.20",
        ("allow", "allowed"),
        200,
    );
    audits.push(a);
    assert_eq!(origin.connections(), 1);

    assert_never_logged(&proxy, &audits, &[TOKEN]);
}

#[test]
fn policy_allow_cidrs_open_an_internal_address_for_that_policy_only() {
    let registry = Origin::http_on("127.0.0.9:0");
    let port = registry.addr.port();
    let proxy = Proxy::of(
        &two_agents(ConfigBuilder::bare().host("registry.test", &["127.0.0.9"]))
            .policy("alpha-apis", |p| {
                p.allow = vec![format!("registry.test:{port}")];
                p.allow_cidrs = vec!["127.0.0.9/32".into()];
            })
            .policy("beta-apis", |p| {
                p.allow = vec![format!("registry.test:{port}")]
            }),
    );
    let url = format!("http://registry.test:{port}/v2/");
    let alpha = (Some("alpha"), Some("alpha-apis"));
    let beta = (Some("beta"), Some("beta-apis"));

    // beta's policy names the host but has no exception for its (loopback) address.
    let r = get(&proxy, "127.0.0.11", &url, &[]);
    check_refusal(&r, 403, "denied_address");
    assert!(r.body.contains("127.0.0.9"), "{r:?}");
    let a = proxy.audit();
    check_audit(&a, beta, "127.0.0.11", ("deny", "denied_address"), 403);
    assert_eq!(a.rule, Some(format!("registry.test:{port}")));
    assert_eq!(a.host.as_deref(), Some("registry.test"));
    let (code, reason, _) = tunnel(&proxy, "127.0.0.11", &url);
    assert_eq!((code, reason.as_deref()), (403, Some("denied_address")));
    let a = proxy.audit();
    check_audit(&a, beta, "127.0.0.11", ("deny", "denied_address"), 403);
    assert_eq!(a.event, "connect");
    assert_eq!(
        registry.connections(),
        0,
        "a denied address must not be contacted"
    );

    // alpha's policy has the exception.
    let r = get(&proxy, "127.0.0.10", &url, &[]);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.reason(), None);
    assert_eq!(r.body, "GET /v2/ HTTP/1.1\n");
    let a = proxy.audit();
    check_audit(&a, alpha, "127.0.0.10", ("allow", "allowed"), 200);
    assert_eq!(a.upstream, Some(format!("127.0.0.9:{port}")));
    assert_eq!(registry.next_seen().request_line(), "GET /v2/ HTTP/1.1");
    assert_eq!(registry.connections(), 1);

    // alpha's exception does not leak to beta afterwards.
    let r = get(&proxy, "127.0.0.11", &url, &[]);
    check_refusal(&r, 403, "denied_address");
    let a = proxy.audit();
    check_audit(&a, beta, "127.0.0.11", ("deny", "denied_address"), 403);
    assert_eq!(
        registry.connections(),
        1,
        "only alpha's request reached the registry"
    );
    assert!(registry.seen.try_recv().is_err());
}

#[test]
fn a_token_file_absent_at_start_is_revoked_until_it_appears() {
    const TOKEN_LATER: &str = "late-token-Pq8sT3vW";
    let (origin, proxy, _dir, token_path) = token_setup("placeholder");
    drop(proxy);
    // Restart with the file gone: the gateway starts (a warning, not a broken config)...
    std::fs::remove_file(&token_path).unwrap();
    let port = origin.addr.port();
    let proxy = Proxy::of(&coder_config(&token_path, port));
    let url = format!("http://origin.test:{port}/late");
    let creds = format!("coder:{TOKEN_LATER}");
    // ...the agent cannot authenticate, not even with an empty token...
    check_refusal(
        &get(&proxy, "127.0.0.1", &url, &["--proxy-user", "coder:"]),
        407,
        "auth_failed",
    );
    proxy.audit();
    check_refusal(
        &get(&proxy, "127.0.0.1", &url, &["--proxy-user", &creds]),
        407,
        "auth_failed",
    );
    proxy.audit();
    // ...until the Secret is mounted.
    write_token(&token_path, TOKEN_LATER);
    wait_until(WAIT, "the token picked up", || {
        let r = get(&proxy, "127.0.0.1", &url, &["--proxy-user", &creds]);
        let a = proxy.audit();
        if r.status == 200 {
            assert_eq!(a.agent.as_deref(), Some("coder"));
        }
        r.status == 200
    });
}
