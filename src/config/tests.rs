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

/// A config with one policy `web` whose body is `policy`, written to a temp dir with `lists`.
fn in_dir(policy: &str, lists: &[(&str, &str)]) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in lists {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    let src = format!(
        "[server]\nlisten = \"127.0.0.1:3128\"\n\n[[agents]]\nname = \"a\"\nsource_cidrs = [\"127.0.0.0/8\"]\npolicy = \"web\"\n\n[policies.web]\n{policy}\n"
    );
    let path = dir.path().join("chokepoint.toml");
    std::fs::write(&path, &src).unwrap();
    (dir, path, src)
}

fn issues_of(r: Result<Config, ConfigError>) -> Vec<String> {
    match r {
        Err(ConfigError::Invalid(issues)) => issues.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("not a validation error: {e}"),
        Ok(_) => panic!("accepted"),
    }
}

#[test]
fn open_web_is_the_sole_allow_rule_only() {
    for (allow, port) in [("\"*\"", None), ("\"*:8443\"", Some(8443))] {
        let c = parse_str(&MINIMAL.replace("[\"example.com\"]", &format!("[{allow}]"))).unwrap();
        let p = &c.policies[0];
        assert!(p.is_open_web(), "{allow}");
        assert_eq!(p.allowlist.rules()[0].port, port);
    }
    let e = issues_of(parse_str(
        &MINIMAL.replace("[\"example.com\"]", "[\"example.com\", \"*\"]"),
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].contains("policies.default.allow[1]: `*` (open web: any public host) must be the only allow rule"),
        "{e:?}"
    );
    let e = issues_of(parse_str(
        &MINIMAL.replace("[\"example.com\"]", "[\"*:0\"]"),
    ));
    assert!(e[0].contains("invalid port"), "{e:?}");
}

#[test]
fn deny_rules_use_the_rule_grammar_and_win() {
    let c = parse_str(&MINIMAL.replace(
        "allow = [\"example.com\"]",
        "allow = [\"*.example.com\"]\ndeny = [\"paste.example.com\", \"*.zip\", \"*.drop.example.com:443\"]",
    ))
    .unwrap();
    let p = &c.policies[0];
    let t = |a: &str| crate::target::parse_authority(a, None).unwrap();
    let d = p
        .check(crate::target::Kind::Connect, &t("paste.example.com:443"))
        .unwrap_err();
    assert_eq!(d.reason, crate::outcome::Reason::HostDenied);
    assert_eq!(
        d.detail,
        "host is denied by rule `paste.example.com` of policy default"
    );
    assert!(p
        .check(crate::target::Kind::Connect, &t("ok.example.com:443"))
        .is_ok());
    assert!(p
        .check(crate::target::Kind::Connect, &t("a.drop.example.com:443"))
        .is_err());
    assert!(p
        .check(crate::target::Kind::Connect, &t("a.drop.example.com:8443"))
        .is_err_and(|d| d.reason == crate::outcome::Reason::PortNotAllowed));

    let e = issues_of(parse_str(&MINIMAL.replace(
        "allow = [\"example.com\"]",
        "allow = [\"example.com\"]\ndeny = [\"*\", \"Paste.example\", \"a.example\", \"a.example\"]",
    )));
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(
        e[0].contains("deny[0]: `*`: a deny rule `*` would refuse every host"),
        "{e:?}"
    );
    assert!(
        e[1].contains("deny[1]: `Paste.example`: write the name normalised"),
        "{e:?}"
    );
    assert!(
        e[2].contains("deny[3]: duplicate rule `a.example`"),
        "{e:?}"
    );
}

/// A config in `dir` with the interception CA and one secret written next to it.
fn intercept_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    crate::intercept::ca::tests::write_ca(dir.path(), "ca");
    std::fs::write(dir.path().join("openai"), "sk-test\n").unwrap();
    dir
}

const INTERCEPTING: &str = r#"
[server]
listen = "127.0.0.1:3128"

[intercept]
ca_cert = "ca.crt"
ca_key = "ca.key"

[[agents]]
name = "local"
source_cidrs = ["127.0.0.0/8"]
policy = "p"

[policies.p]
allow = ["api.openai.com", "*.example.com"]

[[policies.p.intercept]]
host = "api.openai.com"
inject = [{ header = "authorization", value_file = "openai", format = "Bearer {}" }]
rules = ["POST /v1/chat/completions", "GET /v1/models/*"]

[[policies.p.intercept]]
host = "*.example.com"
"#;

