//! Issue #6: "no allocation on the lookup path". The benches measure time; this proves the other
//! half. A counting global allocator (per-thread counters, so the harness's other threads never
//! count) watches only the call under test, and any heap operation there fails the test:
//!
//! - `Allowlist::check` (and `Policy::check` on a hit, which is what the data path calls) at 10
//!   and 10,000 rules built as `benches/allowlist.rs` builds them: exact hit, wildcard hit, miss,
//!   known host on the wrong port. 100,000 rules take about 0.9 s to build in a debug build, too
//!   slow for this file; a hit and a miss tried there by hand allocated nothing either.
//! - `Vetter::check_with`, the pure per-address decision of `vet`, for allowed and denied IPv4
//!   and IPv6 addresses, through the built-in ranges, `deny_cidrs`, `allow_cidrs` and a policy's
//!   own exception.
//!
//! Measured with the same counter while writing this, and deliberately not asserted (none is the
//! lookup issue #6 is about):
//! - Target parsing allocates for names: `parse_authority` / `target::parse` make one allocation
//!   for a normalised name (the `Box<str>` in `Host::Name`); a name that needs normalising
//!   (upper case, trailing dot, IDN) goes through `idna` and adds three reallocations. IP
//!   literals (v4 and bracketed v6) parse without allocating.
//! - `Policy::check` on a refusal allocates once: the `Deny` detail is a `format!` (`#[cold]`).
//! - `Vetter::vet` allocates: one `Vec<VettedAddr>` when an address passes, and that `Vec` plus
//!   the refusal's `format!` detail (2 allocations, sometimes a reallocation) when none does.
//!
//! The counter is the `allocation-counter` dev-dependency (it installs itself as this test
//! binary's global allocator and counts per thread): this crate forbids unsafe code, and a
//! `GlobalAlloc` impl is unsafe.

#![allow(clippy::unwrap_used)] // setup failures may panic

use std::hint::black_box;
use std::net::IpAddr;

use chokepoint::limits::Limits;
use chokepoint::policy::{parse_rule, Allowlist, Denylist, Miss, Mode, Policy};
use chokepoint::target::{parse_authority, Kind};
use chokepoint::vet::Vetter;
/// Run `f` with the counter armed; fail if it allocated (or reallocated) anything.
fn assert_no_alloc<R>(what: &str, f: impl FnOnce() -> R) -> R {
    let mut out = None;
    let info = allocation_counter::measure(|| out = Some(f()));
    assert_eq!(info.count_total, 0, "{what} allocated: {info:?}");
    out.unwrap()
}

/// The counter is really installed: a box counts as one allocation.
fn assert_counting() {
    let info = allocation_counter::measure(|| drop(black_box(Box::new(1u64))));
    assert_eq!(
        info.count_total, 1,
        "allocation counter not installed: {info:?}"
    );
}

/// The policy of `benches/allowlist.rs`: half exact names, half `*.` wildcards.
fn policy(n: usize) -> Policy {
    let mut allowlist = Allowlist::default();
    for i in 0..n {
        let rule = if i % 2 == 0 {
            format!("api{i}.svc{i}.example")
        } else {
            format!("*.cdn{i}.example")
        };
        let (pattern, port) = parse_rule(&rule).unwrap();
        allowlist.insert(&rule, pattern, port);
    }
    Policy {
        name: "bench".into(),
        allowlist,
        deny: Denylist::default(),
        limits: Limits::default(),
        mode: Mode::Enforce,
        allow_cidrs: Vec::new(),
        intercept: Default::default(),
    }
}

#[test]
fn allowlist_lookup_does_not_allocate() {
    assert_counting();
    for n in [10, 10_000] {
        let policy = policy(n);
        let (e, w) = (n / 2 * 2 - 2, n - 1); // the last exact and the last wildcard rule
        let exact = format!("api{e}.svc{e}.example");
        let wildcard = format!("*.cdn{w}.example");
        let cases = [
            ("exact hit", format!("{exact}:443"), Ok(exact.as_str())),
            (
                "wildcard hit",
                format!("a.b.cdn{w}.example:443"),
                Ok(&wildcard),
            ),
            ("miss", "exfil.attacker.test:443".into(), Err(Miss::Host)),
            ("wrong port", format!("{exact}:8443"), Err(Miss::Port)),
        ];
        for (case, authority, want) in cases {
            // Parsed before arming: parsing is not the lookup path (it allocates; see above).
            let target = parse_authority(&authority, None).unwrap();
            let got = assert_no_alloc(&format!("{case} at {n} rules"), || {
                policy
                    .allowlist
                    .check(Kind::Connect, black_box(&target))
                    .map(|rule| &*rule.text)
            });
            assert_eq!(got, want, "{case} at {n} rules");
            if want.is_ok() {
                let allowed =
                    assert_no_alloc(&format!("Policy::check {case} at {n} rules"), || {
                        policy.check(Kind::Connect, black_box(&target)).is_ok()
                    });
                assert!(allowed);
            }
        }
    }
}

