//! The connection to the limit store, its health, and the calls the request path makes.
//!
//! One [`Store`] per `[cluster]` setting (kept across reloads while the section is unchanged).
//! A background task keeps it usable: it connects (and reconnects after a failure or a password
//! rotation), sends this replica's heartbeat every second (which also counts the live replicas)
//! and renews the leases this replica holds. Requests never connect: while the store is down they
//! do not call it at all (the `fail_mode` applies at once), and the task's next successful
//! heartbeat, at most [`TICK`] later, brings it back.
//!
//! A finished request's lease is given back by the agent's next admission on this replica, in
//! that admission's own round trip (the script removes it before it counts), so a busy agent
//! costs one round trip per request or tunnel. What no admission took within [`RELEASE_AFTER`]
//! a second task gives back, in one call per agent.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, FromRedisValue, IntoConnectionInfo, Pipeline, RedisError, RedisFuture, RedisResult,
    Script, Value,
};
use tokio::sync::mpsc;

use super::scripts;
use super::ClusterSettings;
use crate::limits::budget::{Budgets, KINDS};
use crate::limits::Limits;
use crate::metrics::{Metrics, StoreResult};

/// How often the background task looks at the store (and so the longest a recovered store
/// waits to be used again).
pub const TICK: Duration = Duration::from_millis(250);
/// How often a healthy replica sends its heartbeat.
const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);
/// How long a replica counts as live after its last heartbeat.
pub const REPLICA_TTL: Duration = Duration::from_secs(10);
/// How long a lease lives without renewal: a replica that dies (kill -9) frees its agents'
/// slots within this.
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// How often held leases are renewed (well inside [`LEASE_TTL`], so a slow round survives).
const RENEW_EVERY: Duration = Duration::from_secs(3);
/// Bound on establishing a connection (the background task's, never a request's).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How often the password file is read again.
const PASSWORD_EVERY: Duration = Duration::from_secs(1);
/// How long a released lease waits for the agent's next admission to give it back before the
/// release task does: about the longest other replicas count a finished request as open (a
/// request's own replica never does: its next admission removes it first). A busy agent's
/// admissions take every release well within it, so the task sends nothing for it.
pub const RELEASE_AFTER: Duration = Duration::from_millis(20);
/// Most released leases one call gives back (Lua's `unpack` has a stack limit); the rest wait
/// for the next.
const MAX_RELEASES: usize = 512;

/// The keys of one agent; they share the hash tag `{agent}`, so one slot on a Redis Cluster.
#[derive(Clone, Debug)]
pub struct AgentKeys {
    /// GCRA state.
    pub rate: String,
    /// Leases: member `replica:seq`, score = expiry (ms).
    pub leases: Arc<str>,
    /// Byte budget counters, in the order of `budget::KINDS`.
    pub bytes: [String; 4],
}

/// A connection: one server (multiplexed) or a Redis Cluster.
#[derive(Clone)]
enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

/// What the store answered for one admission.
#[derive(Debug)]
pub struct Admitted {
    /// 0 admitted, 1 over `max_concurrent`, 2 over the rate, 3 a byte budget spent.
    pub verdict: i64,
    /// Over the rate: how long until a request would conform; a budget: until its window ends.
    pub wait: Duration,
    /// The byte budget spent (its index in `budget::KINDS`), for verdict 3.
    pub kind: usize,
    /// The lease taken, if any (admitted, or report mode).
    pub lease: Option<Lease>,
}

/// The ADMIT script's reply: `0` when admitted (most calls, and the cheapest reply to parse),
/// else `{verdict, wait_us, kind}`.
struct Verdict {
    verdict: i64,
    wait_us: i64,
    kind: i64,
}

/// A lease's member in the lease set, `REPLICA:SEQ`, written without `format!` (once per
/// admission).
struct Member {
    buf: [u8; MEMBER_MAX],
    len: usize,
}

/// Longest member: a replica id (a ULID, 26 characters), `:` and a `u64`.
const MEMBER_MAX: usize = 26 + 1 + 20;

/// The store could not be asked (down, not connected, an error, or slower than `timeout`).
#[derive(Debug, Clone, Copy)]
pub struct Unavailable;

/// One request's or tunnel's slot in the store; given back (in a batch) when dropped, and
/// renewed by the store's task while held.
#[derive(Debug)]
pub struct Lease {
    store: Arc<Store>,
    seq: u64,
}

