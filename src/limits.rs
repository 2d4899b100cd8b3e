//! Step 4: per-agent limits — request rate (GCRA, governor), open requests and tunnels
//! (concurrency permits), and the byte caps the later steps enforce.
//!
//! A [`Gate`] is the runtime state of one agent: its rate limiter and its count of open
//! requests. Gates are built when a config is loaded and carried over to the next config for
//! every agent that still exists (same name), so a reload neither resets an agent's rate budget
//! nor forgets the requests it has open. Admission is lock-free: one atomic add for the permit and
//! one compare-and-swap in the rate limiter.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

use crate::outcome::{Deny, Reason};

pub mod budget;
pub mod cluster;

use budget::Budgets;

/// The `[limits]` values (defaults, or a policy's overrides applied on top).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Largest request head (request line and headers), in bytes: 431 beyond it.
    pub max_request_header_bytes: u64,
    /// Largest request body: 413 beyond it.
    pub max_request_body_bytes: u64,
    /// Most bytes a client may send up one CONNECT tunnel before it is closed.
    pub max_tunnel_upload_bytes: u64,
    /// Largest plain-HTTP response body passed back.
    pub max_response_body_bytes: u64,
    /// Sustained rate of requests and new tunnels.
    pub requests_per_second: f64,
    /// How many requests may come at once above the sustained rate.
    pub burst: u32,
    /// Open requests plus tunnels.
    pub max_concurrent: u32,
    /// Bytes per hour and per day, each way (unset: unlimited).
    pub budgets: Budgets,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_header_bytes: 32 * 1024,
            max_request_body_bytes: 10 * 1024 * 1024,
            max_tunnel_upload_bytes: 100 * 1024 * 1024,
            max_response_body_bytes: 100 * 1024 * 1024,
            requests_per_second: 20.0,
            burst: 40,
            max_concurrent: 64,
            budgets: Budgets::default(),
        }
    }
}

/// The runtime state of one agent's limits.
pub struct Gate<C: Clock = DefaultClock> {
    rate: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    quota: Quota,
    clock: C,
    active: Arc<AtomicU32>,
}

/// One open request or tunnel of an agent; dropping it frees the slot (and, with `[cluster]`,
/// gives its lease in the store back).
#[derive(Debug)]
pub struct Permit {
    active: Arc<AtomicU32>,
    /// The cluster-wide lease, when the store granted one.
    lease: Option<cluster::Lease>,
}

// === impl Limits ===

impl Limits {
    /// The GCRA quota: one cell every `1/requests_per_second`, `burst` at once. `None` if the
    /// values are out of range (validation prevents that for loaded configs).
    pub fn quota(&self) -> Option<Quota> {
        let period = Duration::try_from_secs_f64(1.0 / self.requests_per_second).ok()?;
        let burst = NonZeroU32::new(self.burst)?;
        Some(Quota::with_period(period)?.allow_burst(burst))
    }
}

// === impl Gate ===

