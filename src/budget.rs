//! Before identification: a refusal budget per client address, and the summaries of what was
//! dropped.
//!
//! Refusals that happen before a request is tied to an agent (a head that does not parse, a
//! malformed target, `host_mismatch`, broken framing, failed proxy authentication, a failed TLS
//! handshake) spend no agent's rate budget: there is no agent yet. Without a bound of their own,
//! one client could make the gateway write an audit line per refused request at line rate, and
//! guess tokens as fast as it can send them. So each client address has a budget of such
//! refusals ([`Allowance`]: a rate with a burst, GCRA): within it a refusal is answered and
//! audited as usual; past it the connection is closed unanswered and unaudited, and the
//! [summariser](summarise) writes one `dropped` audit line per address and interval saying how
//! many were dropped and why. While an address is past its budget, proxy credentials it sends are
//! not checked at all (the request is dropped as `credentials_unchecked`), so a token guesser
//! learns nothing faster than the budget lets it.
//!
//! The address table ([`Budget`]) has a fixed size, [`ADDRESSES`] entries, allocated once:
//! set-associative, [`WAYS`] entries per bucket, the bucket chosen by a hash seeded per process
//! (so a client cannot aim its addresses at one bucket). A new address takes the bucket's entry
//! that is least in debt (the one whose budget has refilled furthest): an address that is
//! blocked stays remembered unless every entry of its bucket is blocked too. Drops counted for
//! a forgotten address are kept, without the address, for the next summary.
//!
//! Cost on the hot path: nothing for a request that is not refused, except one that carries
//! proxy credentials, which costs a hash and one atomic load (a bucket's lock is taken only
//! when some address of that bucket is in debt). A refusal takes its bucket's lock for a scan of
//! [`WAYS`] entries.
//!
//! The same summaries cover connections refused at a connection cap ([`Refused`]): one line per
//! listener and interval, instead of a log line per connection.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, DroppedRecord};
use crate::outcome::Reason;
use crate::proxy::Shared;

/// Client addresses the budget table remembers at once.
pub const ADDRESSES: usize = 4096;

/// Entries per bucket of the table.
pub const WAYS: usize = 4;

const BUCKETS: usize = ADDRESSES / WAYS;

/// What can be dropped: every refusal reason, plus requests whose credentials were not checked.
const KEYS: usize = Reason::ALL.len() + 1;

/// The summary and metric label of requests dropped unchecked (their address was past its
/// budget and they carried proxy credentials).
pub const CREDENTIALS_UNCHECKED: &str = "credentials_unchecked";

/// The `summary_interval` default.
pub const DEFAULT_SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// A refusal budget: `per_second` refusals sustained, `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Allowance {
    /// Sustained refusals per second (`server.address_refusals_per_second`).
    pub per_second: f64,
    /// Refusals allowed at once above the rate (`server.address_refusal_burst`).
    pub burst: u32,
}

impl Default for Allowance {
    fn default() -> Self {
        // Generous for a client that is merely misconfigured (a missing token answered with
        // 407 fifty times in a row), tight for one that floods: at most 10 lines a second.
        Allowance {
            per_second: 10.0,
            burst: 50,
        }
    }
}

/// What a dropped request would have been refused for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dropped {
    /// A refusal past the address's budget.
    Refusal(Reason),
    /// A request with proxy credentials from an address past its budget: not checked.
    CredentialsUnchecked,
}

/// Drop counts by [`Dropped`] kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Counts([u32; KEYS]);

/// The client-address table (see the module docs).
pub struct Budget {
    buckets: Box<[Bucket]>,
    hasher: foldhash::fast::RandomState,
    epoch: tokio::time::Instant,
    /// Drops of addresses that were evicted before their summary.
    forgotten: Mutex<Counts>,
}

struct Bucket {
    /// The latest theoretical arrival time (ns since the epoch) of any entry: while the clock
    /// is past it, no address in this bucket is in debt and none can be blocked.
    debt_until: AtomicU64,
    ways: Mutex<[Slot; WAYS]>,
}

#[derive(Clone)]
struct Slot {
    ip: Option<IpAddr>,
    /// GCRA's theoretical arrival time of the next refusal, ns since the epoch.
    tat: u64,
    dropped: Counts,
}

/// One address's (or the forgotten addresses') drops since the last summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressDrops {
    /// The address; `None` for addresses the table forgot before their summary.
    pub client: Option<IpAddr>,
    /// What was dropped.
    pub counts: Counts,
}

/// Which listener refused a connection at its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    /// `server.listen`, capped by `server.max_connections`.
    Proxy,
    /// `server.tls_listen`, capped by `server.max_connections`.
    Tls,
    /// `server.admin_listen`, capped by `server.admin_max_connections`.
    Admin,
}

/// Connections refused at a connection cap since the last summary, per listener.
#[derive(Debug, Default)]
pub struct Refused {
    counts: [AtomicU64; 3],
}

// === impl Allowance ===

