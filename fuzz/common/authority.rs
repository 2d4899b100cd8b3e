//! Arbitrary text as a CONNECT authority (`host:port`), an absolute-form authority (port 80 by
//! default) and a bare host, straight into the target normaliser.
//!
//! Invariants:
//! * never panics;
//! * an accepted target has a non-zero port and a normalised host (lower case, valid labels, no
//!   trailing dot, not numeric), and its rendering parses to the same target (idempotent);
//! * normalising a normalised name gives it back unchanged;
//! * IP literals round-trip: an IPv4 host renders as std prints it, an IPv6 one as `[std form]`;
//! * with and without a default port the parser agrees whenever the input names a port, and a
//!   mandatory-port parse never accepts what the default-port parse refuses;
//! * the host chosen alone (`normalise_host`) equals the host of `host:port`.
use std::net::IpAddr;

use chokepoint::target::{self, Host, Target};

/// Check one input; panics on a broken invariant.
pub(crate) fn run(s: &str) {
    let connect = target::parse_authority(s, None);
    let http = target::parse_authority(s, Some(80));
    match (&connect, &http) {
        (Ok(c), Ok(h)) => assert_eq!(c, h, "a port was given, the default must not matter"),
        (Ok(c), Err(_)) => panic!("{s:?}: accepted without default port ({c}) but not with it"),
        _ => {}
    }
    for t in [&connect, &http].into_iter().flatten() {
        check(s, t);
    }
    if let Ok(h) = target::normalise_host(s) {
        if let Host::Name(n) = &h {
            check_name(n);
        }
        // The host alone, given a port, is the same host.
        if !s.starts_with('[') && !s.contains(':') {
            let t = target::parse_authority(&format!("{s}:443"), None)
                .unwrap_or_else(|e| panic!("{s:?} normalises alone but not as {s}:443: {e:?}"));
            assert_eq!(t.host, h);
        }
    }
}

fn check(input: &str, t: &Target) {
    assert_ne!(t.port, 0, "{input:?}: port 0");
    let rendered = t.to_string();
    let again = target::parse_authority(&rendered, None)
        .unwrap_or_else(|e| panic!("{input:?}: rendering {rendered:?} refused: {e:?}"));
    assert_eq!(&again, t, "{input:?}: not idempotent via {rendered:?}");
    match &t.host {
        Host::Name(n) => {
            check_name(n);
            let again = target::normalise_host(n)
                .unwrap_or_else(|e| panic!("{input:?}: normalised {n:?} refused: {e:?}"));
            assert_eq!(
                again.as_name(),
                Some(&**n),
                "{input:?}: normalising {n:?} again"
            );
        }
        Host::Ip(IpAddr::V4(ip)) => {
            assert_eq!(rendered, format!("{ip}:{}", t.port));
            // Only the canonical dotted quad is an IPv4 literal.
            let host = input.rsplit_once(':').map_or(input, |(h, _)| h);
            assert_eq!(
                host,
                ip.to_string(),
                "{input:?}: non-canonical IPv4 accepted"
            );
        }
        Host::Ip(IpAddr::V6(ip)) => {
            assert_eq!(rendered, format!("[{ip}]:{}", t.port));
            assert!(
                input.starts_with('['),
                "{input:?}: unbracketed IPv6 accepted"
            );
        }
    }
}

/// A normalised name, checked from scratch.
fn check_name(n: &str) {
    assert!(!n.is_empty() && n.len() <= 253, "name length {}", n.len());
    assert!(!n.ends_with('.'), "trailing dot in {n:?}");
    assert!(n.parse::<std::net::Ipv4Addr>().is_err(), "{n:?} is IPv4");
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
