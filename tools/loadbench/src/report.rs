//! The report: a markdown table of chokepoint's rows, one of the peers' rows, one of scenario
//! r's ([`store`]), the targets (issues 6, 13 and 15) met or not, and notes; [`json`] writes
//! the same figures to `LOAD_JSON`.

mod json;
mod store;

pub(crate) use store::StorePair;
use store::{StoreFields, STORE_COLUMNS};

use serde::Serialize;

use crate::client::{Closed, Idle, Transfer, CONNS};
use crate::machine::Spent;
use crate::peers::Peer;
use crate::proxy::FILLER_RULES;
use crate::settings::Settings;

/// One line of the results table, every cell formatted, and the same figures as numbers.
struct Row {
    /// The first column.
    name: String,
    /// The other columns, formatted.
    cells: [String; 10],
    /// The same figures for the JSON file.
    record: Record,
}

/// A row's figures as numbers, for the `LOAD_JSON` file; `None` (null) where the table has "-".
#[derive(Serialize, Default)]
struct Record {
    /// `a`, `a-noproxy`, `b`, `b-noproxy`, `c`, `c-noproxy`, `d-down`, `d-up`, `d3` or `e`;
    /// a peer's row is the scenario's id, `@` and the peer (`a@squid`); scenario r's are
    /// `r-a-inprocess`, `r-a-redis`, `r-a-1conn-inprocess`, … (`r-c-…` for c's load).
    id: String,
    label: String,
    throughput: Option<Quantity>,
    /// The no-proxy throughput `ratio` divides by, in `throughput`'s unit.
    no_proxy: Option<f64>,
    ratio: Option<f64>,
    p50_us: Option<u32>,
    p99_us: Option<u32>,
    p999_us: Option<u32>,
    /// The table's "proxy CPU/op": µs per request or tunnel (a, b, c), s per GiB (d, d3), or
    /// memory, KiB per idle tunnel (e).
    proxy_per_op: Option<Quantity>,
    /// CPU of the load client and origin together (this process), in `proxy_per_op`'s unit.
    /// On a no-proxy row it is what the exchange costs both ends without a proxy: the kernel
    /// work of a connection's two ends, which a proxy, being both ends, repeats.
    load_per_op: Option<Quantity>,
    proxy_core_pct: Option<f64>,
    client_core_pct: Option<f64>,
    /// Set when other processes were busy during a window this row's figures come from.
    busy_note: Option<String>,
    /// e only.
    idle: Option<Idle>,
    /// Why the scenario has no figures.
    error: Option<String>,
    /// The load client's TLS handshakes over the run, warm-up included (i, j).
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_handshakes: Option<u64>,
    /// Of those, how many resumed an earlier session.
    #[serde(skip_serializing_if = "Option::is_none")]
    tls_resumed: Option<u64>,
    /// A peer's row: the proxy measured instead of chokepoint (`squid`).
    #[serde(skip_serializing_if = "Option::is_none")]
    peer: Option<&'static str>,
    /// A peer's row: chokepoint's `throughput` in the same scenario of this run ÷ the peer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    chokepoint_throughput_ratio: Option<f64>,
    /// A peer's row: chokepoint's `proxy_per_op` in the same scenario of this run ÷ the peer's.
    #[serde(skip_serializing_if = "Option::is_none")]
    chokepoint_per_op_ratio: Option<f64>,
    /// Scenario r's rows: where the limits were evaluated, the difference, the store's figures.
    #[serde(flatten)]
    store: StoreFields,
}

