//! Step 2: the request target, parsed and normalised once.
//!
//! A [`Target`] is the only form in which a destination travels through the pipeline. Its
//! [`Host`] is already normalised (lower case, one trailing dot dropped, IDNs as punycode), so the
//! allowlist compares bytes and never re-interprets text. Everything that could make two parsers
//! disagree about the destination is refused here with 400: userinfo, percent-encoding, zone ids,
//! and every non-canonical spelling of an IPv4 address (`2130706433`, `0x7f.1`, `127.1`, `0177.0.0.1`)
//! that a resolver or libc might still turn into an address.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING, UPGRADE};
use http::{HeaderMap, Method, Uri, Version};

use crate::outcome::{Deny, Reason};

/// Longest name DNS can carry (RFC 1035 §2.3.4, without the root dot): the longest `host` an
/// audit line can hold.
pub const MAX_NAME_LEN: usize = 253;

/// Longest request method accepted, and written to an audit line or a response. The longest
/// registered method (`UPDATEREDIRECTREF`) has 17 bytes; hyper accepts any token up to its
/// buffer size, so without this bound one request could write a 30 KB method into the audit log.
pub const MAX_METHOD_BYTES: usize = 32;
/// Longest DNS label.
const MAX_LABEL_LEN: usize = 63;

/// A normalised destination host.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Host {
    /// A DNS name: lower-case ASCII (IDNs in punycode), no trailing dot, valid labels.
    Name(Box<str>),
    /// An IP literal.
    Ip(IpAddr),
}

/// A normalised destination: host and port.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// The host, normalised.
    pub host: Host,
    /// The TCP port, never 0.
    pub port: u16,
}

/// What kind of proxy request the client sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `CONNECT host:port`: a TCP tunnel.
    Connect,
    /// An absolute-form request (`GET http://host/path`): forwarded as plain HTTP.
    Http,
}

// === impl Kind ===

impl Kind {
    /// The token used in the audit line's `event` field.
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Connect => "connect",
            Kind::Http => "http",
        }
    }
}

/// Classify a request and parse its target.
///
/// CONNECT needs authority-form (`host:port`, port mandatory); every other method needs
/// absolute-form with the `http` scheme (default port 80). Origin-form requests are refused with
/// `not_proxy_request`: the client is talking to the proxy as if it were the origin.
pub fn parse(method: &Method, uri: &Uri) -> Result<(Kind, Target), Deny> {
    if method.as_str().len() > MAX_METHOD_BYTES {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "request method longer than 32 bytes",
        ));
    }
    if method == Method::CONNECT {
        let authority = match (uri.scheme(), uri.authority()) {
            (None, Some(a)) => a.as_str(),
            _ => {
                return Err(Deny::new(
                    Reason::MalformedRequest,
                    "CONNECT needs an authority-form target (host:port)",
                ))
            }
        };
        return parse_authority(authority, None).map(|t| (Kind::Connect, t));
    }
    let Some(scheme) = uri.scheme_str() else {
        return Err(Deny::new(
            Reason::NotProxyRequest,
            "this is a forward proxy: send absolute-form requests (GET http://host/path) or CONNECT host:port",
        ));
    };
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(Deny::new(
            Reason::UnsupportedScheme,
            "only http:// URLs are forwarded; use CONNECT for https",
        ));
    }
    let Some(authority) = uri.authority() else {
        return Err(Deny::new(Reason::MalformedRequest, "URL has no host"));
    };
    parse_authority(authority.as_str(), Some(80)).map(|t| (Kind::Http, t))
}

/// `method` as a request context records it: cut to [`MAX_METHOD_BYTES`] (a prefix of a token
/// is a token, so the cut method is still one). `None` only if that ever failed.
pub fn recorded_method(method: Method) -> Option<Method> {
    match method.as_str().as_bytes().get(..MAX_METHOD_BYTES) {
        Some(head) if method.as_str().len() > MAX_METHOD_BYTES => Method::from_bytes(head).ok(),
        _ => Some(method),
    }
}