#[test]
fn address_vetting_decision_does_not_allocate() {
    assert_counting();
    // Pure values handed to the decision, no traffic; every address is a loopback form, so the
    // built-in loopback ranges stand in for "internal" and allow_cidrs carve exceptions in them.
    let vetter = Vetter::new(
        vec!["127.0.9.0/24".parse().unwrap()],
        vec!["127.0.0.0/16".parse().unwrap(), "::1/128".parse().unwrap()],
        vec!["127.0.0.1:3128".parse().unwrap()],
    );
    let policy_allow = ["127.1.5.0/24".parse().unwrap()];
    let cases = [
        ("127.0.1.1", true),  // built-in loopback, but in allow_cidrs
        ("127.1.5.5", true),  // built-in loopback, but in the policy's allow_cidrs
        ("127.2.0.1", false), // built-in: loopback
        ("127.0.9.1", false), // deny_cidrs, longer than the allow range around it
        // In allow_cidrs, but also the IPv4-compatible form of 0.0.0.1, which is refused.
        ("::1", false),
        ("::ffff:127.0.1.1", true), // IPv4-mapped, judged as the IPv4 address
        ("::ffff:127.2.0.1", false), // IPv4-mapped loopback
        ("2002:7f02::1", false),    // 6to4 carrying 127.2.0.0
    ];
    for (addr, want) in cases {
        let ip: IpAddr = addr.parse().unwrap();
        let allowed = assert_no_alloc(&format!("vetting {addr}"), || {
            vetter
                .check_with(black_box(ip), 443, black_box(&policy_allow))
                .is_ok()
        });
        assert_eq!(allowed, want, "{addr}");
    }
}

#[path = "../benches/fixtures/denylist.rs"]
mod deny_fixture;

/// An open-web policy denying the synthetic list of `n` entries (`benches/allowlist.rs`'s).
fn open_web(n: usize) -> Policy {
    let set = chokepoint::policy::deny_file::parse(&deny_fixture::text(n)).unwrap();
    let file = std::sync::Arc::new(chokepoint::policy::DenyFile {
        shown: "bench.txt".into(),
        path: "bench.txt".into(),
        set,
    });
    Policy {
        name: "web".into(),
        allowlist: Allowlist::open_web("*", None),
        deny: Denylist::new(Default::default(), vec![file]),
        limits: Limits::default(),
        mode: Mode::Enforce,
        allow_cidrs: Vec::new(),
        intercept: Default::default(),
    }
}

#[test]
fn deny_lookup_does_not_allocate() {
    assert_counting();
    for n in [10, 10_000] {
        let policy = open_web(n);
        let wild = deny_fixture::name(7); // line 8 is `*.` + this name
        let cases = [
            (
                "exact hit",
                format!("{}:443", deny_fixture::name(n - 2)),
                true,
            ),
            ("wildcard hit", format!("a.b.{wild}:443"), true),
            ("wildcard apex", format!("{wild}:443"), false),
            ("miss", "news.example.org:443".to_owned(), false),
            (
                "deep miss",
                "a.b.c.d.news.example.org:443".to_owned(),
                false,
            ),
        ];
        for (case, authority, want) in cases {
            let target = parse_authority(&authority, None).unwrap();
            let denied = assert_no_alloc(&format!("{case} at {n} deny entries"), || {
                policy.deny.check(black_box(&target)).is_some()
            });
            assert_eq!(denied, want, "{case} at {n}");
            if !want {
                // The whole decision of an open-web policy that admits the name.
                let allowed = assert_no_alloc(&format!("Policy::check {case} at {n}"), || {
                    policy.check(Kind::Connect, black_box(&target)).is_ok()
                });
                assert!(allowed, "{case} at {n}");
            }
        }
    }
}

/// Memory per deny-list entry, as the heap bytes the loaded list keeps (the arena, the table and
/// their growth slack; the parse's temporaries are freed and not counted). Stated in
/// docs/benchmarks.md; the bound here is loose (the figure moves with the table's power-of-two
/// size) and only catches a layout regression such as a heap allocation per name.
#[test]
fn deny_list_memory_per_entry() {
    let n = 200_000;
    let text = deny_fixture::text(n);
    let mut set = None;
    let info = allocation_counter::measure(|| {
        set = Some(chokepoint::policy::deny_file::parse(&text).unwrap());
    });
    let set = set.unwrap();
    assert_eq!(set.len(), n);
    let per_entry = info.bytes_current as f64 / n as f64;
    let reported = set.heap_bytes() as f64 / n as f64;
    eprintln!(
        "deny list of {n} entries ({} text bytes): {:.1} heap bytes per entry kept ({:.1} by heap_bytes), peak {:.1} per entry while loading",
        text.len(),
        per_entry,
        reported,
        info.bytes_max as f64 / n as f64
    );
    assert!(per_entry < 64.0, "{per_entry:.1} bytes per entry");
    assert!(
        (reported - per_entry).abs() < 4.0,
        "heap_bytes {reported:.1} vs counted {per_entry:.1}"
    );
}
