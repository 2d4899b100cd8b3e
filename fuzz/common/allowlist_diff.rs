//! Differential: the compiled allowlist against a slow reference matcher written here.
//!
//! Rules and queries are built from a small alphabet of labels, so that exact names, wildcards,
//! ports, apexes and look-alike suffixes actually collide. Each rule is rendered as config text and
//! goes through `parse_rule` + `Allowlist::insert`; the reference keeps the same rule as a list of
//! labels and decides by a linear scan comparing labels, following the grammar in design.md:
//! * `name` / `name:port`: exactly that name; `*.suffix`: any name with at least one more label
//!   whose last labels are the suffix's (never the apex);
//! * without a port a rule admits 443 for CONNECT and 80 for plain HTTP, with one exactly that port;
//! * an IP-literal target only matches a rule naming that IP;
//! * exact rules win over wildcards, longer wildcard suffixes over shorter, then config order;
//! * a miss is `Port` when some rule names the host, `IpLiteral` for an unnamed IP, else `Host`.
//!
//! The verdict, and which rule matched, must agree. Rule validity is predicted too (a one-label
//! wildcard, a numeric last label, a wildcard over an IP are refused; the same pattern and port
//! twice is a duplicate). A free-form rule string is also parsed: it must never panic, and an
//! accepted rule's canonical rendering parses to the same pattern and port.
use std::net::IpAddr;

use arbitrary::Arbitrary;
use chokepoint::policy::{parse_rule, Allowlist, Miss, Pattern};
use chokepoint::target::{self, Host, Kind, Target};

/// Labels that make matches, near misses and edge cases likely.
const LABELS: [&str; 16] = [
    "a",
    "b",
    "c",
    "example",
    "com",
    "test",
    "evil",
    "api",
    "_acme",
    "a-b",
    "xn--bcher-kva",
    "1",
    "2",
    "0x1f",
    "badexample",
    "com-",
];
/// IP literals as a rule or target writes them.
const IPS: [&str; 6] = [
    "203.0.113.7",
    "1.2.3.4",
    "[2001:db8::1]",
    "[::ffff:1.2.3.4]",
    "[::1]",
    "[2001:db8::]",
];
const PORTS: [u16; 6] = [443, 80, 8080, 8443, 1, 65535];

#[derive(Arbitrary, Debug)]
enum HostSpec {
    Name(Vec<u8>),
    Ip(u8),
}

#[derive(Arbitrary, Debug)]
struct RuleSpec {
    wild: bool,
    host: HostSpec,
    port: Option<u8>,
}

/// The query host: free, or a rule's host with up to two labels put in front (so that exact
/// and wildcard matches, apexes and ports are hit often).
#[derive(Arbitrary, Debug)]
enum Query {
    Host(HostSpec),
    NearRule(u8, Vec<u8>),
}

/// One fuzz case: the rules to compile, the query, and a free-form rule string.
#[derive(Arbitrary, Debug)]
pub(crate) struct Input {
    rules: Vec<RuleSpec>,
    query: Query,
    port: u8,
    connect: bool,
    free_rule: String,
}

/// The reference's view of one accepted rule.
#[derive(Clone, Debug, PartialEq)]
enum RefPattern {
    Exact(Vec<String>),
    Below(Vec<String>),
    Ip(IpAddr),
}

#[derive(Debug)]
struct RefRule {
    text: String,
    pattern: RefPattern,
    port: Option<u16>,
}