/// Parse `host[:port]` (or `[v6][:port]`). Without a port, `default_port` applies; `None` makes
/// the port mandatory.
pub fn parse_authority(authority: &str, default_port: Option<u16>) -> Result<Target, Deny> {
    if authority.contains('@') {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "userinfo (user@) in the target is not allowed",
        ));
    }
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let Some((inside, after)) = rest.split_once(']') else {
            return Err(Deny::new(
                Reason::MalformedRequest,
                "unclosed [ in IPv6 target",
            ));
        };
        if inside.contains('%') {
            return Err(Deny::new(
                Reason::MalformedRequest,
                "IPv6 zone ids are not allowed in a target",
            ));
        }
        let ip: Ipv6Addr = inside
            .parse()
            .map_err(|_| Deny::new(Reason::MalformedRequest, "invalid IPv6 address in target"))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(Deny::new(
                Reason::MalformedRequest,
                "junk after ] in target",
            ))?),
        };
        (Host::Ip(IpAddr::V6(ip)), port)
    } else {
        let (h, p) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        (normalise_host(h)?, p)
    };
    let port = match (port, default_port) {
        (Some(p), _) => parse_port(p)?,
        (None, Some(d)) => d,
        (None, None) => {
            return Err(Deny::new(
                Reason::MalformedRequest,
                "CONNECT target needs a port (host:port)",
            ))
        }
    };
    Ok(Target { host, port })
}

/// Normalise a host as written by a client or in a config rule.
///
/// Returns `Host::Ip` only for the one canonical dotted-quad IPv4 form; IPv6 literals come
/// bracketed and are handled by [`parse_authority`].
pub fn normalise_host(raw: &str) -> Result<Host, Deny> {
    if raw.is_empty() {
        return Err(Deny::new(Reason::MalformedRequest, "empty host"));
    }
    // std's parser accepts exactly a.b.c.d with decimal octets and no leading zeros.
    if let Ok(v4) = raw.parse::<Ipv4Addr>() {
        return Ok(Host::Ip(IpAddr::V4(v4)));
    }
    if raw.contains('%') {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "percent-encoded hosts are not allowed",
        ));
    }
    let trimmed = raw.strip_suffix('.').unwrap_or(raw);
    let name = if is_plain_lower_ascii(trimmed) {
        trimmed.to_owned()
    } else {
        idna::domain_to_ascii(trimmed)
            .map_err(|_| Deny::new(Reason::MalformedRequest, "host is not a valid domain name"))?
    };
    check_name(&name)?;
    Ok(Host::Name(name.into_boxed_str()))
}

fn parse_port(p: &str) -> Result<u16, Deny> {
    if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "invalid port in target",
        ));
    }
    match p.parse::<u16>() {
        Ok(0) | Err(_) => Err(Deny::new(
            Reason::MalformedRequest,
            "port out of range 1-65535",
        )),
        Ok(n) => Ok(n),
    }
}

/// The fast path: names that are already normalised need no IDNA pass.
fn is_plain_lower_ascii(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'_'))
        && !s.contains("xn--")
}

/// Label syntax after normalisation, and the rule that a name whose last label is numeric is an
/// IPv4 address in disguise (the WHATWG URL parser and many resolvers treat it as one).
fn check_name(name: &str) -> Result<(), Deny> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "host name length out of range",
        ));
    }
    let mut last = "";
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= MAX_LABEL_LEN
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !ok {
            return Err(Deny::new(
                Reason::MalformedRequest,
                "host is not a valid domain name",
            ));
        }
        last = label;
    }
    if looks_numeric(last) {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "non-canonical IP address form; write IPv4 as a.b.c.d",
        ));
    }
    Ok(())
}

