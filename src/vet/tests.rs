use super::*;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn nets(list: &[&str]) -> Vec<IpNet> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[test]
fn builtin_table() {
    let denied = [
        ("127.0.0.1", "loopback"),
        ("127.255.255.254", "loopback edge"),
        ("10.0.0.1", "rfc1918 10/8"),
        ("172.16.0.1", "rfc1918 172.16/12 low"),
        ("172.31.255.255", "rfc1918 172.16/12 high"),
        ("192.168.1.1", "rfc1918 192.168/16"),
        ("100.64.0.1", "cgnat low"),
        ("100.127.255.255", "cgnat high"),
        ("169.254.169.254", "metadata"),
        ("169.254.0.1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.1", "TEST-NET-1"),
        ("198.18.0.1", "benchmarking"),
        ("::1", "v6 loopback"),
        ("::", "v6 unspecified"),
        ("fe80::1", "v6 link-local"),
        ("fd00:ec2::254", "aws v6 metadata"),
        ("fc00::1", "ula"),
        ("ff02::1", "v6 multicast"),
        ("2001:db8::1", "v6 documentation"),
        ("::ffff:127.0.0.1", "mapped loopback"),
        ("::ffff:169.254.169.254", "mapped metadata"),
        ("::127.0.0.1", "compatible loopback"),
        ("::10.0.0.1", "compatible private"),
        ("64:ff9b::a9fe:a9fe", "NAT64 of metadata"),
        ("64:ff9b::7f00:1", "NAT64 of loopback"),
        ("64:ff9b:1::1", "local-use NAT64"),
        ("2002:a9fe:a9fe::1", "6to4 of metadata"),
        ("2002:7f00:1::", "6to4 of loopback"),
        ("2001:0:a9fe:a9fe::1", "teredo server metadata"),
        (
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
            "teredo client 127.0.0.1 (inverted)",
        ),
    ];
    let v = Vetter::default();
    for (addr, why) in denied {
        assert!(v.check(ip(addr), 443).is_err(), "{why}: {addr} was allowed");
    }
    let allowed = [
        ("100.63.255.255", "just below cgnat"),
        ("100.128.0.0", "just above cgnat"),
        ("172.15.255.255", "just below 172.16/12"),
        ("172.32.0.0", "just above 172.16/12"),
        ("11.0.0.1", "just above 10/8"),
        ("93.184.215.14", "public v4"),
        ("2606:4700::1111", "public v6"),
        ("64:ff9b::5db8:d70e", "NAT64 of a public address"),
        ("::ffff:93.184.215.14", "mapped public"),
    ];
    for (addr, why) in allowed {
        assert_eq!(v.check(ip(addr), 443), Ok(()), "{why}: {addr}");
    }
}

#[test]
fn operator_ranges_longest_prefix_wins() {
    let v = Vetter::new(
        nets(&["127.0.0.64/26", "93.184.0.0/16", "10.1.2.0/24"]),
        nets(&["127.0.0.0/24", "10.0.0.0/8", "127.0.0.66/32"]),
        vec![],
    );
    assert_eq!(v.check(ip("127.0.0.1"), 80), Ok(()), "allow exception");
    assert!(
        matches!(v.check(ip("127.0.0.65"), 80), Err(Refusal::DenyCidr(_))),
        "longer deny"
    );
    assert_eq!(
        v.check(ip("127.0.0.66"), 80),
        Ok(()),
        "longer allow beats deny"
    );
    assert!(
        v.check(ip("127.0.1.1"), 80).is_err(),
        "outside the allow: built-in"
    );
    assert!(
        v.check(ip("93.184.215.14"), 80).is_err(),
        "deny of a public range"
    );
    assert!(v.check(ip("10.1.2.3"), 80).is_err(), "deny inside an allow");
    assert_eq!(v.check(ip("10.9.9.9"), 80), Ok(()));
    assert_eq!(
        v.check(ip("::ffff:127.0.0.1"), 80),
        Ok(()),
        "mapped form follows its IPv4"
    );
    assert!(
        v.check(ip("::ffff:127.0.0.65"), 80).is_err(),
        "mapped form of a deny"
    );
    let tie = Vetter::new(nets(&["127.0.0.0/24"]), nets(&["127.0.0.0/24"]), vec![]);
    assert!(tie.check(ip("127.0.0.1"), 80).is_err(), "a tie denies");
}

#[test]
fn metadata_needs_exact_allow() {
    let wide = Vetter::new(vec![], nets(&["169.254.0.0/16", "fd00::/8"]), vec![]);
    assert_eq!(
        wide.check(ip("169.254.169.254"), 80),
        Err(Refusal::Metadata)
    );
    assert_eq!(
        wide.check(ip("::ffff:169.254.169.254"), 80),
        Err(Refusal::Metadata)
    );
    assert_eq!(wide.check(ip("fd00:ec2::254"), 80), Err(Refusal::Metadata));
    assert_eq!(wide.check(ip("169.254.1.1"), 80), Ok(()));
    let azure = Vetter::new(vec![], nets(&["168.63.0.0/16"]), vec![]);
    assert_eq!(azure.check(ip("168.63.129.16"), 80), Err(Refusal::Metadata));
    let exact = Vetter::new(vec![], nets(&["169.254.169.254/32"]), vec![]);
    assert_eq!(exact.check(ip("169.254.169.254"), 80), Ok(()));
    // Credential endpoints are exact-only too: a range wider than the address never admits it.
    // (Values for the pure decision only; no traffic goes anywhere.)
    let wide = Vetter::new(
        vec![],
        nets(&[
            "169.254.0.0/16",
            "fd00::/8",
            "100.64.0.0/10",
            "192.0.0.0/24",
        ]),
        vec![],
    );
    for (addr, what) in [
        ("169.254.170.2", "ECS task credentials"),
        ("169.254.170.23", "EKS Pod Identity"),
        ("fd00:ec2::23", "EKS Pod Identity, IPv6"),
        ("100.100.100.200", "Alibaba Cloud metadata"),
        ("192.0.0.192", "Oracle Cloud metadata"),
    ] {
        assert_eq!(wide.check(ip(addr), 80), Err(Refusal::Metadata), "{what}");
        let exact = Vetter::new(
            vec![],
            nets(&[&format!(
                "{}/{}",
                addr,
                if addr.contains(':') { 128 } else { 32 }
            )]),
            vec![],
        );
        assert_eq!(
            exact.check(ip(addr), 80),
            Ok(()),
            "{what}: an exact allow admits it"
        );
    }
    assert_eq!(
        wide.check(ip("169.254.170.3"), 80),
        Ok(()),
        "its neighbour is not special"
    );
}

