//! Profiles of a measured window, when asked for: `perf record` of the proxy
//! (`LOAD_PERF_DIR`), or callgrind's counts of a proxy running under valgrind
//! (`LOAD_CALLGRIND_DIR`), zeroed when the window starts and dumped when it ends.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::{sleep, Instant};

use crate::proxy::Proxy;
use crate::settings::Settings;

/// What profiles a measured window: a `perf record` of the proxy into `LOAD_PERF_DIR/NAME.data`,
/// and/or callgrind's collection switched on in a proxy running under it; until [`stop_perf`].
pub(crate) struct Profiling {
    perf: Option<Child>,
    callgrind: Option<u32>,
}

/// Start profiling the window, when asked for (perf: software clock, so it works in VMs
/// without hardware counters).
pub(crate) fn start_perf(s: &Settings, proxy: Option<&Proxy>, name: &str) -> Profiling {
    let callgrind = match (&s.callgrind_dir, proxy) {
        (Some(_), Some(p)) => {
            callgrind_control(&["-z"], p.pid); // counts start from zero here
            Some(p.pid)
        }
        _ => None,
    };
    let perf = match (&s.perf_dir, proxy) {
        (Some(dir), Some(proxy)) => {
            let out = dir.join(format!("{name}.data"));
            let args = [
                "record",
                "-e",
                "cpu-clock",
                "-F",
                "999",
                "--call-graph",
                "dwarf",
            ];
            Command::new("perf")
                .args(args)
                .args(["-p", &proxy.pid.to_string(), "-o"])
                .arg(out)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| eprintln!("perf did not start: {e}"))
                .ok()
        }
        _ => None,
    };
    Profiling { perf, callgrind }
}

/// `callgrind_control ARGS PID`, bounded by the tool's own timeout handling.
fn callgrind_control(args: &[&str], pid: u32) {
    let status = Command::new("callgrind_control")
        .args(args)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        eprintln!("callgrind_control {args:?} {pid} failed: {status:?}");
    }
}

/// Stop profiling: dump callgrind's counts since the window started; stop `perf record`
/// (SIGINT makes it write its file) and wait for it, bounded; the wait is async so the load
/// winds down meanwhile.
pub(crate) async fn stop_perf(p: Profiling) {
    if let Some(pid) = p.callgrind {
        callgrind_control(&["-d"], pid);
    }
    let Some(mut perf) = p.perf else { return };
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(120);
    while matches!(perf.try_wait(), Ok(None)) && Instant::now() < deadline {
        sleep(Duration::from_millis(50)).await;
    }
    let _ = perf.kill();
    let _ = perf.wait();
}
