#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may panic on setup failure
//! The monitoring bundle in `deploy/monitoring`: the Prometheus rules pass `promtool check rules`
//! and their unit tests (`promtool test rules`), the PrometheusRule embeds exactly `rules.yaml`,
//! and the rules, their tests and the Grafana dashboard use only metric names the gateway exports
//! (`src/metrics.rs`) and only `reason`/`decision` values it emits (`src/outcome.rs`).
//!
//! promtool comes from Debian's `prometheus` package (CI installs it); without it these tests
//! fail rather than skip.

use std::collections::BTreeSet;
use std::io::ErrorKind;
use std::path::PathBuf;
use std::process::Command;

const RULES: &str = "deploy/monitoring/rules.yaml";
const RULE_TESTS: &str = "deploy/monitoring/rules.test.yaml";
const PROMETHEUS_RULE: &str = "deploy/monitoring/prometheusrule.yaml";
const DASHBOARD: &str = "deploy/monitoring/grafana-dashboard.json";

/// PromQL words that are not metric names (operators and modifiers).
const KEYWORDS: [&str; 15] = [
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
    "Inf",
    "NaN",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// Run promtool from the crate root; panic with its output unless it succeeds.
fn promtool(args: &[&str]) -> String {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "promtool is not on PATH: install Debian's prometheus package \
             (`apt-get install prometheus`, which provides /usr/bin/promtool; CI installs it). \
             The monitoring rules are not checked without it."
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

/// The metric names `src/metrics.rs` declares (`pub const X: &str = "chokepoint_..."`).
fn exported_metrics() -> BTreeSet<String> {
    let names: BTreeSet<String> = read("src/metrics.rs")
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("pub const ") && l.contains(": &str = \""))
        .filter_map(|l| {
            let start = l.find('"')? + 1;
            let end = l.rfind('"')?;
            Some(l[start..end].to_owned())
        })
        .filter(|v| v.starts_with("chokepoint_"))
        .collect();
    assert!(
        names.contains("chokepoint_requests_total") && names.len() >= 8,
        "could not parse the metric names of src/metrics.rs: {names:?}"
    );
    names
}

/// The tokens `as_str` of `impl <ty>` returns in `src/outcome.rs` (`X => "token",`).
fn outcome_tokens(ty: &str) -> BTreeSet<String> {
    let src = read("src/outcome.rs");
    let imp = src
        .find(&format!("impl {ty} {{"))
        .unwrap_or_else(|| panic!("src/outcome.rs has no `impl {ty}`"));
    let body = &src[imp..];
    let start = body
        .find("fn as_str")
        .unwrap_or_else(|| panic!("`impl {ty}` has no as_str"));
    let body = &body[start + "fn as_str".len()..];
    let body = &body[..body.find("fn ").unwrap_or(body.len())];
    let mut tokens = BTreeSet::new();
    let mut rest = body;
    while let Some(i) = rest.find("=> \"") {
        rest = &rest[i + 4..];
        let end = rest.find('"').unwrap();
        tokens.insert(rest[..end].to_owned());
        rest = &rest[end..];
    }
    tokens
}

fn reasons() -> BTreeSet<String> {
    let r = outcome_tokens("Reason");
    assert!(
        r.contains("allowed") && r.contains("host_not_allowed") && r.len() >= 20,
        "could not parse Reason::as_str in src/outcome.rs: {r:?}"
    );
    r
}

fn decisions() -> BTreeSet<String> {
    let d = outcome_tokens("Decision");
    assert!(
        d.contains("allow") && d.contains("deny") && d.len() == 3,
        "could not parse Decision::as_str in src/outcome.rs: {d:?}"
    );
    d
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

/// The `expr:` values of a rule file: inline, quoted, or block scalars (`|`, `>`).
fn rule_exprs(yaml: &str) -> Vec<String> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut exprs = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        i += 1;
        let Some(value) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let value = value.trim();
        if value.starts_with('|') || value.starts_with('>') {
            let indent = indent_of(line);
            let mut block = Vec::new();
            while i < lines.len() && (lines[i].trim().is_empty() || indent_of(lines[i]) > indent) {
                block.push(lines[i].trim());
                i += 1;
            }
            exprs.push(block.join("\n"));
        } else {
            let unquoted = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(value);
            exprs.push(unquoted.to_owned());
        }
    }
    exprs
}

