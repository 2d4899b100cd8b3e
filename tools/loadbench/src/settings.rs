//! The `LOAD_…` environment, after what the machine allows.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::Error;
use crate::machine;

/// File descriptors kept free for everything but the idle tunnels of scenario e.
const SPARE_FDS: u64 = 256;

/// What the environment asks for, after what the machine allows.
pub(crate) struct Settings {
    /// Measured seconds per scenario (`LOAD_SECS`).
    pub(crate) secs: Duration,
    /// Warm-up before each measured window (`LOAD_WARM_SECS`).
    pub(crate) warm: Duration,
    /// Tunnels held open in scenario e (`LOAD_IDLE_TUNNELS`, lowered to the open-file limit).
    pub(crate) idle_tunnels: usize,
    /// The scenario letters to run (`LOAD_SCENARIOS`).
    pub(crate) scenarios: String,
    /// Alternating rounds of scenario i's #15 check (`LOAD_ROUNDS`, at least 1).
    pub(crate) rounds: usize,
    /// `LOAD_PERF_DIR`: record a `perf` profile of the proxy per measured window there.
    pub(crate) perf_dir: Option<PathBuf>,
    /// `LOAD_CALLGRIND_DIR`: run the proxy under callgrind, its output there.
    pub(crate) callgrind_dir: Option<PathBuf>,
    /// Where the results go as JSON.
    pub(crate) json: PathBuf,
    /// The release `chokepoint` binary the scenarios start.
    pub(crate) chokepoint: PathBuf,
    /// CPUs available to the bench before it pinned itself.
    pub(crate) nproc: usize,
    /// Whether the proxy goes on CPU 0 and this process is on CPU 1.
    pub(crate) pinned: bool,
    /// Clock ticks per second of `/proc/PID/stat`.
    pub(crate) clk_tck: f64,
}

impl Settings {
    /// Read the `LOAD_…` variables; `nofile` (the open-file limit) bounds scenario e.
    pub(crate) fn from_env(
        chokepoint: PathBuf,
        nproc: usize,
        pinned: bool,
        nofile: u64,
        notes: &mut Vec<String>,
    ) -> Result<Settings, Error> {
        // A window shorter than this measures nothing worth a number.
        let secs = env_number("LOAD_SECS", 5.0)?.max(0.1);
        let warm = env_number("LOAD_WARM_SECS", 1.0)?;
        let wanted = env_number("LOAD_IDLE_TUNNELS", 9000.0)? as usize;
        let rounds = (env_number("LOAD_ROUNDS", 1.0)? as usize).max(1);
        // Each idle tunnel costs two descriptors here (client side, origin side) and two in the
        // proxy, which inherits this process's limit.
        let fit = usize::try_from(nofile.saturating_sub(SPARE_FDS) / 2).unwrap_or(usize::MAX);
        let idle_tunnels = if wanted > fit {
            notes.push(format!(
                "scenario e: {wanted} idle tunnels need {} open files but the limit is {nofile}: \
                 lowered to {fit}",
                2 * wanted as u64 + SPARE_FDS
            ));
            fit
        } else {
            wanted
        };
        Ok(Settings {
            secs: Duration::from_secs_f64(secs),
            warm: Duration::from_secs_f64(warm),
            idle_tunnels,
            scenarios: std::env::var("LOAD_SCENARIOS").unwrap_or_else(|_| "abcde".into()),
            rounds,
            perf_dir: std::env::var_os("LOAD_PERF_DIR").map(PathBuf::from),
            callgrind_dir: std::env::var_os("LOAD_CALLGRIND_DIR").map(PathBuf::from),
            json: json_path(),
            chokepoint,
            nproc,
            pinned,
            clk_tck: machine::clk_tck(),
        })
    }

    /// Whether `LOAD_SCENARIOS` selects `scenario`.
    pub(crate) fn wants(&self, scenario: char) -> bool {
        self.scenarios.contains(scenario)
    }
}

/// The checkout this tool was built from: two levels above its own manifest
/// (`tools/loadbench`).
pub(crate) fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .nth(2)
        .map_or_else(|| manifest.join("../.."), Path::to_path_buf)
}

/// `LOAD_JSON`, else `load-results.json` in the workspace's target directory:
/// `CARGO_TARGET_DIR` if set (relative to the workspace root), else its `target`.
fn json_path() -> PathBuf {
    if let Some(path) = std::env::var_os("LOAD_JSON") {
        return path.into();
    }
    let root = workspace_root();
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), |t| root.join(t));
    target.join("load-results.json")
}

/// A non-negative number from the environment, `default` when the variable is unset.
fn env_number(name: &'static str, default: f64) -> Result<f64, Error> {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite() && *n >= 0.0)
            .ok_or(Error::Setting { name, value }),
        Err(_) => Ok(default),
    }
}
