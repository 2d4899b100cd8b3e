//! libFuzzer entry point of the `allowlist_diff` target; the checks are in `fuzz/common/allowlist_diff.rs`, which
//! `tests/fuzz_seeds.rs` also replays the committed seeds through.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/allowlist_diff.rs"]
mod allowlist_diff;

fuzz_target!(|input: allowlist_diff::Input| allowlist_diff::run(&input));
