use super::*;
use proptest::prelude::*;

fn list(rules: &[&str]) -> Allowlist {
    let mut a = Allowlist::default();
    for r in rules {
        let (p, port) = parse_rule(r).unwrap_or_else(|e| panic!("{r}: {e}"));
        assert!(a.insert(r, p, port));
    }
    a
}

fn t(authority: &str) -> Target {
    target::parse_authority(authority, None).unwrap()
}

#[test]
fn matching_table() {
    let a = list(&[
        "api.openai.com",
        "api.anthropic.com:443",
        "*.githubusercontent.com",
        "plain.example:8080",
        "203.0.113.7",
        "[2001:db8::1]:443",
        "*.deep.example.com",
        "deep.example.com:8443",
    ]);
    use Kind::{Connect as C, Http as H};
    let cases: &[(&str, Kind, Result<&str, Miss>, &str)] = &[
        (
            "api.openai.com:443",
            C,
            Ok("api.openai.com"),
            "exact, CONNECT 443",
        ),
        (
            "api.openai.com:80",
            H,
            Ok("api.openai.com"),
            "exact, HTTP 80",
        ),
        (
            "api.openai.com:80",
            C,
            Err(Miss::Port),
            "port-less rule: CONNECT only 443",
        ),
        (
            "api.openai.com:443",
            H,
            Err(Miss::Port),
            "port-less rule: HTTP only 80",
        ),
        ("api.openai.com:8443", C, Err(Miss::Port), "other port"),
        (
            "api.anthropic.com:443",
            C,
            Ok("api.anthropic.com:443"),
            "explicit port",
        ),
        (
            "api.anthropic.com:443",
            H,
            Ok("api.anthropic.com:443"),
            "explicit port, HTTP too",
        ),
        (
            "api.anthropic.com:80",
            H,
            Err(Miss::Port),
            "explicit port excludes 80",
        ),
        (
            "raw.githubusercontent.com:443",
            C,
            Ok("*.githubusercontent.com"),
            "wildcard one label",
        ),
        (
            "a.b.githubusercontent.com:443",
            C,
            Ok("*.githubusercontent.com"),
            "wildcard two labels",
        ),
        (
            "githubusercontent.com:443",
            C,
            Err(Miss::Host),
            "wildcard never the apex",
        ),
        (
            "badgithubusercontent.com:443",
            C,
            Err(Miss::Host),
            "suffix look-alike",
        ),
        (
            "githubusercontent.com.evil.test:443",
            C,
            Err(Miss::Host),
            "suffix then more labels",
        ),
        (
            "raw.githubusercontent.com.evil.test:443",
            C,
            Err(Miss::Host),
            "prefix trick",
        ),
        ("evil.test:443", C, Err(Miss::Host), "unknown"),
        (
            "plain.example:8080",
            H,
            Ok("plain.example:8080"),
            "HTTP on explicit port",
        ),
        ("203.0.113.7:443", C, Ok("203.0.113.7"), "IP rule"),
        ("203.0.113.8:443", C, Err(Miss::IpLiteral), "other IP"),
        ("[2001:db8::1]:443", C, Ok("[2001:db8::1]:443"), "IPv6 rule"),
        ("[2001:db8::2]:443", C, Err(Miss::IpLiteral), "other IPv6"),
        (
            "x.deep.example.com:443",
            C,
            Ok("*.deep.example.com"),
            "nested wildcard",
        ),
        (
            "deep.example.com:8443",
            C,
            Ok("deep.example.com:8443"),
            "apex of wildcard, own rule",
        ),
        (
            "deep.example.com:443",
            C,
            Err(Miss::Port),
            "apex known only on 8443",
        ),
        (
            "API.OPENAI.COM.:443",
            C,
            Ok("api.openai.com"),
            "case and trailing dot",
        ),
    ];
    for (target, kind, want, why) in cases {
        let got = a.check(*kind, &t(target)).map(|r| &*r.text);
        assert_eq!(got, *want, "{why}: {target}");
    }
}

#[test]
fn exact_beats_wildcard_and_longer_wildcard_wins() {
    let a = list(&["*.example.com", "*.a.example.com", "x.a.example.com"]);
    let got = |s: &str| &*a.check(Kind::Connect, &t(s)).unwrap().text;
    assert_eq!(got("x.a.example.com:443"), "x.a.example.com");
    assert_eq!(got("y.a.example.com:443"), "*.a.example.com");
    assert_eq!(got("y.b.example.com:443"), "*.example.com");
}

