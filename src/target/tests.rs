use super::*;
use http::HeaderValue;
use proptest::prelude::*;

fn name(s: &str) -> Host {
    Host::Name(s.into())
}

#[test]
fn authority_table() {
    let ok: &[(&str, Option<u16>, Host, u16)] = &[
        ("example.com:443", None, name("example.com"), 443),
        ("EXAMPLE.com:443", None, name("example.com"), 443),
        ("example.com.:443", None, name("example.com"), 443),
        ("example.com", Some(80), name("example.com"), 80),
        (
            "b\u{fc}cher.example:443",
            None,
            name("xn--bcher-kva.example"),
            443,
        ),
        (
            "xn--bcher-kva.example:443",
            None,
            name("xn--bcher-kva.example"),
            443,
        ),
        ("_acme.example.com:80", None, name("_acme.example.com"), 80),
        (
            "203.0.113.7:443",
            None,
            Host::Ip("203.0.113.7".parse().unwrap()),
            443,
        ),
        (
            "[2001:db8::1]:443",
            None,
            Host::Ip("2001:db8::1".parse().unwrap()),
            443,
        ),
        ("[::1]", Some(80), Host::Ip("::1".parse().unwrap()), 80),
        ("example.com:65535", None, name("example.com"), 65535),
    ];
    for (input, default, host, port) in ok {
        let t = parse_authority(input, *default).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(&t.host, host, "{input}");
        assert_eq!(t.port, *port, "{input}");
    }
}

#[test]
fn authority_rejects() {
    let bad: &[(&str, &str)] = &[
        ("example.com", "CONNECT without port"),
        ("example.com:0", "port zero"),
        ("example.com:65536", "port too big"),
        ("example.com:+443", "signed port"),
        ("example.com:", "empty port"),
        ("user@example.com:443", "userinfo"),
        ("user:pw@example.com:443", "userinfo with password"),
        ("exa%6dple.com:443", "percent-encoding"),
        ("[fe80::1%25eth0]:443", "zone id"),
        ("[fe80::1:443", "unclosed bracket"),
        ("[::1]x:443", "junk after bracket"),
        ("2130706433:443", "decimal IPv4"),
        ("0x7f.1:443", "hex short IPv4"),
        ("0x7f000001:443", "hex IPv4"),
        ("127.1:443", "short IPv4"),
        ("0177.0.0.1:443", "octal IPv4"),
        ("127.0.0.01:443", "leading zero octet"),
        (":443", "empty host"),
        ("a..b:443", "empty label"),
        ("example.com..:443", "two trailing dots"),
        ("-a.example.com:443", "leading hyphen"),
        ("a b.example.com:443", "space"),
        ("exa\u{0}mple.com:443", "NUL"),
    ];
    for (input, why) in bad {
        assert!(
            parse_authority(input, None).is_err(),
            "{why}: {input} was accepted"
        );
    }
}

#[test]
fn long_names() {
    let label = "a".repeat(63);
    let ok = format!("{label}.{label}.{label}.{}.com", "a".repeat(57));
    assert_eq!(ok.len(), 253);
    assert!(normalise_host(&ok).is_ok());
    assert!(normalise_host(&format!("a{ok}")).is_err());
    assert!(normalise_host(&format!("{}.com", "a".repeat(64))).is_err());
}

#[test]
fn request_forms() {
    let connect = Method::CONNECT;
    let get = Method::GET;
    let t = |m: &Method, u: &str| parse(m, &u.parse::<Uri>().unwrap());
    assert_eq!(t(&connect, "example.com:443").unwrap().0, Kind::Connect);
    let (k, tg) = t(&get, "http://Example.com/x?y").unwrap();
    assert_eq!((k, tg.port), (Kind::Http, 80));
    assert_eq!(t(&get, "http://example.com:8080/").unwrap().1.port, 8080);
    assert_eq!(
        t(&get, "/path").unwrap_err().reason,
        Reason::NotProxyRequest
    );
    assert_eq!(
        t(&get, "https://example.com/").unwrap_err().reason,
        Reason::UnsupportedScheme
    );
    assert_eq!(
        t(&connect, "/path").unwrap_err().reason,
        Reason::MalformedRequest
    );
}