/// This replica's leases: those held (renewed by the upkeep task) and those released but not
/// given back yet.
#[derive(Default)]
struct Leases {
    /// seq → the lease set it is in.
    held: HashMap<u64, Arc<str>>,
    /// Lease set → leases released since the last call that gave that set's leases back.
    released: HashMap<Arc<str>, Waiting>,
}

/// Released leases of one lease set, not given back yet.
struct Waiting {
    /// When the oldest was released.
    since: Instant,
    seqs: Vec<u64>,
}

/// The shared limit store.
pub struct Store {
    settings: ClusterSettings,
    /// This process's id: lease members and the replica set use it.
    replica: String,
    conn: ArcSwapOption<Conn>,
    /// Usable: the last call succeeded in time. Requests skip the store while false.
    up: AtomicBool,
    /// Live replicas at the last heartbeat (at least 1).
    replicas: AtomicU32,
    metrics: Arc<Metrics>,
    seq: AtomicU64,
    /// Leases held by this replica, and released ones not given back yet.
    leases: parking_lot::Mutex<Leases>,
    /// Wakes the release task (capacity 1: one pending wake is enough).
    release_due: mpsc::Sender<()>,
    admit: Script,
    release: Script,
    add_bytes: Script,
    renew: Script,
    heartbeat: Script,
    replica_key: String,
}

/// The background task's own state.
struct Upkeep {
    password: Option<String>,
    password_read: Instant,
    beat: Instant,
    renewed: Instant,
}

// === impl Store ===

impl Store {
    /// Make the store and start its background tasks (they end when the store is dropped).
    /// Must run inside the tokio runtime.
    pub fn start(settings: ClusterSettings, metrics: Arc<Metrics>) -> Arc<Store> {
        let (tx, rx) = mpsc::channel(1);
        let replica = ulid::Ulid::new().to_string();
        let replica_key = format!("{}replicas", settings.key_prefix);
        let store = Arc::new(Store {
            settings,
            replica,
            conn: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            replicas: AtomicU32::new(1),
            metrics,
            seq: AtomicU64::new(0),
            leases: parking_lot::Mutex::new(Leases::default()),
            release_due: tx,
            admit: Script::new(scripts::ADMIT),
            release: Script::new(scripts::RELEASE),
            add_bytes: Script::new(scripts::ADD_BYTES),
            renew: Script::new(scripts::RENEW),
            heartbeat: Script::new(scripts::HEARTBEAT),
            replica_key,
        });
        // Until the first heartbeat the store counts as failing: the fallback applies.
        store.metrics.store_fallback(true);
        tokio::spawn(upkeep(Arc::downgrade(&store)));
        tokio::spawn(give_back(Arc::downgrade(&store), rx));
        store
    }

    /// The settings this store was made from.
    pub fn settings(&self) -> &ClusterSettings {
        &self.settings
    }