#[test]
fn interception_compiles_hosts_injections_and_rules() {
    let dir = intercept_dir();
    let c = parse(&dir.path().join("c.toml"), INTERCEPTING).unwrap();
    let s = c.intercept.as_ref().unwrap();
    assert_eq!(s.ca_cert, dir.path().join("ca.crt"));
    let p = &c.policies[0];
    let t = |s: &str| crate::target::parse_authority(s, None).unwrap();
    let openai = p.intercept.find(&t("api.openai.com:443")).unwrap();
    assert_eq!(openai.credential.as_deref(), Some("openai"));
    assert_eq!(openai.inject[0].header, "authorization");
    assert_eq!(openai.inject[0].value_file, dir.path().join("openai"));
    assert_eq!(
        openai.inject[0].value(b"sk-x").unwrap(),
        "Bearer sk-x",
        "format applied"
    );
    assert!(openai.inject[0].value(b"sk-x").unwrap().is_sensitive());
    assert!(openai
        .rules
        .check(&http::Method::POST, "/v1/chat/completions")
        .unwrap()
        .is_some());
    assert!(p
        .intercept
        .find(&t("a.example.com:443"))
        .unwrap()
        .rules
        .is_empty());
    assert!(p.intercept.find(&t("api.openai.com:8443")).is_none());
    assert!(p.intercept.find(&t("example.com:443")).is_none());
}

#[test]
fn interception_issues_name_line_and_key() {
    let dir = intercept_dir();
    std::fs::write(dir.path().join("big"), vec![b'k'; 9000]).unwrap();
    let src = r#"
[server]
listen = "127.0.0.1:3128"

[intercept]
ca_cert = "ca.crt"
ca_key = "ca.key"
upstream_ca = ["missing.pem"]

[[agents]]
name = "local"
source_cidrs = ["127.0.0.0/8"]
policy = "p"

[policies.p]
allow = ["api.openai.com", "only.example.com"]

[[policies.p.intercept]]
host = "api.openai.com"
inject = [
  { header = "Authorization", value_file = "openai" },
  { header = "content-length", value_file = "openai" },
  { header = "x api key", value_file = "openai" },
  { header = "x-key", value_file = "none" },
  { header = "x-big", value_file = "big" },
  { header = "x-fmt", value_file = "openai", format = "Bearer" },
]
rules = ["post /v1", "GET /v1/**/x", "GET /v1/../admin"]

[[policies.p.intercept]]
host = "*.example.com"

[[policies.p.intercept]]
host = "elsewhere.test"

[[policies.p.intercept]]
host = "127.0.0.2"
"#;
    let ConfigError::Invalid(issues) = parse(&dir.path().join("c.toml"), src).unwrap_err() else {
        panic!("expected validation issues");
    };
    let keys: Vec<(usize, &str)> = issues.iter().map(|i| (i.line, i.key.as_str())).collect();
    assert_eq!(
        keys,
        [
            (21, "policies.p.intercept[0].inject[0].header"),
            (22, "policies.p.intercept[0].inject[1].header"),
            (23, "policies.p.intercept[0].inject[2].header"),
            (24, "policies.p.intercept[0].inject[3].value_file"),
            (25, "policies.p.intercept[0].inject[4].value_file"),
            (26, "policies.p.intercept[0].inject[5].format"),
            (28, "policies.p.intercept[0].rules[0]"),
            (28, "policies.p.intercept[0].rules[1]"),
            (28, "policies.p.intercept[0].rules[2]"),
            (31, "policies.p.intercept[1].host"),
            (34, "policies.p.intercept[2].host"),
            (37, "policies.p.intercept[3].host"),
            (8, "intercept.upstream_ca[0]"),
        ]
    );
    let text = ConfigError::Invalid(issues).to_string();
    assert!(
        text.contains("is not allowed by this policy's allow rules"),
        "{text}"
    );
    assert!(
        text.contains("write the header name in lower case"),
        "{text}"
    );
    assert!(
        !text.contains("sk-test"),
        "a secret never appears in a message"
    );
    // Interception without [intercept].
    let bare = INTERCEPTING.replace(
        "[intercept]\nca_cert = \"ca.crt\"\nca_key = \"ca.key\"\n",
        "",
    );
    let e = parse(&dir.path().join("c.toml"), &bare)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("interception needs an [intercept] section"),
        "{e}"
    );
}