/// The names recorded by `- record:` rules.
fn recorded(yaml: &str) -> BTreeSet<String> {
    yaml.lines()
        .filter_map(|l| l.trim_start().strip_prefix("- record:"))
        .map(|n| n.trim().to_owned())
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Remove the parts of a PromQL expression that hold no metric name: string literals, label
/// matchers, ranges, and the label lists of `by (...)`, `on (...)` and friends.
fn strip_promql(expr: &str) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' | '`' => {
                for d in chars.by_ref() {
                    if d == c {
                        break;
                    }
                }
                out.push(' ');
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                for d in chars.by_ref() {
                    if d == close {
                        break;
                    }
                }
                out.push(' ');
            }
            _ => out.push(c),
        }
    }
    // Label lists of grouping modifiers.
    for kw in [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ] {
        while let Some(at) = find_word(&out, kw) {
            let after = &out[at + kw.len()..];
            let trimmed = after.trim_start();
            let mut end = at + kw.len();
            if trimmed.starts_with('(') {
                let open = end + (after.len() - trimmed.len());
                let close = out[open..].find(')').map_or(out.len(), |j| open + j + 1);
                end = close;
            }
            out.replace_range(at..end, " ");
        }
    }
    out
}

/// The byte offset of `word` in `s` as a whole identifier.
fn find_word(s: &str, word: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(word) {
        let at = from + i;
        let before = s[..at].chars().next_back();
        let after = s[at + word.len()..].chars().next();
        if !before.is_some_and(is_ident) && !after.is_some_and(is_ident) {
            return Some(at);
        }
        from = at + word.len();
    }
    None
}

/// The metric names an expression selects (identifiers that are not functions or keywords).
fn metric_names(expr: &str) -> Vec<String> {
    let stripped = strip_promql(expr);
    let mut names = Vec::new();
    let mut rest = stripped.as_str();
    while let Some(start) = rest.find(|c: char| c.is_ascii_alphabetic() || c == '_' || c == ':') {
        // A number like 1e3 or 0x10 is not a name.
        let prev = rest[..start].chars().next_back();
        let len = rest[start..]
            .find(|c: char| !is_ident(c))
            .unwrap_or(rest.len() - start);
        let word = &rest[start..start + len];
        rest = &rest[start + len..];
        if prev.is_some_and(|p| p.is_ascii_digit() || p == '.' || p == '$') {
            continue;
        }
        let function = rest.trim_start().starts_with('(');
        if function || KEYWORDS.contains(&word) {
            continue;
        }
        names.push(word.to_owned());
    }
    names
}

/// Panic unless `name` is a metric the gateway exports (histogram series included), a name a
/// rule records, `up`, or a process collector metric.
fn assert_known_metric(
    name: &str,
    exported: &BTreeSet<String>,
    recorded: &BTreeSet<String>,
    r#where: &str,
) {
    let base = ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .filter(|b| exported.contains(*b));
    let ok = exported.contains(name)
        || base.is_some()
        || recorded.contains(name)
        || name == "up"
        || name.starts_with("process_");
    assert!(
        ok,
        "{where}: `{name}` is not a metric of src/metrics.rs (nor a recorded name, up or process_*); \
         known: {exported:?}; recorded: {recorded:?}"
    );
}

/// Every identifier of `text` that mentions `chokepoint_` must be a real or recorded name
/// (catches typos in annotations, runbooks, descriptions and test series).
fn assert_chokepoint_tokens(
    text: &str,
    exported: &BTreeSet<String>,
    recorded: &BTreeSet<String>,
    r#where: &str,
) -> usize {
    let mut seen = 0;
    for token in text.split(|c: char| !is_ident(c)) {
        // Prose puts a colon after a name ("chokepoint_x: what it means").
        let token = token.trim_end_matches(':');
        if !token.contains("chokepoint_") {
            continue;
        }
        seen += 1;
        assert_known_metric(token, exported, recorded, r#where);
    }
    seen
}

/// The values of `label="..."`, `label=~"..."`, `label!="..."`, `label!~"..."` matchers in `text`.
fn matcher_values(text: &str, label: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(label) {
        let at = from + i;
        from = at + label.len();
        if text[..at].chars().next_back().is_some_and(is_ident) {
            continue;
        }
        let rest = text[from..].trim_start();
        let Some(op) = ["=~", "!~", "!=", "="]
            .into_iter()
            .find(|op| rest.starts_with(op))
        else {
            continue;
        };
        let rest = rest[op.len()..].trim_start();
        let Some(value) = rest.strip_prefix('"') else {
            continue;
        };
        let Some(end) = value.find('"') else {
            continue;
        };
        let value = &value[..end];
        if !value.contains("{{") {
            found.push((op.to_owned(), value.to_owned()));
        }
    }
    found
}

/// Panic unless every value a `label` matcher of `text` names is in `tokens` (regex
/// alternatives: each literal must exist, each `prefix.*` must match at least one token).
fn assert_matchers(text: &str, label: &str, tokens: &BTreeSet<String>, r#where: &str) -> usize {
    let mut checked = 0;
    for (op, value) in matcher_values(text, label) {
        let alternatives: Vec<&str> = if op.ends_with('~') {
            value.split('|').collect()
        } else {
            vec![value.as_str()]
        };
        for alt in alternatives {
            checked += 1;
            let is_meta = |c: char| ".*+?()[]{}^$\\".contains(c);
            if !alt.contains(is_meta) {
                assert!(
                    tokens.contains(alt),
                    "{where}: {label}{op}\"{value}\": `{alt}` is not a {label} the gateway emits; \
                     known: {tokens:?}"
                );
            } else if let Some(prefix) = alt.strip_suffix(".*").filter(|p| !p.contains(is_meta)) {
                assert!(
                    tokens.iter().any(|t| t.starts_with(prefix)),
                    "{where}: {label}{op}\"{value}\": `{alt}` matches no {label}; known: {tokens:?}"
                );
            } else {
                panic!(
                    "{where}: {label}{op}\"{value}\": this test understands literal alternatives \
                     and `prefix.*` only; write `{alt}` that way or teach tests/monitoring.rs"
                );
            }
        }
    }
    checked
}

/// Every string in a JSON document.
fn json_strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

/// Every PromQL expression of the dashboard: panel targets, annotation queries, variables.
fn dashboard_exprs(dash: &serde_json::Value) -> Vec<String> {
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(o) => {
                for (k, x) in o {
                    match (k.as_str(), x) {
                        ("expr", serde_json::Value::String(s)) => out.push(s.clone()),
                        _ => walk(x, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(dash, &mut out);
    out
}

fn dashboard() -> serde_json::Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Alert name → its block of lines in the rule file.
fn alert_blocks(yaml: &str) -> Vec<(String, String)> {
    let mut blocks: Vec<(String, String)> = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in yaml.lines() {
        let t = line.trim_start();
        if t.starts_with("- record:") || t.starts_with("- name:") || t.starts_with("- alert:") {
            blocks.extend(current.take());
            if let Some(name) = t.strip_prefix("- alert:") {
                current = Some((name.trim().to_owned(), String::new()));
            }
        }
        if let Some((_, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    blocks.extend(current);
    blocks
}

#[test]
fn promtool_accepts_the_rules() {
    let out = promtool(&["check", "rules", RULES]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn promtool_unit_tests_of_the_rules_pass() {
    let out = promtool(&["test", "rules", RULE_TESTS]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn prometheus_rule_spec_is_rules_yaml_indented() {
    let rules = read(RULES);
    let resource = read(PROMETHEUS_RULE);
    for needle in [
        "apiVersion: monitoring.coreos.com/v1",
        "kind: PrometheusRule",
        "  namespace: chokepoint-system",
        "    app.kubernetes.io/name: chokepoint",
    ] {
        assert!(
            resource.lines().any(|l| l == needle),
            "{PROMETHEUS_RULE} lacks `{needle}`"
        );
    }
    let mut lines = resource.lines();
    assert!(
        lines.by_ref().any(|l| l == "spec:"),
        "{PROMETHEUS_RULE} has no `spec:` line"
    );
    let spec: Vec<&str> = lines.collect();
    let want: Vec<String> = rules
        .lines()
        .map(|l| {
            if l.is_empty() {
                String::new()
            } else {
                format!("  {l}")
            }
        })
        .collect();
    for (n, (got, want)) in spec.iter().zip(&want).enumerate() {
        assert_eq!(
            got,
            want,
            "{PROMETHEUS_RULE} line {} after `spec:` differs from {RULES} line {} indented by two \
             spaces; regenerate it (see the comment at its top)",
            n + 1,
            n + 1
        );
    }
    assert_eq!(
        spec.len(),
        want.len(),
        "{PROMETHEUS_RULE}: `spec:` has {} lines, {RULES} has {}; regenerate it",
        spec.len(),
        want.len()
    );
}

#[test]
fn rules_and_dashboard_use_only_exported_metrics() {
    let exported = exported_metrics();
    let rules = read(RULES);
    let recorded = recorded(&rules);
    assert!(!recorded.is_empty(), "{RULES} records nothing");

    let exprs = rule_exprs(&rules);
    let rule_count = rules
        .lines()
        .filter(|l| {
            let t = l.trim_start();
            t.starts_with("- record:") || t.starts_with("- alert:")
        })
        .count();
    assert_eq!(
        exprs.len(),
        rule_count,
        "one expr per rule expected in {RULES}"
    );
    let mut selected = BTreeSet::new();
    for expr in &exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{RULES}: no metric in `{expr}`");
        for name in names {
            assert_known_metric(&name, &exported, &recorded, RULES);
            selected.insert(name);
        }
    }
    // The alerts cover what the brief of each alert names.
    for name in [
        "chokepoint_requests_total",
        "chokepoint_audit_queue_lines",
        "chokepoint_audit_wait_seconds_total",
        "chokepoint_config_reloads_total",
        "up",
    ] {
        assert!(selected.contains(name), "{RULES} never uses {name}");
    }
    // Annotations, runbooks and comments too.
    assert_chokepoint_tokens(&rules, &exported, &recorded, RULES);
    // The synthetic series of the unit tests are real series.
    let tests = read(RULE_TESTS);
    assert!(assert_chokepoint_tokens(&tests, &exported, &recorded, RULE_TESTS) > 10);

    let dash = dashboard();
    let dash_exprs = dashboard_exprs(&dash);
    assert!(dash_exprs.len() >= 10, "{DASHBOARD}: too few queries");
    let mut dash_selected = BTreeSet::new();
    for expr in &dash_exprs {
        let names = metric_names(expr);
        assert!(!names.is_empty(), "{DASHBOARD}: no metric in `{expr}`");
        for name in names {
            // The dashboard must work without the recording rules.
            assert_known_metric(&name, &exported, &BTreeSet::new(), DASHBOARD);
            dash_selected.insert(name);
        }
    }
    for name in &exported {
        let used = dash_selected.contains(name)
            || ["_bucket", "_count"]
                .iter()
                .any(|s| dash_selected.contains(&format!("{name}{s}")));
        assert!(used, "{DASHBOARD} shows no panel of {name}");
    }
    let mut strings = Vec::new();
    json_strings(&dash, &mut strings);
    for s in strings {
        assert_chokepoint_tokens(s, &exported, &BTreeSet::new(), DASHBOARD);
        // label_values(metric, label) in a variable query.
        if let Some(args) = s.trim().strip_prefix("label_values(") {
            let metric = args.split([',', '{', ')']).next().unwrap().trim();
            assert_known_metric(metric, &exported, &BTreeSet::new(), DASHBOARD);
        }
    }
}

#[test]
fn reason_and_decision_values_are_the_gateways() {
    let reasons = reasons();
    let decisions = decisions();
    let rules = read(RULES);
    assert!(assert_matchers(&rules, "reason", &reasons, RULES) >= 5);
    assert!(assert_matchers(&rules, "decision", &decisions, RULES) >= 3);
    let tests = read(RULE_TESTS);
    assert!(assert_matchers(&tests, "reason", &reasons, RULE_TESTS) >= 5);
    assert!(assert_matchers(&tests, "decision", &decisions, RULE_TESTS) >= 5);
    let mut strings = Vec::new();
    let dash = dashboard();
    json_strings(&dash, &mut strings);
    let mut checked = 0;
    for s in strings {
        checked += assert_matchers(s, "reason", &reasons, DASHBOARD);
        checked += assert_matchers(s, "decision", &decisions, DASHBOARD);
    }
    assert!(
        checked >= 5,
        "{DASHBOARD}: too few reason/decision matchers"
    );
}

#[test]
fn every_alert_is_documented_labelled_and_tested_both_ways() {
    let rules = read(RULES);
    let blocks = alert_blocks(&rules);
    assert!(blocks.len() >= 6, "{RULES}: too few alerts");

    // Which alerts the unit tests expect to fire, and which they expect silent.
    let tests = read(RULE_TESTS);
    let mut fires = BTreeSet::new();
    let mut silent = BTreeSet::new();
    let mut alertname: Option<String> = None;
    for line in tests.lines() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix("alertname:") {
            alertname = Some(name.trim().to_owned());
        } else if let Some(exp) = t.strip_prefix("exp_alerts:") {
            let name = alertname.take().expect("exp_alerts without alertname");
            if exp.trim() == "[]" {
                silent.insert(name);
            } else {
                fires.insert(name);
            }
        }
    }

    let docs = read("docs/metrics.md");
    for (name, body) in &blocks {
        let severity = body
            .lines()
            .find_map(|l| l.trim().strip_prefix("severity:"))
            .map(|s| s.trim().trim_matches('"'));
        assert!(
            matches!(severity, Some("critical" | "warning" | "info")),
            "{RULES}: alert {name} needs a severity label (critical, warning or info)"
        );
        for key in ["summary:", "description:", "runbook:"] {
            assert!(
                body.lines().any(|l| l.trim_start().starts_with(key)),
                "{RULES}: alert {name} lacks the `{key}` annotation"
            );
        }
        assert!(
            fires.contains(name),
            "{RULE_TESTS} never shows {name} firing"
        );
        assert!(
            silent.contains(name),
            "{RULE_TESTS} never shows {name} silent"
        );
        assert!(
            docs.contains(name.as_str()),
            "docs/metrics.md does not explain {name}"
        );
    }
}

#[test]
fn dashboard_is_valid_json_with_panels_and_variables() {
    let dash = dashboard();
    let panels = dash["panels"].as_array().expect("panels array");
    let graphs: Vec<&serde_json::Value> = panels.iter().filter(|p| p["type"] != "row").collect();
    assert!(graphs.len() >= 10, "{DASHBOARD}: too few panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        let id = p["id"].as_u64().expect("panel id");
        assert!(ids.insert(id), "{DASHBOARD}: duplicate panel id {id}");
        assert!(p["gridPos"]["w"].as_u64().is_some(), "panel {id}: gridPos");
    }
    for p in graphs {
        let title = p["title"].as_str().expect("panel title");
        assert_eq!(
            p["datasource"]["uid"], "${datasource}",
            "panel {title}: use the ${{datasource}} variable"
        );
        let targets = p["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "panel {title} has no query");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "panel {title}: empty query"
            );
        }
    }
    let vars = dash["templating"]["list"].as_array().expect("templating");
    let var = |name: &str| {
        vars.iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("{DASHBOARD}: no `{name}` variable"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    assert!(var("agent")["definition"]
        .as_str()
        .unwrap()
        .contains("label_values(chokepoint_requests_total, agent)"));
    assert!(dash["schemaVersion"].as_u64().unwrap() >= 36);

    let kustomization = read("deploy/monitoring/kustomization.yaml");
    for needle in [
        "prometheusrule.yaml",
        "servicemonitor.yaml",
        "grafana-dashboard.json",
        "grafana_dashboard: \"1\"",
        "disableNameSuffixHash: true",
    ] {
        assert!(
            kustomization.contains(needle),
            "kustomization.yaml lacks {needle}"
        );
    }
}

#[test]
fn promql_metric_extraction_sees_through_modifiers() {
    let names = metric_names(
        r#"sum by (agent, le) (rate(chokepoint_requests_total{reason=~"dns_.*",agent="x"}[5m] offset 1h))
           / on (agent) group_left (kind) up > 3 * avg_over_time(a:b:rate5m[1d]) and 1e3 > bool 2"#,
    );
    assert_eq!(
        names,
        ["chokepoint_requests_total", "up", "a:b:rate5m"],
        "{names:?}"
    );
    let found = matcher_values(
        r#"x{reason=~"a|b", decision!="deny"} .reason == "c" reason="{{ $labels.reason }}""#,
        "reason",
    );
    assert_eq!(found, [("=~".to_owned(), "a|b".to_owned())]);
}