    /// True while requests use the store.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Live replicas at the last heartbeat (at least 1): the `local` fallback's divisor.
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Relaxed).max(1)
    }

    /// The keys of `agent` under this store's prefix.
    pub fn keys(&self, agent: &str) -> AgentKeys {
        let p = &self.settings.key_prefix;
        AgentKeys {
            rate: format!("{p}{{{agent}}}:rate"),
            leases: format!("{p}{{{agent}}}:leases").into(),
            bytes: ["up:hour", "down:hour", "up:day", "down:day"]
                .map(|k| format!("{p}{{{agent}}}:bytes:{k}")),
        }
    }

    /// Ask the store to admit one request or tunnel of the agent with `keys` under `limits`
    /// (concurrency, then rate), in one round trip bounded by `cluster.timeout`. The agent's
    /// leases released on this replica since its last call are given back in the same call,
    /// before the count.
    pub async fn admit(
        self: &Arc<Self>,
        keys: &AgentKeys,
        limits: &Limits,
        report: bool,
    ) -> Result<Admitted, Unavailable> {
        let Some(conn) = self.usable() else {
            self.metrics.store_request(StoreResult::Skipped, None);
            return Err(Unavailable);
        };
        let mut conn = Conn::clone(&conn);
        let seq = self.seq.fetch_add(1, Relaxed);
        let released = self.take_released(&keys.leases);
        let cmd = self.admit_cmd(keys, limits, report, seq, &released);
        let started = Instant::now();
        let answer = tokio::time::timeout(
            self.settings.timeout,
            eval::<Verdict>(&self.admit, &cmd, &mut conn),
        )
        .await;
        let settled = self.settled(answer, started);
        if settled.is_err() && !released.is_empty() {
            // Not known to be given back: the release task tries again.
            self.release_later(&keys.leases, &released);
        }
        let Verdict {
            verdict,
            wait_us,
            kind,
        } = settled?;
        let lease = (verdict == 0 || report).then(|| {
            self.leases.lock().held.insert(seq, keys.leases.clone());
            Lease {
                store: self.clone(),
                seq,
            }
        });
        Ok(Admitted {
            verdict,
            wait: Duration::from_micros(u64::try_from(wait_us).unwrap_or(0)),
            kind: usize::try_from(kind).unwrap_or(0),
            lease,
        })
    }

    /// `EVALSHA` of the ADMIT script (see `scripts::ADMIT` for its keys and arguments), built
    /// in one buffer: the per-request path does not go through redis-rs's `ScriptInvocation`,
    /// which allocates every argument on its own and copies them all once more.
    fn admit_cmd(
        &self,
        keys: &AgentKeys,
        limits: &Limits,
        report: bool,
        seq: u64,
        released: &[u64],
    ) -> Cmd {
        let budgets = || (0..keys.bytes.len()).filter_map(|i| Some((i, limits.budgets.get(i)?)));
        let n_keys = 2 + budgets().count();
        let n_args = 6 + 2 * (n_keys - 2) + released.len();
        let mut cmd = Cmd::with_capacity(3 + n_keys + n_args, 256 + MEMBER_MAX * released.len());
        // The GCRA emission interval in microseconds (validation keeps the rate at most 10⁶/s).
        let emission = (1e6 / limits.requests_per_second).round().max(1.0) as u64;
        cmd.arg("EVALSHA")
            .arg(self.admit.get_hash())
            .arg(n_keys)
            .arg(&keys.rate)
            .arg(&*keys.leases);
        for (i, _) in budgets() {
            cmd.arg(&keys.bytes[i]);
        }
        cmd.arg(emission)
            .arg(limits.burst)
            .arg(limits.max_concurrent)
            .arg(self.member(seq).as_bytes())
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(u8::from(report));
        for (i, max) in budgets() {
            cmd.arg(max).arg(i);
        }
        // After the budgets' arguments: the script finds them by the number of keys.
        for seq in released {
            cmd.arg(self.member(*seq).as_bytes());
        }
        cmd
    }

    /// Add a request's new bytes to the agent's byte budgets in the store (a flush, off the
    /// request path); returns the highest used / budget ratio, `None` if the store could not
    /// be asked.
    pub async fn add_bytes(
        &self,
        keys: &AgentKeys,
        budgets: &Budgets,
        up: u64,
        down: u64,
    ) -> Option<f64> {
        let conn = self.usable()?;
        let mut conn = Conn::clone(&conn);
        let mut call = self.add_bytes.prepare_invoke();
        for (i, kind) in KINDS.iter().enumerate() {
            let Some(max) = budgets.get(i) else { continue };
            let n = match kind.dir {
                crate::io::Direction::Up => up,
                crate::io::Direction::Down => down,
            };
            call.key(&keys.bytes[i]).arg(n).arg(kind.window).arg(max);
        }
        let answer = tokio::time::timeout(
            self.settings.timeout.max(TICK),
            call.invoke_async::<u64>(&mut conn),
        )
        .await;
        match answer {
            Ok(Ok(permille)) => Some(permille as f64 / 1000.0),
            Ok(Err(e)) => {
                self.down(&e.to_string(), is_broken(&e));
                None
            }
            Err(_) => {
                self.down("byte budget update slower than cluster.timeout", false);
                None
            }
        }
    }

    /// Up to [`MAX_RELEASES`] of the leases released in lease set `key`, no longer waiting.
    fn take_released(&self, key: &Arc<str>) -> Vec<u64> {
        let mut leases = self.leases.lock();
        let Some(waiting) = leases.released.get_mut(key) else {
            return Vec::new();
        };
        if waiting.seqs.len() <= MAX_RELEASES {
            return leases
                .released
                .remove(key)
                .map(|w| w.seqs)
                .unwrap_or_default();
        }
        let keep = waiting.seqs.len() - MAX_RELEASES;
        waiting.seqs.split_off(keep)
    }

    /// Leases of set `key` to be given back: by the agent's next admission, or by the release
    /// task about [`RELEASE_AFTER`] later.
    fn release_later(&self, key: &Arc<str>, seqs: &[u64]) {
        self.leases
            .lock()
            .released
            .entry(key.clone())
            .or_insert_with(|| Waiting {
                since: Instant::now(),
                seqs: Vec::new(),
            })
            .seqs
            .extend_from_slice(seqs);
        // Full: a wake is already pending, and the round it starts sees these too.
        let _ = self.release_due.try_send(());
    }

    /// The connection, if the store is up.
    fn usable(&self) -> Option<Arc<Conn>> {
        if !self.up.load(Relaxed) {
            return None;
        }
        self.conn.load_full()
    }

    fn member(&self, seq: u64) -> Member {
        Member::new(&self.replica, seq)
    }

    /// Record a call's result and turn it into the value or `Unavailable`, marking the store
    /// down on an error or a timeout.
    fn settled<T>(
        &self,
        answer: Result<Result<T, RedisError>, tokio::time::error::Elapsed>,
        started: Instant,
    ) -> Result<T, Unavailable> {
        let took = started.elapsed();
        match answer {
            Ok(Ok(v)) => {
                self.metrics.store_request(StoreResult::Ok, Some(took));
                Ok(v)
            }
            Ok(Err(e)) => {
                self.metrics.store_request(StoreResult::Error, Some(took));
                self.down(&e.to_string(), is_broken(&e));
                Err(Unavailable)
            }
            Err(_) => {
                self.metrics.store_request(StoreResult::Timeout, Some(took));
                self.down("slower than cluster.timeout", false);
                Err(Unavailable)
            }
        }
    }

    /// Stop using the store until the task's next successful heartbeat; `broken` drops the
    /// connection too, so the task makes a new one.
    fn down(&self, why: &str, broken: bool) {
        if broken {
            self.conn.store(None);
        }
        if self.up.swap(false, Relaxed) {
            let mode = self.settings.fail_mode.as_str();
            tracing::warn!(error = %why, fail_mode = mode, "limit store unavailable; fail_mode applies");
            self.metrics.store_fallback(true);
        }
    }

    /// Connect, with the current password.
    async fn connect(&self, password: Option<&str>) -> Result<Conn, RedisError> {
        let s = &self.settings;
        let mut infos = Vec::with_capacity(s.nodes.len());
        for url in &s.nodes {
            let mut info = url.as_str().into_connection_info()?;
            info.redis.username.clone_from(&s.username);
            info.redis.password = password.map(str::to_owned);
            infos.push(info);
        }
        if s.cluster {
            let mut b = redis::cluster::ClusterClientBuilder::new(infos)
                .connection_timeout(CONNECT_TIMEOUT)
                .response_timeout(s.timeout.max(TICK))
                .retries(1);
            if let Some(u) = &s.username {
                b = b.username(u.clone());
            }
            if let Some(p) = password {
                b = b.password(p.to_owned());
            }
            Ok(Conn::Cluster(b.build()?.get_async_connection().await?))
        } else {
            let info = infos.pop().ok_or_else(|| {
                RedisError::from((redis::ErrorKind::InvalidClientConfig, "no URL"))
            })?;
            let client = redis::Client::open(info)?;
            // No response timeout of redis-rs's own: every call is bounded by a
            // `tokio::time::timeout` here, and a second timer per request would only cost.
            let config =
                redis::AsyncConnectionConfig::new().set_connection_timeout(CONNECT_TIMEOUT);
            Ok(Conn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            ))
        }
    }

    /// One round of upkeep: password, connection, heartbeat, lease renewal.
    async fn upkeep(&self, st: &mut Upkeep) {
        if let Some(path) = &self.settings.password_file {
            if st.password_read.elapsed() >= PASSWORD_EVERY {
                st.password_read = Instant::now();
                self.reread_password(path, st);
            }
        }
        if self.conn.load().is_none() {
            let made =
                tokio::time::timeout(CONNECT_TIMEOUT, self.connect(st.password.as_deref())).await;
            match made {
                Ok(Ok(c)) => self.conn.store(Some(Arc::new(c))),
                Ok(Err(e)) => return self.down(&e.to_string(), true),
                Err(_) => return self.down("no connection within 1s", true),
            }
        }
        if !self.is_up() || st.beat.elapsed() >= HEARTBEAT_EVERY {
            st.beat = Instant::now();
            self.beat().await;
        }
        if self.is_up() && st.renewed.elapsed() >= RENEW_EVERY {
            st.renewed = Instant::now();
            self.renew_held().await;
        }
    }

    fn reread_password(&self, path: &Path, st: &mut Upkeep) {
        match super::read_password(path) {
            Ok(pw) if st.password.as_deref() != Some(pw.as_str()) => {
                if st.password.is_some() {
                    tracing::info!(file = %path.display(), "limit store password changed; reconnecting");
                }
                st.password = Some(pw);
                // The next round connects with it.
                self.conn.store(None);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "limit store password unreadable; keeping the previous one")
            }
        }
    }

    /// The heartbeat: register this replica and count the live ones. Its success is what
    /// brings a store that was down back into use.
    async fn beat(&self) {
        let Some(conn) = self.conn.load_full() else {
            return;
        };
        let mut conn = Conn::clone(&conn);
        let mut call = self.heartbeat.prepare_invoke();
        call.key(&self.replica_key)
            .arg(&self.replica)
            .arg(REPLICA_TTL.as_millis() as u64);
        let started = Instant::now();
        let answer = tokio::time::timeout(
            self.settings.timeout.max(TICK),
            call.invoke_async::<u32>(&mut conn),
        )
        .await;
        // Not counted in the request metrics: those are the calls requests make.
        match answer {
            Ok(Ok(n)) => {
                self.replicas.store(n.max(1), Relaxed);
                if !self.up.swap(true, Relaxed) {
                    tracing::info!(replicas = n, took = ?started.elapsed(), "limit store available; cluster-wide limits apply");
                    self.metrics.store_fallback(false);
                }
            }
            Ok(Err(e)) => self.down(&e.to_string(), is_broken(&e)),
            Err(_) => self.down("heartbeat slower than cluster.timeout", false),
        }
    }

    /// Renew every lease this replica holds (re-adding any the store lost), one call per agent.
    async fn renew_held(&self) {
        let mut by_key: HashMap<Arc<str>, Vec<u64>> = HashMap::new();
        for (seq, key) in self.leases.lock().held.iter() {
            by_key.entry(key.clone()).or_default().push(*seq);
        }
        let Some(conn) = self.conn.load_full() else {
            return;
        };
        for (key, seqs) in by_key {
            let mut conn = Conn::clone(&conn);
            let mut call = self.renew.prepare_invoke();
            call.key(&*key).arg(LEASE_TTL.as_millis() as u64);
            for seq in seqs {
                call.arg(self.member(seq).as_bytes());
            }
            let answer = tokio::time::timeout(
                TICK.max(self.settings.timeout),
                call.invoke_async::<u64>(&mut conn),
            )
            .await;
            match answer {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return self.down(&e.to_string(), is_broken(&e)),
                Err(_) => return self.down("lease renewal slower than cluster.timeout", false),
            }
        }
    }

    /// Give back the released leases that waited [`RELEASE_AFTER`] for an admission: one call
    /// per agent (its keys share one hash slot on a Redis Cluster), at most [`MAX_RELEASES`]
    /// leases each. Returns whether any are still waiting (for a later round).
    async fn give_back_released(&self) -> bool {
        let Some(conn) = self.conn.load_full() else {
            // Not connected: no longer renewed, they expire on their own.
            self.leases.lock().released.clear();
            return false;
        };
        let due: Vec<Arc<str>> = self
            .leases
            .lock()
            .released
            .iter()
            .filter(|(_, w)| w.since.elapsed() >= RELEASE_AFTER)
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let seqs = self.take_released(&key);
            if seqs.is_empty() {
                continue; // an admission took them meanwhile
            }
            let mut conn = Conn::clone(&conn);
            let mut call = self.release.prepare_invoke();
            call.key(&*key);
            for seq in &seqs {
                call.arg(self.member(*seq).as_bytes());
            }
            let bound = TICK.max(self.settings.timeout);
            let answer = tokio::time::timeout(bound, call.invoke_async::<u64>(&mut conn)).await;
            if !matches!(answer, Ok(Ok(_))) {
                tracing::debug!("giving leases back failed; they expire on their own");
            }
        }
        !self.leases.lock().released.is_empty()
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("nodes", &self.settings.nodes)
            .field("up", &self.is_up())
            .field("replicas", &self.replicas())
            .finish_non_exhaustive()
    }
}

