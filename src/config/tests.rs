use super::*;
use std::net::IpAddr;

fn parse_str(src: &str) -> Result<Config, ConfigError> {
    parse(Path::new("test.toml"), src)
}

const MINIMAL: &str = r#"
[server]
listen = "127.0.0.1:3128"

[[agents]]
name = "local"
source_cidrs = ["127.0.0.0/8"]
policy = "default"

[policies.default]
allow = ["example.com"]
"#;

#[test]
fn minimal_config_has_defaults() {
    let c = parse_str(MINIMAL).unwrap();
    assert_eq!(c.timeouts, Timeouts::default());
    assert_eq!(c.agents.len(), 1);
    assert_eq!(c.policies[0].allowlist.len(), 1);
    assert!(c.dns.nameservers.is_none());
}

#[test]
fn unknown_key_names_line_and_key() {
    let src = MINIMAL.replace("[server]\n", "[server]\nlisten_addr = \"x\"\n");
    let e = parse_str(&src).unwrap_err().to_string();
    assert!(
        e.starts_with("test.toml:3:1: unknown field `listen_addr`"),
        "{e}"
    );
}

#[test]
fn every_issue_is_reported_at_once() {
    let src = r#"
[server]
listen = "nope"

[timeouts]
connect = "5 parsecs"
idle = "0s"

[destinations]
deny_cidrs = ["10.0.0.1/8", "banana"]

[[agents]]
name = "a"
source_cidrs = ["127.0.0.0/8"]
policy = "missing"

[[agents]]
name = "a"
source_cidrs = ["127.0.0.0/8"]
policy = "p"

[policies.p]
allow = ["*", "API.example.com", "ok.example.com", "ok.example.com"]
"#;
    let ConfigError::Invalid(issues) = parse_str(src).unwrap_err() else {
        panic!("expected validation issues");
    };
    let keys: Vec<(usize, &str)> = issues.iter().map(|i| (i.line, i.key.as_str())).collect();
    assert_eq!(
        keys,
        [
            (3, "server.listen"),
            (6, "timeouts.connect"),
            (7, "timeouts.idle"),
            (10, "destinations.deny_cidrs[0]"),
            (10, "destinations.deny_cidrs[1]"),
            (23, "policies.p.allow[0]"),
            (23, "policies.p.allow[1]"),
            (23, "policies.p.allow[3]"),
            (15, "agents[0].policy"),
            (18, "agents[1].name"),
        ]
    );
    let text = ConfigError::Invalid(issues).to_string();
    assert!(text.contains("test.toml:10:15: destinations.deny_cidrs[0]: `10.0.0.1/8` has host bits set; did you mean `10.0.0.0/8`?"), "{text}");
    assert!(
        text.contains("write the name normalised, as `api.example.com`"),
        "{text}"
    );
}

#[test]
fn static_hosts_are_normalised() {
    let src =
        format!("{MINIMAL}\n[dns]\nhosts = {{ \"Tools.Internal.Test.\" = [\"127.0.0.2\"] }}\n");
    let c = parse_str(&src).unwrap();
    assert_eq!(
        c.dns.hosts["tools.internal.test"],
        ["127.0.0.2".parse::<IpAddr>().unwrap()]
    );
}

/// Found by the `config` fuzz target: toml reports a control character in a comment with an
/// empty message, which left the operator with `file:1:22: ` and nothing else.
#[test]
fn control_character_in_comment_is_named() {
    let src = format!("# The least a config \u{1}\n{MINIMAL}");
    let e = parse_str(&src).unwrap_err();
    let ConfigError::Syntax {
        line, col, message, ..
    } = &e
    else {
        panic!("{e:?}");
    };
    assert_eq!((*line, *col), (1, 22));
    assert!(message.contains(r"'\u{1}'"), "{message}");
    assert!(
        e.to_string()
            .starts_with("test.toml:1:22: control character"),
        "{e}"
    );
}

#[test]
fn a_certificate_agent_an_earlier_one_shadows_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["gateway.local".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.path().join("tls.crt"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("tls.key"), key.serialize_pem()).unwrap();
    std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
    let src = r#"
[server]
listen = "127.0.0.1:3128"
tls_listen = "127.0.0.1:3129"
tls_cert = "tls.crt"
tls_key = "tls.key"
client_ca = "ca.pem"

[[agents]]
name = "coder"
spiffe_id = "spiffe://cluster.local/ns/a/sa/coder"
policy = "default"

[[agents]]
name = "coder-again"
spiffe_id = "spiffe://cluster.local/ns/a/sa/coder"
cert_subject = "coder"
policy = "default"

[[agents]]
name = "mailer"
spiffe_id = "spiffe://cluster.local/ns/a/sa/mailer"
policy = "default"

[policies.default]
allow = ["example.com"]
"#;
    let c = parse(&dir.path().join("c.toml"), src).unwrap();
    let warnings: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(warnings.len(), 1, "{warnings:#?}");
    assert!(
        warnings[0].contains("agent `coder-again` can never match: agent `coder` comes first"),
        "{warnings:#?}"
    );
}

#[test]
fn refusal_budget_and_admin_cap_keys_are_checked() {
    let c = parse_str(MINIMAL).unwrap();
    assert_eq!(c.refusal_budget, crate::budget::Allowance::default());
    assert_eq!(c.summary_interval, crate::budget::DEFAULT_SUMMARY_INTERVAL);
    assert_eq!(c.admin_max_connections, DEFAULT_ADMIN_MAX_CONNECTIONS);

    let set = |keys: &str| MINIMAL.replace("[server]\n", &format!("[server]\n{keys}\n"));
    let c = parse_str(&set(
        "address_refusals_per_second = 0.5\naddress_refusal_burst = 3\nsummary_interval = \"1m\"\nadmin_max_connections = 8",
    ))
    .unwrap();
    assert_eq!(
        c.refusal_budget,
        crate::budget::Allowance {
            per_second: 0.5,
            burst: 3
        }
    );
    assert_eq!(c.summary_interval, Duration::from_secs(60));
    assert_eq!(c.admin_max_connections, 8);

    let src = set(
        "address_refusals_per_second = 0.0\naddress_refusal_burst = 0\nsummary_interval = \"2h\"\nadmin_max_connections = 0",
    );
    let ConfigError::Invalid(issues) = parse_str(&src).unwrap_err() else {
        panic!("expected validation issues");
    };
    let keys: Vec<&str> = issues.iter().map(|i| i.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "server.admin_max_connections",
            "server.address_refusal_burst",
            "server.address_refusals_per_second",
            "server.summary_interval",
        ]
    );
}
