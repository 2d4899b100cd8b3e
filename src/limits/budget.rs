//! Byte budgets: how many bytes an agent may upload and download per hour and per day
//! (`max_{upload,download}_bytes_per_{hour,day}`), over fixed UTC windows (an hour from hh:00,
//! a day from 00:00).
//!
//! The bytes of tunnels and forwarded bodies are counted by the request's [`Meter`]; a
//! [`Flusher`] task per request or tunnel (started only for agents with a budget) adds what is
//! new to the agent's budget every [`FLUSH_EVERY`] or every [`FLUSH_BYTES`], whichever comes
//! first, and once more when the request ends: never one update per read. Without `[cluster]`
//! the budget is this process's ([`LocalBudget`]); with it, the store's (one script per flush),
//! so the bytes of every replica count. An agent over a budget gets 429 `byte_budget` with
//! `Retry-After` to the end of the window; an open tunnel that passes it is closed.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::cluster::{AgentKeys, Store};
use crate::io::{Direction, Meter};
use crate::metrics::AgentMetrics;
use crate::outcome::{Deny, Reason};

/// A request's or tunnel's new bytes are added to its agent's budget at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);
/// … or as soon as this many new bytes have moved.
pub const FLUSH_BYTES: u64 = 1024 * 1024;

/// The four budgets, in the order of [`KINDS`]; `None` is unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Budgets {
    /// `max_upload_bytes_per_hour`.
    pub upload_per_hour: Option<u64>,
    /// `max_download_bytes_per_hour`.
    pub download_per_hour: Option<u64>,
    /// `max_upload_bytes_per_day`.
    pub upload_per_day: Option<u64>,
    /// `max_download_bytes_per_day`.
    pub download_per_day: Option<u64>,
}

/// A budget's direction and window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Kind {
    /// Which bytes.
    pub dir: Direction,
    /// The window length, in seconds.
    pub window: u64,
    /// The key suffix in the store and the config key.
    pub name: &'static str,
}

const HOUR: u64 = 3600;
const DAY: u64 = 86_400;

/// Every budget kind, in the order of [`Budgets::get`].
pub const KINDS: [Kind; 4] = [
    Kind {
        dir: Direction::Up,
        window: HOUR,
        name: "max_upload_bytes_per_hour",
    },
    Kind {
        dir: Direction::Down,
        window: HOUR,
        name: "max_download_bytes_per_hour",
    },
    Kind {
        dir: Direction::Up,
        window: DAY,
        name: "max_upload_bytes_per_day",
    },
    Kind {
        dir: Direction::Down,
        window: DAY,
        name: "max_download_bytes_per_day",
    },
];

/// One agent's budgets in this process: per kind, the window it counts and the bytes in it.
#[derive(Debug, Default)]
pub struct LocalBudget {
    slots: [Slot; 4],
}

#[derive(Debug, Default)]
struct Slot {
    /// Index of the window counted (Unix seconds / window length).
    window: AtomicU64,
    used: AtomicU64,
}

/// Where a flusher adds bytes.
#[derive(Clone, Debug)]
pub enum Sink {
    /// This process's budget.
    Local(Arc<LocalBudget>),
    /// The store's (and this process's, for the `local` fallback).
    Cluster(Arc<LocalBudget>, Arc<Store>, AgentKeys),
}

/// Held by the request's context: dropping it (the request or tunnel ended) makes the flusher
/// add the last bytes and stop. `cut` is cancelled when the agent passes a budget.
#[derive(Debug)]
pub struct Flusher {
    done: CancellationToken,
    /// Cancelled when a budget was passed: an open tunnel closes.
    pub cut: CancellationToken,
}

// === impl Budgets ===

impl Budgets {
    /// The limit of kind number `i` (see [`KINDS`]).
    pub fn get(&self, i: usize) -> Option<u64> {
        match i {
            0 => self.upload_per_hour,
            1 => self.download_per_hour,
            2 => self.upload_per_day,
            3 => self.download_per_day,
            _ => None,
        }
    }

    /// True when any budget is set.
    pub fn any(&self) -> bool {
        (0..4).any(|i| self.get(i).is_some())
    }
}

// === impl LocalBudget ===

impl LocalBudget {
    /// Refuse when a budget is spent in its current window (`now`: Unix seconds).
    pub fn check(&self, budgets: &Budgets, now: u64) -> Option<Deny> {
        for (i, kind) in KINDS.iter().enumerate() {
            let Some(max) = budgets.get(i) else { continue };
            if self.used(i, kind, now) >= max {
                let left = kind.window - now % kind.window;
                return Some(over(kind, max).retry_after(Duration::from_secs(left)));
            }
        }
        None
    }

