//! The configuration: read a TOML file, validate every value, build the domain values the data
//! path uses (allowlists, CIDR sets, the agent table).
//!
//! `raw` mirrors the file exactly; this module turns it into a [`Config`] or a list of
//! [`ConfigIssue`]s naming file, line, column and key. All issues are collected before failing, so
//! an operator fixes a file in one pass.

mod error;
mod raw;
mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use error::{ConfigError, ConfigIssue};

use crate::fingerprint::FileStamp;
use crate::identity::{Agent, Agents};
use crate::limits::cluster::ClusterSettings;
use crate::limits::Limits;
use crate::policy::deny_file::{LineIssue, ListError};
use crate::policy::{DenyFile, Mode, Policy};
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
    /// The `[intercept]` section: the CA files and extra upstream roots (checked at load; the
    /// reload snapshot holds the live `Interceptor` that re-reads them).
    pub intercept: Option<crate::intercept::InterceptSettings>,
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
    /// Most admin-listener connections open at once (`server.admin_max_connections`); beyond
    /// it new ones are closed at once. Takes effect at start.
    pub admin_max_connections: usize,
    /// Refusals before identification each client address may cause
    /// (`server.address_refusals_per_second`, `server.address_refusal_burst`).
    pub refusal_budget: crate::budget::Allowance,
    /// How often the `dropped` summary lines are written (`server.summary_interval`).
    pub summary_interval: Duration,
    /// The global mode (`server.mode`); a policy may override it.
    pub mode: Mode,
    /// The `[limits]` defaults.
    pub limits: Limits,
    /// The `[cluster]` section: limits shared by every replica through Redis. `None`: the
    /// limits are per process.
    pub cluster: Option<ClusterSettings>,
    /// A hash of the exact file content this config was built from (reload compares it).
    pub fingerprint: u64,
    /// The `deny_files` lists it loaded, each once, with their stamps at load (the reload
    /// watcher compares them, as it compares `fingerprint`).
    pub deny_lists: Vec<WatchedList>,
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

/// A `deny_files` list a config loaded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchedList {
    /// The list's path (relative names resolved against the config file's directory).
    pub path: PathBuf,
    /// Its stamp when it was read (`None` if it could not be taken).
    pub stamp: Option<FileStamp>,
}

/// Deny lists of earlier loads, by path and stamp, so a reload reads again only the lists whose
/// files changed (a million-line list takes a fraction of a second to parse; an edit of an allow
/// rule should not). Broken lists are kept too, so a list that stays broken is not parsed again
/// on every poll. Lists that can no longer be read are not kept.
#[derive(Debug, Default)]
pub struct DenyCache {
    lists: parking_lot::Mutex<HashMap<PathBuf, (FileStamp, Loaded)>>,
}

/// A list as one load left it.
type Loaded = Result<Arc<DenyFile>, CachedError>;

/// A list problem as the cache keeps it.
#[derive(Clone, Debug)]
pub(crate) enum CachedError {
    /// Lines that are not rules (the first few) and how many more.
    Lines {
        issues: Arc<[LineIssue]>,
        more: usize,
    },
    /// The file could not be read, or is too large; never cached.
    Other(Arc<ListError>),
}

impl From<ListError> for CachedError {
    fn from(e: ListError) -> Self {
        match e {
            ListError::Lines { issues, more } => CachedError::Lines {
                issues: issues.into(),
                more,
            },
            other => CachedError::Other(Arc::new(other)),
        }
    }
}

// === impl DenyCache ===

impl DenyCache {
    /// The list loaded from `path` when it had `stamp`, if that is the one kept.
    pub(crate) fn get(&self, path: &Path, stamp: FileStamp) -> Option<Loaded> {
        let lists = self.lists.lock();
        let (kept, result) = lists.get(path)?;
        (*kept == stamp).then(|| result.clone())
    }

    /// Keep what loading `path` at `stamp` gave (read errors are not kept).
    pub(crate) fn put(&self, path: &Path, stamp: FileStamp, result: &Loaded) {
        if matches!(result, Err(CachedError::Other(_))) {
            return;
        }
        self.lists
            .lock()
            .insert(path.to_owned(), (stamp, result.clone()));
    }

    /// Forget every list not in `keep` (lists a config no longer names), so their memory goes.
    pub fn retain(&self, keep: &[WatchedList]) {
        self.lists
            .lock()
            .retain(|path, _| keep.iter().any(|w| w.path == *path));
    }

    /// Keep the lists `config` loaded (at start, before any reload).
    pub fn seed(&self, config: &Config) {
        let mut lists = self.lists.lock();
        for p in &config.policies {
            for file in p.deny.files() {
                let stamp = config
                    .deny_lists
                    .iter()
                    .find(|w| w.path == file.path)
                    .and_then(|w| w.stamp);
                if let Some(stamp) = stamp {
                    lists.insert(file.path.clone(), (stamp, Ok(Arc::clone(file))));
                }
            }
        }
    }

    /// Forget everything (SIGHUP: the operator asks for every file to be read again).
    pub fn clear(&self) {
        self.lists.lock().clear();
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
    parse_with(path, src, None)
}

/// Validate config text, taking unchanged deny lists from `cache` (and keeping what it reads
/// there).
pub fn parse_with(
    path: &Path,
    src: &str,
    cache: Option<&DenyCache>,
) -> Result<Config, ConfigError> {
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
        deny_cache: cache,
        deny_lists: Vec::new(),
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

/// Default for `server.admin_max_connections`: far more than probes and scrapers use, far
/// fewer descriptors than a flood could take.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;

pub use crate::fingerprint::fingerprint;

#[cfg(test)]
mod doc_tests;
#[cfg(test)]
mod tests;