#[test]
fn grammar_rejects() {
    let bad: &[(&str, &str)] = &[
        ("*", "bare star"),
        ("*.", "star dot"),
        ("**.example.com", "double star"),
        ("a*.example.com", "partial wildcard"),
        ("api.*.example.com", "inner wildcard"),
        ("*.com", "whole TLD"),
        ("ex?mple.com", "question mark"),
        ("{a,b}.example.com", "braces"),
        ("[a-z].example.com", "class"),
        ("API.example.com", "upper case"),
        ("example.com.", "trailing dot"),
        ("b\u{fc}cher.example", "unicode, not punycode"),
        ("example.com:0", "port zero"),
        ("example.com:99999", "port too big"),
        ("example.com:", "empty port"),
        ("2001:db8::1", "unbracketed IPv6"),
        ("http://example.com", "URL"),
        ("example.com/path", "path"),
        ("", "empty"),
        (" example.com", "space"),
        ("*.10.0.0.1", "wildcard over IP"),
        ("0x7f.1", "non-canonical IP"),
    ];
    for (rule, why) in bad {
        assert!(parse_rule(rule).is_err(), "{why}: {rule:?} was accepted");
    }
    assert_eq!(
        parse_rule("b\u{fc}cher.example").unwrap_err(),
        "write the name normalised, as `xn--bcher-kva.example`"
    );
}

#[test]
fn star_is_a_rule_only_in_its_open_web_form() {
    for star in ["*", "*:443", "*.com"] {
        assert!(parse_rule(star).is_err(), "{star} as an allow rule");
    }
    assert!(parse_rule("*").unwrap_err().contains("the one allow rule"));
    // The deny grammar takes a wildcard over a TLD (it refuses more), never `*` itself.
    assert_eq!(
        parse_rule_as("*.zip", RuleUse::Deny).unwrap(),
        (Pattern::Below("zip".into()), None)
    );
    for star in ["*", "*:443", "**.zip", "a*.zip"] {
        assert!(
            parse_rule_as(star, RuleUse::Deny).is_err(),
            "{star} as a deny rule"
        );
    }
    assert_eq!(open_web_rule("*"), Some(Ok(None)));
    assert_eq!(open_web_rule("*:8443"), Some(Ok(Some(8443))));
    assert!(matches!(open_web_rule("*:0"), Some(Err(_))));
    assert_eq!(open_web_rule("*.example.com"), None);
    assert_eq!(open_web_rule("example.com"), None);
}

#[test]
fn open_web_admits_names_on_its_ports_never_ip_literals() {
    use Kind::{Connect as C, Http as H};
    let any = Allowlist::open_web("*", None);
    let on_8443 = Allowlist::open_web("*:8443", Some(8443));
    type Case<'a> = (&'a Allowlist, &'a str, Kind, Result<&'a str, Miss>, &'a str);
    let cases: &[Case<'_>] = &[
        (&any, "anything.example:443", C, Ok("*"), "CONNECT 443"),
        (&any, "a.b.c.example:80", H, Ok("*"), "HTTP 80"),
        (
            &any,
            "anything.example:80",
            C,
            Err(Miss::Port),
            "CONNECT 80",
        ),
        (
            &any,
            "anything.example:8443",
            C,
            Err(Miss::Port),
            "other port",
        ),
        (
            &any,
            "203.0.113.7:443",
            C,
            Err(Miss::IpLiteral),
            "IPv4 literal",
        ),
        (
            &any,
            "[2001:db8::1]:443",
            C,
            Err(Miss::IpLiteral),
            "IPv6 literal",
        ),
        (
            &on_8443,
            "x.example:8443",
            C,
            Ok("*:8443"),
            "its port, CONNECT",
        ),
        (
            &on_8443,
            "x.example:8443",
            H,
            Ok("*:8443"),
            "its port, HTTP",
        ),
        (&on_8443, "x.example:443", C, Err(Miss::Port), "not 443"),
    ];
    for (list, authority, kind, want, name) in cases {
        let got = list.check(*kind, &t(authority)).map(|r| &*r.text);
        assert_eq!(got, *want, "{name}");
    }
    assert!(any.is_open_web() && !Allowlist::default().is_open_web());
    let mut any = any;
    let (p, port) = parse_rule("example.com").unwrap();
    assert!(
        !any.insert("example.com", p, port),
        "open web holds one rule"
    );
}

#[test]
fn duplicates_are_reported() {
    let mut a = list(&["example.com"]);
    let (p, port) = parse_rule("example.com").unwrap();
    assert!(!a.insert("example.com", p, port));
    let (p, port) = parse_rule("example.com:8080").unwrap();
    assert!(a.insert("example.com:8080", p, port));
}

/// The obviously-correct reference: a wildcard rule `*.s` matches name `n` iff `n` ends with
/// `"." + s`.
fn reference(rules: &[String], name: &str) -> bool {
    rules.iter().any(|r| match r.strip_prefix("*.") {
        Some(s) => name.ends_with(&format!(".{s}")),
        None => r == name,
    })
}

proptest! {
    #[test]
    fn matcher_agrees_with_reference(
        rules in proptest::collection::vec("(\\*\\.)?([a-c]{1,2}\\.){0,2}[a-c]{1,2}\\.(test|com)", 1..12),
        name in "([a-c]{1,2}\\.){0,4}[a-c]{1,2}\\.(test|com)",
    ) {
        let mut a = Allowlist::default();
        for r in &rules {
            let (p, port) = parse_rule(r).unwrap();
            a.insert(r, p, port);
        }
        let got = a.check(Kind::Connect, &t(&format!("{name}:443"))).is_ok();
        prop_assert_eq!(got, reference(&rules, &name));
    }
}
