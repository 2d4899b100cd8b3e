//! `chokepoint explain`: what the gateway would decide for one agent and one target, without
//! sending anything — the decision, the rule or reason, the policy, the limits, and with
//! `--resolve` the DNS answers and which addresses vetting keeps.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::config::Config;
use crate::identity::{AgentId, Agents};
use crate::outcome::{Deny, Outcome, Reason, Verdict};
use crate::policy::{Mode, Policy};
use crate::target::{self, Kind, Target};

/// Who is asking.
#[derive(Clone, Debug)]
pub enum Who {
    /// An agent by name.
    Agent(String),
    /// A client address, matched like a connection (address classes only: tokens cannot be
    /// presented here).
    Client(IpAddr),
}

/// Each resolved address and, if vetting refuses it, why.
pub type Vetted = Vec<(IpAddr, Result<(), String>)>;

/// The outcome of `explain`.
#[derive(Debug)]
pub struct Explanation {
    /// The request the target stands for.
    pub kind: Kind,
    /// The parsed target.
    pub target: Target,
    /// The agent's name.
    pub agent: String,
    /// How the agent was found.
    pub matched_by: String,
    /// Policy name and mode.
    pub policy: String,
    /// Mode of the policy.
    pub mode: Mode,
    /// Allowed by the rule, or refused with the reason.
    pub verdict: Result<String, Deny>,
    /// The deny rule that refused, and where it is written (`deny[2]`, `lists/exfil.txt:17`).
    pub denied_by: Option<String>,
    /// The policy is open-web (`allow = ["*"]`).
    pub open_web: bool,
    /// The limits line.
    pub limits: String,
    /// With `--resolve`: each address and whether vetting keeps it.
    pub addresses: Option<Result<Vetted, Deny>>,
    /// For a CONNECT the policy intercepts: what interception does to it.
    pub intercept: Option<String>,
}

/// Why a question could not be answered (usage errors: exit 64).
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The target could not be parsed.
    #[error("target `{0}`: {1}")]
    Target(String, String),
    /// No such agent.
    #[error("no agent named `{0}` (agents: {1})")]
    NoAgent(String, String),
    /// The client address matches no agent.
    #[error("{0}")]
    Unmatched(String),
}

