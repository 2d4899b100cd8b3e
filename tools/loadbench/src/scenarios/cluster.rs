//! r: cluster-wide limits on Redis (issue #13, item 8). The agent's limits (rate, burst and
//! concurrency, set too high to refuse) evaluated in-process (no `[cluster]`), then in a
//! `redis-server` on 127.0.0.1 (`[cluster] redis = "redis://127.0.0.1:PORT/0"`), under the
//! same load, side by side in one run:
//!
//! - a's load (absolute-form GETs on keep-alive connections: one admission per request) and
//!   c's (a new tunnel and one GET per exchange: one admission per tunnel);
//! - each with 64 connections (the proxy saturated: CPU per request, and latency that is
//!   queueing) and with 1 (the proxy idle between requests: the latency one request gains);
//! - each pair measured [`ROUNDS`] times, alternating which side goes first (in-process,
//!   Redis, Redis, in-process, in-process, Redis), so a drift of the shared machine during the
//!   run weighs on both sides alike; the report adds the windows up, and gives the CPU added in
//!   each round too, to show the noise.
//!
//! Both proxies run from the start (pinned to CPU 0, the idle one costs nothing), so a window
//! measures the one the load goes to. Over each Redis window the store's CPU and `INFO
//! commandstats` are read at the window's edges ([`crate::store`]). The issue's targets: at
//! most one store round trip per admitted request or tunnel, proxy CPU added per request
//! ≤ 10 µs, p50 latency added ≤ 0.2 ms.

use std::time::Duration;

use tokio::time::{sleep, Instant};

use crate::client::{closed_loop_watched, Closed, CONNS};
use crate::error::Error;
use crate::machine::installed;
use crate::origin::Origin;
use crate::proxy::{Proxy, PROCESS_WAIT, REPLICAS_KEY};
use crate::report::{Report, StorePair};
use crate::scenarios::via_script;
use crate::settings::Settings;
use crate::store::{Redis, StoreUse};

/// Windows per side and per load: in-process, Redis, Redis, in-process, in-process, Redis.
const ROUNDS: usize = 3;

/// One load of scenario r: whose script, and how the report names it.
struct Load {
    /// The closed-loop scenario whose script runs (a or c).
    script: char,
    /// Row name.
    name: &'static str,
    /// Throughput unit.
    unit: &'static str,
    /// What one exchange is admitted as, in the checks.
    per: &'static str,
}

const LOADS: [Load; 2] = [
    Load {
        script: 'a',
        name: "r/a: GETs, keep-alive",
        unit: "req/s",
        per: "request",
    },
    Load {
        script: 'c',
        name: "r/c: new tunnel + 1 GET",
        unit: "tunnels/s",
        per: "tunnel",
    },
];

/// r. The load of a and of c through a proxy whose limits are in-process, and through one
/// whose limits are in Redis; the issue-13 targets checked against the difference.
pub(crate) async fn cluster_limits(
    s: &Settings,
    origin: &Origin,
    report: &mut Report,
) -> Result<(), Error> {
    if !installed("redis-server") {
        report.failed("r", "redis-server is not installed (Debian: redis-server)");
        return Ok(());
    }
    let mut redis = match Redis::start(s) {
        Ok(r) => r,
        Err(e) => {
            report.failed("r", &e.to_string());
            return Ok(());
        }
    };
    let port = origin.addr.port();
    let local = Proxy::start_limited(port, None, s)?;
    let shared = Proxy::start_limited(port, Some(&redis.url()), s)?;
    if !store_in_use(&mut redis).await {
        report.failed(
            "r",
            &format!(
                "the proxy did not reach redis at {} in {PROCESS_WAIT:?}",
                redis.addr
            ),
        );
        return Ok(());
    }
    for load in &LOADS {
        let mut pairs = Vec::new();
        for conns in [CONNS, 1] {
            let pair = side_by_side(s, load, conns, &local, &shared, &mut redis, port).await;
            report.store_pair(load.name, load.unit, &pair);
            pairs.push(pair);
        }
        if let [loaded, single] = &pairs[..] {
            check(report, load, loaded, single);
        }
    }
    let (local_log, shared_log) = (local.stop().await, shared.stop().await);
    report.notes.push(local_log.note("r, in-process limits"));
    report.notes.push(shared_log.note("r, limits in Redis"));
    let pinning = if s.pinned {
        "pinned with the load client and origin (CPU 1), in a session of its own; both proxies \
         on CPU 0"
    } else {
        "not pinned, in a session of its own"
    };
    report.notes.push(format!(
        "r: redis-server on {} {pinning}; each figure is {ROUNDS} windows, in-process and Redis \
         alternating (in-process, Redis, Redis, in-process, in-process, Redis)",
        redis.addr
    ));
    Ok(())
}

/// Wait (bounded) for the proxy's first heartbeat to reach the store: from then on it admits
/// through it.
async fn store_in_use(redis: &mut Redis) -> bool {
    let deadline = Instant::now() + PROCESS_WAIT;
    // Each pass sleeps; the deadline bounds them.
    while Instant::now() < deadline {
        if redis.exists(REPLICAS_KEY) {
            return true;
        }
        sleep(Duration::from_millis(20)).await;
    }
    false
}

