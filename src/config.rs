//! The configuration: read a TOML file, validate every value, build the domain values the data
//! path uses (allowlists, CIDR sets, the agent table).
//!
//! `raw` mirrors the file exactly; this module turns it into a [`Config`] or a list of
//! [`ConfigIssue`]s naming file, line, column and key. All issues are collected before failing, so
//! an operator fixes a file in one pass.

mod error;
mod raw;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

pub use error::{ConfigError, ConfigIssue};

use crate::identity::{Agent, Agents};
use crate::policy::{self, Allowlist, Policy};
use crate::resolve::DnsConfig;
use crate::target::{self, Host};
use crate::vet::Vetter;
use raw::{RawConfig, Str};

/// The `[timeouts]` section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Bound on receiving a complete request head (and on an idle keep-alive client connection).
    pub request_header: Duration,
    /// Bound on each upstream connection attempt.
    pub connect: Duration,
    /// Bound on one DNS lookup.
    pub dns: Duration,
    /// A tunnel with no bytes in either direction for this long is closed.
    pub idle: Duration,
    /// After SIGTERM/SIGINT, how long open requests and tunnels may continue.
    pub shutdown_grace: Duration,
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// The proxy listener address.
    pub listen: SocketAddr,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// DNS settings.
    pub dns: DnsConfig,
    /// Destination vetting.
    pub vetter: Vetter,
    /// Agents, in match order.
    pub agents: Agents,
    /// Policies; agents refer to them by index.
    pub policies: Vec<Policy>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            request_header: Duration::from_secs(10),
            connect: Duration::from_secs(5),
            dns: Duration::from_secs(5),
            idle: Duration::from_secs(300),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

/// Read and validate a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let src = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })?;
    parse(path, &src)
}

/// Validate config text; `path` is used in messages.
pub fn parse(path: &Path, src: &str) -> Result<Config, ConfigError> {
    let raw: RawConfig = toml::from_str(src).map_err(|source| {
        let (line, col) = source
            .span()
            .map_or((1, 1), |s| error::line_col(src, s.start));
        ConfigError::Syntax {
            file: path.to_owned(),
            line,
            col,
            message: source.message().trim_end().to_owned(),
            source: Box::new(source),
        }
    })?;
    let mut v = Validator {
        file: path,
        src,
        issues: Vec::new(),
    };
    let config = v.build(&raw);
    if v.issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(v.issues))
    }
}

// === impl Config ===

impl Config {
    /// The policy of an agent.
    pub fn policy_of(&self, agent: &Agent) -> &Policy {
        &self.policies[agent.policy]
    }
}

/// Collects issues while building domain values.
struct Validator<'a> {
    file: &'a Path,
    src: &'a str,
    issues: Vec<ConfigIssue>,
}

// === impl Validator ===

