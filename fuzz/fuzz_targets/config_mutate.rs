//! libFuzzer entry point of the `config_mutate` target; the checks are in
//! `fuzz/common/config_mutate.rs` and `fuzz/common/config_check.rs`, which `tests/fuzz_seeds.rs`
//! also replays the committed seeds through.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/config_check.rs"]
mod config_check;
#[path = "../common/config_mutate.rs"]
mod config_mutate;

fuzz_target!(|input: config_mutate::Input| config_mutate::run(&input));
