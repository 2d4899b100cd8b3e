//! Validation: turns the raw serde mirror into domain values, collecting every issue (with
//! file, line, column and key) and every warning before reporting.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use super::error::{self, ConfigIssue};
use super::raw::{self, RawConfig, Str};
use super::{fingerprint, CachedError, Config, DenyCache, SniPolicy, Timeouts, WatchedList};
use http::header::HeaderName;

use crate::fingerprint::FileStamp;
use crate::identity::{Agent, Agents, CertId, Token};
use crate::intercept::{
    self, CaError, Inject, Intercept, InterceptSettings, Interceptor, Intercepts,
};
use crate::limits::cluster::{self, ClusterSettings, FailMode};
use crate::limits::Limits;
use crate::policy::deny_file;
use crate::policy::{
    self, Allowlist, DenyFile, DenySet, Denylist, Inserted, Mode, Pattern, Policy, RuleUse,
};
use crate::resolve::DnsConfig;
use crate::target::{self, Host};
use crate::tls::{TlsError, TlsFiles, TlsSettings};
use crate::vet::Vetter;

/// Collects issues while building domain values.
pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
    pub(super) src: &'a str,
    pub(super) issues: Vec<ConfigIssue>,
    pub(super) warnings: Vec<ConfigIssue>,
    /// Deny lists loaded before, reused while their files are unchanged.
    pub(super) deny_cache: Option<&'a DenyCache>,
    /// Every deny list this load read (or reused), once each, by resolved path; `None` for one
    /// that failed (already reported).
    pub(super) deny_lists: Vec<(PathBuf, Option<Arc<DenyFile>>, WatchedList)>,
}

// === impl Validator ===