fn looks_numeric(label: &str) -> bool {
    let hex = label.strip_prefix("0x");
    match hex {
        Some(h) => h.bytes().all(|b| b.is_ascii_hexdigit()),
        None => label.bytes().all(|b| b.is_ascii_digit()),
    }
}

// === impl Host ===

impl Host {
    /// The name, if this is not an IP literal.
    pub fn as_name(&self) -> Option<&str> {
        match self {
            Host::Name(n) => Some(n),
            Host::Ip(_) => None,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Name(n) => f.write_str(n),
            Host::Ip(IpAddr::V4(ip)) => write!(f, "{ip}"),
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
        }
    }
}

// === impl Target ===

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

// === Request head ===
//
// What the head of a plain-HTTP request must satisfy besides its target: checked with the target,
// before any agent is identified, so that the audit line, the allowlist and the next hop all see
// one destination and one framing.

/// Refuse a request whose `Host` header names another destination than its absolute-form target
/// (two parsers, two answers: the classic smuggling and cache-poisoning set-up). `authority` is
/// the request target's authority, which `target` was parsed from.
pub fn check_host(headers: &HeaderMap, target: &Target, authority: &str) -> Result<(), Deny> {
    let mut hosts = headers.get_all(HOST).iter();
    let Some(value) = hosts.next() else {
        return Ok(());
    };
    if hosts.next().is_some() {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "more than one Host header",
        ));
    }
    // The usual case: the same text as the target's authority parses to the same target.
    if value.as_bytes() == authority.as_bytes() {
        return Ok(());
    }
    let parsed = value
        .to_str()
        .ok()
        .and_then(|v| parse_authority(v, Some(80)).ok());
    match parsed {
        Some(h) if h == *target => Ok(()),
        _ => Err(Deny::new(
            Reason::HostMismatch,
            "Host header does not match the request target",
        )),
    }
}

/// Refuse transfer codings other than `chunked`: hyper removes only the chunked framing, so a
/// `gzip, chunked` body would reach the next hop still gzip-coded but labelled as plain.
pub fn check_framing(headers: &HeaderMap) -> Result<(), Deny> {
    let only_chunked = headers
        .get_all(TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .all(|coding| coding.trim().eq_ignore_ascii_case("chunked"));
    if only_chunked {
        Ok(())
    } else {
        Err(Deny::new(
            Reason::MalformedRequest,
            "unsupported Transfer-Encoding: only chunked is forwarded",
        ))
    }
}

/// Refuse a CONNECT in HTTP/1.0 that carries an `Upgrade` header, before anything is dialled.
///
/// RFC 9110 §7.8 has a server ignore `Upgrade` in an HTTP/1.0 request, and hyper does: but in
/// ignoring it, it also drops the upgrade a CONNECT is (`wants_upgrade` is reset for any
/// `Upgrade` header outside HTTP/1.1), so it would send our 200 and then close the connection
/// instead of handing it over: a dial and an `allow` line for a tunnel that never carries a
/// byte. Refused, the client learns what to send instead (HTTP/1.1, or no `Upgrade`).
pub fn check_connect(version: Version, headers: &HeaderMap) -> Result<(), Deny> {
    if version != Version::HTTP_11 && headers.contains_key(UPGRADE) {
        return Err(Deny::new(
            Reason::MalformedRequest,
            "a CONNECT in HTTP/1.0 with an Upgrade header cannot become a tunnel: send it as HTTP/1.1, or without Upgrade",
        ));
    }
    Ok(())
}

/// Size of the request head as sent: `METHOD SP target SP HTTP/1.1 CRLF`, each header line
/// with its `: ` and CRLF, and the final CRLF. Computed without allocating.
pub fn head_bytes<B>(req: &http::Request<B>) -> u64 {
    let uri = req.uri();
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    let line = req.method().as_str().len() + 1 + target + 1 + "HTTP/1.1\r\n".len();
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    (line + headers + 2) as u64
}

/// The declared `Content-Length`, if present and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

#[cfg(test)]
mod tests;
