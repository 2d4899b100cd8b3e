//! The release `chokepoint` binary the scenarios start: built from this checkout with cargo's
//! release profile (the same binary `cargo build --release` ships), then found in cargo's own
//! report of what it built, so `CARGO_TARGET_DIR` and `--target` layouts need no guessing.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::error::Error;
use crate::settings::workspace_root;

/// One line of `cargo build --message-format=json`: only built artifacts matter here.
#[derive(Deserialize)]
struct Message {
    reason: String,
    target: Option<Target>,
    executable: Option<PathBuf>,
}

/// The cargo target an artifact message is about.
#[derive(Deserialize)]
struct Target {
    name: String,
    kind: Vec<String>,
}

/// `cargo build --release -p chokepoint --bin chokepoint` in this checkout (cargo's progress and
/// diagnostics go to stderr); the path of the executable it built or found up to date. Uses the
/// cargo that runs this tool (`CARGO`, set by `cargo run`), else `cargo` on `PATH`.
pub(crate) fn build_chokepoint() -> Result<PathBuf, Error> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = workspace_root().join("Cargo.toml");
    eprintln!("loadbench: cargo build --release -p chokepoint --bin chokepoint");
    let mut cmd = Command::new(&cargo);
    // `cargo run` gives this process the variables it sets for a crate (CARGO_MANIFEST_DIR,
    // CARGO_PKG_…); passed on, they would look like a changed environment to build scripts
    // that watch them (ring's does), and chokepoint would be rebuilt whenever the tool was
    // started the other way (directly, or from a plain `cargo build --release`).
    for (name, _) in std::env::vars_os() {
        if name.to_str().is_some_and(set_by_cargo_run) {
            cmd.env_remove(name);
        }
    }
    let out = cmd
        .args([
            "build",
            "--release",
            "-p",
            "chokepoint",
            "--bin",
            "chokepoint",
            "--message-format=json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| Error::Build(format!("{} did not run: {e}", cargo.to_string_lossy())))?;
    if !out.status.success() {
        return Err(Error::Build(format!("cargo exited with {}", out.status)));
    }
    out.stdout
        .lines()
        .map_while(Result::ok)
        .filter_map(|line| serde_json::from_str::<Message>(&line).ok())
        .filter(|m| m.reason == "compiler-artifact")
        .filter(|m| {
            m.target
                .as_ref()
                .is_some_and(|t| t.name == "chokepoint" && t.kind.iter().any(|k| k == "bin"))
        })
        .find_map(|m| m.executable)
        .ok_or_else(|| Error::Build("cargo reported no chokepoint executable".into()))
}

/// Whether `name` is one of the variables cargo sets for the crate it runs or builds, rather
/// than one that configures cargo itself (`CARGO_HOME`, `CARGO_TARGET_DIR`, `CARGO_PROFILE_…`).
fn set_by_cargo_run(name: &str) -> bool {
    matches!(
        name,
        "CARGO_MANIFEST_DIR"
            | "CARGO_MANIFEST_PATH"
            | "CARGO_CRATE_NAME"
            | "CARGO_BIN_NAME"
            | "CARGO_PRIMARY_PACKAGE"
    ) || name.starts_with("CARGO_PKG_")
}
