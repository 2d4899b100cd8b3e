//! The allow-rule grammar and its compiled matcher.
//!
//! Grammar (deliberately small, checked at load): `host`, `host:port`, `*.suffix`, `*.suffix:port`,
//! `a.b.c.d[:port]`, `[v6][:port]`. Names must be written normalised (lower case, punycode, no
//! trailing dot); the error says how. A rule without a port admits 443 for CONNECT and 80 for plain
//! HTTP; with a port, exactly that port for either.
//!
//! `*` alone is not a rule: [`parse_rule`] refuses it everywhere. Only the validator accepts it,
//! through [`open_web_rule`], as the *sole* allow rule of a policy (`allow = ["*"]` or
//! `["*:PORT"]`): an open-web policy, built with [`Allowlist::open_web`], which admits every name
//! on the rule's ports and never an IP literal. So a stray `*` among other rules stays the
//! config error it always was.
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

/// What a rule is parsed for: the deny grammar accepts `*.tld` (it refuses more, not less).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleUse {
    /// An allow rule.
    Allow,
    /// A deny rule (`deny`, `deny_files`).
    Deny,
}

/// The compiled allowlist of one policy.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    /// An open-web policy: `rules` is the one `*` rule, and the maps are empty.
    open: bool,
    rules: Vec<Rule>,
    exact: Map<Box<str>>,
    below: Map<Box<str>>,
    ips: Map<IpAddr>,
}

/// Parse one allow rule. The error is a sentence for the config report, with the fix when known.
pub fn parse_rule(text: &str) -> Result<(Pattern, Option<u16>), String> {
    parse_rule_as(text, RuleUse::Allow)
}

/// `*` or `*:PORT`, the open-web form: `Some` with the port (or the port's error) when `text`
/// is one, `None` for any other text.
pub fn open_web_rule(text: &str) -> Option<Result<Option<u16>, String>> {
    if text == "*" {
        return Some(Ok(None));
    }
    text.strip_prefix("*:")
        .map(|p| parse_rule_port(p).map(Some))
}

/// Parse one rule for `use_`. The error is a sentence for the config report, with the fix when
/// known.
pub fn parse_rule_as(text: &str, use_: RuleUse) -> Result<(Pattern, Option<u16>), String> {
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
    if host == "*" {
        return Err(match use_ {
            RuleUse::Allow => "`*` alone (any public host) is accepted only as the one allow rule of a policy: `allow = [\"*\"]` or `[\"*:PORT\"]`".into(),
            RuleUse::Deny => "a deny rule `*` would refuse every host; give the policy no allow rule instead".into(),
        });
    }
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
        Host::Name(n) if wild && !n.contains('.') && use_ == RuleUse::Allow => Err(format!(
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
    /// The open-web allowlist of `allow = ["*"]` (`port` `None`: 443 for CONNECT, 80 for plain
    /// HTTP) or `["*:PORT"]`: every name on those ports, never an IP literal.
    pub fn open_web(text: &str, port: Option<u16>) -> Self {
        Allowlist {
            open: true,
            rules: vec![Rule {
                text: text.into(),
                port,
            }],
            ..Allowlist::default()
        }
    }

    /// True for an open-web allowlist (`allow = ["*"]`).
    pub fn is_open_web(&self) -> bool {
        self.open
    }

    /// Add a parsed rule. Returns false if the same pattern and port are already present, or
    /// if the allowlist is open-web (which holds its one rule only).
    pub fn insert(&mut self, text: &str, pattern: Pattern, port: Option<u16>) -> bool {
        if self.open {
            return false;
        }
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
        if self.open {
            return self.check_open(kind, target);
        }
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

    /// Open web: any name on the rule's ports; an IP literal is never named, so never admitted.
    fn check_open(&self, kind: Kind, target: &Target) -> Result<&Rule, Miss> {
        let rule = self.rules.first().ok_or(Miss::Host)?;
        match target.host {
            Host::Ip(_) => Err(Miss::IpLiteral),
            Host::Name(_) if port_admits(rule.port, kind, target.port) => Ok(rule),
            Host::Name(_) => Err(Miss::Port),
        }
    }

    /// True when every CONNECT that `pattern` (with `port`, 443 when `None`) describes is
    /// admitted: an exact name by any rule, `*.suffix` only by a `*.` rule for the suffix or
    /// one of its parents (an exact rule admits one name, not the names below it).
    pub fn admits_all(&self, pattern: &Pattern, port: Option<u16>) -> bool {
        let port = port.unwrap_or(443);
        if self.open {
            // Open web: every name on the rule's ports; an IP literal only where named, never.
            return !matches!(pattern, Pattern::Ip(_))
                && self
                    .rules
                    .first()
                    .is_some_and(|r| port_admits(r.port, Kind::Connect, port));
        }
        match pattern {
            Pattern::Exact(n) => {
                let t = Target {
                    host: Host::Name(n.clone()),
                    port,
                };
                self.check(Kind::Connect, &t).is_ok()
            }
            Pattern::Below(suffix) => {
                let mut rest: &str = suffix;
                loop {
                    if let Some(idx) = self.below.get(rest) {
                        if self.pick(idx, Kind::Connect, port).is_some() {
                            return true;
                        }
                    }
                    match rest.split_once('.') {
                        Some((_, parent)) => rest = parent,
                        None => return false,
                    }
                }
            }
            Pattern::Ip(ip) => self
                .ips
                .get(ip)
                .is_some_and(|idx| self.pick(idx, Kind::Connect, port).is_some()),
        }
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
