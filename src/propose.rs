//! `chokepoint propose`: read audit lines (typically a day of report mode) and print, per policy,
//! the smallest allowlist change that admits every `would_deny` request — exact rules only, so
//! nothing beyond what was observed is admitted — as TOML an operator can paste.
//!
//! Never proposed: a host a deny rule of the current config refuses (a deny rule wins over any
//! allow rule, so the rule would be dead, and the host was denied on purpose), and any rule for
//! an open-web policy (its `*` must stay its only allow rule); both are counted in a comment.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::io::BufRead;

use serde::Deserialize;

use crate::config::Config;
use crate::target::{self, Host, Kind, Target};

/// The audit fields `propose` reads (other fields are ignored, so newer lines still parse).
#[derive(Debug, Deserialize)]
struct Line {
    event: String,
    agent: Option<String>,
    policy: Option<String>,
    host: Option<String>,
    port: Option<u16>,
    decision: String,
    reason: String,
}

/// What one policy needs.
#[derive(Debug, Default)]
struct Needs {
    /// Rule text → (requests, agents).
    rules: BTreeMap<String, (u64, BTreeSet<String>)>,
    /// Limit reasons (`rate_limited`, …) → requests.
    limits: BTreeMap<String, u64>,
    /// would_deny lines already admitted by the current config (it changed since).
    already: u64,
    /// would_deny lines whose host a deny rule refuses (`host_denied`, or denied by the
    /// current config): never proposed.
    denied: u64,
    /// would_deny lines of an open-web policy (a port or an IP literal it does not admit):
    /// not proposed, since `*` must stay the policy's only rule.
    open_web: u64,
}

/// What the current config says about a would_deny line's target.
enum Now {
    /// Admitted by an allow rule already.
    Admitted,
    /// Refused by a deny rule.
    Denied,
    /// The policy is open-web.
    OpenWeb,
    /// Still refused by the allowlist (or the policy or target is unknown).
    Refused,
}

/// Totals for the report header.
#[derive(Debug, Default)]
pub struct Summary {
    /// Lines read.
    pub lines: u64,
    /// Lines that were not audit JSON.
    pub skipped: u64,
    /// `would_deny` lines considered.
    pub would_deny: u64,
}

/// Read audit lines from `input`; return the TOML proposal and the totals.
pub fn propose(
    config: &Config,
    input: impl BufRead,
    only_policy: Option<&str>,
) -> std::io::Result<(String, Summary)> {
    let mut sum = Summary::default();
    let mut by_policy: BTreeMap<String, Needs> = BTreeMap::new();
    for line in input.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        sum.lines += 1;
        let Ok(l) = serde_json::from_str::<Line>(&line) else {
            sum.skipped += 1;
            continue;
        };
        if l.decision != "would_deny" {
            continue;
        }
        let Some(policy) = l.policy.clone() else {
            continue;
        };
        if only_policy.is_some_and(|p| p != policy) {
            continue;
        }
        sum.would_deny += 1;
        let needs = by_policy.entry(policy.clone()).or_default();
        match l.reason.as_str() {
            "host_denied" => needs.denied += 1,
            "host_not_allowed" | "port_not_allowed" | "ip_literal_not_allowed" => {
                let Some(rule) = rule_for(&l) else { continue };
                match judge_now(config, &policy, &l) {
                    Now::Admitted => {
                        needs.already += 1;
                        continue;
                    }
                    Now::Denied => {
                        needs.denied += 1;
                        continue;
                    }
                    Now::OpenWeb => {
                        needs.open_web += 1;
                        continue;
                    }
                    Now::Refused => {}
                }
                let entry = needs.rules.entry(rule).or_default();
                entry.0 += 1;
                if let Some(agent) = l.agent {
                    entry.1.insert(agent);
                }
            }
            other => *needs.limits.entry(other.to_owned()).or_default() += 1,
        }
    }
    Ok((render(config, &by_policy), sum))
}