impl Record {
    /// The figures of a closed-loop run through a proxy, against `no_proxy` (its rate).
    fn closed(
        id: String,
        label: String,
        unit: &'static str,
        via: &Closed,
        no_proxy: Option<f64>,
    ) -> Record {
        let micros = |value| Quantity { value, unit: "µs" };
        Record {
            id,
            label,
            throughput: Some(Quantity {
                value: via.rate(),
                unit,
            }),
            no_proxy,
            ratio: no_proxy.map(|n| via.rate() / n),
            p50_us: via.percentile(0.50),
            p99_us: via.percentile(0.99),
            p999_us: via.percentile(0.999),
            proxy_per_op: via.cpu_per_op().map(micros),
            load_per_op: via.load_per_op().map(micros),
            proxy_core_pct: core_pct(via.spent.proxy, via.spent.wall),
            client_core_pct: core_pct(via.spent.own, via.spent.wall),
            tls_handshakes: (via.tls.done > 0).then_some(via.tls.done),
            tls_resumed: (via.tls.done > 0).then_some(via.tls.resumed),
            ..Record::default()
        }
    }

    /// The figures of a 1 GiB transfer through a proxy, against `no_proxy` (its GB/s).
    fn bulk(id: String, label: String, via: &Transfer, no_proxy: Option<f64>) -> Record {
        let per_gib = |value| Quantity {
            value,
            unit: "s/GiB",
        };
        Record {
            id,
            label,
            throughput: Some(Quantity {
                value: via.gb_per_s(),
                unit: "GB/s",
            }),
            no_proxy,
            ratio: no_proxy.map(|n| via.gb_per_s() / n),
            proxy_per_op: via.proxy_cpu().map(per_gib),
            load_per_op: via.load_cpu().map(per_gib),
            proxy_core_pct: core_pct(via.spent.proxy, via.spent.wall),
            client_core_pct: core_pct(via.spent.own, via.spent.wall),
            ..Record::default()
        }
    }
}

#[derive(Serialize)]
struct Quantity {
    /// The number.
    value: f64,
    /// Its unit (`req/s`, `µs`, `GB/s`, `s/GiB`, `KiB/tunnel`, …).
    unit: &'static str,
}

/// A target (of issue 6, 13 or 15) next to what was measured.
#[derive(Serialize)]
struct Check {
    target: String,
    measured: String,
    met: bool,
}

/// What a run found: chokepoint's rows, the peers' rows, the issue-6 checks and notes.
#[derive(Default)]
pub(crate) struct Report {
    /// Chokepoint's rows, in `COLUMNS`.
    rows: Vec<Row>,
    /// The same scenarios against peers, in `PEER_COLUMNS`.
    peer_rows: Vec<Row>,
    /// Scenario r: limits in-process and in Redis, in `STORE_COLUMNS`.
    store_rows: Vec<Row>,
    /// The targets, met or not.
    checks: Vec<Check>,
    /// Said under the tables (and kept in the JSON file).
    pub(crate) notes: Vec<String>,
}

const COLUMNS: [&str; 11] = [
    "scenario",
    "throughput",
    "no-proxy",
    "ratio",
    "p50",
    "p99",
    "p99.9",
    "proxy CPU/op",
    "load CPU/op",
    "proxy core",
    "client core",
];

const PEER_COLUMNS: [&str; 11] = [
    "scenario",
    "throughput",
    "chokepoint ÷ peer",
    "p50",
    "p99",
    "p99.9",
    "proxy CPU/op",
    "chokepoint ÷ peer",
    "load CPU/op",
    "proxy core",
    "client core",
];

/// CPU time `busy` over a window of `wall` seconds, as a percentage of one core.
fn core_pct(busy: Option<f64>, wall: f64) -> Option<f64> {
    busy.map(|b| 100.0 * b / wall)
}

fn pct(pct: Option<f64>) -> String {
    pct.map_or("-".into(), |p| format!("{p:.0}%"))
}

fn micros(us: Option<u32>) -> String {
    us.map_or("-".into(), |us| format!("{us} µs"))
}

fn micros_f(us: Option<f64>) -> String {
    us.map_or("-".into(), |us| format!("{us:.1} µs"))
}

fn times(ratio: Option<f64>) -> String {
    ratio.map_or("-".into(), |r| format!("{r:.2}×"))
}

