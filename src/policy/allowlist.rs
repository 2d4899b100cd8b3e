//! The allow-rule grammar and its compiled matcher.
//!
//! Grammar (deliberately small, checked at load): `host`, `host:port`, `*.suffix`, `*.suffix:port`,
//! `a.b.c.d[:port]`, `[v6][:port]`. Names must be written normalised (lower case, punycode, no
//! trailing dot); the error says how. A rule without a port admits 443 for CONNECT and 80 for plain
//! HTTP; with a port, exactly that port for either.
//!
//! Matching is hash lookups over label-boundary suffixes of the (already normalised) name: one
//! lookup for the exact name, then one per dot for the `*.` rules. That is O(labels), independent
//! of the number of rules, allocation-free, and by construction a `*.example.com` rule can only
//! match at a label boundary below `example.com` — never the apex, never `badexample.com`, never
//! `example.com.evil.test`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use crate::target::{self, Host, Kind, Target};

/// One allow rule as written in the config (normalised), for audit lines and `check` output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// The rule text, e.g. `*.githubusercontent.com` or `api.anthropic.com:443`.
    pub text: Arc<str>,
    /// The port the rule is limited to; `None` means 443 for CONNECT and 80 for plain HTTP.
    pub port: Option<u16>,
}

/// A parsed rule's key: what it matches before ports are considered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// Exactly this name.
    Exact(Box<str>),
    /// Any name strictly below this suffix (`*.suffix`).
    Below(Box<str>),
    /// Exactly this IP literal.
    Ip(IpAddr),
}

/// Why a target did not match.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Miss {
    /// No rule names this host.
    Host,
    /// A rule names the host, but none for this port.
    Port,
    /// The target is an IP literal and no rule names it.
    IpLiteral,
}

/// Keys come from the config; lookups hash client-chosen names but can only probe the chains the
/// config built, so a fast seeded hash is safe here (and halves the cost of SipHash per label).
type Map<K> = HashMap<K, Vec<usize>, foldhash::fast::RandomState>;

/// The compiled allowlist of one policy.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    rules: Vec<Rule>,
    exact: Map<Box<str>>,
    below: Map<Box<str>>,
    ips: Map<IpAddr>,
}

/// Parse one rule. The error is a sentence for the config report, with the fix when known.
pub fn parse_rule(text: &str) -> Result<(Pattern, Option<u16>), String> {
    if text.is_empty() {
        return Err("empty rule".into());
    }
    if let Some(bad) = text
        .chars()
        .find(|c| c.is_whitespace() || matches!(c, '?' | '{' | '}' | '/' | '@' | '%'))
    {
        return Err(format!("character {bad:?} is not allowed in a rule"));
    }
    // IPv6 literal, bracketed.
    if text.starts_with('[') {
        let t = target::parse_authority(text, Some(0)).map_err(|d| d.detail.into_owned())?;
        let port = (t.port != 0).then_some(t.port);
        return match t.host {
            Host::Ip(ip) => Ok((Pattern::Ip(ip), port)),
            Host::Name(_) => Err("invalid IPv6 literal".into()),
        };
    }
    if text.matches(':').count() > 1 {
        return Err("IPv6 literals must be bracketed, e.g. [2001:db8::1]:443".into());
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((h, p)) => (h, Some(parse_rule_port(p)?)),
        None => (text, None),
    };
    let (wild, name) = match host.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, host),
    };
    if name.contains('*') || name.contains('[') {
        return Err(
            "`*` is only allowed as a whole first label (`*.example.com`); `*` alone, `**` and partial wildcards are not rules"
                .into(),
        );
    }
    if name.is_empty() {
        return Err("wildcard needs a domain after `*.`".into());
    }
    let normalised = target::normalise_host(name).map_err(|d| d.detail.into_owned())?;
    match normalised {
        Host::Ip(ip) if !wild && ip.to_string() == name => Ok((Pattern::Ip(ip), port)),
        Host::Ip(_) => Err("a wildcard cannot cover an IP address".into()),
        Host::Name(n) if &*n != name => Err(format!(
            "write the name normalised, as `{}{n}`",
            if wild { "*." } else { "" }
        )),
        Host::Name(n) if wild && !n.contains('.') => Err(format!(
            "`*.{n}` would admit every name under a top-level domain; name a registrable domain"
        )),
        Host::Name(n) if wild => Ok((Pattern::Below(n), port)),
        Host::Name(n) => Ok((Pattern::Exact(n), port)),
    }
}

fn parse_rule_port(p: &str) -> Result<u16, String> {
    match p.parse::<u16>() {
        Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("invalid port `{p}` (1-65535)")),
    }
}

// === impl Allowlist ===

impl Allowlist {
    /// Add a parsed rule. Returns false if the same pattern and port are already present.
    pub fn insert(&mut self, text: &str, pattern: Pattern, port: Option<u16>) -> bool {
        let idx = self.rules.len();
        let slot = match pattern {
            Pattern::Exact(n) => self.exact.entry(n).or_default(),
            Pattern::Below(n) => self.below.entry(n).or_default(),
            Pattern::Ip(ip) => self.ips.entry(ip).or_default(),
        };
        if slot.iter().any(|&i| self.rules[i].port == port) {
            return false;
        }
        slot.push(idx);
        self.rules.push(Rule {
            text: text.into(),
            port,
        });
        true
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// True when the allowlist admits nothing.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Every rule, in config order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Find the rule that admits `target` for a request of `kind`.
    ///
    /// Exact names win over wildcards, and a longer wildcard suffix over a shorter one.
    pub fn check(&self, kind: Kind, target: &Target) -> Result<&Rule, Miss> {
        let name = match &target.host {
            Host::Ip(ip) => {
                return match self.ips.get(ip) {
                    Some(idx) => self.pick(idx, kind, target.port).ok_or(Miss::Port),
                    None => Err(Miss::IpLiteral),
                }
            }
            Host::Name(n) => &**n,
        };
        let mut host_known = false;
        if let Some(idx) = self.exact.get(name) {
            host_known = true;
            if let Some(rule) = self.pick(idx, kind, target.port) {
                return Ok(rule);
            }
        }
        if !self.below.is_empty() {
            let mut rest = name;
            while let Some((_, suffix)) = rest.split_once('.') {
                if let Some(idx) = self.below.get(suffix) {
                    host_known = true;
                    if let Some(rule) = self.pick(idx, kind, target.port) {
                        return Ok(rule);
                    }
                }
                rest = suffix;
            }
        }
        Err(if host_known { Miss::Port } else { Miss::Host })
    }

    fn pick(&self, idx: &[usize], kind: Kind, port: u16) -> Option<&Rule> {
        idx.iter()
            .map(|&i| &self.rules[i])
            .find(|r| port_admits(r.port, kind, port))
    }
}

/// The port semantics of design.md: a port-less rule admits 443 for tunnels and 80 for plain HTTP.
fn port_admits(rule_port: Option<u16>, kind: Kind, port: u16) -> bool {
    match rule_port {
        Some(p) => p == port,
        None => matches!((kind, port), (Kind::Connect, 443) | (Kind::Http, 80)),
    }
}

#[cfg(test)]
#[path = "allowlist_tests.rs"]
mod tests;
