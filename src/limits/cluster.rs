//! Cluster-wide limits: the `[cluster]` settings, and the store that holds every replica's
//! view of an agent's rate, open requests and byte budgets in Redis (or Valkey).
//!
//! Without `[cluster]` nothing here runs: the limits are the in-process [`Gate`]s.
//!
//! With it, each request or tunnel asks the [`Store`] once (one script: concurrency lease, then
//! GCRA rate), bounded by `cluster.timeout`. While the store is unusable `fail_mode` decides:
//! `local` admits through a per-agent fallback [`Gate`] whose limits are the configured ones
//! divided by the live replicas last seen; `closed` refuses (503 `limit_store_unavailable`);
//! `open` admits. The in-process open-request counter is kept either way, so the fallback
//! starts from what this replica really has open.

mod scripts;
mod store;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;

pub use store::{AgentKeys, Lease, Store, LEASE_TTL, RELEASE_AFTER, REPLICA_TTL, TICK};

use super::{Gate, Limits, Permit};
use crate::identity::Agents;
use crate::outcome::{Deny, Reason};

/// Default `cluster.timeout`: the most a request waits on the store.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(50);

/// Default `cluster.key_prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "chokepoint:";

/// What the gateway does while the store is unreachable or slower than `cluster.timeout`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FailMode {
    /// In-process limits, each divided by the number of live replicas last seen.
    #[default]
    Local,
    /// Refuse with 503 `limit_store_unavailable`; `/readyz` reports not ready.
    Closed,
    /// Admit without the cluster-wide limits.
    Open,
}

/// The validated `[cluster]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `redis://` / `rediss://` URLs, without credentials: one server, or the seed nodes of a
    /// Redis Cluster.
    pub nodes: Vec<String>,
    /// True when `redis` was a list: speak the Redis Cluster protocol.
    pub cluster: bool,
    /// The ACL user (`cluster.username`).
    pub username: Option<String>,
    /// The file holding the password (a mounted Secret), re-read when it changes.
    pub password_file: Option<PathBuf>,
    /// Bound on each store call made for a request.
    pub timeout: Duration,
    /// Behaviour while the store is unusable.
    pub fail_mode: FailMode,
    /// Prefix of every key the gateway writes.
    pub key_prefix: String,
}

/// The cluster-wide limits of one snapshot: the store and, per agent (aligned with the
/// config's agents), its keys and its `local` fallback gate.
#[derive(Debug)]
pub struct ClusterLimits {
    store: Arc<Store>,
    agents: Vec<AgentState>,
}

#[derive(Debug)]
struct AgentState {
    name: Arc<str>,
    keys: AgentKeys,
    fallback: ArcSwapOption<Fallback>,
}

/// A fallback gate for one replica count and one set of limits.
#[derive(Debug)]
struct Fallback {
    replicas: u32,
    limits: Limits,
    share: Limits,
    gate: Gate,
}

// === impl ClusterLimits ===

impl ClusterLimits {
    /// The cluster limits of `agents` on `store`; fallback gates of `prev` are kept for agents
    /// that still exist.
    pub fn new(store: Arc<Store>, agents: &Agents, prev: Option<&ClusterLimits>) -> Self {
        let agents = agents
            .iter()
            .map(|a| {
                let kept = prev
                    .filter(|p| Arc::ptr_eq(&p.store, &store))
                    .and_then(|p| p.agents.iter().find(|s| s.name == a.name))
                    .and_then(|s| s.fallback.load_full());
                AgentState {
                    name: a.name.clone(),
                    keys: store.keys(&a.name),
                    fallback: ArcSwapOption::new(kept),
                }
            })
            .collect();
        ClusterLimits { store, agents }
    }