impl Report {
    /// Rows `id` and `id-noproxy` of a closed-loop scenario.
    pub(crate) fn closed(
        &mut self,
        id: &str,
        name: &str,
        unit: &'static str,
        via: &Closed,
        direct: &Closed,
    ) {
        let direct_name = format!("{name}, no proxy");
        let [via_busy, direct_busy] =
            [(via, name), (direct, direct_name.as_str())].map(|(run, label)| {
                let busy = self.neighbours(label, &run.spent);
                self.failures(label, run);
                self.resumption(label, run);
                busy
            });
        let ratio = via.rate() / direct.rate();
        let cpu = via.cpu_per_op();
        let record = Record {
            busy_note: via_busy,
            ..Record::closed(id.into(), name.into(), unit, via, Some(direct.rate()))
        };
        self.rows.push(Row {
            name: name.into(),
            cells: [
                format!("{:.0} {unit}", via.rate()),
                format!("{:.0} {unit}", direct.rate()),
                format!("{ratio:.2}×"),
                micros(record.p50_us),
                micros(record.p99_us),
                micros(record.p999_us),
                cpu.map_or("-".into(), |c| format!("{c:.1} µs")),
                micros_f(via.load_per_op()),
                pct(record.proxy_core_pct),
                pct(record.client_core_pct),
            ],
            record,
        });
        let record = Record {
            id: format!("{id}-noproxy"),
            label: direct_name.clone(),
            throughput: Some(Quantity {
                value: direct.rate(),
                unit,
            }),
            p50_us: direct.percentile(0.50),
            p99_us: direct.percentile(0.99),
            p999_us: direct.percentile(0.999),
            load_per_op: direct
                .load_per_op()
                .map(|value| Quantity { value, unit: "µs" }),
            client_core_pct: core_pct(direct.spent.own, direct.spent.wall),
            busy_note: direct_busy,
            tls_handshakes: (direct.tls.done > 0).then_some(direct.tls.done),
            tls_resumed: (direct.tls.done > 0).then_some(direct.tls.resumed),
            ..Record::default()
        };
        self.rows.push(Row {
            name: direct_name,
            cells: [
                format!("{:.0} {unit}", direct.rate()),
                "-".into(),
                "-".into(),
                micros(record.p50_us),
                micros(record.p99_us),
                micros(record.p999_us),
                "-".into(),
                micros_f(direct.load_per_op()),
                "-".into(),
                pct(record.client_core_pct),
            ],
            record,
        });
    }

    /// Row `id` of a 1 GiB transfer through the proxy, against `direct`.
    /// `direct_seen`: `direct` is a window an earlier row already checked for neighbours.
    pub(crate) fn bulk(
        &mut self,
        id: &str,
        name: &str,
        via: &Transfer,
        direct: &Transfer,
        direct_seen: bool,
    ) {
        let direct_busy = if direct_seen {
            None
        } else {
            self.neighbours(&format!("{name}, no proxy"), &direct.spent)
        };
        let busy: Vec<String> = [self.neighbours(name, &via.spent), direct_busy]
            .into_iter()
            .flatten()
            .collect();
        let ratio = via.gb_per_s() / direct.gb_per_s();
        let per_gib = via.proxy_cpu();
        let record = Record {
            busy_note: (!busy.is_empty()).then(|| busy.join("; ")),
            ..Record::bulk(id.into(), name.into(), via, Some(direct.gb_per_s()))
        };
        self.rows.push(Row {
            name: name.into(),
            cells: [
                format!("{:.2} GB/s", via.gb_per_s()),
                format!("{:.2} GB/s", direct.gb_per_s()),
                format!("{ratio:.2}×"),
                "-".into(),
                "-".into(),
                "-".into(),
                per_gib.map_or("-".into(), |c| format!("{c:.2} s/GiB")),
                via.load_cpu()
                    .map_or("-".into(), |c| format!("{c:.2} s/GiB")),
                pct(record.proxy_core_pct),
                pct(record.client_core_pct),
            ],
            record,
        });
    }

