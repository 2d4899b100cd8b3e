//! `chokepoint probe`: run inside an agent namespace to prove the lock-down from the agent's seat.
//!
//! Checks, one line each: a direct TCP connection out fails; a DNS query to a resolver other than
//! the cluster's gets no answer; the cloud metadata address is unreachable; through the gateway
//! an allowed URL is let through and a denied one is refused with 403 by chokepoint. Every
//! target is a flag, so the same binary proves a real cluster (defaults) or a test bed.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::explain::parse_target;
use crate::target::Kind;

/// What to probe.
#[derive(Clone, Debug)]
pub struct Probe {
    /// The gateway: `http://[user:token@]host:port`.
    pub proxy: String,
    /// Proxy credentials `agent:token` (from `--proxy-user` and `--proxy-token-file`); take
    /// precedence over userinfo in `proxy`.
    pub credentials: Option<String>,
    /// A URL the agent's policy allows.
    pub allowed_url: String,
    /// A URL the agent's policy does not allow.
    pub denied_url: String,
    /// An address outside the cluster that must not be reachable directly.
    pub direct: SocketAddr,
    /// A DNS resolver other than the cluster's that must not answer.
    pub dns_server: SocketAddr,
    /// The metadata endpoint that must not be reachable.
    pub metadata: SocketAddr,
    /// Per-check time bound.
    pub timeout: Duration,
}

/// One check's result.
#[derive(Debug)]
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// Whether the lock-down holds for it.
    pub pass: bool,
    /// What was observed.
    pub detail: String,
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.pass { "PASS" } else { "FAIL" };
        write!(f, "{verdict} {:<16} {}", self.name, self.detail)
    }
}

/// Run every check.
pub async fn run(p: &Probe) -> Vec<Check> {
    vec![
        must_not_connect("direct-egress", p.direct, p.timeout).await,
        dns_must_not_answer(p.dns_server, p.timeout).await,
        must_not_connect("metadata", p.metadata, p.timeout).await,
        via_gateway("gateway-allowed", p, &p.allowed_url, true).await,
        via_gateway("gateway-denied", p, &p.denied_url, false).await,
    ]
}

async fn must_not_connect(name: &'static str, addr: SocketAddr, timeout: Duration) -> Check {
    let (pass, detail) = match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => (
            false,
            format!("connected to {addr}: this pod can bypass the gateway"),
        ),
        Ok(Err(e)) => (
            true,
            format!("connect to {addr} failed ({}), as required", e.kind()),
        ),
        Err(_) => (true, format!("connect to {addr} timed out, as required")),
    };
    Check { name, pass, detail }
}