/// Check one input; panics on a disagreement.
pub(crate) fn run(input: &Input) {
    free_rule(&input.free_rule);

    let mut compiled = Allowlist::default();
    let mut reference: Vec<RefRule> = Vec::new();
    for spec in input.rules.iter().take(16) {
        let (text, expected) = render_rule(spec);
        let parsed = parse_rule(&text);
        let Some(pattern) = expected else {
            assert!(parsed.is_err(), "{text:?} accepted: {parsed:?}");
            continue;
        };
        let (p, port) = parsed.unwrap_or_else(|e| panic!("{text:?} refused: {e}"));
        let port_expected = spec.port.map(port_of);
        assert_eq!(port, port_expected, "{text:?}: port");
        assert_eq!(to_ref(&p), pattern, "{text:?}: pattern");
        let duplicate = reference
            .iter()
            .any(|r| r.pattern == pattern && r.port == port);
        let inserted = compiled.insert(&text, p, port);
        assert_eq!(inserted, !duplicate, "{text:?}: duplicate detection");
        if inserted {
            reference.push(RefRule {
                text,
                pattern,
                port,
            });
        }
    }
    assert_eq!(compiled.len(), reference.len());
    for (c, r) in compiled.rules().iter().zip(&reference) {
        assert_eq!(
            (&*c.text, c.port),
            (r.text.as_str(), r.port),
            "rules in config order"
        );
    }

    let host = match &input.query {
        Query::Host(h) => render_host(h),
        Query::NearRule(_, _) if input.rules.is_empty() => return,
        Query::NearRule(i, prefix) => {
            let rules = &input.rules[..input.rules.len().min(16)];
            match &rules[usize::from(*i) % rules.len()].host {
                HostSpec::Name(idx) => {
                    let mut labels = labels_of(&prefix[..prefix.len().min(2)]);
                    labels.extend(labels_of(idx));
                    labels.join(".")
                }
                ip => render_host(ip),
            }
        }
    };
    let authority = format!("{host}:{}", port_of(input.port));
    let Ok(target) = target::parse_authority(&authority, None) else {
        return;
    };
    let kind = if input.connect {
        Kind::Connect
    } else {
        Kind::Http
    };
    let got = compiled.check(kind, &target).map(|rule| {
        compiled
            .rules()
            .iter()
            .position(|r| std::ptr::eq(r, rule))
            .expect("matched rule is not in the list")
    });
    let want = reference_check(&reference, kind, &target);
    if trace() {
        eprintln!("rules={} {kind:?} {target} -> {want:?}", reference.len());
    }
    assert_eq!(
        got, want,
        "{kind:?} {target}: compiled {got:?}, reference {want:?}; rules {reference:#?}"
    );
}

/// `CHOKEPOINT_FUZZ_TRACE=1` prints each decided query (to check a corpus reaches matches:
/// `cargo fuzz run allowlist_diff corpus/allowlist_diff -- -runs=0`).
fn trace() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("CHOKEPOINT_FUZZ_TRACE").is_some())
}

fn port_of(i: u8) -> u16 {
    PORTS[usize::from(i) % PORTS.len()]
}

fn labels_of(idx: &[u8]) -> Vec<String> {
    idx.iter()
        .take(5)
        .map(|&i| LABELS[usize::from(i) % LABELS.len()].to_owned())
        .collect()
}

fn render_host(h: &HostSpec) -> String {
    match h {
        HostSpec::Name(idx) => labels_of(idx).join("."),
        HostSpec::Ip(i) => IPS[usize::from(*i) % IPS.len()].to_owned(),
    }
}

/// A label a resolver or URL parser would read as a number (`0x1f`, `12`).
fn numeric(label: &str) -> bool {
    match label.strip_prefix("0x") {
        Some(h) => h.bytes().all(|b| b.is_ascii_hexdigit()),
        None => label.bytes().all(|b| b.is_ascii_digit()),
    }
}

fn valid_label(l: &str) -> bool {
    !l.starts_with('-') && !l.ends_with('-')
}

/// The rule text, and the pattern the reference expects (`None`: the rule must be refused).
fn render_rule(spec: &RuleSpec) -> (String, Option<RefPattern>) {
    let mut text = String::new();
    if spec.wild {
        text.push_str("*.");
    }
    let expected = match &spec.host {
        HostSpec::Ip(i) => {
            let ip = IPS[usize::from(*i) % IPS.len()];
            text.push_str(ip);
            let addr: IpAddr = ip
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .expect("IPS holds addresses");
            (!spec.wild).then_some(RefPattern::Ip(addr))
        }
        HostSpec::Name(idx) => {
            let labels = labels_of(idx);
            let name = labels.join(".");
            text.push_str(&name);
            let last = labels.last().map(String::as_str).unwrap_or("");
            if labels.is_empty() || !labels.iter().all(|l| valid_label(l)) {
                None
            } else if let (false, Ok(ip)) = (spec.wild, name.parse::<IpAddr>()) {
                Some(RefPattern::Ip(ip))
            } else if numeric(last) || (spec.wild && labels.len() < 2) {
                None
            } else if spec.wild {
                Some(RefPattern::Below(labels))
            } else {
                Some(RefPattern::Exact(labels))
            }
        }
    };
    if let Some(p) = spec.port {
        text.push_str(&format!(":{}", port_of(p)));
    }
    (text, expected)
}