    /// Chokepoint's row `id` of this run: (throughput, proxy_per_op, no-proxy throughput).
    fn ours(&self, id: &str) -> (Option<f64>, Option<f64>, Option<f64>) {
        let Some(r) = self.rows.iter().find(|r| r.record.id == id) else {
            return (None, None, None);
        };
        let r = &r.record;
        let value = |q: &Option<Quantity>| q.as_ref().map(|q| q.value);
        (value(&r.throughput), value(&r.proxy_per_op), r.no_proxy)
    }

    /// Peer row `id@peer` of a closed-loop scenario, next to chokepoint's row `id`.
    pub(crate) fn peer_closed(
        &mut self,
        id: &str,
        name: &str,
        unit: &'static str,
        peer: Peer,
        via: &Closed,
    ) {
        let label = format!("{name} ({})", peer.name());
        if via.ops == 0 {
            let why = via
                .first_error
                .as_deref()
                .unwrap_or("no exchange completed");
            return self.peer_failed(id, peer, &format!("no exchange completed; first: {why}"));
        }
        let busy = self.neighbours(&label, &via.spent);
        self.failures(&label, via);
        self.resumption(&label, via);
        let (ours, ours_cpu, no_proxy) = self.ours(id);
        let cpu = via.cpu_per_op();
        let record = Record {
            busy_note: busy,
            peer: Some(peer.name()),
            chokepoint_throughput_ratio: ours.map(|o| o / via.rate()),
            chokepoint_per_op_ratio: ours_cpu.zip(cpu).map(|(o, p)| o / p),
            ..Record::closed(
                format!("{id}@{}", peer.name()),
                label.clone(),
                unit,
                via,
                no_proxy,
            )
        };
        self.peer_rows.push(Row {
            name: label,
            cells: [
                format!("{:.0} {unit}", via.rate()),
                times(record.chokepoint_throughput_ratio),
                micros(record.p50_us),
                micros(record.p99_us),
                micros(record.p999_us),
                micros_f(cpu),
                times(record.chokepoint_per_op_ratio),
                micros_f(via.load_per_op()),
                pct(record.proxy_core_pct),
                pct(record.client_core_pct),
            ],
            record,
        });
    }

    /// Peer row `id@peer` of a 1 GiB transfer, next to chokepoint's row `id`.
    pub(crate) fn peer_bulk(&mut self, id: &str, name: &str, peer: Peer, via: &Transfer) {
        let label = format!("{name} ({})", peer.name());
        let busy = self.neighbours(&label, &via.spent);
        let (ours, ours_cpu, no_proxy) = self.ours(id);
        let per_gib = via.proxy_cpu();
        let s_per_gib = |c: Option<f64>| c.map_or("-".into(), |c| format!("{c:.2} s/GiB"));
        let record = Record {
            busy_note: busy,
            peer: Some(peer.name()),
            chokepoint_throughput_ratio: ours.map(|o| o / via.gb_per_s()),
            chokepoint_per_op_ratio: ours_cpu.zip(per_gib).map(|(o, p)| o / p),
            ..Record::bulk(
                format!("{id}@{}", peer.name()),
                label.clone(),
                via,
                no_proxy,
            )
        };
        self.peer_rows.push(Row {
            name: label,
            cells: [
                format!("{:.2} GB/s", via.gb_per_s()),
                times(record.chokepoint_throughput_ratio),
                "-".into(),
                "-".into(),
                "-".into(),
                s_per_gib(per_gib),
                times(record.chokepoint_per_op_ratio),
                s_per_gib(via.load_cpu()),
                pct(record.proxy_core_pct),
                pct(record.client_core_pct),
            ],
            record,
        });
    }