proptest! {
    /// Normalisation is idempotent: a normalised name normalises to itself.
    #[test]
    fn normalise_idempotent(s in "[a-zA-Z0-9\u{e0}-\u{ff}-]{1,20}(\\.[a-zA-Z0-9-]{1,20}){0,3}\\.?") {
        if let Ok(Host::Name(n)) = normalise_host(&s) {
            prop_assert_eq!(normalise_host(&n).unwrap(), Host::Name(n.clone()));
            prop_assert!(!n.ends_with('.'));
            prop_assert!(n.bytes().all(|b| !b.is_ascii_uppercase()));
        }
    }

    /// Case and one trailing dot never change the result.
    #[test]
    fn case_and_dot_insensitive(s in "[a-z][a-z0-9-]{0,10}[a-z](\\.[a-z]{2,8}){1,3}") {
        let upper = s.to_ascii_uppercase();
        let dotted = format!("{s}.");
        prop_assert_eq!(normalise_host(&s).unwrap(), normalise_host(&upper).unwrap());
        prop_assert_eq!(normalise_host(&s).unwrap(), normalise_host(&dotted).unwrap());
    }

    /// No input panics, and any accepted name is valid ASCII DNS syntax.
    #[test]
    fn never_panics(s in "\\PC{0,80}") {
        if let Ok(t) = parse_authority(&s, Some(80)) {
            if let Host::Name(n) = t.host {
                prop_assert!(n.len() <= MAX_NAME_LEN);
                prop_assert!(n.is_ascii());
            }
        }
    }
}

#[test]
fn only_chunked_transfer_coding_passes() {
    let te = |v: &'static str| {
        let mut h = HeaderMap::new();
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static(v));
        check_framing(&h).is_ok()
    };
    assert!(te("chunked"));
    assert!(te("Chunked"));
    assert!(!te("gzip, chunked"));
    assert!(!te("chunked, identity"));
    assert!(check_framing(&HeaderMap::new()).is_ok());
}

#[test]
fn host_must_agree() {
    let t = parse_authority("example.com", Some(80)).unwrap();
    let with = |v: &'static str| {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_static(v));
        check_host(&h, &t, "example.com")
    };
    assert!(with("example.com").is_ok());
    assert!(with("EXAMPLE.com:80").is_ok());
    assert!(with("example.com.").is_ok());
    assert_eq!(with("evil.test").unwrap_err().reason, Reason::HostMismatch);
    assert_eq!(
        with("example.com:8080").unwrap_err().reason,
        Reason::HostMismatch
    );
    assert!(check_host(&HeaderMap::new(), &t, "example.com").is_ok());
    let mut two = HeaderMap::new();
    two.append(HOST, HeaderValue::from_static("example.com"));
    two.append(HOST, HeaderValue::from_static("example.com"));
    assert_eq!(
        check_host(&two, &t, "example.com").unwrap_err().reason,
        Reason::MalformedRequest
    );
}

#[test]
fn connect_with_upgrade_needs_http_1_1() {
    let mut h = HeaderMap::new();
    assert!(check_connect(Version::HTTP_10, &h).is_ok());
    h.insert(http::header::UPGRADE, "websocket".parse().unwrap());
    assert!(check_connect(Version::HTTP_11, &h).is_ok());
    let deny = check_connect(Version::HTTP_10, &h).unwrap_err();
    assert_eq!(deny.reason, Reason::MalformedRequest);
}

#[test]
fn methods_longer_than_32_bytes_are_refused_and_recorded_cut() {
    let uri: Uri = "http://example.com/".parse().unwrap();
    let longest = Method::from_bytes(&[b'M'; MAX_METHOD_BYTES]).unwrap();
    assert!(parse(&longest, &uri).is_ok());
    let over = Method::from_bytes(&[b'M'; 30_000]).unwrap();
    let deny = parse(&over, &uri).unwrap_err();
    assert_eq!(deny.reason, Reason::MalformedRequest);
    let recorded = recorded_method(over).unwrap();
    assert_eq!(recorded.as_str(), "M".repeat(MAX_METHOD_BYTES));
    assert_eq!(recorded_method(Method::GET), Some(Method::GET));
}
