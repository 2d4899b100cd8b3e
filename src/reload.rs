//! The live configuration: a [`Snapshot`] behind an `ArcSwap`, replaced atomically when the file
//! changes or on SIGHUP.
//!
//! Each request loads the current snapshot once and keeps it to the end; every change (a new
//! snapshot, a rotated token) is announced to the subscribers of [`Live::subscribe`], so open
//! tunnels and client connections check themselves against it (`proxy::revoke`).
//!
//! A snapshot bundles what must change together: the validated [`Config`] (plain settings and
//! paths), the per-agent limit [`Gate`]s (carried over by agent name, so a reload neither resets
//! rate budgets nor forgets open requests), the resolver (rebuilt only when `[dns]` changed),
//! and the live stores that re-read files as they change: the proxy [`Tokens`] (carried over by
//! file) and the HTTPS listener's [`TlsFiles`] (carried over while its settings stay the same).
//!
//! Watching: every [`POLL`] the file is read again (through symlinks, so the `..data` swap
//! Kubernetes does for ConfigMap volumes is seen like any edit) and compared with what was last
//! loaded; token files are re-read on the same tick. The `deny_files` lists are compared by
//! their [`FileStamp`] (size, times, inode) instead of their bytes: hashing a million-line list
//! every second would cost more than the rest of the watcher. A changed file (or token, or list)
//! is applied once two polls in a row see the same state, so one written in place (truncated,
//! then written) is never applied half-written; SIGHUP applies at once and reads every list
//! again. A file that fails to parse or validate is reported and the running snapshot stays: a
//! config is applied whole or not at all.
//!
//! A reload parses on a blocking thread ([`tokio::task::spawn_blocking`]): with a large deny
//! list that takes a fraction of a second, which must not stall a runtime worker and the
//! requests queued on it. Lists whose stamps did not change are taken from the [`DenyCache`]
//! instead of being parsed again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigError, DenyCache};
use crate::fingerprint::FileStamp;
use crate::identity::{AgentId, Tokens};
use crate::intercept::{CaError, Interceptor, Secrets};
use crate::limits::budget::{LocalBudget, Sink};
use crate::limits::cluster::{ClusterLimits, Store};
use crate::limits::Gate;
use crate::metrics::{AgentMetrics, Metrics};
use crate::resolve::{Resolver, ResolverError};
use crate::tls::{TlsError, TlsFiles};

/// How often the config file and token files are checked for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// Everything a request needs from the configuration, consistent with itself.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config (its vetter knows the bound listen address).
    pub config: Config,
    /// Limit state per agent, aligned with `config.agents`.
    pub gates: Vec<Arc<Gate>>,
    /// This process's byte budget counts per agent, aligned with `config.agents`; carried over
    /// by name.
    pub budgets: Vec<Arc<LocalBudget>>,
    /// The resolver for `config.dns`.
    pub resolver: Arc<Resolver>,
    /// The live proxy tokens of `config.agents`.
    pub tokens: Tokens,
    /// The HTTPS listener's live certificate, key and client CA (`config.tls`).
    pub tls: Option<Arc<TlsFiles>>,
    /// The cluster-wide limits (`config.cluster`); the store is carried over while the
    /// `[cluster]` section stays the same.
    pub cluster: Option<Arc<ClusterLimits>>,
    /// The live interception CA, leaf cache and upstream roots (`config.intercept`).
    pub intercept: Option<Arc<Interceptor>>,
    /// The live secrets that interception injects, one store per file the policies name.
    pub secrets: Secrets,
    /// Metric handles per agent, aligned with `config.agents`; carried over by name.
    agent_metrics: Vec<Arc<AgentMetrics>>,
}