#[test]
fn deny_files_load_relative_shared_once_with_file_line_errors() {
    let (_dir, path, src) = in_dir(
        "allow = [\"*\"]\ndeny_files = [\"lists/a.txt\", \"lists/b.txt\"]\n\n[policies.other]\nallow = [\"x.example\"]\ndeny_files = [\"lists/a.txt\"]",
        &[
            ("lists/a.txt", "# exfil\npaste.example\n0.0.0.0 drop.example\n"),
            ("lists/b.txt", "||tracker.example^\n"),
        ],
    );
    let c = parse(&path, &src).unwrap();
    let (web, other) = (&c.policies[1], &c.policies[0]);
    assert_eq!(&*web.name, "web");
    assert_eq!(web.deny.files().len(), 2);
    assert!(
        Arc::ptr_eq(&web.deny.files()[0], &other.deny.files()[0]),
        "one list named by two policies is loaded once"
    );
    assert_eq!(c.deny_lists.len(), 2);
    let t = crate::target::parse_authority("a.tracker.example:443", None).unwrap();
    let hit = web.denied_by(&t).unwrap();
    assert_eq!(
        (hit.rule.to_string(), hit.source()),
        ("*.tracker.example".into(), "lists/b.txt:1".into())
    );
    let d = web.check(crate::target::Kind::Connect, &t).unwrap_err();
    assert_eq!(
        d.detail,
        "host is denied by rule `*.tracker.example` of policy web (deny list lists/b.txt, line 1)"
    );

    // Problems inside a list name the list's file, line and column, under the config key.
    std::fs::write(
        path.parent().unwrap().join("lists/b.txt"),
        "ok.example\n\n  bad..example\n",
    )
    .unwrap();
    let e = issues_of(parse(&path, &src));
    let list = path.parent().unwrap().join("lists/b.txt");
    assert_eq!(
        e,
        [format!(
            "{}:3:3: policies.web.deny_files[1]: `bad..example`: host is not a valid domain name",
            list.display()
        )]
    );
    // A missing list is an issue at the config's line.
    std::fs::remove_file(&list).unwrap();
    let e = issues_of(parse(&path, &src));
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with(&format!("{}:11:", path.display()))
            && e[0].contains("policies.web.deny_files[1]: `lists/b.txt`: cannot read deny list"),
        "{e:?}"
    );
}

#[test]
fn an_empty_list_is_a_warning() {
    let (_dir, path, src) = in_dir(
        "allow = [\"*\"]\ndeny_files = [\"empty.txt\"]",
        &[("empty.txt", "# nothing yet\n")],
    );
    let c = parse(&path, &src).unwrap();
    assert_eq!(c.warnings.len(), 1);
    assert!(
        c.warnings[0].problem.contains("holds no rules"),
        "{:?}",
        c.warnings
    );
}

#[test]
fn the_cache_reuses_unchanged_lists_and_reads_changed_ones() {
    let (dir, path, src) = in_dir(
        "allow = [\"*\"]\ndeny_files = [\"l.txt\"]",
        &[("l.txt", "a.example\n")],
    );
    let cache = DenyCache::default();
    let first = parse_with(&path, &src, Some(&cache)).unwrap();
    let again = parse_with(&path, &src, Some(&cache)).unwrap();
    let file = |c: &Config| Arc::clone(&c.policies[0].deny.files()[0]);
    assert!(
        Arc::ptr_eq(&file(&first), &file(&again)),
        "unchanged: reused"
    );
    // A rename over the file (the way to replace it atomically) is a new stamp.
    let tmp = dir.path().join("l.txt.new");
    std::fs::write(&tmp, "a.example\nb.example\n").unwrap();
    std::fs::rename(&tmp, dir.path().join("l.txt")).unwrap();
    let changed = parse_with(&path, &src, Some(&cache)).unwrap();
    assert!(!Arc::ptr_eq(&file(&first), &file(&changed)));
    assert_eq!(file(&changed).set.len(), 2);
    // A broken list stays broken from the cache, then a fixed one is read.
    std::fs::write(dir.path().join("l.txt"), "bad..example\n").unwrap();
    assert_eq!(issues_of(parse_with(&path, &src, Some(&cache))).len(), 1);
    assert_eq!(issues_of(parse_with(&path, &src, Some(&cache))).len(), 1);
    std::fs::write(dir.path().join("l.txt"), "c.example\n").unwrap();
    let fixed = parse_with(&path, &src, Some(&cache)).unwrap();
    assert_eq!(file(&fixed).set.len(), 1);
    cache.retain(&[]);
    assert!(cache.lists.lock().is_empty());
}

#[test]
fn check_and_explain_show_interception() {
    use crate::explain::{explain, Who};
    let dir = intercept_dir();
    let c = parse(&dir.path().join("c.toml"), INTERCEPTING).unwrap();
    let summary = crate::commands::summary(&c);
    assert!(summary.contains("intercept: CA "), "{summary}");
    assert!(
        summary.contains("TLS intercepted as `api.openai.com`; injects authorization from openai; allows POST /v1/chat/completions, GET /v1/models/*"),
        "{summary}"
    );
    let who = Who::Agent("local".into());
    let e = explain(&c, &who, "https://api.openai.com/v1/models").unwrap();
    let text = e.to_string();
    assert!(
        text.contains("intercept: TLS intercepted as `api.openai.com`"),
        "{text}"
    );
    let e = explain(&c, &who, "http://api.openai.com/").unwrap();
    assert!(e.intercept.is_none(), "plain HTTP is not intercepted");
    assert!(!summary.contains("sk-test") && !text.contains("sk-test"));
}