impl Gate<DefaultClock> {
    /// A gate with the real clock; `active` is the agent's open-request counter (shared with the
    /// gate of the previous config, if any).
    pub fn new(quota: Quota, active: Arc<AtomicU32>) -> Self {
        Gate::with_clock(quota, active, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Gate<C> {
    /// A gate with an explicit clock (tests use governor's `FakeRelativeClock`).
    pub fn with_clock(quota: Quota, active: Arc<AtomicU32>, clock: C) -> Self {
        Gate {
            rate: RateLimiter::direct_with_clock(quota, clock.clone()),
            quota,
            clock,
            active,
        }
    }

    /// The quota this gate enforces.
    pub fn quota(&self) -> Quota {
        self.quota
    }

    /// Spend the whole burst now: a gate that replaces one with another quota starts empty, so
    /// changing an agent's rate during an incident never hands it a fresh burst.
    pub fn spend_burst(&self) {
        let burst = self.quota.burst_size();
        let _ = self.rate.check_n(burst);
    }

    /// The open-request counter, to carry over to the next config's gate.
    pub fn active(&self) -> Arc<AtomicU32> {
        self.active.clone()
    }

    /// Count one more open request or tunnel without checking anything (the cluster-wide path:
    /// the store decides, this process only keeps its own count for the local fallback).
    pub fn permit(&self) -> Permit {
        self.active.fetch_add(1, Ordering::AcqRel);
        Permit {
            active: self.active.clone(),
            lease: None,
        }
    }

    /// Admit one request or tunnel. The permit is always taken (so report mode still counts
    /// what is open); the `Deny` says whether the request is over a limit. The concurrency cap is
    /// checked first so that a refused request does not spend rate budget.
    pub fn admit(&self, max_concurrent: u32) -> (Permit, Option<Deny>) {
        let open = self.active.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let permit = Permit {
            active: self.active.clone(),
            lease: None,
        };
        if open > max_concurrent {
            let deny = Deny::with_detail(
                Reason::TooManyConcurrent,
                format!(
                    "agent already has {max_concurrent} requests and tunnels open (max_concurrent)"
                ),
            )
            .retry_after(Duration::from_secs(1));
            return (permit, Some(deny));
        }
        match self.rate.check() {
            Ok(()) => (permit, None),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let deny = Deny::new(
                    Reason::RateLimited,
                    "agent is over its request rate (requests_per_second, burst)",
                )
                .retry_after(wait);
                (permit, Some(deny))
            }
        }
    }
}

impl<C: Clock> std::fmt::Debug for Gate<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("quota", &self.quota)
            .field("active", &self.active.load(Ordering::Relaxed))
            .finish()
    }
}

// === impl Permit ===

impl Permit {
    /// Attach the store's lease: it is given back when the permit drops.
    pub fn with_lease(mut self, lease: cluster::Lease) -> Self {
        self.lease = Some(lease);
        self
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn gate(rps: f64, burst: u32) -> (Gate<FakeRelativeClock>, FakeRelativeClock) {
        let limits = Limits {
            requests_per_second: rps,
            burst,
            ..Limits::default()
        };
        let clock = FakeRelativeClock::default();
        let g = Gate::with_clock(limits.quota().unwrap(), Arc::default(), clock.clone());
        (g, clock)
    }

    #[test]
    fn burst_then_rate_with_retry_after() {
        let (g, clock) = gate(2.0, 3);
        for i in 0..3 {
            assert!(g.admit(100).1.is_none(), "burst request {i}");
        }
        let (_, deny) = g.admit(100);
        let deny = deny.expect("fourth request is over the burst");
        assert_eq!(deny.reason, Reason::RateLimited);
        assert_eq!(
            deny.retry_after,
            Some(1),
            "one cell every 500 ms, rounded up"
        );
        clock.advance(Duration::from_millis(500));
        assert!(g.admit(100).1.is_none(), "a cell has been replenished");
        assert!(g.admit(100).1.is_some());
    }

    #[test]
    fn concurrency_is_counted_by_permits_and_spends_no_rate() {
        let (g, _) = gate(1.0, 2);
        let (p1, d1) = g.admit(1);
        assert!(d1.is_none());
        let (p2, d2) = g.admit(1);
        assert_eq!(d2.unwrap().reason, Reason::TooManyConcurrent);
        drop(p2);
        drop(p1);
        assert_eq!(g.active().load(Ordering::Relaxed), 0);
        // The refused request did not spend the second burst cell.
        let (_p3, d3) = g.admit(1);
        assert!(d3.is_none());
    }

    #[test]
    fn a_replacing_gate_starts_with_its_burst_spent() {
        let (g, clock) = gate(1.0, 5);
        g.spend_burst();
        assert_eq!(g.admit(100).1.unwrap().reason, Reason::RateLimited);
        clock.advance(Duration::from_secs(1));
        assert!(g.admit(100).1.is_none(), "the rate itself still applies");
    }

    #[test]
    fn fractional_rates_and_invalid_values() {
        let l = Limits {
            requests_per_second: 0.5,
            burst: 1,
            ..Limits::default()
        };
        assert_eq!(
            l.quota().unwrap().replenish_interval(),
            Duration::from_secs(2)
        );
        let zero = Limits {
            burst: 0,
            ..Limits::default()
        };
        assert!(zero.quota().is_none());
    }
}
