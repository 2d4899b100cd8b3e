//! The configuration: read a TOML file, validate every value, build the domain values the data
//! path uses (allowlists, CIDR sets, the agent table).
//!
//! `raw` mirrors the file exactly; this module turns it into a [`Config`] or a list of
//! [`ConfigIssue`]s naming file, line, column and key. All issues are collected before failing, so
//! an operator fixes a file in one pass.

mod error;
mod raw;
mod validate;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::{ConfigError, ConfigIssue};

use crate::identity::{Agent, Agents};
use crate::limits::cluster::ClusterSettings;
use crate::limits::Limits;
use crate::policy::{Mode, Policy};
use crate::resolve::DnsConfig;
use crate::tls::TlsSettings;
use crate::vet::Vetter;
use raw::RawConfig;
use validate::Validator;

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

/// The `[sni]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniPolicy {
    /// CONNECT ports whose tunnels must start with a TLS ClientHello naming the CONNECT host
    /// (default `[443]`; empty turns the check off).
    pub ports: Vec<u16>,
    /// Refuse a ClientHello without a server name (`sni_missing`); default true. A CONNECT to an
    /// IP literal is never required to carry one (TLS forbids IP addresses in SNI).
    pub require: bool,
}

impl Default for SniPolicy {
    fn default() -> Self {
        SniPolicy {
            ports: vec![443],
            require: true,
        }
    }
}

impl SniPolicy {
    /// True when tunnels to `port` are checked.
    pub fn applies_to(&self, port: u16) -> bool {
        self.ports.contains(&port)
    }
}

/// A validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// The proxy listener address.
    pub listen: SocketAddr,
    /// The admin listener address (`/metrics`, `/healthz`, `/readyz`), if any.
    pub admin_listen: Option<SocketAddr>,
    /// The HTTPS proxy listener address (`server.tls_listen`), if any. Takes effect at start.
    pub tls_listen: Option<SocketAddr>,
    /// The HTTPS listener's certificate, key and client CA files (checked at load; the reload
    /// snapshot holds the live store that re-reads them as they rotate).
    pub tls: Option<TlsSettings>,
    /// The `[sni]` section: which tunnels must carry a ClientHello for the CONNECT host.
    pub sni: SniPolicy,
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
    /// Most client connections open at once (`server.max_connections`); beyond it new
    /// connections are closed at once. Takes effect at start.
    pub max_connections: usize,
    /// The global mode (`server.mode`); a policy may override it.
    pub mode: Mode,
    /// The `[limits]` defaults.
    pub limits: Limits,
    /// The `[cluster]` section: limits shared by every replica through Redis. `None`: the
    /// limits are per process.
    pub cluster: Option<ClusterSettings>,
    /// A hash of the exact file content this config was built from (reload compares it).
    pub fingerprint: u64,
    /// Problems that do not stop the config from loading (dead rules, shadowed agents, very
    /// broad exceptions); `check` prints them and the gateway logs them.
    pub warnings: Vec<ConfigIssue>,
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
        let at = source.span().map_or(0, |s| s.start);
        let (line, col) = error::line_col(src, at);
        let message = match source.message().trim_end() {
            // toml says nothing for some characters it refuses (a control character in a
            // comment): name the character, so the line is not all the operator gets.
            "" => unnamed_syntax_error(src, at),
            m => m.to_owned(),
        };
        ConfigError::Syntax {
            file: path.to_owned(),
            line,
            col,
            message,
            source: Box::new(source),
        }
    })?;
    let mut v = Validator {
        file: path,
        src,
        issues: Vec::new(),
        warnings: Vec::new(),
    };
    let mut config = v.build(&raw);
    config.warnings = v.warnings;
    if v.issues.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(v.issues))
    }
}

/// The message for a TOML syntax error that toml left without one.
fn unnamed_syntax_error(src: &str, at: usize) -> String {
    match src.get(at..).and_then(|rest| rest.chars().next()) {
        Some(c) if c.is_control() => format!(
            "control character {c:?} is not allowed in TOML, not even in a comment; remove it"
        ),
        Some(c) => format!("unexpected {c:?}"),
        None => "unexpected end of file".to_owned(),
    }
}

// === impl Config ===

impl Config {
    /// The policy of an agent.
    pub fn policy_of(&self, agent: &Agent) -> &Policy {
        &self.policies[agent.policy]
    }

    /// The largest request head any policy accepts (the HTTP parser's bound).
    pub fn max_header_bytes(&self) -> u64 {
        self.policies
            .iter()
            .map(|p| p.limits.max_request_header_bytes)
            .fold(self.limits.max_request_header_bytes, u64::max)
    }
}

/// Default for `server.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

pub use crate::fingerprint::fingerprint;

#[cfg(test)]
mod doc_tests;
#[cfg(test)]
mod tests;
