//! Scenario r's table: each load with the agent's limits in-process and in Redis, side by
//! side, the difference, and what the store itself spent.

use std::collections::BTreeMap;

use super::{core_pct, micros, micros_f, pct, Quantity, Record, Report, Row};
use crate::client::Closed;
use crate::store::StoreUse;

/// One load of scenario r, through both proxies.
pub(crate) struct StorePair {
    /// The closed-loop scenario whose load it is (a or c).
    pub(crate) script: char,
    /// Concurrent connections.
    pub(crate) conns: usize,
    /// Through the proxy whose limits are in-process.
    pub(crate) in_process: Closed,
    /// Through the proxy whose limits are in Redis.
    pub(crate) in_redis: Closed,
    /// What the store did over the Redis windows.
    pub(crate) store: StoreUse,
    /// Proxy CPU µs per exchange of each round's windows: (in-process, Redis).
    pub(crate) rounds: Vec<(f64, f64)>,
}

pub(super) const STORE_COLUMNS: [&str; 11] = [
    "scenario r (#13)",
    "throughput",
    "p50",
    "p99",
    "proxy CPU/op",
    "added CPU/op",
    "added p50",
    "Redis CPU/op",
    "round trips (reads)/op",
    "proxy core",
    "client core",
];

// === impl StorePair ===

impl StorePair {
    /// Proxy CPU µs per exchange with the limits in Redis minus in-process.
    pub(crate) fn added_cpu(&self) -> Option<f64> {
        Some(self.in_redis.cpu_per_op()? - self.in_process.cpu_per_op()?)
    }

    /// p50 with the limits in Redis minus in-process, in ms.
    pub(crate) fn added_p50_ms(&self) -> Option<f64> {
        self.added_ms(0.50)
    }

    fn added_ms(&self, p: f64) -> Option<f64> {
        let (redis, local) = (self.in_redis.percentile(p)?, self.in_process.percentile(p)?);
        Some((f64::from(redis) - f64::from(local)) / 1000.0)
    }

    /// The store's CPU µs per exchange.
    fn store_cpu(&self) -> Option<f64> {
        Some(self.store.cpu? * 1e6 / self.in_redis.ops.max(1) as f64)
    }

    /// Per exchange: `n` of them over the Redis windows.
    fn per_op(&self, n: u64) -> f64 {
        n as f64 / self.in_redis.ops.max(1) as f64
    }
}

// === impl Report ===

impl Report {
    /// Rows `r-X-inprocess` and `r-X-redis` (X: the load, `a` or `c`, and `-1conn` for one
    /// connection) of one load of scenario r.
    pub(crate) fn store_pair(&mut self, name: &str, unit: &'static str, pair: &StorePair) {
        let conns = if pair.conns == 1 {
            "1 conn".to_string()
        } else {
            format!("{} conns", pair.conns)
        };
        let suffix = if pair.conns == 1 { "-1conn" } else { "" };
        let base = format!("r-{}{suffix}", pair.script);
        for (side, run) in [("in-process", &pair.in_process), ("Redis", &pair.in_redis)] {
            let label = format!("{name}, {conns}, limits {side}");
            let busy = self.neighbours(&label, &run.spent);
            self.failures(&label, run);
            if run.ops == 0 {
                self.notes.push(format!("{label}: no exchange completed"));
            }
            let redis = side == "Redis";
            let id = format!("{base}-{}", if redis { "redis" } else { "inprocess" });
            let mut record = Record {
                busy_note: busy,
                store: StoreFields {
                    limits: Some(if redis { "redis" } else { "in-process" }),
                    conns: Some(pair.conns),
                    ..StoreFields::default()
                },
                ..Record::closed(id, label.clone(), unit, run, None)
            };
            let mut cells: [String; 10] = [
                format!("{:.0} {unit}", run.rate()),
                micros(record.p50_us),
                micros(record.p99_us),
                micros_f(run.cpu_per_op()),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                pct(core_pct(run.spent.proxy, run.spent.wall)),
                pct(core_pct(run.spent.own, run.spent.wall)),
            ];
            if redis {
                let added_cpu = pair.added_cpu();
                let added_p50 = pair.added_p50_ms();
                let trips = pair.per_op(pair.store.round_trips());
                cells[4] = added_cpu.map_or("-".into(), |c| format!("{c:+.1} µs"));
                cells[5] = added_p50.map_or("-".into(), |ms| format!("{ms:+.3} ms"));
                cells[6] = micros_f(pair.store_cpu());
                cells[7] = match pair.store.reads {
                    Some(reads) => format!("{trips:.3} ({:.2})", pair.per_op(reads)),
                    None => format!("{trips:.3}"),
                };
                let micros = |value| Quantity { value, unit: "µs" };
                let fields = &mut record.store;
                fields.added_cpu_per_op = added_cpu.map(micros);
                fields.added_p50_ms = added_p50;
                fields.added_p99_ms = pair.added_ms(0.99);
                fields.round_added_cpu_per_op_us =
                    Some(pair.rounds.iter().map(|(l, r)| r - l).collect());
                fields.store_cpu_per_op = pair.store_cpu().map(micros);
                fields.store_round_trips_per_op = Some(trips);
                fields.store_commands_per_op = pair.store.commands.map(|n| pair.per_op(n));
                fields.store_reads_per_op = pair.store.reads.map(|n| pair.per_op(n));
                fields.store_calls = Some(pair.store.calls.clone());
                if let Some(e) = &pair.store.error {
                    self.notes
                        .push(format!("{label}: the store's counters: {e}"));
                }
            }
            self.store_rows.push(Row {
                name: label,
                cells,
                record,
            });
        }
    }
}

/// Scenario r's own fields of a JSON record.
#[derive(serde::Serialize, Default)]
pub(super) struct StoreFields {
    /// Where the agent's limits were evaluated: `in-process` or `redis`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) limits: Option<&'static str>,
    /// Concurrent connections of the load.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) conns: Option<usize>,
    /// Redis row: proxy CPU per exchange minus the in-process row's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) added_cpu_per_op: Option<Quantity>,
    /// Redis row: p50 minus the in-process row's, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) added_p50_ms: Option<f64>,
    /// Redis row: proxy CPU per exchange added in each round (its Redis window minus its
    /// in-process window), in µs: the spread shows the machine's noise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) round_added_cpu_per_op_us: Option<Vec<f64>>,
    /// Redis row: p99 minus the in-process row's, in ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) added_p99_ms: Option<f64>,
    /// Redis row: redis-server's own CPU per exchange.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) store_cpu_per_op: Option<Quantity>,
    /// Redis row: commands clients sent to the store (those run inside scripts and this tool's
    /// `INFO` left out), per exchange completed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) store_round_trips_per_op: Option<f64>,
    /// Redis row: commands the store processed, those inside scripts included, per exchange.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) store_commands_per_op: Option<f64>,
    /// Redis row: reads from client sockets per exchange (`total_reads_processed`): below
    /// `store_round_trips_per_op` when commands arrive several to a write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) store_reads_per_op: Option<f64>,
    /// Redis row: `INFO commandstats` calls per command over the windows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) store_calls: Option<BTreeMap<String, u64>>,
}
