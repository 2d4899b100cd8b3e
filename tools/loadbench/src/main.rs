//! chokepoint's load tool. Question: what does the gateway cost as a real process under load —
//! CPU per forwarded request, per request inside a tunnel, per new tunnel, per GiB tunnelled,
//! memory per idle tunnel — and how close does it get to the same load sent straight to the
//! origin? These are the issue-6 targets.
//!
//! The release binary (built here first, `cargo build --release -p chokepoint`) runs with a
//! generated config as in production: audit on (stdout to a file), one agent whose policy has
//! 1,000 allow rules, limits too high to interfere. The origin and the load client are in this
//! process, written on raw tokio sockets (HTTP/1.1, `Content-Length` bodies only). With 2+ cores
//! the proxy is pinned to CPU 0 and this process to CPU 1.
//!
//! Every byte stays on 127.0.0.0/8: the origin binds 127.0.0.1, `origin.test` is a static host,
//! and the proxy's nameserver is 127.0.0.1:9 (never asked). Every loop is bounded by a deadline
//! or a count, every socket operation by a timeout.
//!
//! Peers: when `squid` or `traffic_server` is on `PATH`, the selected scenarios run again
//! through each, after chokepoint's, with the same load code; i and j through Squid with
//! ssl-bump, when it is built with OpenSSL (see [`peers`]).
//!
//! Usage and the `LOAD_…` settings: `tools/loadbench/README.md`.
//!
//! Modules, in the order a run uses them:
//!
//! | module | what |
//! | --- | --- |
//! | [`settings`] | the `LOAD_…` environment, after what the machine allows |
//! | [`binary`] | builds the release `chokepoint` and finds it |
//! | [`machine`] | pinning, the open-file limit, CPU and memory from `/proc` |
//! | [`http`] | one HTTP/1.1 connection (either side) and the requests sent |
//! | [`origin`] | the keep-alive origin on 127.0.0.1 |
//! | [`proxy`] | the chokepoint process, its config and its audit log |
//! | [`peers`] | Squid and Traffic Server, configured and started the same way |
//! | [`client`] | the load: closed loops, 1 GiB transfers, idle tunnels |
//! | [`store`] | scenario r's `redis-server`, its CPU and `INFO commandstats` over a window |
//! | [`profile`] | `perf record` / callgrind over a measured window |
//! | [`scenarios`] | a to e, i, j and r, each run without and through the proxy, and the checks |
//! | [`report`] | the tables, the issue-6 checks, the notes; [`report::json`] writes `LOAD_JSON` |

mod binary;
mod client;
mod error;
mod http;
mod machine;
mod origin;
mod peers;
mod profile;
mod proxy;
mod report;
mod scenarios;
mod settings;
mod store;
mod tls;

use std::process::ExitCode;

use error::Error;
use settings::Settings;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadbench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let mut notes = Vec::new();
    // Before pinning: the build gets every core, and this process has no threads yet.
    let chokepoint = binary::build_chokepoint()?;
    if cfg!(debug_assertions) {
        notes.push(
            "loadbench itself was built without --release: its load client is slow, the \
             figures are not comparable"
                .to_string(),
        );
    }
    // Before pinning, which leaves this process one CPU.
    let nproc = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = machine::pin_self(nproc, &mut notes);
    let nofile = machine::raise_nofile(&mut notes);
    let settings = Settings::from_env(chokepoint, nproc, pinned, nofile, &mut notes)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "build a tokio runtime".into(),
            source,
        })?;
    let report = rt.block_on(scenarios::run(&settings))?;
    report.print(&settings, &notes);
    match report.write_json(&settings, &notes) {
        Ok(()) => println!("\nresults as JSON: {}", settings.json.display()),
        Err(e) => eprintln!("could not write {}: {e}", settings.json.display()),
    }
    Ok(())
}
