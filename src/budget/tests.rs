use std::net::{IpAddr, Ipv4Addr};

use super::*;

fn ip(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
}

const TWO_A_SECOND: Allowance = Allowance {
    per_second: 2.0,
    burst: 3,
};

#[tokio::test(start_paused = true)]
async fn burst_then_rate_then_drops_are_counted() {
    let b = Budget::new();
    let a = ip(1);
    for i in 0..3 {
        assert!(
            b.spend(a, Reason::MalformedRequest, TWO_A_SECOND),
            "burst {i}"
        );
    }
    assert!(!b.spend(a, Reason::MalformedRequest, TWO_A_SECOND));
    assert!(!b.spend(a, Reason::AuthFailed, TWO_A_SECOND));
    // Another address has its own budget.
    assert!(b.spend(ip(2), Reason::MalformedRequest, TWO_A_SECOND));
    // One refusal every 500 ms refills.
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(b.spend(a, Reason::HostMismatch, TWO_A_SECOND));
    assert!(!b.spend(a, Reason::HostMismatch, TWO_A_SECOND));

    let drops = b.take_drops();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(drops[0].client, Some(a));
    let counts: Vec<(&str, u32)> = drops[0]
        .counts
        .iter()
        .map(|(d, n)| (d.as_str(), n))
        .collect();
    assert_eq!(
        counts,
        [
            ("malformed_request", 1),
            ("host_mismatch", 1),
            ("auth_failed", 1)
        ],
        "in Reason::ALL order"
    );
    assert_eq!(drops[0].counts.total(), 3);
    assert!(b.take_drops().is_empty(), "taken: counted afresh");
}

#[tokio::test(start_paused = true)]
async fn credentials_are_unchecked_only_while_past_the_budget() {
    let b = Budget::new();
    let a = ip(7);
    assert!(b.may_check_credentials(a, TWO_A_SECOND), "no history");
    for _ in 0..3 {
        assert!(b.spend(a, Reason::AuthFailed, TWO_A_SECOND));
    }
    assert!(!b.may_check_credentials(a, TWO_A_SECOND), "burst spent");
    assert!(
        b.may_check_credentials(ip(8), TWO_A_SECOND),
        "another address"
    );
    tokio::time::advance(Duration::from_millis(500)).await;
    assert!(
        b.may_check_credentials(a, TWO_A_SECOND),
        "one refusal refilled"
    );
    let drops = b.take_drops();
    assert_eq!(drops.len(), 1);
    let counts: Vec<_> = drops[0].counts.iter().collect();
    assert_eq!(counts, [(Dropped::CredentialsUnchecked, 1)]);
}

#[tokio::test(start_paused = true)]
async fn an_ipv4_mapped_address_is_the_ipv4_address() {
    let b = Budget::new();
    let v4 = ip(9);
    let IpAddr::V4(raw) = v4 else { unreachable!() };
    let mapped = IpAddr::V6(raw.to_ipv6_mapped());
    let one = Allowance {
        per_second: 1.0,
        burst: 1,
    };
    assert!(b.spend(v4, Reason::MalformedRequest, one));
    assert!(!b.spend(mapped, Reason::MalformedRequest, one));
}

#[tokio::test(start_paused = true)]
async fn the_table_is_bounded_and_forgotten_drops_are_kept() {
    let b = Budget::new();
    let one = Allowance {
        per_second: 0.001,
        burst: 1,
    };
    // Far more addresses than entries, each dropping once: at most ADDRESSES are remembered,
    // and every drop is accounted for, with or without its address.
    let n = 4 * ADDRESSES as u32;
    for i in 0..n {
        assert!(b.spend(ip(i), Reason::MalformedRequest, one));
        assert!(!b.spend(ip(i), Reason::MalformedRequest, one));
    }
    let drops = b.take_drops();
    let named = drops.iter().filter(|d| d.client.is_some()).count();
    assert!(named <= ADDRESSES, "{named} addresses remembered");
    assert_eq!(drops.iter().filter(|d| d.client.is_none()).count(), 1);
    let total: u64 = drops.iter().map(|d| d.counts.total()).sum();
    assert_eq!(total, u64::from(n));
}

#[tokio::test(start_paused = true)]
async fn a_blocked_address_outlives_addresses_that_are_not() {
    let b = Budget::new();
    let one = Allowance {
        per_second: 0.001,
        burst: 1,
    };
    let blocked = ip(1);
    assert!(b.spend(blocked, Reason::AuthFailed, one));
    // Many one-off addresses pass through, each owing a microsecond at most: `blocked` (owing
    // 1000 s) is never the entry its bucket gives up.
    for i in 2..(4 * ADDRESSES as u32) {
        tokio::time::advance(Duration::from_millis(1)).await;
        let _ = b.spend(
            ip(i),
            Reason::AuthFailed,
            Allowance {
                per_second: 1_000_000.0,
                burst: 1,
            },
        );
    }
    assert!(
        !b.may_check_credentials(blocked, one),
        "still remembered and blocked"
    );
}

#[test]
fn connection_refusals_are_counted_per_listener() {
    let r = Refused::default();
    assert!(r.add(Listener::Proxy), "first of the interval");
    assert!(!r.add(Listener::Proxy));
    assert!(r.add(Listener::Admin));
    assert_eq!(r.take(), [(Listener::Proxy, 2), (Listener::Admin, 1)]);
    assert!(r.take().is_empty());
    assert!(r.add(Listener::Proxy), "first again after a summary");
}

#[test]
fn every_kind_has_its_own_index_and_label() {
    let mut seen = std::collections::BTreeSet::new();
    for r in Reason::ALL {
        let d = Dropped::Refusal(r);
        assert_eq!(Dropped::from_index(d.index()), Some(d));
        assert!(seen.insert(d.as_str()));
    }
    let u = Dropped::CredentialsUnchecked;
    assert_eq!(Dropped::from_index(u.index()), Some(u));
    assert!(seen.insert(u.as_str()));
    assert_eq!(seen.len(), Dropped::KINDS);
}

#[test]
fn the_summary_line_has_its_shape() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let counts = rt.block_on(async {
        let b = Budget::new();
        let one = Allowance {
            per_second: 1.0,
            burst: 1,
        };
        assert!(b.spend(ip(3), Reason::MalformedRequest, one));
        for _ in 0..2 {
            assert!(!b.spend(ip(3), Reason::MalformedRequest, one));
        }
        assert!(!b.may_check_credentials(ip(3), one));
        b.take_drops().remove(0).counts
    });
    let line = DroppedRecord {
        ts: "2026-11-22T10:00:00.123Z",
        cause: "refusal_budget",
        client: Some(ip(3)),
        listener: None,
        count: counts.total(),
        reasons: Some(&counts),
        interval_ms: 10_000,
    }
    .to_line();
    assert_eq!(
        line,
        r#"{"v":1,"ts":"2026-11-22T10:00:00.123Z","event":"dropped","cause":"refusal_budget","client":"10.0.0.3","listener":null,"count":3,"reasons":{"malformed_request":2,"credentials_unchecked":1},"interval_ms":10000}"#
    );
    let line = DroppedRecord {
        ts: "2026-11-22T10:00:00.123Z",
        cause: "max_connections",
        client: None,
        listener: Some("proxy"),
        count: 12,
        reasons: None,
        interval_ms: 10_000,
    }
    .to_line();
    assert_eq!(
        line,
        r#"{"v":1,"ts":"2026-11-22T10:00:00.123Z","event":"dropped","cause":"max_connections","client":null,"listener":"proxy","count":12,"reasons":{},"interval_ms":10000}"#
    );
}
