//! Arbitrary bytes as an HTTP/1.1 request head, through the checks the proxy runs on it.
//!
//! The head is parsed the way hyper 1's server does it (`proto/h1/role.rs`, `Server::parse`):
//! `httparse` with the default parser config and hyper's default limits (100 headers, URI below
//! 64 KiB), the head bounded by chokepoint's read buffer at the default
//! `max_request_header_bytes`, and hyper's framing rules (Transfer-Encoding only on HTTP/1.1 and
//! ending in `chunked`; Content-Length digits only, several only if equal; Content-Length dropped
//! next to Transfer-Encoding). What hyper would refuse never reaches chokepoint, so it is skipped.
//!
//! Then `target::parse`, `target::check_host`, `target::check_framing`,
//! `target::content_length` and `forward::strip_hop_by_hop`, with these invariants:
//! * an accepted target has a non-zero port and a host that is either an IP literal or a
//!   normalised name (lower case, valid labels, no trailing dot, not numeric);
//! * rendering the target and parsing it again gives the same target;
//! * the target agrees with what `http::Uri` says the host and port are (the next hop's view);
//! * CONNECT gives `Kind::Connect`, an accepted absolute-form request gives `Kind::Http`;
//! * an absolute-form request that passes `check_host` has no Host header, or exactly one that
//!   names the same target;
//! * `check_framing` passes only when every transfer coding is `chunked`;
//! * `content_length` is the length hyper frames the body with, and `None` for chunked bodies;
//! * after `strip_hop_by_hop` no hop-by-hop header is left, nor Content-Length next to
//!   Transfer-Encoding.
use chokepoint::proxy::forward;
use chokepoint::target::{self, Host, Kind, Target};
use http::header::{HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{HeaderMap, Method, Request, Uri, Version};

/// hyper's `DEFAULT_MAX_HEADERS`.
const MAX_HEADERS: usize = 100;
/// hyper's `MAX_URI_LEN`.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;
/// chokepoint's read buffer with the default `max_request_header_bytes` (32 KiB + 8 KiB).
const MAX_HEAD: usize = 40 * 1024;
/// hyper's `DecodedLength::MAX_LEN`.
const MAX_BODY_LEN: u64 = u64::MAX - 2;

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "proxy-authorization",
    "proxy-authenticate",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// How hyper frames the request body.
#[derive(Debug, PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Check one input; panics on a broken invariant.
pub(crate) fn run(data: &[u8]) {
    let Some((req, framing)) = parse_like_hyper(data) else {
        return;
    };
    let parsed = target::parse(req.method(), req.uri());
    if let Ok((kind, t)) = &parsed {
        check_target(*kind, t, req.method(), req.uri());
    }

    // The proxy runs these for absolute-form requests; they must never panic on anything.
    let authority = req.uri().authority().map_or("", |a| a.as_str());
    let host = parsed
        .as_ref()
        .ok()
        .map(|(_, t)| target::check_host(req.headers(), t, authority));
    let framing_ok = target::check_framing(req.headers()).is_ok();
    let length = target::content_length(req.headers());

    if let (Ok((Kind::Http, t)), Some(Ok(()))) = (&parsed, &host) {
        let hosts: Vec<&HeaderValue> = req.headers().get_all(HOST).iter().collect();
        assert!(hosts.len() <= 1, "two Host headers accepted");
        if let Some(v) = hosts.first() {
            let s = v.to_str().expect("accepted Host header is not text");
            let h = target::parse_authority(s, Some(80)).expect("accepted Host header fails");
            assert_eq!(&h, t, "Host header {s:?} disagrees with the target");
        }
    }

    if framing_ok {
        for v in req.headers().get_all(TRANSFER_ENCODING) {
            let s = v.to_str().expect("accepted Transfer-Encoding is not text");
            for coding in s.split(',') {
                assert!(
                    coding
                        .trim_matches([' ', '\t'])
                        .eq_ignore_ascii_case("chunked"),
                    "Transfer-Encoding {s:?} accepted"
                );
            }
        }
    }

    match framing {
        Framing::Length(n) => assert_eq!(length, Some(n), "Content-Length disagrees with hyper"),
        Framing::Chunked | Framing::None => assert_eq!(length, None, "length without framing"),
    }

    let had_te = req.headers().contains_key(TRANSFER_ENCODING);
    let mut stripped = req.headers().clone();
    forward::strip_hop_by_hop(&mut stripped);
    for name in HOP_BY_HOP {
        assert!(!stripped.contains_key(name), "{name} left after stripping");
    }
    if had_te {
        assert!(!stripped.contains_key(CONTENT_LENGTH));
    }
    for v in req.headers().get_all(CONNECTION) {
        let Ok(s) = v.to_str() else { continue };
        for token in s.split(',') {
            if let Ok(name) = HeaderName::from_bytes(token.trim().as_bytes()) {
                assert!(
                    !stripped.contains_key(&name),
                    "{name} named by Connection left"
                );
            }
        }
    }
}

/// Invariants of an accepted target.
fn check_target(kind: Kind, t: &Target, method: &Method, uri: &Uri) {
    assert_ne!(t.port, 0, "port 0 accepted");
    assert_eq!(kind == Kind::Connect, method == Method::CONNECT);
    if kind == Kind::Http {
        let scheme = uri.scheme_str().expect("absolute-form without scheme");
        assert!(scheme.eq_ignore_ascii_case("http"), "scheme {scheme}");
    }
    if let Host::Name(n) = &t.host {
        check_name(n);
    }
    // Idempotent: the rendered target parses to itself.
    let rendered = t.to_string();
    let again = target::parse_authority(&rendered, None)
        .unwrap_or_else(|e| panic!("rendered target {rendered:?} refused: {e:?}"));
    assert_eq!(&again, t, "rendering {rendered:?} is not stable");

    // The next hop's view of the same URI: http's own host/port split.
    let authority = uri.authority().expect("accepted target without authority");
    let host = authority.host();
    match &t.host {
        Host::Ip(std::net::IpAddr::V6(ip)) => {
            let inner = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .expect("IPv6 target not bracketed in the URI");
            assert_eq!(inner.parse::<std::net::Ipv6Addr>().ok(), Some(*ip));
        }
        Host::Ip(std::net::IpAddr::V4(ip)) => {
            assert_eq!(host.parse::<std::net::Ipv4Addr>().ok(), Some(*ip), "{host}");
        }
        Host::Name(n) => {
            let h = target::normalise_host(host).expect("URI host refused alone");
            assert_eq!(h.as_name(), Some(&**n), "URI host {host:?}");
        }
    }
    let default = if kind == Kind::Connect {
        None
    } else {
        Some(80)
    };
    assert_eq!(
        authority.port_u16().or(default),
        Some(t.port),
        "http sees another port in {authority}"
    );
}

/// A normalised name, checked from scratch.
fn check_name(n: &str) {
    assert!(!n.is_empty() && n.len() <= 253, "name length {}", n.len());
    assert!(!n.ends_with('.'), "trailing dot in {n:?}");
    assert!(
        n.parse::<std::net::Ipv4Addr>().is_err(),
        "{n:?} is an IPv4 address"
    );
    let labels: Vec<&str> = n.split('.').collect();
    for l in &labels {
        assert!((1..=63).contains(&l.len()), "label {l:?} in {n:?}");
        assert!(
            l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'),
            "label {l:?} in {n:?}"
        );
        assert!(!l.starts_with('-') && !l.ends_with('-'), "label {l:?}");
    }
    let last = labels.last().copied().unwrap_or_default();
    assert!(
        !last.bytes().all(|b| b.is_ascii_digit()),
        "numeric last label in {n:?}"
    );
}

/// hyper 1's `Server::parse`, reduced to what decides acceptance and the header map.
fn parse_like_hyper(buf: &[u8]) -> Option<(Request<()>, Framing)> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match httparse::ParserConfig::default().parse_request(&mut req, buf) {
        Ok(httparse::Status::Complete(len)) => len,
        _ => return None,
    };
    if len > MAX_HEAD {
        return None; // hyper: "message head is too large" (431)
    }
    let path = req.path?;
    if path.len() > MAX_URI_LEN {
        return None;
    }
    let method = Method::from_bytes(req.method?.as_bytes()).ok()?;
    let version = if req.version? == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    if req.headers.iter().any(|h| h.name.len() >= 1 << 16) {
        return None;
    }
    let uri = Uri::try_from(path).ok()?;

    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let mut framing = Framing::None;
    let (mut is_te, mut is_cl, mut chunked) = (false, false, false);
    let mut con_len: Option<u64> = None;
    for h in req.headers.iter() {
        // hyper panics here in debug builds: httparse's tokens must be valid header names.
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .unwrap_or_else(|e| panic!("httparse name {:?} is no HeaderName: {e}", h.name));
        let value = HeaderValue::from_bytes(h.value)
            .unwrap_or_else(|e| panic!("httparse value {:?} is no HeaderValue: {e}", h.value));
        if name == TRANSFER_ENCODING {
            if version != Version::HTTP_11 {
                return None;
            }
            is_te = true;
            if is_cl && con_len.take().is_some() {
                headers.remove(CONTENT_LENGTH);
            }
            chunked = value
                .to_str()
                .ok()
                .and_then(|s| s.rsplit(',').next())
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"));
            if chunked {
                framing = Framing::Chunked;
            }
        } else if name == CONTENT_LENGTH {
            is_cl = true;
            if is_te {
                continue;
            }
            let n = digits(value.as_bytes())?;
            if let Some(prev) = con_len {
                if prev != n {
                    return None;
                }
                continue;
            }
            if n > MAX_BODY_LEN {
                return None;
            }
            framing = Framing::Length(n);
            con_len = Some(n);
        }
        headers.append(name, value);
    }
    if is_te && !chunked {
        return None;
    }
    let mut request = Request::new(());
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    Some((request, framing))
}

/// hyper's `from_digits`: ASCII digits only, no sign, no overflow.
fn digits(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |acc, &b| match b {
        b'0'..=b'9' => acc.checked_mul(10)?.checked_add(u64::from(b - b'0')),
        _ => None,
    })
}
