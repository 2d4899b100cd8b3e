use super::*;
use crate::policy::allowlist::{parse_rule_as, RuleUse};
use crate::target::parse_authority;

fn set(rules: &[&str]) -> DenySet {
    let mut s = DenySet::default();
    for (i, r) in rules.iter().enumerate() {
        let (p, port) = parse_rule_as(r, RuleUse::Deny).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert_eq!(s.insert(p, port, i as u32 + 1), Inserted::New, "{r}");
    }
    s
}

fn hit(s: &DenySet, authority: &str) -> Option<(String, u32)> {
    let t = parse_authority(authority, None).unwrap();
    s.check(&t).map(|h| (h.to_string(), h.origin))
}

#[test]
fn matching_table() {
    let s = set(&[
        "paste.example",          // 1
        "*.drop.example",         // 2
        "drop.example:8443",      // 3
        "*.deep.port.example:22", // 4
        "203.0.113.7",            // 5
        "[2001:db8::1]:443",      // 6
        "*.zip",                  // 7
        "both.example",           // 8
        "*.both.example",         // 9
    ]);
    type Case<'a> = (&'a str, Option<(&'a str, u32)>, &'a str);
    let cases: &[Case<'_>] = &[
        (
            "paste.example:443",
            Some(("paste.example", 1)),
            "exact, 443",
        ),
        (
            "paste.example:8080",
            Some(("paste.example", 1)),
            "port-less deny: every port",
        ),
        ("www.paste.example:443", None, "exact does not cover below"),
        ("badpaste.example:443", None, "not a label boundary"),
        (
            "paste.example.evil.test:443",
            None,
            "suffix of another name",
        ),
        (
            "a.drop.example:443",
            Some(("*.drop.example", 2)),
            "wildcard one label",
        ),
        (
            "a.b.c.drop.example:80",
            Some(("*.drop.example", 2)),
            "wildcard deep",
        ),
        ("drop.example:443", None, "wildcard never the apex"),
        (
            "drop.example:8443",
            Some(("drop.example:8443", 3)),
            "ported exact",
        ),
        (
            "x.deep.port.example:22",
            Some(("*.deep.port.example:22", 4)),
            "ported wildcard",
        ),
        (
            "x.deep.port.example:443",
            None,
            "ported wildcard, other port",
        ),
        ("203.0.113.7:443", Some(("203.0.113.7", 5)), "IP literal"),
        ("203.0.113.8:443", None, "other IP"),
        (
            "[2001:db8::1]:443",
            Some(("[2001:db8::1]:443", 6)),
            "IPv6 with port",
        ),
        ("[2001:db8::1]:80", None, "IPv6, other port"),
        (
            "files.zip:443",
            Some(("*.zip", 7)),
            "TLD wildcard (deny only)",
        ),
        ("zip:443", None, "TLD wildcard never the TLD itself"),
        (
            "both.example:443",
            Some(("both.example", 8)),
            "exact and wildcard on one record",
        ),
        (
            "x.both.example:443",
            Some(("*.both.example", 9)),
            "the wildcard half",
        ),
        ("unrelated.test:443", None, "miss"),
    ];
    for (authority, want, name) in cases {
        let want = want.map(|(r, o)| (r.to_owned(), o));
        assert_eq!(hit(&s, authority), want, "{name}: {authority}");
    }
    assert_eq!(s.len(), 9);
}

#[test]
fn exact_beats_wildcard_and_longer_suffix_beats_shorter() {
    let s = set(&["*.example.com", "*.a.example.com", "b.a.example.com"]);
    assert_eq!(hit(&s, "b.a.example.com:443").unwrap().0, "b.a.example.com");
    assert_eq!(hit(&s, "c.a.example.com:443").unwrap().0, "*.a.example.com");
    assert_eq!(hit(&s, "c.example.com:443").unwrap().0, "*.example.com");
}

#[test]
fn duplicates_keep_the_first_origin() {
    let mut s = DenySet::default();
    let rule = |t: &str| parse_rule_as(t, RuleUse::Deny).unwrap();
    let (p, port) = rule("a.example");
    assert_eq!(s.insert(p.clone(), port, 3), Inserted::New);
    assert_eq!(s.insert(p, port, 9), Inserted::Duplicate);
    let (p, port) = rule("*.a.example");
    assert_eq!(s.insert(p, port, 10), Inserted::New);
    let (p, port) = rule("a.example:81");
    assert_eq!(s.insert(p.clone(), port, 11), Inserted::New);
    assert_eq!(s.insert(p, port, 12), Inserted::Duplicate);
    let (p, port) = rule("192.0.2.1");
    assert_eq!(s.insert(p.clone(), port, 13), Inserted::New);
    assert_eq!(s.insert(p, port, 14), Inserted::Duplicate);
    assert_eq!(s.len(), 4);
    assert_eq!(hit(&s, "a.example:443"), Some(("a.example".into(), 3)));
}

#[test]
fn without_a_tld_wildcard_the_last_label_is_not_probed() {
    // Not observable through results (the grammar never stores a one-label wildcard without
    // setting the flag), so check the flag itself.
    assert!(!set(&["*.example.com"]).tld_below);
    assert!(set(&["*.zip"]).tld_below);
}

#[test]
fn a_large_set_still_finds_every_rule() {
    let mut s = DenySet::default();
    for i in 0..20_000u32 {
        let (p, port) = parse_rule_as(&format!("*.n{i}.example"), RuleUse::Deny).unwrap();
        s.insert(p, port, i + 1);
    }
    s.shrink_to_fit();
    for i in (0..20_000u32).step_by(997) {
        let got = hit(&s, &format!("x.n{i}.example:443"));
        assert_eq!(got, Some((format!("*.n{i}.example"), i + 1)));
    }
    assert_eq!(hit(&s, "n5.example:443"), None);
}

#[test]
fn denylist_names_the_list() {
    let file = Arc::new(DenyFile {
        shown: "lists/exfil.txt".into(),
        path: "/etc/chokepoint/lists/exfil.txt".into(),
        set: set(&["x.example", "y.example"]),
    });
    let list = Denylist::new(set(&["own.example"]), vec![file]);
    let t = parse_authority("y.example:443", None).unwrap();
    let h = list.check(&t).unwrap();
    assert_eq!(
        (h.rule.to_string(), h.source()),
        ("y.example".into(), "lists/exfil.txt:2".into())
    );
    let t = parse_authority("own.example:443", None).unwrap();
    assert_eq!(list.check(&t).unwrap().source(), "deny[0]");
    assert!(!list.is_empty());
    assert!(Denylist::default().is_empty());
}