#[test]
fn self_loop() {
    let own = vec![
        "127.0.0.1:3128".parse().unwrap(),
        "0.0.0.0:9999".parse().unwrap(),
    ];
    let v = Vetter::new(vec![], nets(&["127.0.0.0/8"]), own);
    assert_eq!(v.check(ip("127.0.0.1"), 3128), Err(Refusal::SelfLoop));
    assert_eq!(v.check(ip("127.0.0.1"), 3129), Ok(()));
    assert_eq!(v.check(ip("127.0.0.5"), 9999), Err(Refusal::SelfLoop));
}

#[test]
fn vet_keeps_allowed_in_order_and_names_refusal() {
    let v = Vetter::new(vec![], nets(&["127.0.0.1/32"]), vec![]);
    let got = v
        .vet(&[ip("10.0.0.1"), ip("127.0.0.1"), ip("::1")], 443, &[])
        .unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].addr(), "127.0.0.1:443".parse().unwrap());
    let err = v.vet(&[ip("169.254.169.254")], 80, &[]).unwrap_err();
    assert_eq!(err.reason, Reason::DeniedAddress);
    assert!(err.detail.contains("169.254.169.254"), "{}", err.detail);
    assert_eq!(
        v.vet(&[], 80, &[]).unwrap_err().reason,
        Reason::DnsNoAddresses
    );
    let mapped = v.vet(&[ip("::ffff:127.0.0.1")], 80, &[]).unwrap();
    assert_eq!(
        mapped[0].addr(),
        "127.0.0.1:80".parse().unwrap(),
        "dialled as IPv4"
    );
}

#[test]
fn policy_exceptions_hold_only_where_given_and_never_widen_metadata() {
    let v = Vetter::new(nets(&["127.0.0.64/26"]), vec![], vec![]);
    let registry = nets(&["127.0.0.9/32", "169.254.0.0/16"]);
    assert!(
        v.check(ip("127.0.0.9"), 443).is_err(),
        "not without the policy's exception"
    );
    assert_eq!(v.check_with(ip("127.0.0.9"), 443, &registry), Ok(()));
    assert!(v.check_with(ip("127.0.0.10"), 443, &registry).is_err());
    assert_eq!(
        v.check_with(ip("169.254.169.254"), 80, &registry),
        Err(Refusal::Metadata)
    );
    assert!(
        v.check_with(ip("127.0.0.66"), 443, &nets(&["127.0.0.0/24"]))
            .is_err(),
        "global deny is longer"
    );
}

#[test]
fn embedded_forms_are_decided_by_the_ipv4_they_carry() {
    // The forms tests/hostile.rs sends only inside a network namespace (they are not loopback, so
    // a test must never send them here), decided without any traffic. All carry 127.0.0.2, or
    // 93.184.215.14 for the operator-deny half.
    let forms = [
        ("::ffff:127.0.0.2", "93.184.215.14", "IPv4-mapped"),
        ("::127.0.0.2", "::93.184.215.14", "IPv4-compatible"),
        (
            "::ffff:0:127.0.0.2",
            "::ffff:0:93.184.215.14",
            "IPv4-translated",
        ),
        ("64:ff9b::7f00:2", "64:ff9b::5db8:d70e", "NAT64"),
        ("2002:7f00:2::1", "2002:5db8:d70e::1", "6to4"),
        (
            "2001:0:7f00:2::80ff:fffd",
            "2001:0:5db8:d70e::a247:28f1",
            "Teredo (server and client)",
        ),
    ];
    let builtin = Vetter::default();
    let operator = Vetter::new(nets(&["93.184.215.14/32"]), vec![], vec![]);
    for (loopback, public, why) in forms {
        assert!(
            builtin.check(ip(loopback), 443).is_err(),
            "{why}: {loopback}"
        );
        assert!(operator.check(ip(public), 443).is_err(), "{why}: {public}");
    }
    // With the carried address excepted, a form is allowed unless its IPv6 address is itself
    // reserved (::/8 holds the compatible and translated forms).
    let excepted = Vetter::new(vec![], nets(&["127.0.0.2/32"]), vec![]);
    for (loopback, _, why) in forms {
        let reserved = why == "IPv4-compatible" || why == "IPv4-translated";
        assert_eq!(
            excepted.check(ip(loopback), 443).is_err(),
            reserved,
            "{why}: {loopback}"
        );
    }
    // The proxy's own address is its own in the mapped form too.
    let own = Vetter::new(
        vec![],
        nets(&["127.0.0.0/8"]),
        vec!["127.0.0.1:3128".parse().unwrap()],
    );
    assert_eq!(
        own.check(ip("::ffff:127.0.0.1"), 3128),
        Err(Refusal::SelfLoop)
    );
}