async fn dns_must_not_answer(server: SocketAddr, timeout: Duration) -> Check {
    let name = "foreign-dns";
    let bind = if server.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let sock = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            return Check {
                name,
                pass: false,
                detail: format!("cannot open a UDP socket: {e}"),
            }
        }
    };
    // A minimal query: id 0x5eed, recursion desired, one question `example.com. A IN`.
    let mut q = vec![0x5e, 0xed, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["example", "com"] {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    let answered = async {
        sock.send_to(&q, server).await?;
        let mut buf = [0u8; 512];
        let (n, _) = sock.recv_from(&mut buf).await?;
        Ok::<bool, std::io::Error>(n >= 2 && buf[..2] == q[..2])
    };
    let (pass, detail) = match tokio::time::timeout(timeout, answered).await {
        Ok(Ok(true)) => (
            false,
            format!("{server} answered a DNS query: DNS tunnelling is possible"),
        ),
        Ok(Ok(false)) => (true, format!("{server} sent no valid answer, as required")),
        Ok(Err(e)) => (
            true,
            format!("query to {server} failed ({}), as required", e.kind()),
        ),
        Err(_) => (true, format!("no answer from {server}, as required")),
    };
    Check { name, pass, detail }
}

/// Through the gateway: a CONNECT for https URLs (the tunnel's 200 is the answer; no TLS is
/// needed to know the gateway let it through), a GET for http URLs.
async fn via_gateway(name: &'static str, p: &Probe, url: &str, want_allowed: bool) -> Check {
    let fail = |detail: String| Check {
        name,
        pass: false,
        detail,
    };
    let (kind, target) = match parse_target(url) {
        Ok(t) => t,
        Err(e) => return fail(e.to_string()),
    };
    let (proxy_addr, mut auth) = match parse_proxy(&p.proxy) {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if let Some(c) = &p.credentials {
        auth = basic_header(c);
    }
    let request = match kind {
        Kind::Connect => format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n"),
        Kind::Http => {
            format!("GET {url} HTTP/1.1\r\nHost: {target}\r\n{auth}Connection: close\r\n\r\n")
        }
    };
    let exchange = async {
        let mut s = TcpStream::connect(proxy_addr.as_str()).await?;
        s.write_all(request.as_bytes()).await?;
        let mut head = Vec::with_capacity(1024);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
            if s.read(&mut byte).await? == 0 {
                break;
            }
            head.push(byte[0]);
        }
        Ok::<String, std::io::Error>(String::from_utf8_lossy(&head).into_owned())
    };
    let head = match tokio::time::timeout(p.timeout, exchange).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return fail(format!("gateway {proxy_addr} unreachable: {e}")),
        Err(_) => return fail(format!("gateway {proxy_addr} did not answer in time")),
    };
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let reason = head
        .lines()
        .find_map(|l| l.strip_prefix("chokepoint-reason: "))
        .unwrap_or("")
        .trim()
        .to_owned();
    let refused_by_gateway = !reason.is_empty();
    match (want_allowed, refused_by_gateway) {
        (true, false) if status != 0 => Check {
            name,
            pass: true,
            detail: format!("{url}: let through (status {status})"),
        },
        (true, _) => fail(format!(
            "{url}: refused (status {status}, reason {reason:?}); check the agent's policy"
        )),
        (false, true) if status == 403 => Check {
            name,
            pass: true,
            detail: format!("{url}: refused with 403 ({reason}), as required"),
        },
        (false, _) => fail(format!(
            "{url}: not refused by the gateway (status {status})"
        )),
    }
}

/// `http://[user:token@]host:port` → (`host:port`, Proxy-Authorization header line or "").
fn parse_proxy(url: &str) -> Result<(String, String), String> {
    let shown = redact(url);
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--proxy {shown}: expected http://[user:token@]host:port"))?;
    let rest = rest.trim_end_matches('/');
    let (creds, hostport) = match rest.rsplit_once('@') {
        Some((c, h)) => (Some(c), h),
        None => (None, rest),
    };
    if !hostport.contains(':') {
        return Err(format!("--proxy {shown}: needs a port"));
    }
    let auth = creds.map_or(String::new(), basic_header);
    Ok((hostport.to_owned(), auth))
}

fn basic_header(credentials: &str) -> String {
    format!(
        "Proxy-Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// The proxy URL with any token replaced, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..s + 3], &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_redacted_in_messages() {
        assert_eq!(
            redact("http://coder:s3cret@gw:3128"),
            "http://coder:***@gw:3128"
        );
        let err = parse_proxy("http://coder:s3cret@gw").unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
    }

    #[test]
    fn proxy_urls() {
        assert_eq!(
            parse_proxy("http://gw:3128").unwrap(),
            ("gw:3128".into(), String::new())
        );
        let (h, auth) = parse_proxy("http://coder:s3cret@gw.ns.svc:3128/").unwrap();
        assert_eq!(h, "gw.ns.svc:3128");
        assert_eq!(auth, "Proxy-Authorization: Basic Y29kZXI6czNjcmV0\r\n");
        assert!(parse_proxy("https://gw:3128").is_err());
        assert!(parse_proxy("http://gw").is_err());
    }
}