    /// Add `up` and `down` bytes now; returns the highest used / budget ratio.
    pub fn add(&self, budgets: &Budgets, up: u64, down: u64, now: u64) -> f64 {
        let mut ratio = 0.0f64;
        for (i, kind) in KINDS.iter().enumerate() {
            let n = match kind.dir {
                Direction::Up => up,
                Direction::Down => down,
            };
            self.roll(i, kind, now);
            let total = self.slots[i].used.fetch_add(n, Relaxed).saturating_add(n);
            if let Some(max) = budgets.get(i) {
                ratio = ratio.max(total as f64 / max as f64);
            }
        }
        ratio
    }

    /// The bytes counted in kind `i`'s current window.
    pub fn used(&self, i: usize, kind: &Kind, now: u64) -> u64 {
        self.roll(i, kind, now)
    }

    /// Start a new window if `now` is past the counted one; returns the bytes in the current one.
    fn roll(&self, i: usize, kind: &Kind, now: u64) -> u64 {
        let slot = &self.slots[i];
        let window = now / kind.window;
        let seen = slot.window.load(Relaxed);
        if seen != window
            && slot
                .window
                .compare_exchange(seen, window, Relaxed, Relaxed)
                .is_ok()
        {
            slot.used.store(0, Relaxed);
        }
        slot.used.load(Relaxed)
    }
}

/// The refusal for a spent budget.
fn over(kind: &Kind, max: u64) -> Deny {
    let (what, per) = match (kind.dir, kind.window) {
        (Direction::Up, HOUR) => ("uploaded", "hour"),
        (Direction::Up, _) => ("uploaded", "day"),
        (Direction::Down, HOUR) => ("downloaded", "hour"),
        (Direction::Down, _) => ("downloaded", "day"),
    };
    Deny::with_detail(
        Reason::ByteBudget,
        format!(
            "agent has {what} its {max} bytes this {per} ({})",
            kind.name
        ),
    )
}

/// The refusal for budget kind number `i`, `retry` until its window ends.
pub fn refusal(i: usize, budgets: &Budgets, retry: Duration) -> Deny {
    let kind = &KINDS[i.min(3)];
    over(kind, budgets.get(i).unwrap_or(0)).retry_after(retry)
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// === impl Flusher ===

impl Flusher {
    /// Start counting `meter`'s bytes into `sink` under `budgets`.
    pub fn start(
        meter: Arc<Meter>,
        sink: Sink,
        budgets: Budgets,
        metrics: Option<Arc<AgentMetrics>>,
    ) -> Flusher {
        let done = CancellationToken::new();
        let cut = CancellationToken::new();
        meter.notify_every(FLUSH_BYTES);
        tokio::spawn(flush_loop(
            meter,
            sink,
            budgets,
            metrics,
            done.clone(),
            cut.clone(),
        ));
        Flusher { done, cut }
    }
}

impl Drop for Flusher {
    fn drop(&mut self) {
        self.done.cancel();
    }
}

/// Add the meter's new bytes every [`FLUSH_EVERY`] or [`FLUSH_BYTES`], and once more at the end.
async fn flush_loop(
    meter: Arc<Meter>,
    sink: Sink,
    budgets: Budgets,
    metrics: Option<Arc<AgentMetrics>>,
    done: CancellationToken,
    cut: CancellationToken,
) {
    let (mut up, mut down) = (0u64, 0u64);
    loop {
        let last = tokio::select! {
            () = done.cancelled() => true,
            () = tokio::time::sleep(FLUSH_EVERY) => false,
            () = meter.flush_due() => false,
        };
        let (u, d) = (meter.up(), meter.down());
        let (new_up, new_down) = (u.saturating_sub(up), d.saturating_sub(down));
        (up, down) = (u, d);
        if new_up > 0 || new_down > 0 {
            let ratio = add(&sink, &budgets, new_up, new_down).await;
            if let Some(m) = &metrics {
                m.byte_budget_used(ratio);
            }
            if ratio >= 1.0 {
                cut.cancel();
            }
        }
        if last {
            return;
        }
    }
}

/// Add bytes to the sink; returns the highest used / budget ratio after it.
async fn add(sink: &Sink, budgets: &Budgets, up: u64, down: u64) -> f64 {
    let now = unix_now();
    match sink {
        Sink::Local(local) => local.add(budgets, up, down, now),
        Sink::Cluster(local, store, keys) => {
            let mine = local.add(budgets, up, down, now);
            match store.add_bytes(keys, budgets, up, down).await {
                Some(ratio) => ratio,
                // The store is down: this replica's own count is what is known.
                None => mine,
            }
        }
    }
}