/// `load` with `conns` connections through each proxy, [`ROUNDS`] windows each, alternating.
async fn side_by_side(
    s: &Settings,
    load: &Load,
    conns: usize,
    local: &Proxy,
    shared: &Proxy,
    redis: &mut Redis,
    port: u16,
) -> StorePair {
    let script = via_script(load.script, port);
    let mut in_process: Option<Closed> = None;
    let mut in_redis: Option<Closed> = None;
    let mut store: Option<StoreUse> = None;
    let mut rounds = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let mut cpu = (f64::NAN, f64::NAN);
        // Even rounds: in-process first; odd rounds: Redis first.
        for redis_turn in [round % 2 == 1, round % 2 == 0] {
            let id = format!("r-{}-{conns}-{round}", load.script);
            if redis_turn {
                let name = format!("{id}-redis");
                let (mut run, before, after) = closed_loop_watched(
                    shared.addr,
                    &script,
                    conns,
                    s,
                    Some(shared),
                    &name,
                    || redis.snapshot(),
                )
                .await;
                let used = before.until(&after, s.clk_tck);
                // The store's CPU is no neighbour's.
                if let (Some(others), Some(store_cpu)) = (run.spent.others, used.cpu) {
                    run.spent.others = Some((others - store_cpu).max(0.0));
                }
                cpu.1 = run.cpu_per_op().unwrap_or(f64::NAN);
                in_redis = Some(match in_redis {
                    Some(prev) => prev.merge(run),
                    None => run,
                });
                store = Some(match store {
                    Some(mut prev) => {
                        prev.add(&used);
                        prev
                    }
                    None => used,
                });
            } else {
                let name = format!("{id}-inprocess");
                let (run, (), ()) =
                    closed_loop_watched(local.addr, &script, conns, s, Some(local), &name, || ())
                        .await;
                cpu.0 = run.cpu_per_op().unwrap_or(f64::NAN);
                in_process = Some(match in_process {
                    Some(prev) => prev.merge(run),
                    None => run,
                });
            }
        }
        rounds.push(cpu);
    }
    StorePair {
        script: load.script,
        conns,
        // ROUNDS ≥ 1, so each side ran at least once.
        in_process: in_process.unwrap_or_else(Closed::empty),
        in_redis: in_redis.unwrap_or_else(Closed::empty),
        store: store.unwrap_or_default(),
        rounds,
    }
}

/// The issue-13 targets for one load: round trips per admission, CPU added per exchange (64
/// connections: the proxy saturated), p50 added (1 connection: no queueing; the 64-connection
/// figure, which is queueing, beside it).
fn check(report: &mut Report, load: &Load, loaded: &StorePair, single: &StorePair) {
    let id = load.script;
    let per = load.per;
    let trips = |p: &StorePair| p.store.round_trips() as f64 / p.in_redis.ops.max(1) as f64;
    let calls =
        |p: &StorePair, name: &str| p.store.calls_of(name) as f64 / p.in_redis.ops.max(1) as f64;
    let (many, one) = (trips(loaded), trips(single));
    report.check(
        &format!("r/{id} (#13): ≤ 1 store round trip per admitted {per}"),
        format!(
            "{many:.3} at {} conns (EVALSHA {:.3}); {one:.3} at 1 (EVALSHA {:.3})",
            loaded.conns,
            calls(loaded, "evalsha"),
            calls(single, "evalsha"),
        ),
        // The per-second upkeep (heartbeat, lease renewal) and the requests in flight at the
        // window's edges are a few per 10,000.
        many <= 1.01 && one <= 1.01,
    );
    let cpu = loaded.added_cpu().unwrap_or(f64::NAN);
    let per_round: Vec<String> = loaded
        .rounds
        .iter()
        .map(|(local, redis)| format!("{:+.1}", redis - local))
        .collect();
    report.check(
        &format!("r/{id} (#13): ≤ 10 µs proxy CPU added per {per}"),
        format!(
            "{cpu:+.1} µs ({:.1} vs {:.1} µs, {} conns; rounds {}); {:+.1} µs at 1 conn",
            loaded.in_redis.cpu_per_op().unwrap_or(f64::NAN),
            loaded.in_process.cpu_per_op().unwrap_or(f64::NAN),
            loaded.conns,
            per_round.join(", "),
            single.added_cpu().unwrap_or(f64::NAN),
        ),
        cpu <= 10.0,
    );
    let p50 = single.added_p50_ms().unwrap_or(f64::NAN);
    report.check(
        &format!("r/{id} (#13): p50 added ≤ 0.2 ms"),
        format!(
            "{p50:+.3} ms at 1 conn; {:+.2} ms at {} conns (queueing: {} ÷ throughput)",
            loaded.added_p50_ms().unwrap_or(f64::NAN),
            loaded.conns,
            loaded.conns,
        ),
        p50 <= 0.2,
    );
}