/// Why a reload did not apply.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new file is invalid; the old config keeps serving.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The new `[dns]` section could not be turned into a resolver.
    #[error(transparent)]
    Resolver(#[from] ResolverError),
    /// The TLS files changed between validation and use, and no longer build a TLS config.
    #[error("server.tls_cert / tls_key / client_ca: {0}")]
    Tls(#[from] TlsError),
    /// The blocking task that parsed the new file did not finish (it panicked).
    #[error("the reload task failed")]
    Task(#[source] tokio::task::JoinError),
    /// The interception CA files changed between validation and use.
    #[error("intercept.ca_cert / ca_key / upstream_ca: {0}")]
    Intercept(#[from] CaError),
}

/// The live snapshot and where it comes from.
#[derive(Debug)]
pub struct Live {
    current: ArcSwap<Snapshot>,
    path: PathBuf,
    /// The proxy and admin addresses actually bound: a tunnel to them is a loop.
    own: Vec<SocketAddr>,
    metrics: Arc<Metrics>,
    /// Counts the changes that can revoke an admission (a new snapshot, a rotated token); open
    /// tunnels and client connections wait on it to check themselves again.
    changes: watch::Sender<u64>,
    /// Deny lists by stamp, so a reload parses only the lists that changed.
    deny_cache: DenyCache,
}

// === impl Snapshot ===

impl Snapshot {
    /// Build a snapshot, reusing gates, metric handles, token and TLS stores and the resolver
    /// of `prev` where nothing changed.
    pub fn build(
        config: Config,
        own: &[SocketAddr],
        prev: Option<&Snapshot>,
        metrics: &Metrics,
    ) -> Result<Snapshot, ReloadError> {
        let mut config = config;
        config.vetter = config.vetter.clone().with_own(own.to_vec());
        let resolver = match prev {
            Some(p)
                if p.config.dns == config.dns && p.config.timeouts.dns == config.timeouts.dns =>
            {
                p.resolver.clone()
            }
            _ => Arc::new(Resolver::new(&config.dns, config.timeouts.dns)?),
        };
        let old: HashMap<&str, &Arc<Gate>> = prev
            .map(|p| {
                p.config
                    .agents
                    .iter()
                    .zip(&p.gates)
                    .map(|(a, g)| (&*a.name, g))
                    .collect()
            })
            .unwrap_or_default();
        let mut gates = Vec::with_capacity(config.agents.len());
        for agent in config.agents.iter() {
            let limits = config.policy_of(agent).limits;
            // Validation keeps every rate and burst in range, so a quota always exists.
            let quota = limits
                .quota()
                .unwrap_or_else(|| unreachable!("validated limits"));
            let gate = match old.get(&*agent.name) {
                Some(g) if g.quota() == quota => Arc::clone(g),
                Some(g) => {
                    let fresh = Gate::new(quota, g.active());
                    fresh.spend_burst();
                    Arc::new(fresh)
                }
                None => Arc::new(Gate::new(quota, Arc::default())),
            };
            gates.push(gate);
        }
        let budgets = config
            .agents
            .iter()
            .map(|a| {
                prev.and_then(|p| {
                    p.config
                        .agents
                        .iter()
                        .position(|o| o.name == a.name)
                        .map(|i| p.budgets[i].clone())
                })
                .unwrap_or_default()
            })
            .collect();
        let agent_metrics = config
            .agents
            .iter()
            .map(|a| {
                prev.and_then(|p| p.agent_metrics.iter().find(|m| m.agent() == &*a.name))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(metrics.agent(a.name.clone())))
            })
            .collect();
        let prev_cluster = prev.and_then(|p| p.cluster.as_deref());
        let cluster = config.cluster.as_ref().map(|settings| {
            let store = match prev_cluster {
                Some(c) if c.store().settings() == settings => c.store().clone(),
                _ => Store::start(settings.clone(), Arc::new(metrics.clone())),
            };
            Arc::new(ClusterLimits::new(store, &config.agents, prev_cluster))
        });
        if cluster.is_none() && prev_cluster.is_some() {
            metrics.store_fallback(false);
        }
        let tokens = Tokens::load(&config.agents, prev.map(|p| &p.tokens));
        let tls = match (&config.tls, prev) {
            (None, _) => None,
            (Some(settings), Some(p)) if p.config.tls.as_ref() == Some(settings) => p.tls.clone(),
            (Some(settings), _) => Some(Arc::new(TlsFiles::load(settings.clone())?)),
        };
        let intercept = match (&config.intercept, prev) {
            (None, _) => None,
            (Some(settings), Some(p))
                if p.intercept.as_ref().map(|i| i.settings()) == Some(settings) =>
            {
                p.intercept.clone()
            }
            (Some(settings), _) => Some(Arc::new(Interceptor::load(settings.clone())?)),
        };
        let secrets = Secrets::load(
            crate::intercept::secret_files(&config.policies),
            prev.map(|p| &p.secrets),
        );
        Ok(Snapshot {
            config,
            gates,
            budgets,
            resolver,
            tokens,
            tls,
            cluster,
            intercept,
            secrets,
            agent_metrics,
        })
    }

    /// The metric handles of an agent.
    pub fn agent_metrics(&self, agent: AgentId) -> &Arc<AgentMetrics> {
        &self.agent_metrics[agent.0]
    }

    /// False while limits cannot be applied as configured: the limit store is unusable under
    /// `cluster.fail_mode = "closed"` (`/readyz`).
    pub fn limits_ready(&self) -> bool {
        self.cluster.as_ref().map_or(true, |c| c.ready())
    }

    /// Where an agent's bytes are counted against its byte budgets.
    pub fn budget_sink(&self, agent: AgentId) -> Sink {
        let local = self.budgets[agent.0].clone();
        match &self.cluster {
            None => Sink::Local(local),
            Some(c) => c.sink(agent.0, local),
        }
    }

    /// True when byte budgets are checked against this process's counts (no `[cluster]`, or
    /// the store is unusable).
    pub fn budgets_local(&self) -> bool {
        self.cluster.as_ref().map_or(true, |c| !c.store().is_up())
    }

    /// The limit gate of an agent.
    pub fn gate(&self, agent: AgentId) -> &Gate {
        &self.gates[agent.0]
    }
}

// === impl Live ===

impl Live {
    /// Start from an already loaded config, for a proxy bound to `bound`.
    pub fn new(
        config: Config,
        own: Vec<SocketAddr>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ReloadError> {
        let path = config.source.clone();
        let snapshot = Snapshot::build(config, &own, None, &metrics)?;
        log_warnings(&snapshot.config);
        if let Some(tls) = &snapshot.tls {
            metrics.tls_cert_loaded(tls.not_after());
        }
        let deny_cache = DenyCache::default();
        deny_cache.seed(&snapshot.config);
        Ok(Live {
            current: ArcSwap::from_pointee(snapshot),
            path,
            own,
            metrics,
            changes: watch::Sender::new(0),
            deny_cache,
        })
    }

    /// The current snapshot; hold it for the whole request.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Notice of every later change that may revoke an admission: a new snapshot, a rotated
    /// token. Subscribe before [`Live::load`], so a change between the two is not missed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Tell the subscribers that the snapshot or a token changed.
    fn changed(&self) {
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Read the file again and, if it is valid, swap it in.
    pub fn reload(&self) -> Result<(), ReloadError> {
        let src = std::fs::read_to_string(&self.path).map_err(|source| ConfigError::Read {
            file: self.path.clone(),
            source,
        })?;
        self.apply(&src)
    }

    /// Validate `src` as the config file's content and, if it is valid, swap it in.
    fn apply(&self, src: &str) -> Result<(), ReloadError> {
        let config = config::parse_with(&self.path, src, Some(&self.deny_cache))?;
        let bound = self.own[0];
        if config.listen != bound && config.listen.port() != 0 {
            tracing::warn!(
                configured = %config.listen,
                bound = %bound,
                "server.listen changed; it takes effect at the next restart"
            );
        }
        let prev = self.current.load();
        let next = Snapshot::build(config, &self.own, Some(&prev), &self.metrics)?;
        log_warnings(&next.config);
        let gone = prev
            .agent_metrics
            .iter()
            .filter(|m| !next.config.agents.iter().any(|a| &*a.name == m.agent()));
        self.metrics.forget_agents(gone.map(|m| &**m));
        if let Some(tls) = &next.tls {
            self.metrics.tls_cert_loaded(tls.not_after());
        }
        self.deny_cache.retain(&next.config.deny_lists);
        self.current.store(Arc::new(next));
        self.changed();
        Ok(())
    }

    /// Apply `bytes` as the config file's content on a blocking thread (see the module docs).
    async fn apply_blocking(self: &Arc<Self>, bytes: Vec<u8>) -> Result<(), ReloadError> {
        let src = String::from_utf8(bytes).map_err(|e| {
            ReloadError::Config(ConfigError::Read {
                file: self.path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
            })
        })?;
        let live = Arc::clone(self);
        tokio::task::spawn_blocking(move || live.apply(&src))
            .await
            .map_err(ReloadError::Task)?
    }

    /// Re-read every token file of the current config; `at_once` (SIGHUP) applies a changed
    /// token on its first read instead of its second.
    fn refresh_tokens(&self, at_once: bool) {
        let snap = self.current.load();
        let mut rotated = false;
        for (agent, token) in snap.tokens.iter(&snap.config.agents) {
            match token.refresh(at_once) {
                Ok(true) => {
                    rotated = true;
                    tracing::info!(agent, "proxy token rotated");
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(agent, error = %e, "token file unreadable; keeping the previous token")
                }
            }
        }
        if rotated {
            self.changed();
        }
    }

    /// Re-read the secret files interception injects, and the interception CA files; `at_once`
    /// (SIGHUP) applies a changed secret on its first read. A secret's value is never logged.
    fn refresh_intercept(&self, at_once: bool) {
        let snap = self.current.load();
        for secret in snap.secrets.iter() {
            match secret.refresh(at_once) {
                Ok(true) => {
                    tracing::info!(file = %secret.path().display(), "injected secret changed")
                }
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "secret file unreadable; keeping the previous value for now")
                }
            }
        }
        let Some(i) = &snap.intercept else { return };
        match i.refresh() {
            Ok(true) => {
                self.metrics.leaves_cached(i.cached());
                tracing::info!(
                    ca = %i.settings().ca_cert.display(),
                    "interception CA files changed; new connections get leaves from them"
                )
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "interception CA files unusable; the previous CA keeps signing"
            ),
        }
    }

    /// Re-read the HTTPS listener's certificate, key and client CA files of the current config.
    fn refresh_tls(&self) {
        let snap = self.current.load();
        let Some(tls) = &snap.tls else { return };
        match tls.refresh() {
            Ok(true) => {
                self.metrics.tls_cert_loaded(tls.not_after());
                tracing::info!(
                    cert = %tls.settings().cert.display(),
                    "TLS files changed; new connections use them"
                );
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "TLS files unusable; the previous certificate keeps serving"
            ),
        }
    }

    /// Watch the file (and token files) until `stop`, reloading on change and on SIGHUP.
    /// `hup` comes from [`hangup`], installed before the gateway announces itself.
    pub async fn watch(self: Arc<Self>, mut hup: Hangup, stop: CancellationToken) {
        // The content that last failed to load and why: it is retried every tick (a token file
        // it names may appear), but reported again only when the error changes.
        let mut failed: Option<(u64, String)> = None;
        // A changed content seen once: applied when the next poll reads the same bytes, so a
        // file written in place (truncate, then write) is never applied half-written.
        let mut settling: Option<u64> = None;
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let forced = tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => false,
                Some(()) = recv(&mut hup) => true,
            };
            self.refresh_tokens(forced);
            self.refresh_tls();
            self.refresh_intercept(forced);
            let now = match std::fs::read(&self.path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    // A ConfigMap swap can leave the path briefly missing; try again next tick.
                    tracing::debug!(error = %e, "config file unreadable; will retry");
                    continue;
                }
            };
            let (seen, current) = {
                let snap = self.current.load();
                let lists = &snap.config.deny_lists;
                (
                    watched_state(
                        config::fingerprint(&now),
                        lists.iter().map(|l| FileStamp::of(&l.path)),
                    ),
                    watched_state(snap.config.fingerprint, lists.iter().map(|l| l.stamp)),
                )
            };
            if !forced && seen == current {
                settling = None;
                continue;
            }
            // SIGHUP applies at once: the operator says the file is complete.
            if !forced && settling != Some(seen) {
                settling = Some(seen);
                continue;
            }
            if forced {
                self.deny_cache.clear();
            }
            let applied = self.apply_blocking(now).await;
            match applied {
                Ok(()) => {
                    failed = None;
                    self.metrics.reloaded(true);
                    tracing::info!(config = %self.path.display(), "config reloaded");
                }
                Err(e) => {
                    let error = e.to_string();
                    let repeat = failed.as_ref() == Some(&(seen, error.clone()));
                    if !repeat || forced {
                        self.metrics.reloaded(false);
                        tracing::error!(
                            config = %self.path.display(),
                            error = %error,
                            "config reload failed; the previous config keeps serving"
                        );
                    }
                    failed = Some((seen, error));
                }
            }
        }
    }
}

