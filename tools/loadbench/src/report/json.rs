//! The `LOAD_JSON` file: every row's figures as numbers, the checks and the notes, with the
//! run's commit and settings. `benches/chart.py` draws it as SVG.

use std::io;
use std::process::{Command, Stdio};
use std::time::SystemTime;

use serde::Serialize;

use super::{Check, Record, Report};
use crate::settings::{workspace_root, Settings};

impl Report {
    /// Write the rows, checks and notes with the run's settings as JSON to `s.json`.
    pub(crate) fn write_json(&self, s: &Settings, notes: &[String]) -> io::Result<()> {
        let results = Results {
            timestamp: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            commit: git(&["rev-parse", "--short", "HEAD"]),
            dirty: git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
            nproc: s.nproc,
            pinned: s.pinned,
            load_secs: s.secs.as_secs_f64(),
            load_warm_secs: s.warm.as_secs_f64(),
            idle_tunnels: s.idle_tunnels,
            scenarios: &s.scenarios,
            rows: self
                .rows
                .iter()
                .chain(&self.peer_rows)
                .chain(&self.store_rows)
                .map(|r| &r.record)
                .collect(),
            checks: &self.checks,
            notes: notes
                .iter()
                .chain(&self.notes)
                .map(String::as_str)
                .collect(),
        };
        let json = serde_json::to_string_pretty(&results).map_err(io::Error::other)?;
        if let Some(dir) = s.json.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&s.json, json + "\n")
    }
}

/// The `LOAD_JSON` file.
#[derive(Serialize)]
struct Results<'a> {
    /// When the run ended, RFC 3339, UTC.
    timestamp: String,
    /// `git rev-parse --short HEAD` of the checkout; null outside one.
    commit: Option<String>,
    /// Whether tracked files differed from `commit`.
    dirty: Option<bool>,
    nproc: usize,
    pinned: bool,
    load_secs: f64,
    load_warm_secs: f64,
    idle_tunnels: usize,
    scenarios: &'a str,
    rows: Vec<&'a Record>,
    checks: &'a [Check],
    notes: Vec<&'a str>,
}

/// `git ARGS` in the checkout: its trimmed output, or `None` (no git, not a checkout).
fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(workspace_root())
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8(out.stdout)
        .ok()
        .map(|s| s.trim().to_string())
}