/// The upkeep task: every [`TICK`] while the store exists.
async fn upkeep(store: Weak<Store>) {
    let long_ago = Instant::now()
        .checked_sub(Duration::from_secs(60))
        .unwrap_or_else(Instant::now);
    let mut st = Upkeep {
        password: None,
        password_read: long_ago,
        beat: long_ago,
        renewed: Instant::now(),
    };
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(store) = store.upgrade() else { return };
        store.upkeep(&mut st).await;
    }
}

/// The release task: woken when a lease is released, it looks every [`RELEASE_AFTER`], giving
/// back the leases that waited that long for an admission of their agent, until none waits.
/// It ends when the store is dropped (the channel closes).
async fn give_back(store: Weak<Store>, mut due: mpsc::Receiver<()>) {
    while due.recv().await.is_some() {
        // Each round sleeps; a lease that waited RELEASE_AFTER is given back (or, without a
        // connection, dropped), so the rounds end once releases stop.
        loop {
            tokio::time::sleep(RELEASE_AFTER).await;
            // Wakes sent meanwhile are for leases these rounds see.
            while due.try_recv().is_ok() {}
            let Some(store) = store.upgrade() else { return };
            if !store.give_back_released().await {
                break;
            }
        }
    }
}

/// Run `cmd`, an `EVALSHA` of `script`; when the server does not know the script yet (a new
/// or restarted server), load it and run `cmd` once more.
async fn eval<T: FromRedisValue>(script: &Script, cmd: &Cmd, conn: &mut Conn) -> RedisResult<T> {
    match cmd.query_async(conn).await {
        Err(e) if e.kind() == redis::ErrorKind::NoScriptError => {
            script.load_async(conn).await?;
            cmd.query_async(conn).await
        }
        other => other,
    }
}