    /// Row `e`: memory per idle tunnel.
    pub(crate) fn idle(&mut self, idle: Idle) {
        let per = idle.per_tunnel_kib();
        let mut cells: [String; 10] = Default::default();
        cells[0] = format!("{} idle tunnels", idle.tunnels);
        cells[1] = idle.rss_cell();
        cells[6] = format!("{per:.2} KiB/tunnel");
        self.rows.push(Row {
            name: "e: idle tunnels".into(),
            cells,
            record: Record {
                id: "e".into(),
                label: "e: idle tunnels".into(),
                proxy_per_op: Some(Quantity {
                    value: per,
                    unit: "KiB/tunnel",
                }),
                idle: Some(idle),
                ..Record::default()
            },
        });
    }

    /// Peer row `e@peer`: memory per idle tunnel, next to chokepoint's row `e`.
    pub(crate) fn peer_idle(&mut self, peer: Peer, idle: Idle) {
        let label = format!("e: idle tunnels ({})", peer.name());
        let per = idle.per_tunnel_kib();
        let (_, ours, _) = self.ours("e");
        let ratio = ours.map(|o| o / per);
        let mut cells: [String; 10] = Default::default();
        cells[0] = format!("{} idle tunnels", idle.tunnels);
        cells[1] = idle.rss_cell();
        cells[5] = format!("{per:.2} KiB/tunnel");
        cells[6] = times(ratio);
        self.peer_rows.push(Row {
            name: label.clone(),
            cells,
            record: Record {
                id: format!("e@{}", peer.name()),
                label,
                proxy_per_op: Some(Quantity {
                    value: per,
                    unit: "KiB/tunnel",
                }),
                idle: Some(idle),
                peer: Some(peer.name()),
                chokepoint_per_op_ratio: ratio,
                ..Record::default()
            },
        });
    }

    /// Peer row `id@peer`: the scenario failed with `error`.
    pub(crate) fn peer_failed(&mut self, id: &str, peer: Peer, error: &str) {
        let id = format!("{id}@{}", peer.name());
        let mut cells: [String; 10] = Default::default();
        cells[0] = format!("failed: {error}");
        self.peer_rows.push(Row {
            name: id.clone(),
            cells,
            record: Record {
                id: id.clone(),
                label: id,
                error: Some(error.into()),
                peer: Some(peer.name()),
                ..Record::default()
            },
        });
    }

    /// Say how many of the client's TLS handshakes resumed a session, if it made any: a
    /// resumed handshake costs both ends less (no certificate, no signature), so the share
    /// matters when j's rows are compared.
    fn resumption(&mut self, label: &str, run: &Closed) {
        let tls = run.tls;
        if tls.done > 0 {
            self.notes.push(format!(
                "{label}: {} of {} client TLS handshakes resumed a session (warm-up included)",
                tls.resumed, tls.done
            ));
        }
    }

    /// Say so when connections of a closed-loop run failed.
    fn failures(&mut self, label: &str, run: &Closed) {
        if run.errors > 0 {
            self.notes.push(format!(
                "{label}: {} connections failed; first: {}",
                run.errors,
                run.first_error.as_deref().unwrap_or("?")
            ));
        }
    }

    /// Say so when other processes took more than 5% of a core during a measurement; the note,
    /// if any, is also returned.
    fn neighbours(&mut self, label: &str, spent: &Spent) -> Option<String> {
        let others = spent.others.filter(|o| *o > 0.05 * spent.wall)?;
        let note = format!(
            "{label}: other processes were busy {:.0}% of a core during the window",
            100.0 * others / spent.wall
        );
        self.notes.push(note.clone());
        Some(note)
    }

    /// The latency target of a and b: p99 through the proxy minus p99 without it, ≤ 0.3 ms.
    pub(crate) fn latency_check(&mut self, id: &str, via: &Closed, direct: &Closed) {
        let (Some(p99), Some(base)) = (via.percentile(0.99), direct.percentile(0.99)) else {
            return;
        };
        let added = (f64::from(p99) - f64::from(base)) / 1000.0;
        self.check(
            &format!("{id}: p99 added ≤ 0.3 ms"),
            format!("{added:+.2} ms"),
            added <= 0.3,
        );
    }