    /// Where agent number `agent`'s bytes go: the store (and `local`, its own count).
    pub fn sink(
        &self,
        agent: usize,
        local: Arc<super::budget::LocalBudget>,
    ) -> super::budget::Sink {
        super::budget::Sink::Cluster(local, self.store.clone(), self.agents[agent].keys.clone())
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// False while the store is unusable under `fail_mode = "closed"` (`/readyz`).
    pub fn ready(&self) -> bool {
        self.store.settings().fail_mode != FailMode::Closed || self.store.is_up()
    }

    /// Admit one request or tunnel of agent number `agent` (whose in-process gate is `gate`)
    /// under `limits`: the same contract as [`Gate::admit`], decided by the store, or by
    /// `fail_mode` when the store cannot answer within `cluster.timeout`.
    pub async fn admit(
        &self,
        agent: usize,
        gate: &Gate,
        limits: &Limits,
        report: bool,
    ) -> (Permit, Option<Deny>) {
        let state = &self.agents[agent];
        match self.store.admit(&state.keys, limits, report).await {
            Ok(a) => {
                let mut permit = gate.permit();
                if let Some(lease) = a.lease {
                    permit = permit.with_lease(lease);
                }
                let deny = match a.verdict {
                    0 => None,
                    3 => Some(super::budget::refusal(a.kind, &limits.budgets, a.wait)),
                    1 => Some(
                        Deny::with_detail(
                            Reason::TooManyConcurrent,
                            format!("agent already has {} requests and tunnels open across the gateway's replicas (max_concurrent)", limits.max_concurrent),
                        )
                        .retry_after(Duration::from_secs(1)),
                    ),
                    _ => Some(
                        Deny::new(
                            Reason::RateLimited,
                            "agent is over its request rate across the gateway's replicas (requests_per_second, burst)",
                        )
                        .retry_after(a.wait),
                    ),
                };
                (permit, deny)
            }
            Err(store::Unavailable) => match self.store.settings().fail_mode {
                FailMode::Local => {
                    let fallback = self.fallback(state, limits, gate);
                    fallback.gate.admit(fallback.share.max_concurrent)
                }
                FailMode::Closed => {
                    let deny = Deny::new(
                        Reason::LimitStoreUnavailable,
                        "the shared limit store is unavailable and cluster.fail_mode is closed; retry shortly",
                    )
                    .retry_after(Duration::from_secs(1));
                    (gate.permit(), Some(deny))
                }
                FailMode::Open => (gate.permit(), None),
            },
        }
    }

    /// The agent's fallback gate for the live replica count and `limits`, made when either
    /// changed. It shares the agent's open-request counter with `gate`.
    fn fallback(&self, state: &AgentState, limits: &Limits, gate: &Gate) -> Arc<Fallback> {
        let replicas = self.store.replicas();
        if let Some(f) = state.fallback.load_full() {
            if f.replicas == replicas && f.limits == *limits {
                return f;
            }
        }
        let share = share(limits, replicas);
        // `share` keeps the rate and burst in range, so a quota exists.
        let quota = share
            .quota()
            .unwrap_or_else(|| unreachable!("a share of validated limits"));
        let made = Arc::new(Fallback {
            replicas,
            limits: *limits,
            share,
            gate: Gate::new(quota, gate.active()),
        });
        state.fallback.store(Some(made.clone()));
        made
    }
}

/// One replica's share of `limits` when `replicas` share them: rate, burst and concurrency
/// divided (burst and concurrency rounded down, at least 1), so together the replicas stay
/// within what the operator wrote.
pub fn share(limits: &Limits, replicas: u32) -> Limits {
    let n = replicas.max(1);
    Limits {
        requests_per_second: limits.requests_per_second / f64::from(n),
        burst: (limits.burst / n).max(1),
        max_concurrent: (limits.max_concurrent / n).max(1),
        ..*limits
    }
}

// === impl FailMode ===

impl FailMode {
    /// Parse the config spelling.
    pub fn parse(s: &str) -> Option<FailMode> {
        match s {
            "local" => Some(FailMode::Local),
            "closed" => Some(FailMode::Closed),
            "open" => Some(FailMode::Open),
            _ => None,
        }
    }

    /// The config spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            FailMode::Local => "local",
            FailMode::Closed => "closed",
            FailMode::Open => "open",
        }
    }
}

// === impl ClusterSettings ===

impl ClusterSettings {
    /// One line for `check` and `explain`: where the store is and what happens without it.
    pub fn describe(&self) -> String {
        format!(
            "{} {} (timeout {:?}, fail_mode {}, key_prefix {:?})",
            if self.cluster {
                "Redis Cluster"
            } else {
                "Redis"
            },
            self.nodes.join(", "),
            self.timeout,
            self.fail_mode.as_str(),
            self.key_prefix
        )
    }
}

/// Why the store's password could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is empty (or only whitespace).
    #[error("{0}: empty")]
    Empty(PathBuf),
}

/// Read the store's password: the file's content without a trailing newline. Never logged.
pub fn read_password(path: &std::path::Path) -> Result<String, PasswordError> {
    let raw = std::fs::read_to_string(path).map_err(|source| PasswordError::Read {
        path: path.to_owned(),
        source,
    })?;
    let pw = raw.trim_end_matches(['\r', '\n']);
    if pw.trim().is_empty() {
        return Err(PasswordError::Empty(path.to_owned()));
    }
    Ok(pw.to_owned())
}