impl Validator<'_> {
    fn issue(&mut self, at: &Str, key: impl Into<String>, problem: impl Into<String>) {
        let (line, col) = error::line_col(self.src, at.span().start);
        self.issues.push(ConfigIssue {
            file: self.file.to_owned(),
            line,
            col,
            key: key.into(),
            problem: problem.into(),
        });
    }

    fn issue_at_top(&mut self, key: &str, problem: &str) {
        self.issues.push(ConfigIssue {
            file: self.file.to_owned(),
            line: 1,
            col: 1,
            key: key.into(),
            problem: problem.into(),
        });
    }

    fn build(&mut self, raw: &RawConfig) -> Config {
        let listen = self.socket_addr(&raw.server.listen, "server.listen", None);
        let timeouts = self.timeouts(&raw.timeouts);
        let dns = self.dns(&raw.dns);
        let deny = self.cidrs(&raw.destinations.deny_cidrs, "destinations.deny_cidrs");
        let allow = self.cidrs(&raw.destinations.allow_cidrs, "destinations.allow_cidrs");
        let (policies, by_name) = self.policies(&raw.policies);
        let agents = self.agents(&raw.agents, &by_name);
        Config {
            source: self.file.to_owned(),
            listen,
            timeouts,
            dns,
            vetter: Vetter::new(deny, allow, vec![listen]),
            agents,
            policies,
        }
    }

    fn socket_addr(&mut self, v: &Str, key: &str, default_port: Option<u16>) -> SocketAddr {
        if let Ok(a) = v.get_ref().parse::<SocketAddr>() {
            return a;
        }
        if let (Some(port), Ok(ip)) = (default_port, v.get_ref().parse::<IpAddr>()) {
            return SocketAddr::new(ip, port);
        }
        let hint = if default_port.is_some() {
            "expected an IP address or IP:port, e.g. \"10.96.0.10\" or \"[fd00::a]:53\""
        } else {
            "expected IP:port, e.g. \"0.0.0.0:3128\" or \"[::]:3128\""
        };
        self.issue(v, key, format!("`{}` is not valid: {hint}", v.get_ref()));
        SocketAddr::from(([0, 0, 0, 0], 0))
    }

    fn duration(
        &mut self,
        v: Option<&Str>,
        key: &str,
        default: Duration,
        max: Duration,
    ) -> Duration {
        let Some(v) = v else { return default };
        match humantime::parse_duration(v.get_ref()) {
            Ok(d) if d.is_zero() => {
                self.issue(v, key, "must be greater than zero");
                default
            }
            Ok(d) if d > max => {
                let max = humantime::format_duration(max);
                self.issue(v, key, format!("must be at most {max}"));
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.issue(
                    v,
                    key,
                    format!(
                        "`{}` is not a duration ({e}); write e.g. \"10s\", \"500ms\", \"5m\"",
                        v.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn timeouts(&mut self, raw: &raw::RawTimeouts) -> Timeouts {
        let d = Timeouts::default();
        let hour = Duration::from_secs(3600);
        let day = Duration::from_secs(86_400);
        Timeouts {
            request_header: self.duration(
                raw.request_header.as_ref(),
                "timeouts.request_header",
                d.request_header,
                Duration::from_secs(600),
            ),
            connect: self.duration(
                raw.connect.as_ref(),
                "timeouts.connect",
                d.connect,
                Duration::from_secs(600),
            ),
            dns: self.duration(
                raw.dns.as_ref(),
                "timeouts.dns",
                d.dns,
                Duration::from_secs(600),
            ),
            idle: self.duration(raw.idle.as_ref(), "timeouts.idle", d.idle, day),
            shutdown_grace: self.duration(
                raw.shutdown_grace.as_ref(),
                "timeouts.shutdown_grace",
                d.shutdown_grace,
                hour,
            ),
        }
    }

    fn dns(&mut self, raw: &raw::RawDns) -> DnsConfig {
        let nameservers = raw.nameservers.as_ref().map(|list| {
            if list.is_empty() {
                self.issue_at_top(
                    "dns.nameservers",
                    "an empty list resolves nothing; remove the key to use the system resolver",
                );
            }
            list.iter()
                .enumerate()
                .map(|(i, s)| self.socket_addr(s, &format!("dns.nameservers[{i}]"), Some(53)))
                .collect()
        });
        let mut hosts = HashMap::new();
        for (name, ips) in &raw.hosts {
            let key = format!("dns.hosts.\"{}\"", name.get_ref());
            let normalised = match target::normalise_host(name.get_ref()) {
                Ok(Host::Name(n)) => n,
                Ok(Host::Ip(_)) => {
                    self.issue(name, &key, "static hosts map names, not IP addresses");
                    continue;
                }
                Err(d) => {
                    self.issue(name, &key, d.detail.into_owned());
                    continue;
                }
            };
            if ips.is_empty() {
                self.issue(name, &key, "needs at least one address");
            }
            let mut addrs = Vec::with_capacity(ips.len());
            for (i, ip) in ips.iter().enumerate() {
                match ip.get_ref().parse::<IpAddr>() {
                    Ok(a) => addrs.push(a),
                    Err(_) => self.issue(
                        ip,
                        format!("{key}[{i}]"),
                        format!("`{}` is not an IP address", ip.get_ref()),
                    ),
                }
            }
            if hosts.insert(normalised.clone(), addrs).is_some() {
                self.issue(
                    name,
                    &key,
                    format!("`{normalised}` is listed twice (names are compared normalised)"),
                );
            }
        }
        DnsConfig { nameservers, hosts }
    }

    fn cidrs(&mut self, list: &[Str], key: &str) -> Vec<IpNet> {
        let mut out = Vec::with_capacity(list.len());
        for (i, s) in list.iter().enumerate() {
            let key = format!("{key}[{i}]");
            match s.get_ref().parse::<IpNet>() {
                Ok(IpNet::V6(v6)) if v6.network().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 => {
                    let v4 = v6.network().to_ipv4_mapped().map_or_else(String::new, |a| a.to_string());
                    self.issue(
                        s,
                        key,
                        format!(
                            "IPv4-mapped ranges are matched as IPv4; write `{v4}/{}`",
                            v6.prefix_len() - 96
                        ),
                    )
                }
                Ok(net) if net.trunc() != net => self.issue(
                    s,
                    key,
                    format!("`{net}` has host bits set; did you mean `{}`?", net.trunc()),
                ),
                Ok(net) => out.push(net),
                Err(_) => self.issue(
                    s,
                    key,
                    format!("`{}` is not a CIDR (write e.g. \"10.0.0.0/8\" or \"fd00::/8\"; a single address is \"/32\" or \"/128\")", s.get_ref()),
                ),
            }
        }
        out
    }

    fn policies(
        &mut self,
        raw: &std::collections::BTreeMap<Str, raw::RawPolicy>,
    ) -> (Vec<Policy>, HashMap<String, usize>) {
        let mut policies = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (name, p) in raw {
            let key = format!("policies.{}", name.get_ref());
            if !valid_name(name.get_ref()) {
                self.issue(name, &key, NAME_RULE);
            }
            let mut allowlist = Allowlist::default();
            for (i, rule) in p.allow.iter().enumerate() {
                let rkey = format!("{key}.allow[{i}]");
                match policy::parse_rule(rule.get_ref()) {
                    Ok((pattern, port)) => {
                        if !allowlist.insert(rule.get_ref(), pattern, port) {
                            self.issue(rule, rkey, format!("duplicate rule `{}`", rule.get_ref()));
                        }
                    }
                    Err(problem) => {
                        self.issue(rule, rkey, format!("`{}`: {problem}", rule.get_ref()))
                    }
                }
            }
            by_name.insert(name.get_ref().clone(), policies.len());
            policies.push(Policy {
                name: name.get_ref().as_str().into(),
                allowlist,
            });
        }
        (policies, by_name)
    }

    fn agents(&mut self, raw: &[raw::RawAgent], policies: &HashMap<String, usize>) -> Agents {
        if raw.is_empty() {
            self.issue_at_top(
                "agents",
                "no [[agents]] entry: every client would be refused; add one with source_cidrs and policy",
            );
        }
        let mut seen = HashSet::new();
        let mut agents = Vec::with_capacity(raw.len());
        for (i, a) in raw.iter().enumerate() {
            let key = format!("agents[{i}]");
            if !valid_name(a.name.get_ref()) {
                self.issue(&a.name, format!("{key}.name"), NAME_RULE);
            }
            if !seen.insert(a.name.get_ref().as_str()) {
                self.issue(
                    &a.name,
                    format!("{key}.name"),
                    format!("agent `{}` is defined twice", a.name.get_ref()),
                );
            }
            if a.source_cidrs.is_empty() {
                self.issue(
                    &a.name,
                    format!("{key}.source_cidrs"),
                    "needs at least one CIDR to identify the agent's clients",
                );
            }
            let source_cidrs = self.cidrs(&a.source_cidrs, &format!("{key}.source_cidrs"));
            let policy = match policies.get(a.policy.get_ref()) {
                Some(&p) => p,
                None => {
                    let mut known: Vec<&str> = policies.keys().map(String::as_str).collect();
                    known.sort_unstable();
                    self.issue(
                        &a.policy,
                        format!("{key}.policy"),
                        format!(
                            "no [policies.{}] (defined: {})",
                            a.policy.get_ref(),
                            known.join(", ")
                        ),
                    );
                    0
                }
            };
            agents.push(Agent {
                name: Arc::from(a.name.get_ref().as_str()),
                source_cidrs,
                policy,
            });
        }
        Agents::new(agents)
    }
}

const NAME_RULE: &str = "names use 1-64 characters from a-z, A-Z, 0-9, '-', '_' and '.'";

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests;