impl Allowance {
    /// Nanoseconds between two refusals at the sustained rate (at least 1).
    fn interval_ns(&self) -> u64 {
        // Validation keeps the rate within 0.001–1000000, so this is 1 µs to 1000 s.
        ((1e9 / self.per_second) as u64).max(1)
    }
}

// === impl Dropped ===

impl Dropped {
    /// The label in summaries and metrics: the reason token, or [`CREDENTIALS_UNCHECKED`].
    pub fn as_str(self) -> &'static str {
        match self {
            Dropped::Refusal(r) => r.as_str(),
            Dropped::CredentialsUnchecked => CREDENTIALS_UNCHECKED,
        }
    }

    /// How many kinds there are ([`Dropped::index`] is below it).
    pub const KINDS: usize = KEYS;

    /// A dense index of the kind: the reason's code, `credentials_unchecked` last.
    pub fn index(self) -> usize {
        match self {
            Dropped::Refusal(r) => usize::from(r.code()),
            Dropped::CredentialsUnchecked => KEYS - 1,
        }
    }

    fn from_index(i: usize) -> Option<Dropped> {
        if i == KEYS - 1 {
            return Some(Dropped::CredentialsUnchecked);
        }
        let code = u8::try_from(i).ok()?;
        Reason::from_code(code).map(Dropped::Refusal)
    }
}

// === impl Counts ===

impl Counts {
    const ZERO: Counts = Counts([0; KEYS]);

    /// Every drop counted.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|&n| u64::from(n)).sum()
    }

    /// The kinds with a count, in [`Reason::ALL`] order, `credentials_unchecked` last.
    pub fn iter(&self) -> impl Iterator<Item = (Dropped, u32)> + '_ {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, &n)| n > 0)
            .filter_map(|(i, &n)| Dropped::from_index(i).map(|d| (d, n)))
    }

    fn add(&mut self, what: Dropped) {
        let n = &mut self.0[what.index()];
        *n = n.saturating_add(1);
    }

    fn merge(&mut self, other: &Counts) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a = a.saturating_add(b);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|&n| n == 0)
    }
}

// === impl Budget ===

impl Budget {
    /// An empty table (allocated whole, now).
    pub fn new() -> Self {
        let buckets = (0..BUCKETS)
            .map(|_| Bucket {
                debt_until: AtomicU64::new(0),
                ways: Mutex::new(std::array::from_fn(|_| Slot::EMPTY)),
            })
            .collect();
        Budget {
            buckets,
            hasher: foldhash::fast::RandomState::default(),
            epoch: tokio::time::Instant::now(),
            forgotten: Mutex::new(Counts::ZERO),
        }
    }

    /// The monotonic clock in ns since the table was made (tokio's clock, so tests can move it).
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn bucket(&self, ip: IpAddr) -> &Bucket {
        let i = (self.hasher.hash_one(ip) % BUCKETS as u64) as usize;
        &self.buckets[i]
    }

    /// Spend one refusal of `ip`'s budget for `reason`. `true`: within the budget, answer and
    /// audit it as usual. `false`: past it; the drop has been counted for the next summary, and
    /// the caller closes the connection without an answer or an audit line.
    pub fn spend(&self, ip: IpAddr, reason: Reason, allowance: Allowance) -> bool {
        let ip = ip.to_canonical();
        let bucket = self.bucket(ip);
        let now = self.now();
        let t = allowance.interval_ns();
        let mut ways = bucket.ways.lock();
        let slot = self.slot_for(&mut ways, ip);
        // GCRA: the refusal conforms if the next theoretical arrival stays within `burst`
        // intervals of now. A refusal past the budget does not move it (no extra penalty).
        let next = slot.tat.max(now).saturating_add(t);
        if next - now <= t.saturating_mul(u64::from(allowance.burst)) {
            slot.tat = next;
            bucket.debt_until.fetch_max(next, Relaxed);
            true
        } else {
            slot.dropped.add(Dropped::Refusal(reason));
            false
        }
    }

    /// Whether `ip` may have its proxy credentials checked now. `false` while it is past its
    /// budget: the request is counted as [`Dropped::CredentialsUnchecked`], and the caller drops
    /// it like a refusal past the budget.
    pub fn may_check_credentials(&self, ip: IpAddr, allowance: Allowance) -> bool {
        let ip = ip.to_canonical();
        let bucket = self.bucket(ip);
        let now = self.now();
        // The fast path: nobody in this bucket has refusals in the last interval.
        if bucket.debt_until.load(Relaxed) <= now {
            return true;
        }
        let t = allowance.interval_ns();
        let mut ways = bucket.ways.lock();
        let Some(slot) = ways.iter_mut().find(|s| s.ip == Some(ip)) else {
            return true;
        };
        // Past the budget when even one more refusal would not conform.
        let next = slot.tat.max(now).saturating_add(t);
        if next - now <= t.saturating_mul(u64::from(allowance.burst)) {
            return true;
        }
        slot.dropped.add(Dropped::CredentialsUnchecked);
        false
    }