fn to_ref(p: &Pattern) -> RefPattern {
    let split = |n: &str| n.split('.').map(str::to_owned).collect();
    match p {
        Pattern::Exact(n) => RefPattern::Exact(split(n)),
        Pattern::Below(n) => RefPattern::Below(split(n)),
        Pattern::Ip(ip) => RefPattern::Ip(*ip),
    }
}

fn admits(rule_port: Option<u16>, kind: Kind, port: u16) -> bool {
    match rule_port {
        Some(p) => p == port,
        None => (kind == Kind::Connect && port == 443) || (kind == Kind::Http && port == 80),
    }
}

/// Linear scan, label by label.
fn reference_check(rules: &[RefRule], kind: Kind, target: &Target) -> Result<usize, Miss> {
    let labels: Vec<&str> = match &target.host {
        Host::Ip(ip) => {
            let named: Vec<usize> = (0..rules.len())
                .filter(|&i| rules[i].pattern == RefPattern::Ip(*ip))
                .collect();
            if named.is_empty() {
                return Err(Miss::IpLiteral);
            }
            return named
                .into_iter()
                .find(|&i| admits(rules[i].port, kind, target.port))
                .ok_or(Miss::Port);
        }
        Host::Name(n) => n.split('.').collect(),
    };
    // (rank, index): exact names first, then wildcards by longer suffix, then config order.
    let mut candidates: Vec<(usize, usize)> = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        match &r.pattern {
            RefPattern::Exact(l) if *l == labels => candidates.push((0, i)),
            RefPattern::Below(suffix)
                if suffix.len() < labels.len()
                    && labels[labels.len() - suffix.len()..]
                        .iter()
                        .zip(suffix)
                        .all(|(a, b)| *a == b.as_str()) =>
            {
                candidates.push((1000 - suffix.len(), i))
            }
            _ => {}
        }
    }
    if candidates.is_empty() {
        return Err(Miss::Host);
    }
    candidates.sort();
    candidates
        .into_iter()
        .map(|(_, i)| i)
        .find(|&i| admits(rules[i].port, kind, target.port))
        .ok_or(Miss::Port)
}

/// Any text as a rule: never panics; an accepted rule is already in its canonical form.
fn free_rule(text: &str) {
    let Ok((pattern, port)) = parse_rule(text) else {
        return;
    };
    if let Some(p) = port {
        assert_ne!(p, 0, "{text:?}: port 0 accepted");
    }
    let host = match &pattern {
        Pattern::Exact(n) => n.to_string(),
        Pattern::Below(n) => {
            assert!(
                n.contains('.'),
                "{text:?}: wildcard over a top-level domain"
            );
            format!("*.{n}")
        }
        Pattern::Ip(IpAddr::V4(ip)) => ip.to_string(),
        Pattern::Ip(IpAddr::V6(ip)) => format!("[{ip}]"),
    };
    let canonical = match port {
        Some(p) => format!("{host}:{p}"),
        None => host,
    };
    let again = parse_rule(&canonical)
        .unwrap_or_else(|e| panic!("{text:?}: canonical {canonical:?} refused: {e}"));
    assert_eq!(again, (pattern.clone(), port), "{text:?} via {canonical:?}");
    if let Pattern::Exact(n) | Pattern::Below(n) = &pattern {
        let h = target::normalise_host(n)
            .unwrap_or_else(|e| panic!("{text:?}: rule name {n:?} is no host: {e:?}"));
        assert_eq!(
            h.as_name(),
            Some(&**n),
            "{text:?}: rule name not normalised"
        );
    }
}