/// Parse the TARGET argument: `https://host[:port]/…` (a CONNECT), `http://host[:port]/…` (plain
/// HTTP), or `host:port` (a CONNECT).
pub fn parse_target(arg: &str) -> Result<(Kind, Target), ExplainError> {
    let bad = |d: Deny| ExplainError::Target(arg.to_owned(), d.detail.into_owned());
    let lower = arg.to_ascii_lowercase();
    let (kind, rest, default_port) = if let Some(r) = lower.strip_prefix("https://") {
        (Kind::Connect, &arg[arg.len() - r.len()..], Some(443))
    } else if let Some(r) = lower.strip_prefix("http://") {
        (Kind::Http, &arg[arg.len() - r.len()..], Some(80))
    } else {
        (Kind::Connect, arg, None)
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or(rest);
    let t = target::parse_authority(authority, default_port).map_err(bad)?;
    Ok((kind, t))
}

/// Decide, as the gateway would, everything but the network steps.
pub fn explain(config: &Config, who: &Who, arg: &str) -> Result<Explanation, ExplainError> {
    let (kind, target) = parse_target(arg)?;
    let (id, matched_by) = find_agent(&config.agents, who)?;
    let agent = config.agents.get(id);
    let policy = config.policy_of(agent);
    let verdict = policy
        .check(kind, &target)
        .map(|rule| rule.text.to_string());
    let denied_by = policy
        .denied_by(&target)
        .map(|hit| format!("`{}` ({})", hit.rule, hit.source()));
    let intercept = match kind {
        Kind::Connect => policy.intercept.find(&target).map(intercept_line),
        Kind::Http => None,
    };
    Ok(Explanation {
        intercept,
        kind,
        target,
        agent: agent.name.to_string(),
        matched_by,
        policy: policy.name.to_string(),
        mode: policy.mode,
        verdict,
        denied_by,
        open_web: policy.is_open_web(),
        limits: limits_line(policy, config),
        addresses: None,
    })
}

/// Vet resolved addresses as the gateway would for this policy.
pub fn vet_each(config: &Config, policy: &Policy, addrs: &[IpAddr], port: u16) -> Vetted {
    addrs
        .iter()
        .map(|&ip| {
            let verdict = config
                .vetter
                .check_with(ip, port, &policy.allow_cidrs)
                .map_err(|r| r.to_string());
            (ip, verdict)
        })
        .collect()
}

fn find_agent(agents: &Agents, who: &Who) -> Result<(AgentId, String), ExplainError> {
    match who {
        Who::Agent(name) => agents
            .iter()
            .position(|a| &*a.name == name)
            .map(|i| (AgentId(i), "chosen with --agent".to_owned()))
            .ok_or_else(|| {
                let names: Vec<&str> = agents.iter().map(|a| &*a.name).collect();
                ExplainError::NoAgent(name.clone(), names.join(", "))
            }),
        Who::Client(ip) => {
            // Exactly the gateway's matching, for a client that sends no credentials (so no
            // token is ever compared: none are loaded).
            let client = SocketAddr::new(*ip, 0);
            let no_tokens = crate::identity::Tokens::default();
            match agents.identify(&no_tokens, client, &http::HeaderMap::new(), None, 0) {
                Ok(id) => Ok((id, format!("by source address {ip}, without credentials"))),
                Err(d) => Err(ExplainError::Unmatched(format!(
                    "{ip} without credentials: the gateway would refuse it ({}: {}); use --agent NAME for token or certificate agents",
                    d.reason, d.detail
                ))),
            }
        }
    }
}

/// What interception does to a host: the leaf, the injected headers (by secret name) and the
/// rules.
pub fn intercept_line(i: &crate::intercept::Intercept) -> String {
    let inject: Vec<String> = i
        .inject
        .iter()
        .map(|j| format!("{} from {}", j.header, j.name))
        .collect();
    let rules: Vec<&str> = i.rules.iter().map(|r| &*r.text).collect();
    format!(
        "TLS intercepted as `{}`; injects {}; allows {}",
        i.host,
        if inject.is_empty() {
            "nothing".to_owned()
        } else {
            inject.join(", ")
        },
        if rules.is_empty() {
            "any method and path".to_owned()
        } else {
            rules.join(", ")
        }
    )
}

fn limits_line(policy: &Policy, config: &Config) -> String {
    let l = &policy.limits;
    // Which of them hold across replicas: with [cluster] the rate and the concurrency cap are
    // shared through the store; the size caps are per request either way.
    let scope = match &config.cluster {
        Some(_) => "cluster-wide",
        None => "per process",
    };
    format!(
        "{} req/s, burst {}, {} concurrent ({scope}); head <= {} B, body <= {} B, tunnel upload <= {} B, response <= {} B",
        l.requests_per_second,
        l.burst,
        l.max_concurrent,
        l.max_request_header_bytes,
        l.max_request_body_bytes,
        l.max_tunnel_upload_bytes,
        l.max_response_body_bytes
    )
}

// === impl Explanation ===

impl Explanation {
    /// What the gateway would record, folded by the proxy's own rule ([`Outcome::refuse`]): the
    /// allowlist verdict under the policy's mode, then, when resolved, the lookup and vetting.
    pub fn outcome(&self) -> Outcome {
        let mut outcome = Outcome::ALLOWED;
        if let Err(d) = &self.verdict {
            if outcome.refuse(self.mode, d.reason) == Verdict::Refuse {
                return outcome;
            }
        }
        match &self.addresses {
            Some(Err(d)) => {
                outcome.refuse(self.mode, d.reason);
            }
            Some(Ok(list)) if list.iter().all(|(_, v)| v.is_err()) => {
                outcome.refuse(self.mode, Reason::DeniedAddress);
            }
            _ => {}
        }
        outcome
    }

    /// `allow`, `deny`, or `would_deny` (report mode), as the audit line would say.
    pub fn decision(&self) -> &'static str {
        self.outcome().decision().as_str()
    }

    /// Exit status: 0 only when the request would be let through as allowed (a failed lookup
    /// is audited `allow` with its fault as the reason, and exits 1).
    pub fn exit_code(&self) -> u8 {
        u8::from(self.outcome().reason() != Reason::Allowed)
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let method = match self.kind {
            Kind::Connect => "CONNECT",
            Kind::Http => "plain HTTP to",
        };
        writeln!(f, "request:  {method} {}", self.target)?;
        writeln!(f, "agent:    {} ({})", self.agent, self.matched_by)?;
        let open = if self.open_web { ", open web" } else { "" };
        writeln!(
            f,
            "policy:   {} (mode {}{open})",
            self.policy,
            self.mode.as_str()
        )?;
        writeln!(f, "decision: {}", self.decision())?;
        match &self.verdict {
            Ok(rule) => writeln!(f, "rule:     {rule}")?,
            Err(d) => writeln!(f, "reason:   {} ({})", d.reason, d.detail)?,
        }
        if let Some(deny) = &self.denied_by {
            writeln!(f, "deny:     {deny}")?;
        }
        writeln!(f, "limits:   {}", self.limits)?;
        if let Some(i) = &self.intercept {
            writeln!(f, "intercept: {i}")?;
        }
        match &self.addresses {
            None => {}
            Some(Err(d)) => writeln!(f, "resolve:  {} ({})", d.reason, d.detail)?,
            Some(Ok(list)) => {
                writeln!(f, "resolve:  {} address(es)", list.len())?;
                for (ip, verdict) in list {
                    match verdict {
                        Ok(()) => writeln!(f, "  {ip}: kept")?,
                        Err(why) => writeln!(f, "  {ip}: refused, {why}")?,
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const CFG: &str = r#"
[server]
listen = "127.0.0.1:3128"
[destinations]
deny_cidrs = ["127.0.0.64/26"]
[[agents]]
name = "coder"
source_cidrs = ["10.42.0.0/16"]
policy = "llm"
[[agents]]
name = "watcher"
source_cidrs = ["10.43.0.0/16"]
policy = "trial"
[policies.llm]
allow = ["api.openai.com", "*.githubusercontent.com:443"]
limits = { requests_per_second = 5, burst = 10 }
[policies.trial]
mode = "report"
allow = ["api.openai.com"]
"#;

    fn cfg() -> Config {
        crate::config::parse(Path::new("t.toml"), CFG).unwrap()
    }

    #[test]
    fn allow_deny_and_report() {
        let c = cfg();
        let e = explain(
            &c,
            &Who::Agent("coder".into()),
            "https://api.openai.com/v1/chat",
        )
        .unwrap();
        assert_eq!((e.decision(), e.exit_code()), ("allow", 0));
        assert_eq!(e.verdict.as_deref().unwrap(), "api.openai.com");
        let text = e.to_string();
        assert!(
            text.contains("request:  CONNECT api.openai.com:443"),
            "{text}"
        );
        assert!(text.contains("5 req/s, burst 10"), "{text}");

        let e = explain(
            &c,
            &Who::Client("10.42.1.7".parse().unwrap()),
            "evil.test:443",
        )
        .unwrap();
        assert_eq!((e.decision(), e.exit_code()), ("deny", 1));
        assert!(e.to_string().contains("reason:   host_not_allowed"));

        let e = explain(&c, &Who::Agent("watcher".into()), "http://evil.test/").unwrap();
        assert_eq!((e.decision(), e.exit_code()), ("would_deny", 1));

        let e = explain(
            &c,
            &Who::Agent("coder".into()),
            "http://raw.githubusercontent.com/x",
        )
        .unwrap();
        assert_eq!(
            e.decision(),
            "deny",
            "the wildcard rule is for port 443 only"
        );
    }

    #[test]
    fn resolution_vetting_is_part_of_the_decision() {
        let c = cfg();
        let mut e = explain(&c, &Who::Agent("coder".into()), "api.openai.com:443").unwrap();
        let policy = &c.policies[c.agents.get(AgentId(0)).policy];
        e.addresses = Some(Ok(vet_each(
            &c,
            policy,
            &["127.0.0.66".parse().unwrap()],
            443,
        )));
        assert_eq!(e.decision(), "deny");
        assert!(e
            .to_string()
            .contains("127.0.0.66: refused, in deny_cidrs range 127.0.0.64/26"));
    }

    #[test]
    fn deny_rules_are_named_and_open_web_is_shown() {
        let src = format!(
            "{CFG}[[agents]]\nname = \"web\"\nsource_cidrs = [\"10.44.0.0/16\"]\npolicy = \"web\"\n[policies.web]\nallow = [\"*\"]\ndeny = [\"*.paste.test\"]\n"
        );
        let c = crate::config::parse(Path::new("t.toml"), &src).unwrap();
        let web = Who::Agent("web".into());
        let e = explain(&c, &web, "https://a.paste.test/x").unwrap();
        assert_eq!((e.decision(), e.exit_code()), ("deny", 1));
        let text = e.to_string();
        assert!(
            text.contains("policy:   web (mode enforce, open web)"),
            "{text}"
        );
        assert!(
            text.contains(
                "reason:   host_denied (host is denied by rule `*.paste.test` of policy web)"
            ),
            "{text}"
        );
        assert!(
            text.contains("deny:     `*.paste.test` (deny[0])"),
            "{text}"
        );
        let e = explain(&c, &web, "https://news.test/").unwrap();
        assert_eq!(
            (e.decision(), e.verdict.as_deref().unwrap()),
            ("allow", "*")
        );
        let e = explain(&c, &web, "http://203.0.113.7/").unwrap();
        assert!(
            e.to_string().contains("reason:   ip_literal_not_allowed"),
            "{e}"
        );
    }

    #[test]
    fn usage_errors() {
        let c = cfg();
        assert!(matches!(
            explain(&c, &Who::Agent("nobody".into()), "a.test:443"),
            Err(ExplainError::NoAgent(..))
        ));
        assert!(matches!(
            explain(&c, &Who::Client("192.0.2.1".parse().unwrap()), "a.test:443"),
            Err(ExplainError::Unmatched(_))
        ));
        assert!(matches!(
            explain(&c, &Who::Agent("coder".into()), "a.test"),
            Err(ExplainError::Target(..))
        ));
        assert_eq!(
            parse_target("HTTPS://API.openai.com:8443/x?y")
                .unwrap()
                .1
                .port,
            8443
        );
    }
}