    /// The slot of `ip` in its bucket: its own, or a new one in place of the entry least in
    /// debt (its pending drops go to the forgotten count).
    fn slot_for<'a>(&self, ways: &'a mut [Slot; WAYS], ip: IpAddr) -> &'a mut Slot {
        let i = match ways.iter().position(|s| s.ip == Some(ip)) {
            Some(i) => i,
            None => {
                let i = ways
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| (s.ip.is_some(), s.tat))
                    .map_or(0, |(i, _)| i);
                let old = std::mem::replace(&mut ways[i], Slot::EMPTY);
                if !old.dropped.is_empty() {
                    self.forgotten.lock().merge(&old.dropped);
                }
                ways[i].ip = Some(ip);
                i
            }
        };
        &mut ways[i]
    }

    /// Take every drop counted since the last call: one entry per address with drops, and
    /// one with `client: None` for addresses forgotten meanwhile.
    pub fn take_drops(&self) -> Vec<AddressDrops> {
        let mut out = Vec::new();
        for bucket in self.buckets.iter() {
            let mut ways = bucket.ways.lock();
            for slot in ways.iter_mut() {
                if !slot.dropped.is_empty() {
                    out.push(AddressDrops {
                        client: slot.ip,
                        counts: std::mem::replace(&mut slot.dropped, Counts::ZERO),
                    });
                }
            }
        }
        let forgotten = std::mem::replace(&mut *self.forgotten.lock(), Counts::ZERO);
        if !forgotten.is_empty() {
            out.push(AddressDrops {
                client: None,
                counts: forgotten,
            });
        }
        out
    }
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new()
    }
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("addresses", &ADDRESSES)
            .finish_non_exhaustive()
    }
}

impl Slot {
    const EMPTY: Slot = Slot {
        ip: None,
        tat: 0,
        dropped: Counts::ZERO,
    };
}

// === impl Listener ===

impl Listener {
    /// Every listener, in label order.
    pub const ALL: [Listener; 3] = [Listener::Proxy, Listener::Tls, Listener::Admin];

    /// The `listener` label and summary field.
    pub const fn as_str(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Tls => "tls",
            Listener::Admin => "admin",
        }
    }

    /// The cap that refused it, as the summary's `cause` names it.
    pub const fn cap(self) -> &'static str {
        match self {
            Listener::Proxy | Listener::Tls => "max_connections",
            Listener::Admin => "admin_max_connections",
        }
    }

    fn index(self) -> usize {
        match self {
            Listener::Proxy => 0,
            Listener::Tls => 1,
            Listener::Admin => 2,
        }
    }
}

// === impl Refused ===

impl Refused {
    /// Count a connection `listener` refused at its cap; `true` for the first since the last
    /// summary (the one worth a log line).
    pub fn add(&self, listener: Listener) -> bool {
        self.counts[listener.index()].fetch_add(1, Relaxed) == 0
    }

    /// Take the counts since the last call, for the listeners that refused any.
    pub fn take(&self) -> Vec<(Listener, u64)> {
        Listener::ALL
            .into_iter()
            .map(|l| (l, self.counts[l.index()].swap(0, Relaxed)))
            .filter(|(_, n)| *n > 0)
            .collect()
    }
}

/// Write the summaries every `server.summary_interval` until `stop`, then once more for what
/// was dropped meanwhile (the drain included).
pub async fn summarise(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let interval = shared.live.load().config.summary_interval;
        let stopped = tokio::select! {
            () = tokio::time::sleep(interval) => false,
            () = stop.cancelled() => true,
        };
        write_summaries(&shared, interval).await;
        if stopped {
            return;
        }
    }
}

/// One `dropped` audit line per address with drops and per listener with refused connections.
async fn write_summaries(shared: &Shared, interval: Duration) {
    let interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
    let mut lines = Vec::new();
    let now = time::OffsetDateTime::now_utc();
    let mut ts_buf = [0u8; 24];
    let ts = audit::timestamp(now, &mut ts_buf).unwrap_or("1970-01-01T00:00:00.000Z");
    for drops in shared.budget.take_drops() {
        lines.push(
            DroppedRecord {
                ts,
                cause: "refusal_budget",
                client: drops.client,
                listener: None,
                count: drops.counts.total(),
                reasons: Some(&drops.counts),
                interval_ms,
            }
            .to_line(),
        );
    }
    for (listener, count) in shared.refused.take() {
        lines.push(
            DroppedRecord {
                ts,
                cause: listener.cap(),
                client: None,
                listener: Some(listener.as_str()),
                count,
                reasons: None,
                interval_ms,
            }
            .to_line(),
        );
    }
    for line in lines {
        match shared.audit.reserve().await {
            Ok(slot) => slot.send(line),
            Err(audit::WriterGone) => audit::fallback(&line),
        }
    }
}

#[cfg(test)]
mod tests;