/// What the watcher compares: the config file's fingerprint and the stamps of its deny lists.
fn watched_state(fingerprint: u64, lists: impl Iterator<Item = Option<FileStamp>>) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    fingerprint.hash(&mut h);
    for stamp in lists {
        stamp.hash(&mut h);
    }
    h.finish()
}

fn log_warnings(config: &Config) {
    for w in &config.warnings {
        tracing::warn!(warning = %w, "config warning");
    }
}

/// The SIGHUP stream (absent where it cannot be installed).
#[cfg(unix)]
pub type Hangup = Option<tokio::signal::unix::Signal>;
/// The SIGHUP stream (absent where it cannot be installed).
#[cfg(not(unix))]
pub type Hangup = Option<()>;

/// Install the SIGHUP handler now (before the gateway announces itself, so an early SIGHUP is
/// never the default action, which would end the process).
#[cfg(unix)]
pub fn hangup() -> Hangup {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; file changes are still picked up");
            None
        }
    }
}

/// Install the SIGHUP handler now (no-op where signals do not exist).
#[cfg(not(unix))]
pub fn hangup() -> Hangup {
    None
}

/// Completes with `Some` on each SIGHUP; never completes without a handler.
async fn recv(hup: &mut Hangup) -> Option<()> {
    #[cfg(unix)]
    if let Some(s) = hup {
        return s.recv().await;
    }
    let _ = hup;
    std::future::pending().await
}