// === impl Verdict ===

impl FromRedisValue for Verdict {
    fn from_redis_value(v: &Value) -> RedisResult<Verdict> {
        if let Value::Int(0) = v {
            return Ok(Verdict {
                verdict: 0,
                wait_us: 0,
                kind: -1,
            });
        }
        let (verdict, wait_us, kind) = <(i64, i64, i64)>::from_redis_value(v)?;
        Ok(Verdict {
            verdict,
            wait_us,
            kind,
        })
    }
}

// === impl Member ===

impl Member {
    fn new(replica: &str, seq: u64) -> Member {
        let mut m = Member {
            buf: [0; MEMBER_MAX],
            len: 0,
        };
        let mut digits = itoa::Buffer::new();
        for part in [replica.as_bytes(), b":", digits.format(seq).as_bytes()] {
            // A replica id longer than a ULID would be cut; it is always a ULID.
            let n = part.len().min(MEMBER_MAX - m.len);
            m.buf[m.len..m.len + n].copy_from_slice(&part[..n]);
            m.len += n;
        }
        m
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

// === impl Lease ===

impl Drop for Lease {
    fn drop(&mut self) {
        let key = self.store.leases.lock().held.remove(&self.seq);
        if let Some(key) = key {
            self.store.release_later(&key, &[self.seq]);
        }
    }
}

/// True for errors after which the connection is not worth keeping.
fn is_broken(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
        || e.kind() == redis::ErrorKind::AuthenticationFailed
}

// === impl Conn ===

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_is_the_replica_a_colon_and_the_sequence_number() {
        let replica = ulid::Ulid::new().to_string();
        for seq in [0, 7, 1_000_000, u64::MAX] {
            let m = Member::new(&replica, seq);
            assert_eq!(m.as_bytes(), format!("{replica}:{seq}").as_bytes());
        }
    }

    /// The ADMIT script answers `0` when it admits, else `{verdict, wait_us, kind}`.
    #[test]
    fn the_admit_reply_is_zero_or_verdict_wait_and_kind() {
        let admitted = Verdict::from_redis_value(&Value::Int(0)).unwrap();
        assert_eq!(admitted.verdict, 0);
        let refused = Value::Array(vec![Value::Int(2), Value::Int(1500), Value::Int(-1)]);
        let refused = Verdict::from_redis_value(&refused).unwrap();
        assert_eq!(
            (refused.verdict, refused.wait_us, refused.kind),
            (2, 1500, -1)
        );
        let budget = Value::Array(vec![Value::Int(3), Value::Int(9), Value::Int(1)]);
        assert_eq!(Verdict::from_redis_value(&budget).unwrap().kind, 1);
        assert!(Verdict::from_redis_value(&Value::Int(1)).is_err());
    }
}
