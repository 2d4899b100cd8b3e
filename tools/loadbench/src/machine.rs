//! The machine the bench runs on: CPU pinning, the open-file limit, and CPU time and memory
//! of processes and of the whole machine, read from `/proc`.

use std::process::{Command, Stdio};

use tokio::time::Instant;

use crate::proxy::Proxy;

// === pinning and limits ===

/// Pin this process (load client and origin) to CPU 1; the proxy goes on CPU 0. Runs before any
/// thread exists, so every thread inherits the mask.
pub(crate) fn pin_self(cores: usize, notes: &mut Vec<String>) -> bool {
    if cores < 2 {
        notes.push(format!("{cores} core available: not pinned"));
        return false;
    }
    let pid = std::process::id().to_string();
    let status = Command::new("taskset")
        .args(["-cp", "1", &pid])
        .stdout(Stdio::null())
        .status();
    match status {
        Ok(s) if s.success() => {
            notes.push("pinned: proxy on CPU 0, load client and origin on CPU 1".into());
            true
        }
        Ok(s) => {
            notes.push(format!("taskset failed ({s}): not pinned"));
            false
        }
        Err(e) => {
            notes.push(format!("taskset is not installed ({e}): not pinned"));
            false
        }
    }
}

/// Raise the soft open-file limit to the hard one (children inherit it); returns the soft limit.
pub(crate) fn raise_nofile(notes: &mut Vec<String>) -> u64 {
    let Some((soft, hard)) = nofile_limits() else {
        notes.push("cannot read the open-file limit; assuming 1024".into());
        return 1024;
    };
    if soft >= hard {
        return soft;
    }
    let pid = std::process::id().to_string();
    let raised = Command::new("prlimit")
        .args(["--pid", &pid, &format!("--nofile={hard}:{hard}")])
        .status()
        .is_ok_and(|s| s.success());
    let now = nofile_limits().map_or(soft, |(s, _)| s);
    if !raised || now < hard {
        notes.push(format!(
            "could not raise the open-file limit from {soft} to {hard} (prlimit)"
        ));
    }
    now
}

/// (soft, hard) of `Max open files` in /proc/self/limits.
fn nofile_limits() -> Option<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    let soft = fields.next()?.parse().ok()?;
    let hard = fields.next()?.parse().ok()?;
    Some((soft, hard))
}

/// Clock ticks per second of /proc/PID/stat.
pub(crate) fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (all threads), in clock ticks. `pid` may be "self".
pub(crate) fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// VmRSS of a process, in KiB.
pub(crate) fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Children, grandchildren, … of a process (from /proc/PID/task/TID/children); a bounded walk.
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    let mut next = vec![pid];
    // Each pass takes one process off `next`; the bound stops a walk that /proc races could
    // make cyclic (pids are reused).
    for _ in 0..10_000 {
        let Some(parent) = next.pop() else { break };
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{parent}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let children =
                std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
            for child in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(child);
                next.push(child);
            }
        }
    }
    found
}

/// Whether `binary` is a file in one of `PATH`'s directories.
pub(crate) fn installed(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(binary).is_file()))
}

/// Whether this process runs as root (effective uid 0, from /proc/self/status).
pub(crate) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            Some(line.split_whitespace().nth(2)? == "0")
        })
        .unwrap_or(false)
}

// === CPU accounting ===

/// CPU time of the proxy, of this process and of the whole machine at one instant.
#[derive(Clone, Copy)]
pub(crate) struct Usage {
    at: Instant,
    proxy: Option<u64>,
    own: Option<u64>,
    machine: Option<u64>,
}

/// CPU seconds over a window, and its length.
#[derive(Clone, Copy, Default)]
pub(crate) struct Spent {
    /// Seconds of wall-clock time.
    pub(crate) wall: f64,
    /// The proxy's CPU seconds (a peer's: its process tree's).
    pub(crate) proxy: Option<f64>,
    /// This process's CPU seconds: the load client and the origin together.
    pub(crate) own: Option<f64>,
    /// Busy CPU time of everything else on the machine: a noisy neighbour shows up here.
    pub(crate) others: Option<f64>,
}

impl Usage {
    /// The counters now; `proxy`'s are left out without one (a no-proxy run).
    pub(crate) fn now(proxy: Option<&Proxy>) -> Usage {
        Usage {
            at: Instant::now(),
            proxy: proxy.and_then(Proxy::cpu_ticks),
            own: cpu_ticks("self"),
            machine: machine_busy_ticks(),
        }
    }

    /// What was spent from `self` to `later`.
    pub(crate) fn until(self, later: Usage, clk_tck: f64) -> Spent {
        let diff = |a: Option<u64>, b: Option<u64>| Some(b?.saturating_sub(a?) as f64 / clk_tck);
        let proxy = diff(self.proxy, later.proxy);
        let own = diff(self.own, later.own);
        let machine = diff(self.machine, later.machine);
        Spent {
            wall: (later.at - self.at).as_secs_f64(),
            proxy,
            own,
            others: machine.map(|m| (m - proxy.unwrap_or(0.0) - own.unwrap_or(0.0)).max(0.0)),
        }
    }
}

impl Spent {
    /// Two windows as one: their wall-clock and CPU seconds added up.
    pub(crate) fn plus(&self, other: &Spent) -> Spent {
        let add = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
        Spent {
            wall: self.wall + other.wall,
            proxy: add(self.proxy, other.proxy),
            own: add(self.own, other.own),
            others: add(self.others, other.others),
        }
    }
}

/// Busy ticks of all CPUs (the `cpu` line of /proc/stat without idle and iowait).
fn machine_busy_ticks() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4);
    Some(busy.map(|(_, t)| t).sum())
}