/// The exact rule that admits this request: a port-less rule where the port is the default one
/// for the request kind, `host:port` otherwise.
fn rule_for(l: &Line) -> Option<String> {
    let host = l.host.as_deref()?;
    let port = l.port?;
    let default = match l.event.as_str() {
        "connect" => 443,
        "http" => 80,
        _ => return None,
    };
    let host = match host.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.to_owned(),
    };
    // A bracketed IPv6 rule always carries its port (the grammar needs `[v6]:port` to be
    // unambiguous to a reader); names and IPv4 use the port-less form for the default port.
    Some(if port == default && !host.starts_with('[') {
        host
    } else {
        format!("{host}:{port}")
    })
}

fn judge_now(config: &Config, policy: &str, l: &Line) -> Now {
    let Some(p) = config.policies.iter().find(|p| &*p.name == policy) else {
        return Now::Refused;
    };
    let kind = if l.event == "http" {
        Kind::Http
    } else {
        Kind::Connect
    };
    let (Some(host), Some(port)) = (l.host.as_deref(), l.port) else {
        return Now::Refused;
    };
    let host = match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Host::Ip(ip),
        Err(_) => match target::normalise_host(host) {
            Ok(h) => h,
            Err(_) => return Now::Refused,
        },
    };
    let target = Target { host, port };
    if p.denied_by(&target).is_some() {
        Now::Denied
    } else if p.check(kind, &target).is_ok() {
        Now::Admitted
    } else if p.is_open_web() {
        Now::OpenWeb
    } else {
        Now::Refused
    }
}