    pub(crate) fn check(&mut self, target: &str, measured: String, met: bool) {
        self.checks.push(Check {
            target: target.into(),
            measured,
            met,
        });
    }

    /// Row `id`: the scenario failed with `error`.
    pub(crate) fn failed(&mut self, id: &str, error: &str) {
        let mut cells: [String; 10] = Default::default();
        cells[0] = format!("failed: {error}");
        self.rows.push(Row {
            name: id.into(),
            cells,
            record: Record {
                id: id.into(),
                label: id.into(),
                error: Some(error.into()),
                ..Record::default()
            },
        });
    }

    /// The tables (markdown), the checks and the notes (`notes` first) on stdout.
    pub(crate) fn print(&self, s: &Settings, notes: &[String]) {
        println!();
        println!(
            "chokepoint load bench: {} s measured per scenario after {} s warm-up, {CONNS} \
             connections, audit on, {} allow rules",
            s.secs.as_secs_f64(),
            s.warm.as_secs_f64(),
            FILLER_RULES + 1
        );
        // Only scenario r selected: its own table, none of the main one's columns.
        if !self.rows.is_empty() || self.store_rows.is_empty() {
            println!();
            let mut table: Vec<Vec<String>> = vec![COLUMNS.iter().map(|c| c.to_string()).collect()];
            for r in &self.rows {
                let mut line = vec![r.name.clone()];
                line.extend(r.cells.iter().cloned());
                table.push(line);
            }
            print_markdown(&table);
        }
        if !self.peer_rows.is_empty() {
            println!();
            println!(
                "peers: the same scenarios and load through other proxies; \"chokepoint ÷ peer\" \
                 divides chokepoint's throughput, then its proxy CPU/op (memory for e), by the \
                 peer's"
            );
            println!();
            let mut table: Vec<Vec<String>> =
                vec![PEER_COLUMNS.iter().map(|c| c.to_string()).collect()];
            for r in &self.peer_rows {
                let mut line = vec![r.name.clone()];
                line.extend(r.cells.iter().cloned());
                table.push(line);
            }
            print_markdown(&table);
        }
        if !self.store_rows.is_empty() {
            println!();
            println!(
                "r: cluster-wide limits (issue #13): the same load through a proxy whose limits \
                 are in-process and one whose limits are in Redis on 127.0.0.1; \"added\" is the \
                 Redis row minus the in-process row; Redis CPU/op is redis-server's own CPU; a \
                 round trip is a command a client sent it (not those run inside its scripts); \
                 reads: socket reads it made for them (fewer when commands come several to a \
                 write)"
            );
            println!();
            let mut table: Vec<Vec<String>> =
                vec![STORE_COLUMNS.iter().map(|c| c.to_string()).collect()];
            for r in &self.store_rows {
                let mut line = vec![r.name.clone()];
                line.extend(r.cells.iter().cloned());
                table.push(line);
            }
            print_markdown(&table);
        }
        if !self.checks.is_empty() {
            println!();
            let mut checks = vec![vec!["target".into(), "measured".into(), "met".into()]];
            for c in &self.checks {
                let met = if c.met { "yes" } else { "NO" };
                checks.push(vec![c.target.clone(), c.measured.clone(), met.into()]);
            }
            print_markdown(&checks);
        }
        println!();
        for n in notes.iter().chain(&self.notes) {
            println!("- {n}");
        }
    }
}

fn print_markdown(table: &[Vec<String>]) {
    let columns = table.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| {
            table
                .iter()
                .map(|r| r.get(i).map_or(0, |c| c.chars().count()))
                .max()
                .unwrap_or(0)
        })
        .collect();
    for (n, row) in table.iter().enumerate() {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("| {} |", cells.join(" | "));
        if n == 0 {
            let rule: Vec<String> = widths.iter().map(|w| "-".repeat(*w)).collect();
            println!("| {} |", rule.join(" | "));
        }
    }
}
