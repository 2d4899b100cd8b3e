//! libFuzzer entry point of the `authority` target; the checks are in `fuzz/common/authority.rs`, which
//! `tests/fuzz_seeds.rs` also replays the committed seeds through.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/authority.rs"]
mod authority;

fuzz_target!(|s: &str| authority::run(s));