fn render(config: &Config, by_policy: &BTreeMap<String, Needs>) -> String {
    let mut out = String::new();
    if by_policy.is_empty() {
        out.push_str("# no would_deny requests: nothing to propose\n");
        return out;
    }
    for (policy, needs) in by_policy {
        let requests: u64 = needs.rules.values().map(|(n, _)| n).sum();
        let _ = writeln!(
            out,
            "# policy {policy}: {} new rule(s) admit {requests} would_deny request(s)",
            needs.rules.len()
        );
        if needs.already > 0 {
            let _ = writeln!(
                out,
                "# ({} request(s) are admitted by the current config already)",
                needs.already
            );
        }
        if needs.denied > 0 {
            let _ = writeln!(
                out,
                "# {} request(s) went to hosts a deny rule refuses: not proposed (a deny rule wins over any allow rule)",
                needs.denied
            );
        }
        if needs.open_web > 0 {
            let _ = writeln!(
                out,
                "# {} request(s) were refused by open-web policy {policy} (a port or an IP literal `*` does not admit): not proposed, `*` must stay its only allow rule",
                needs.open_web
            );
        }
        for (reason, n) in &needs.limits {
            let _ = writeln!(
                out,
                "# {n} request(s) were over a limit ({reason}): consider `limits = {{ … }}` for this policy"
            );
        }
        if needs.rules.is_empty() {
            out.push('\n');
            continue;
        }
        let _ = writeln!(out, "[policies.{policy}]\nallow = [");
        if let Some(p) = config.policies.iter().find(|p| &*p.name == policy.as_str()) {
            for r in p.allowlist.rules() {
                let _ = writeln!(out, "  \"{}\",", r.text);
            }
        } else {
            let _ = writeln!(out, "  # policy {policy} is not in the current config");
        }
        for (rule, (n, agents)) in &needs.rules {
            let agents: Vec<&str> = agents.iter().map(String::as_str).collect();
            let _ = writeln!(
                out,
                "  \"{rule}\",  # new: {n} request(s) from {}",
                if agents.is_empty() {
                    "-".to_owned()
                } else {
                    agents.join(", ")
                }
            );
        }
        out.push_str("]\n\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CFG: &str = r#"
[server]
listen = "127.0.0.1:3128"
[[agents]]
name = "coder"
source_cidrs = ["10.42.0.0/16"]
policy = "llm"
[policies.llm]
mode = "report"
allow = ["api.openai.com"]
"#;

    fn line(event: &str, host: &str, port: u16, decision: &str, reason: &str) -> String {
        format!(
            r#"{{"v":1,"event":"{event}","agent":"coder","policy":"llm","host":"{host}","port":{port},"decision":"{decision}","reason":"{reason}","future_field":1}}"#
        )
    }

    #[test]
    fn exact_rules_with_counts_and_pasteable_toml() {
        let cfg = crate::config::parse(Path::new("t.toml"), CFG).unwrap();
        let input = [
            line("connect", "pypi.org", 443, "would_deny", "host_not_allowed"),
            line("connect", "pypi.org", 443, "would_deny", "host_not_allowed"),
            line(
                "http",
                "mirror.test",
                8080,
                "would_deny",
                "host_not_allowed",
            ),
            line(
                "connect",
                "2001:db8::1",
                443,
                "would_deny",
                "ip_literal_not_allowed",
            ),
            line(
                "connect",
                "api.openai.com",
                443,
                "would_deny",
                "host_not_allowed",
            ),
            line(
                "connect",
                "api.openai.com",
                443,
                "would_deny",
                "rate_limited",
            ),
            line("connect", "evil.test", 443, "deny", "host_not_allowed"),
            "not json".to_owned(),
        ]
        .join("\n");
        let (toml_text, sum) = propose(&cfg, input.as_bytes(), None).unwrap();
        assert_eq!((sum.lines, sum.skipped, sum.would_deny), (8, 1, 6));
        assert!(
            toml_text.contains("\"pypi.org\",  # new: 2 request(s) from coder"),
            "{toml_text}"
        );
        assert!(toml_text.contains("\"mirror.test:8080\","), "{toml_text}");
        assert!(toml_text.contains("\"[2001:db8::1]:443\","), "{toml_text}");
        assert!(
            toml_text.contains("admitted by the current config already"),
            "{toml_text}"
        );
        assert!(
            toml_text.contains("over a limit (rate_limited)"),
            "{toml_text}"
        );
        assert!(
            !toml_text.contains("evil.test"),
            "only would_deny lines count"
        );
        // The proposal is valid TOML whose rules pass the rule grammar.
        let parsed: toml::Value = toml::from_str(&toml_text).unwrap();
        let allow = parsed["policies"]["llm"]["allow"].as_array().unwrap();
        assert_eq!(allow.len(), 4, "existing rule kept plus three new");
        for r in allow {
            crate::policy::parse_rule(r.as_str().unwrap()).unwrap();
        }
    }

    #[test]
    fn denied_hosts_and_open_web_policies_are_never_proposed() {
        let cfg = crate::config::parse(
            Path::new("t.toml"),
            &format!(
                "{CFG}deny = [\"*.paste.test\", \"drop.test\"]\n[[agents]]\nname = \"web\"\nsource_cidrs = [\"10.44.0.0/16\"]\npolicy = \"web\"\n[policies.web]\nmode = \"report\"\nallow = [\"*\"]\n"
            ),
        )
        .unwrap();
        let input = [
            // Denied now by a deny rule (the line predates it): not proposed.
            line(
                "connect",
                "a.paste.test",
                443,
                "would_deny",
                "host_not_allowed",
            ),
            // Reported as denied: not proposed either.
            line("connect", "drop.test", 443, "would_deny", "host_denied"),
            // Still a candidate.
            line("connect", "pypi.org", 443, "would_deny", "host_not_allowed"),
            // An open-web policy's refusals (a port, an IP literal): never a rule next to `*`.
            line(
                "connect",
                "site.test",
                8443,
                "would_deny",
                "port_not_allowed",
            )
            .replace("\"llm\"", "\"web\""),
        ]
        .join("\n");
        let (text, sum) = propose(&cfg, input.as_bytes(), None).unwrap();
        assert_eq!(sum.would_deny, 4);
        assert!(text.contains("\"pypi.org\",  # new"), "{text}");
        assert!(!text.contains("paste.test\","), "{text}");
        assert!(!text.contains("drop.test\","), "{text}");
        assert!(!text.contains("site.test"), "{text}");
        assert!(
            text.contains("# 2 request(s) went to hosts a deny rule refuses: not proposed"),
            "{text}"
        );
        assert!(
            text.contains("# 1 request(s) were refused by open-web policy web"),
            "{text}"
        );
        assert!(!text.contains("[policies.web]"), "{text}");
    }

    #[test]
    fn nothing_to_propose() {
        let cfg = crate::config::parse(Path::new("t.toml"), CFG).unwrap();
        let (text, sum) = propose(&cfg, "".as_bytes(), None).unwrap();
        assert_eq!(sum.would_deny, 0);
        assert!(text.starts_with("# no would_deny"));
    }
}