impl Validator<'_> {
    fn issue(&mut self, at: &Str, key: impl Into<String>, problem: impl Into<String>) {
        let issue = self.at(at.span().start, key.into(), problem.into());
        self.issues.push(issue);
    }

    fn warn(&mut self, offset: usize, key: impl Into<String>, problem: impl Into<String>) {
        let issue = self.at(offset, key.into(), problem.into());
        self.warnings.push(issue);
    }

    fn at(&self, offset: usize, key: String, problem: String) -> ConfigIssue {
        let (line, col) = error::line_col(self.src, offset);
        ConfigIssue {
            file: self.file.to_owned(),
            line,
            col,
            key,
            problem,
        }
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

    pub(super) fn build(&mut self, raw: &RawConfig) -> Config {
        let listen = self.socket_addr(&raw.server.listen, "server.listen", None);
        let admin_listen = raw
            .server
            .admin_listen
            .as_ref()
            .map(|a| self.socket_addr(a, "server.admin_listen", None));
        if let (Some(a), Some(raw_a)) = (admin_listen, raw.server.admin_listen.as_ref()) {
            if a == listen && a.port() != 0 {
                self.issue(
                    raw_a,
                    "server.admin_listen",
                    "must differ from server.listen",
                );
            }
        }
        let timeouts = self.timeouts(&raw.timeouts);
        let dns = self.dns(&raw.dns);
        let deny = self.cidrs(&raw.destinations.deny_cidrs, "destinations.deny_cidrs");
        let allow = self.cidrs(&raw.destinations.allow_cidrs, "destinations.allow_cidrs");
        self.warn_broad(
            &raw.destinations.allow_cidrs,
            &allow,
            "destinations.allow_cidrs",
        );
        let mode = self.mode(raw.server.mode.as_ref(), "server.mode", Mode::Enforce);
        let max_connections = match &raw.server.max_connections {
            Some(v) if (1..=1_000_000).contains(v.get_ref()) => *v.get_ref() as usize,
            Some(v) => {
                let issue = self.at(
                    v.span().start,
                    "server.max_connections".into(),
                    format!("{} is out of range: use 1 to 1000000", v.get_ref()),
                );
                self.issues.push(issue);
                super::DEFAULT_MAX_CONNECTIONS
            }
            None => super::DEFAULT_MAX_CONNECTIONS,
        };
        let admin_max_connections = self.int_in(
            raw.server.admin_max_connections.as_ref(),
            "server.admin_max_connections",
            1..=100_000,
            super::DEFAULT_ADMIN_MAX_CONNECTIONS as i64,
        ) as usize;
        let refusal_budget = self.refusal_budget(&raw.server);
        let summary_interval = self.duration(
            raw.server.summary_interval.as_ref(),
            "server.summary_interval",
            crate::budget::DEFAULT_SUMMARY_INTERVAL,
            Duration::from_secs(3600),
        );
        let limits = self.limits(&raw.limits, "limits", Limits::default());
        let cluster = raw.cluster.as_ref().map(|c| self.cluster(c));
        let (policies, by_name) = self.policies(&raw.policies, mode, limits);
        let (tls_listen, tls) = self.tls(&raw.server, listen, admin_listen);
        let sni = self.sni(&raw.sni);
        let intercept = self.intercept(raw);
        let agents = self.agents(&raw.agents, &by_name);
        if let Some((_, at)) = agents
            .iter()
            .zip(&raw.agents)
            .find(|(a, _)| a.cert.is_some())
        {
            let needs_ca = tls.as_ref().map_or(true, |t| t.client_ca.is_none());
            if needs_ca {
                self.issue(
                    &at.name,
                    "server.client_ca",
                    format!(
                        "agent `{}` is identified by a client certificate: set server.tls_listen, tls_cert, tls_key and client_ca",
                        at.name.get_ref()
                    ),
                );
            }
        }
        Config {
            source: self.file.to_owned(),
            listen,
            admin_listen,
            tls_listen,
            tls,
            sni,
            intercept,
            timeouts,
            dns,
            vetter: Vetter::new(deny, allow, vec![listen]),
            agents,
            policies,
            max_connections,
            admin_max_connections,
            refusal_budget,
            summary_interval,
            mode,
            limits,
            cluster,
            fingerprint: fingerprint(self.src.as_bytes()),
            deny_lists: self
                .deny_lists
                .iter()
                .filter(|(_, loaded, _)| loaded.is_some())
                .map(|(_, _, w)| w.clone())
                .collect(),
            warnings: Vec::new(),
        }
    }

    /// An integer key within `range`, or `default` (absent, or out of range: reported).
    fn int_in(
        &mut self,
        v: Option<&toml::Spanned<i64>>,
        key: &str,
        range: std::ops::RangeInclusive<i64>,
        default: i64,
    ) -> i64 {
        let Some(v) = v else { return default };
        let n = *v.get_ref();
        if range.contains(&n) {
            return n;
        }
        let issue = self.at(
            v.span().start,
            key.into(),
            format!(
                "{n} is out of range: use {} to {}",
                range.start(),
                range.end()
            ),
        );
        self.issues.push(issue);
        default
    }

    /// `server.address_refusals_per_second` and `server.address_refusal_burst`.
    fn refusal_budget(&mut self, raw: &raw::RawServer) -> crate::budget::Allowance {
        let d = crate::budget::Allowance::default();
        let burst = self.int_in(
            raw.address_refusal_burst.as_ref(),
            "server.address_refusal_burst",
            1..=1_000_000,
            i64::from(d.burst),
        );
        let per_second = match &raw.address_refusals_per_second {
            Some(v) if (0.001..=1_000_000.0).contains(v.get_ref()) => *v.get_ref(),
            Some(v) => {
                let issue = self.at(
                    v.span().start,
                    "server.address_refusals_per_second".into(),
                    format!(
                        "{} is out of range: use 0.001 to 1000000 (fractions allowed: 0.5 = one every 2 s)",
                        v.get_ref()
                    ),
                );
                self.issues.push(issue);
                d.per_second
            }
            None => d.per_second,
        };
        crate::budget::Allowance {
            per_second,
            burst: u32::try_from(burst).unwrap_or(d.burst),
        }
    }

    fn mode(&mut self, v: Option<&Str>, key: &str, default: Mode) -> Mode {
        let Some(v) = v else { return default };
        Mode::parse(v.get_ref()).unwrap_or_else(|| {
            self.issue(
                v,
                key,
                format!(
                    "`{}` is not a mode: use \"enforce\" or \"report\"",
                    v.get_ref()
                ),
            );
            default
        })
    }

    /// Apply the keys present in `raw` on top of `base`, checking each against its range.
    fn limits(&mut self, raw: &raw::RawLimits, key: &str, base: Limits) -> Limits {
        const KIB: i64 = 1024;
        const TIB: i64 = 1024 * 1024 * 1024 * 1024;
        let mut out = base;
        let mut int =
            |v: &Option<toml::Spanned<i64>>, name: &str, min: i64, max: i64, unit: &str| {
                let v = v.as_ref()?;
                let n = *v.get_ref();
                if (min..=max).contains(&n) {
                    return u64::try_from(n).ok();
                }
                let (line, col) = error::line_col(self.src, v.span().start);
                self.issues.push(ConfigIssue {
                    file: self.file.to_owned(),
                    line,
                    col,
                    key: format!("{key}.{name}"),
                    problem: format!("{n} is out of range: use {min} to {max}{unit}"),
                });
                None
            };
        if let Some(n) = int(
            &raw.max_request_header_bytes,
            "max_request_header_bytes",
            KIB,
            256 * KIB,
            " bytes",
        ) {
            out.max_request_header_bytes = n;
        }
        if let Some(n) = int(
            &raw.max_request_body_bytes,
            "max_request_body_bytes",
            1,
            TIB,
            " bytes",
        ) {
            out.max_request_body_bytes = n;
        }
        if let Some(n) = int(
            &raw.max_tunnel_upload_bytes,
            "max_tunnel_upload_bytes",
            1,
            64 * TIB,
            " bytes",
        ) {
            out.max_tunnel_upload_bytes = n;
        }
        if let Some(n) = int(
            &raw.max_response_body_bytes,
            "max_response_body_bytes",
            1,
            64 * TIB,
            " bytes",
        ) {
            out.max_response_body_bytes = n;
        }
        if let Some(n) = int(&raw.burst, "burst", 1, 1_000_000, "") {
            out.burst = n as u32;
        }
        if let Some(n) = int(&raw.max_concurrent, "max_concurrent", 1, 1_000_000, "") {
            out.max_concurrent = n as u32;
        }
        // Byte budgets: up to 1 PiB per window.
        let budgets = [
            (
                &raw.max_upload_bytes_per_hour,
                "max_upload_bytes_per_hour",
                &mut out.budgets.upload_per_hour,
            ),
            (
                &raw.max_download_bytes_per_hour,
                "max_download_bytes_per_hour",
                &mut out.budgets.download_per_hour,
            ),
            (
                &raw.max_upload_bytes_per_day,
                "max_upload_bytes_per_day",
                &mut out.budgets.upload_per_day,
            ),
            (
                &raw.max_download_bytes_per_day,
                "max_download_bytes_per_day",
                &mut out.budgets.download_per_day,
            ),
        ];
        for (v, name, slot) in budgets {
            if let Some(n) = int(v, name, 1, 1024 * TIB, " bytes") {
                *slot = Some(n);
            }
        }
        if let Some(v) = &raw.requests_per_second {
            let r = *v.get_ref();
            if (0.001..=1_000_000.0).contains(&r) {
                out.requests_per_second = r;
            } else {
                let issue = self.at(
                    v.span().start,
                    format!("{key}.requests_per_second"),
                    format!("{r} is out of range: use 0.001 to 1000000 (fractions allowed: 0.5 = one every 2 s)"),
                );
                self.issues.push(issue);
            }
        }
        out
    }

    /// The `[cluster]` section.
    fn cluster(&mut self, raw: &raw::RawCluster) -> ClusterSettings {
        let (nodes, is_cluster) = match raw.redis.get_ref() {
            raw::Nodes::One(url) => (vec![url.clone()], false),
            raw::Nodes::Many(urls) => (urls.clone(), true),
        };
        let at = raw.redis.span().start;
        if nodes.is_empty() {
            self.issue_at(
                at,
                "cluster.redis",
                "an empty list names no store; give one URL, or the cluster's nodes",
            );
        }
        for (i, url) in nodes.iter().enumerate() {
            let key = if is_cluster {
                format!("cluster.redis[{i}]")
            } else {
                "cluster.redis".to_owned()
            };
            if let Some(problem) = redis_url_problem(url, is_cluster) {
                self.issue_at(at, &key, &problem);
            }
        }
        let username = raw.username.as_ref().map(|u| {
            let v = u.get_ref();
            if v.is_empty() || v.len() > 128 || !v.bytes().all(|b| b.is_ascii_graphic()) {
                self.issue(
                    u,
                    "cluster.username",
                    "the ACL user: 1 to 128 printable characters, no spaces",
                );
            }
            v.clone()
        });
        let password_file = raw.password_file.as_ref().map(|f| {
            let path = self.relative(f);
            if let Err(e) = cluster::read_password(&path) {
                // Like a token file: a Secret not mounted yet is loud, not fatal; the store is
                // unusable (fail_mode applies) until the file holds the password.
                self.warn(
                    f.span().start,
                    "cluster.password_file",
                    format!("{e}; the gateway cannot authenticate to the store until the file holds the password"),
                );
            }
            path
        });
        if username.is_some() && password_file.is_none() {
            if let Some(u) = &raw.username {
                self.issue(
                    u,
                    "cluster.username",
                    "needs cluster.password_file (the user's password, from a mounted Secret)",
                );
            }
        }
        let timeout = self.duration(
            raw.timeout.as_ref(),
            "cluster.timeout",
            cluster::DEFAULT_TIMEOUT,
            Duration::from_secs(10),
        );
        let fail_mode = match &raw.fail_mode {
            None => FailMode::default(),
            Some(v) => FailMode::parse(v.get_ref()).unwrap_or_else(|| {
                self.issue(
                    v,
                    "cluster.fail_mode",
                    format!(
                        "`{}` is not a fail mode: use \"local\", \"closed\" or \"open\"",
                        v.get_ref()
                    ),
                );
                FailMode::default()
            }),
        };
        let key_prefix = match &raw.key_prefix {
            None => cluster::DEFAULT_KEY_PREFIX.to_owned(),
            Some(v) => {
                let p = v.get_ref();
                let ok = (1..=64).contains(&p.len())
                    && p.bytes()
                        .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}');
                if !ok {
                    self.issue(v, "cluster.key_prefix", "1 to 64 printable characters, without spaces, `{` or `}` (braces are the keys' cluster hash tags)");
                }
                p.clone()
            }
        };
        ClusterSettings {
            nodes,
            cluster: is_cluster,
            username,
            password_file,
            timeout,
            fail_mode,
            key_prefix,
        }
    }

    fn issue_at(&mut self, offset: usize, key: &str, problem: &str) {
        let issue = self.at(offset, key.to_owned(), problem.to_owned());
        self.issues.push(issue);
    }

    /// Exceptions so broad that they switch the built-in protection off for whole networks.
    fn warn_broad(&mut self, raw: &[Str], nets: &[IpNet], key: &str) {
        for (i, (s, net)) in raw.iter().zip(nets).enumerate() {
            let broad = match net {
                IpNet::V4(n) => n.prefix_len() < 8,
                IpNet::V6(n) => n.prefix_len() < 16,
            };
            if broad {
                self.warn(
                    s.span().start,
                    format!("{key}[{i}]"),
                    format!("`{net}` exempts a very large range from the built-in deny set; prefer the exact service addresses"),
                );
            }
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
            "expected an IP address or IP:port, e.g. \"127.0.0.53\" or \"[fd00::a]:53\""
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
        let max_ttl = self.duration(
            raw.max_ttl.as_ref(),
            "dns.max_ttl",
            crate::resolve::DEFAULT_MAX_TTL,
            Duration::from_secs(86_400),
        );
        DnsConfig {
            nameservers,
            hosts,
            max_ttl,
        }
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
        mode: Mode,
        defaults: Limits,
    ) -> (Vec<Policy>, HashMap<String, usize>) {
        let mut policies = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (name, p) in raw {
            let key = format!("policies.{}", name.get_ref());
            if !valid_name(name.get_ref()) {
                self.issue(name, &key, NAME_RULE);
            }
            let mut allowlist = Allowlist::default();
            let mut parsed = Vec::with_capacity(p.allow.len());
            for (i, rule) in p.allow.iter().enumerate() {
                let rkey = format!("{key}.allow[{i}]");
                if let Some(open) = policy::open_web_rule(rule.get_ref()) {
                    match open {
                        Err(problem) => {
                            self.issue(rule, rkey, format!("`{}`: {problem}", rule.get_ref()))
                        }
                        Ok(_) if p.allow.len() > 1 => self.issue(
                            rule,
                            rkey,
                            format!(
                                "`{}` (open web: any public host) must be the only allow rule of its policy; remove the other rules, or the `{}`",
                                rule.get_ref(),
                                rule.get_ref()
                            ),
                        ),
                        Ok(port) => allowlist = Allowlist::open_web(rule.get_ref(), port),
                    }
                    continue;
                }
                match policy::parse_rule(rule.get_ref()) {
                    Ok((pattern, port)) => {
                        if allowlist.insert(rule.get_ref(), pattern.clone(), port) {
                            parsed.push((i, rule, pattern, port));
                        } else {
                            self.issue(rule, rkey, format!("duplicate rule `{}`", rule.get_ref()));
                        }
                    }
                    Err(problem) => {
                        self.issue(rule, rkey, format!("`{}`: {problem}", rule.get_ref()))
                    }
                }
            }
            self.warn_dead_rules(&key, &parsed);
            let deny = self.deny(p, &key);
            let allow_cidrs = self.cidrs(&p.allow_cidrs, &format!("{key}.allow_cidrs"));
            self.warn_broad(&p.allow_cidrs, &allow_cidrs, &format!("{key}.allow_cidrs"));
            let limits = match &p.limits {
                Some(l) => self.limits(l.get_ref(), &format!("{key}.limits"), defaults),
                None => defaults,
            };
            let mode = self.mode(p.mode.as_ref(), &format!("{key}.mode"), mode);
            let intercept = self.intercepts(&p.intercept, &key, &allowlist);
            by_name.insert(name.get_ref().clone(), policies.len());
            policies.push(Policy {
                name: name.get_ref().as_str().into(),
                allowlist,
                deny,
                limits,
                mode,
                allow_cidrs,
                intercept,
            });
        }
        (policies, by_name)
    }

    /// A policy's `deny` rules and `deny_files` lists.
    fn deny(&mut self, p: &raw::RawPolicy, key: &str) -> Denylist {
        let mut rules = DenySet::default();
        for (i, rule) in p.deny.iter().enumerate() {
            let rkey = format!("{key}.deny[{i}]");
            match policy::parse_rule_as(rule.get_ref(), RuleUse::Deny) {
                Ok((pattern, port)) => {
                    let origin = u32::try_from(i + 1).unwrap_or(u32::MAX);
                    if rules.insert(pattern, port, origin) != Inserted::New {
                        self.issue(rule, rkey, format!("duplicate rule `{}`", rule.get_ref()));
                    }
                }
                Err(problem) => self.issue(rule, rkey, format!("`{}`: {problem}", rule.get_ref())),
            }
        }
        let files = p
            .deny_files
            .iter()
            .enumerate()
            .filter_map(|(i, f)| self.deny_file(f, &format!("{key}.deny_files[{i}]")))
            .collect();
        Denylist::new(rules, files)
    }

    /// One `deny_files` entry: loaded once per config load however many policies name it,
    /// reused from the cache while its file is unchanged. Problems inside the list are
    /// reported at the list's own file, line and column.
    fn deny_file(&mut self, f: &Str, key: &str) -> Option<Arc<DenyFile>> {
        let path = self.relative(f);
        if let Some((_, loaded, _)) = self.deny_lists.iter().find(|(p, _, _)| *p == path) {
            return loaded.clone();
        }
        let loaded = self.load_list(f, &path, key);
        let watched = WatchedList {
            path: path.clone(),
            stamp: loaded.as_ref().and_then(|(_, s)| *s),
        };
        let file = loaded.map(|(file, _)| file);
        if let Some(file) = &file {
            if file.set.is_empty() {
                self.warn(
                    f.span().start,
                    key,
                    format!(
                        "`{}` holds no rules (a list that failed to download?); it denies nothing",
                        f.get_ref()
                    ),
                );
            }
        }
        self.deny_lists.push((path, file.clone(), watched));
        file
    }

    /// Read the list at `path` (or take it from the cache while its stamp is unchanged) and
    /// report its problems.
    fn load_list(
        &mut self,
        f: &Str,
        path: &Path,
        key: &str,
    ) -> Option<(Arc<DenyFile>, Option<FileStamp>)> {
        let cached = match (self.deny_cache, FileStamp::of(path)) {
            (Some(cache), Some(stamp)) => cache.get(path, stamp).map(|hit| (Some(stamp), hit)),
            _ => None,
        };
        let (stamp, result) = match cached {
            Some(hit) => hit,
            None => {
                let (stamp, read) = deny_file::read(path);
                let result = read
                    .map(|set| {
                        Arc::new(DenyFile {
                            shown: f.get_ref().as_str().into(),
                            path: path.to_owned(),
                            set,
                        })
                    })
                    .map_err(CachedError::from);
                if let (Some(cache), Some(stamp)) = (self.deny_cache, stamp) {
                    cache.put(path, stamp, &result);
                }
                (stamp, result)
            }
        };
        match result {
            Ok(file) => Some((file, stamp)),
            Err(CachedError::Lines { issues, more }) => {
                for i in issues.iter() {
                    self.issues.push(ConfigIssue {
                        file: path.to_owned(),
                        line: i.line,
                        col: i.col,
                        key: key.to_owned(),
                        problem: i.problem.clone(),
                    });
                }
                if more > 0 {
                    self.issue(
                        f,
                        key,
                        format!("`{}`: {more} more line(s) are not rules", f.get_ref()),
                    );
                }
                None
            }
            Err(CachedError::Other(e)) => {
                self.issue(f, key, format!("`{}`: {e}", f.get_ref()));
                None
            }
        }
    }

    /// A rule that a wildcard of the same policy already admits (same port) never decides
    /// anything: say so, since it usually means the operator meant something else.
    fn warn_dead_rules(&mut self, key: &str, rules: &[(usize, &Str, Pattern, Option<u16>)]) {
        for (i, rule, pattern, port) in rules {
            let name = match pattern {
                Pattern::Exact(n) | Pattern::Below(n) => n,
                Pattern::Ip(_) => continue,
            };
            let covering = rules.iter().find(|(j, _, other, other_port)| {
                let Pattern::Below(suffix) = other else {
                    return false;
                };
                j != i
                    && other_port == port
                    && name.len() > suffix.len()
                    && name.ends_with(&**suffix)
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            });
            if let Some((_, other, _, _)) = covering {
                self.warn(
                    rule.span().start,
                    format!("{key}.allow[{i}]"),
                    format!(
                        "`{}` is already admitted by `{}`; this rule never decides anything",
                        rule.get_ref(),
                        other.get_ref()
                    ),
                );
            }
        }
    }

    fn agents(&mut self, raw: &[raw::RawAgent], policies: &HashMap<String, usize>) -> Agents {
        if raw.is_empty() {
            self.issue_at_top(
                "agents",
                "no [[agents]] entry: every client would be refused; add one with source_cidrs and policy",
            );
        }
        let mut seen = HashSet::new();
        let mut agents: Vec<Agent> = Vec::with_capacity(raw.len());
        for (i, a) in raw.iter().enumerate() {
            let key = format!("agents[{i}]");
            if !seen.insert(a.name.get_ref().as_str()) {
                self.issue(
                    &a.name,
                    format!("{key}.name"),
                    format!("agent `{}` is defined twice", a.name.get_ref()),
                );
            }
            let agent = self.agent(a, &key, policies);
            self.warn_shadowed(&agents, &agent, &a.name, &key);
            agents.push(agent);
        }
        Agents::new(agents)
    }

    /// The HTTPS listener: `tls_listen` with its `tls_cert` and `tls_key`, and the optional
    /// client certificate settings. The files are read now, to check them: a bad file fails the
    /// load. The config keeps only the settings; the live store that re-reads the files is the
    /// reload snapshot's.
    fn tls(
        &mut self,
        s: &raw::RawServer,
        listen: SocketAddr,
        admin: Option<SocketAddr>,
    ) -> (Option<SocketAddr>, Option<TlsSettings>) {
        let Some(raw_listen) = &s.tls_listen else {
            let stray = [
                ("server.tls_cert", s.tls_cert.as_ref()),
                ("server.tls_key", s.tls_key.as_ref()),
                ("server.client_ca", s.client_ca.as_ref()),
            ];
            for (key, v) in stray {
                if let Some(v) = v {
                    self.issue(v, key, "only used with server.tls_listen (the HTTPS proxy listener); set it or remove this key");
                }
            }
            if let Some(v) = &s.require_client_cert {
                let issue = self.at(
                    v.span().start,
                    "server.require_client_cert".into(),
                    "only used with server.tls_listen and server.client_ca".into(),
                );
                self.issues.push(issue);
            }
            return (None, None);
        };
        let addr = self.socket_addr(raw_listen, "server.tls_listen", None);
        if addr.port() != 0 && (addr == listen || Some(addr) == admin) {
            self.issue(
                raw_listen,
                "server.tls_listen",
                "must differ from server.listen and server.admin_listen",
            );
        }
        let (Some(cert), Some(key)) = (&s.tls_cert, &s.tls_key) else {
            self.issue(
                raw_listen,
                "server.tls_listen",
                "needs server.tls_cert and server.tls_key (PEM files: certificate chain, private key)",
            );
            return (Some(addr), None);
        };
        let require_client_cert = s.require_client_cert.as_ref().is_some_and(|v| *v.get_ref());
        if let (Some(v), None) = (&s.require_client_cert, &s.client_ca) {
            if *v.get_ref() {
                let issue = self.at(
                    v.span().start,
                    "server.require_client_cert".into(),
                    "needs server.client_ca (the CA bundle client certificates must chain to)"
                        .into(),
                );
                self.issues.push(issue);
            }
        }
        let settings = TlsSettings {
            cert: self.relative(cert),
            key: self.relative(key),
            client_ca: s.client_ca.as_ref().map(|c| self.relative(c)),
            require_client_cert,
        };
        match TlsFiles::load(settings.clone()) {
            Ok(_) => (Some(addr), Some(settings)),
            Err(e) => {
                let at = match &e {
                    TlsError::Read { path, .. }
                    | TlsError::Empty { path, .. }
                    | TlsError::Pem { path, .. } => {
                        if *path == settings.key {
                            (key, "server.tls_key")
                        } else if Some(path) == settings.client_ca.as_ref() {
                            (s.client_ca.as_ref().unwrap_or(cert), "server.client_ca")
                        } else {
                            (cert, "server.tls_cert")
                        }
                    }
                    TlsError::Rejected(_) => (cert, "server.tls_cert"),
                };
                self.issue(at.0, at.1, e.to_string());
                (Some(addr), None)
            }
        }
    }

    /// The `[intercept]` section: the CA pair is read and checked now (a leaf it signs must
    /// verify against it), and so are the upstream roots; the reload snapshot re-reads them.
    /// A policy that intercepts a host needs it.
    fn intercept(&mut self, raw: &RawConfig) -> Option<InterceptSettings> {
        let Some(section) = &raw.intercept else {
            let first = raw
                .policies
                .iter()
                .find_map(|(name, p)| p.intercept.first().map(|i| (name, i)));
            if let Some((name, i)) = first {
                self.issue(
                    &i.host,
                    format!("policies.{}.intercept[0].host", name.get_ref()),
                    "interception needs an [intercept] section with ca_cert and ca_key (the CA agents trust for intercepted hosts)",
                );
            }
            return None;
        };
        let s = section.get_ref();
        let settings = InterceptSettings {
            ca_cert: self.relative(&s.ca_cert),
            ca_key: self.relative(&s.ca_key),
            upstream_ca: s.upstream_ca.iter().map(|f| self.relative(f)).collect(),
        };
        match Interceptor::load(settings.clone()) {
            Ok(_) => Some(settings),
            Err(e) => {
                let (at, key) = match &e {
                    CaError::Read { path, .. } | CaError::Bad { path, .. } => {
                        if *path == settings.ca_key {
                            (&s.ca_key, "intercept.ca_key".to_owned())
                        } else if let Some(i) = settings.upstream_ca.iter().position(|p| p == path)
                        {
                            (&s.upstream_ca[i], format!("intercept.upstream_ca[{i}]"))
                        } else {
                            (&s.ca_cert, "intercept.ca_cert".to_owned())
                        }
                    }
                    CaError::Mismatch { .. } | CaError::Mint { .. } => {
                        (&s.ca_key, "intercept.ca_key".to_owned())
                    }
                };
                self.issue(at, key, e.to_string());
                None
            }
        }
    }

    /// A policy's `[[policies.NAME.intercept]]` entries, each host also admitted by `allowlist`.
    fn intercepts(
        &mut self,
        raw: &[raw::RawInterceptHost],
        key: &str,
        allowlist: &Allowlist,
    ) -> Intercepts {
        let mut out = Intercepts::default();
        for (i, h) in raw.iter().enumerate() {
            let key = format!("{key}.intercept[{i}]");
            let hkey = format!("{key}.host");
            let text = h.host.get_ref();
            let (pattern, port) = match policy::parse_rule(text) {
                Ok((Pattern::Ip(_), _)) => {
                    self.issue(&h.host, hkey, "intercept host names, not IP addresses (a leaf certificate names the host)");
                    continue;
                }
                Ok(p) => p,
                Err(problem) => {
                    self.issue(&h.host, hkey, format!("`{text}`: {problem}"));
                    continue;
                }
            };
            if !allowlist.admits_all(&pattern, port) {
                self.issue(
                    &h.host,
                    &hkey,
                    format!("`{text}` is not allowed by this policy's allow rules: add `{text}` to its allow list (interception never widens what an agent may reach)"),
                );
            }
            let mut inject = Vec::with_capacity(h.inject.len());
            for (j, inj) in h.inject.iter().enumerate() {
                if let Some(x) = self.inject(inj, &format!("{key}.inject[{j}]")) {
                    if inject.iter().any(|o: &Inject| o.header == x.header) {
                        self.issue(
                            &inj.header,
                            format!("{key}.inject[{j}].header"),
                            format!("`{}` is injected twice", x.header),
                        );
                    }
                    inject.push(x);
                }
            }
            let mut rules = Vec::with_capacity(h.rules.len());
            for (j, r) in h.rules.iter().enumerate() {
                match intercept::rules::parse_rule(r.get_ref()) {
                    Ok(rule) if rules.contains(&rule) => self.issue(
                        r,
                        format!("{key}.rules[{j}]"),
                        format!("duplicate rule `{}`", r.get_ref()),
                    ),
                    Ok(rule) => rules.push(rule),
                    Err(problem) => self.issue(
                        r,
                        format!("{key}.rules[{j}]"),
                        format!("`{}`: {problem}", r.get_ref()),
                    ),
                }
            }
            let credential = (!inject.is_empty()).then(|| {
                let names: Vec<&str> = inject.iter().map(|j| &*j.name).collect();
                Arc::<str>::from(names.join(","))
            });
            let entry = Intercept {
                host: text.as_str().into(),
                inject,
                rules: intercept::Rules::new(rules),
                credential,
            };
            if !out.insert(pattern, port, entry) {
                self.issue(&h.host, hkey, format!("`{text}` is intercepted twice"));
            }
        }
        out
    }

    /// One `inject` entry: a header name fit to set, a readable secret, a format with one `{}`.
    fn inject(&mut self, raw: &raw::RawInject, key: &str) -> Option<Inject> {
        let name = raw.header.get_ref();
        let header = match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) if intercept::RESERVED_HEADERS.contains(&h.as_str()) => {
                self.issue(
                    &raw.header,
                    format!("{key}.header"),
                    format!("`{name}` cannot be injected: the gateway sets the framing, connection and host headers itself"),
                );
                None
            }
            Ok(h) if h.as_str() != name => {
                self.issue(
                    &raw.header,
                    format!("{key}.header"),
                    format!("write the header name in lower case, as `{}`", h.as_str()),
                );
                None
            }
            Ok(h) => Some(h),
            Err(_) => {
                self.issue(
                    &raw.header,
                    format!("{key}.header"),
                    format!("`{name}` is not a header name (letters, digits and `-`, e.g. \"authorization\", \"x-api-key\")"),
                );
                None
            }
        };
        let path = self.relative(&raw.value_file);
        if let Err(e) = intercept::secrets::read_secret(&path) {
            self.issue(&raw.value_file, format!("{key}.value_file"), e.to_string());
        }
        let format = raw.format.as_ref().map_or("{}", |f| f.get_ref().as_str());
        if intercept::split_format(format).is_none() {
            let at = raw.format.as_ref().unwrap_or(&raw.value_file);
            self.issue(
                at,
                format!("{key}.format"),
                format!("`{format}` must hold exactly one `{{}}` (where the secret goes), e.g. \"Bearer {{}}\", and otherwise printable characters"),
            );
            return None;
        }
        Inject::new(header?, path, raw.value_file.get_ref(), format)
    }

    /// The `[sni]` section.
    fn sni(&mut self, raw: &raw::RawSni) -> SniPolicy {
        let mut sni = SniPolicy::default();
        if let Some(ports) = &raw.ports {
            sni.ports = ports
                .iter()
                .enumerate()
                .filter_map(|(i, p)| match u16::try_from(*p.get_ref()) {
                    Ok(port) if port != 0 => Some(port),
                    _ => {
                        let issue = self.at(
                            p.span().start,
                            format!("sni.ports[{i}]"),
                            format!("{} is not a port: use 1 to 65535", p.get_ref()),
                        );
                        self.issues.push(issue);
                        None
                    }
                })
                .collect();
        }
        if let Some(require) = raw.require {
            sni.require = require;
        }
        sni
    }

    /// A path from the file, relative to the config file's directory.
    fn relative(&self, file: &Str) -> PathBuf {
        let path = Path::new(file.get_ref());
        match self.file.parent() {
            Some(dir) if path.is_relative() => dir.join(path),
            _ => path.to_owned(),
        }
    }

    /// One `[[agents]]` entry.
    fn agent(&mut self, a: &raw::RawAgent, key: &str, policies: &HashMap<String, usize>) -> Agent {
        if !valid_name(a.name.get_ref()) {
            self.issue(&a.name, format!("{key}.name"), NAME_RULE);
        }
        let source_cidrs = match &a.source_cidrs {
            Some(list) => {
                if list.get_ref().is_empty() {
                    let issue = self.at(
                        list.span().start,
                        format!("{key}.source_cidrs"),
                        "an empty list matches no client; remove the key to identify the agent by token only".into(),
                    );
                    self.issues.push(issue);
                }
                self.cidrs(list.get_ref(), &format!("{key}.source_cidrs"))
            }
            None => Vec::new(),
        };
        let token_file = a
            .token_file
            .as_ref()
            .map(|f| self.token(f, &format!("{key}.token_file")));
        let cert = self.cert_id(a, key);
        if a.source_cidrs.is_none() && a.token_file.is_none() && cert.is_none() {
            self.issue(
                &a.name,
                key,
                "needs source_cidrs (the agent's address class), token_file (a proxy token), or spiffe_id / cert_subject (a client certificate); several may be combined",
            );
        }
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
        Agent {
            name: Arc::from(a.name.get_ref().as_str()),
            source_cidrs,
            token_file,
            cert,
            policy,
        }
    }

    /// An agent's `spiffe_id` and `cert_subject`.
    fn cert_id(&mut self, a: &raw::RawAgent, key: &str) -> Option<CertId> {
        if let Some(id) = &a.spiffe_id {
            let v = id.get_ref();
            let ok = v.len() <= 2048
                && v.strip_prefix("spiffe://").is_some_and(|rest| {
                    !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_graphic())
                });
            if !ok {
                self.issue(
                    id,
                    format!("{key}.spiffe_id"),
                    "a SPIFFE ID looks like spiffe://TRUST-DOMAIN/PATH (printable ASCII, no spaces)",
                );
            }
        }
        if let Some(cn) = &a.cert_subject {
            if cn.get_ref().is_empty() || cn.get_ref().len() > 256 {
                self.issue(
                    cn,
                    format!("{key}.cert_subject"),
                    "the certificate's subject common name: 1 to 256 characters",
                );
            }
        }
        if a.spiffe_id.is_none() && a.cert_subject.is_none() {
            return None;
        }
        Some(CertId {
            spiffe_id: a.spiffe_id.as_ref().map(|s| s.get_ref().clone()),
            subject: a.cert_subject.as_ref().map(|s| s.get_ref().clone()),
        })
    }

    /// Check a token file (relative paths are relative to the config file's directory) and
    /// return its path: the reload snapshot reads and watches it.
    fn token(&mut self, file: &Str, key: &str) -> PathBuf {
        let path = self.relative(file);
        match Token::load(&path) {
            Ok(_) => path,
            // A missing or empty file is a revoked (or not yet mounted) token, not a broken
            // config: the agent cannot authenticate until the file appears; everyone else is
            // served. Loud, but not fatal.
            Err(e) => {
                self.warn(
                    file.span().start,
                    key,
                    format!("{e}; the agent cannot authenticate until the file holds a token"),
                );
                path
            }
        }
    }

    /// An agent an earlier one always matches first can never be chosen (first match wins):
    /// an address-only agent whose every range an earlier address-only agent covers, or a
    /// certificate agent whose certificate an earlier certificate agent without a token
    /// already accepts from the same addresses.
    fn warn_shadowed(&mut self, earlier: &[Agent], agent: &Agent, name: &Str, key: &str) {
        if agent.cert.is_some() {
            return self.warn_shadowed_cert(earlier, agent, name, key);
        }
        if agent.token_file.is_some() || agent.source_cidrs.is_empty() {
            return;
        }
        let shadow = earlier.iter().find(|e| {
            e.token_file.is_none()
                && e.cert.is_none()
                && agent
                    .source_cidrs
                    .iter()
                    .all(|n| e.source_cidrs.iter().any(|m| m.contains(n)))
        });
        if let Some(e) = shadow {
            self.warn(
                name.span().start,
                key,
                format!("agent `{}` can never match: agent `{}` comes first and covers all its source_cidrs", agent.name, e.name),
            );
        }
    }

    fn warn_shadowed_cert(&mut self, earlier: &[Agent], agent: &Agent, name: &Str, key: &str) {
        let Some(want) = &agent.cert else { return };
        let implied = |theirs: &Option<String>, ours: &Option<String>| match theirs {
            None => true,
            Some(t) => ours.as_ref() == Some(t),
        };
        let covers = |e: &Agent| {
            e.source_cidrs.is_empty()
                || (!agent.source_cidrs.is_empty()
                    && agent
                        .source_cidrs
                        .iter()
                        .all(|n| e.source_cidrs.iter().any(|m| m.contains(n))))
        };
        let shadow = earlier.iter().find(|e| {
            e.token_file.is_none()
                && e.cert.as_ref().is_some_and(|c| {
                    implied(&c.spiffe_id, &want.spiffe_id) && implied(&c.subject, &want.subject)
                })
                && covers(e)
        });
        if let Some(e) = shadow {
            self.warn(
                name.span().start,
                key,
                format!("agent `{}` can never match: agent `{}` comes first and accepts every certificate it accepts (same spiffe_id / cert_subject) from its addresses", agent.name, e.name),
            );
        }
    }
}

/// What is wrong with a `cluster.redis` URL, if anything.
fn redis_url_problem(url: &str, is_cluster: bool) -> Option<String> {
    use redis::IntoConnectionInfo;
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Some(format!(
            "`{}` is not a redis URL: write redis://HOST:PORT/DB, or rediss:// for TLS",
            redact(url)
        ));
    }
    let info = match url.into_connection_info() {
        Ok(info) => info,
        Err(e) => return Some(format!("`{}` is not a usable redis URL: {e}", redact(url))),
    };
    if info.redis.password.is_some() {
        return Some("the URL carries a password: put it in cluster.password_file (a mounted Secret), never in the config".to_owned());
    }
    if info.redis.username.is_some() {
        return Some(format!(
            "`{}` carries a user name: use cluster.username",
            redact(url)
        ));
    }
    if is_cluster && info.redis.db != 0 {
        return Some(format!(
            "`{}`: Redis Cluster has only database 0",
            redact(url)
        ));
    }
    None
}

/// A URL for a message, with anything before an `@` (credentials) left out.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://…@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

const NAME_RULE: &str = "names use 1-64 characters from a-z, A-Z, 0-9, '-', '_' and '.'";

fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}
