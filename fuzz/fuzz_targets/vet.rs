//! libFuzzer entry point of the `vet` target; the checks are in `fuzz/common/vet.rs`, which
//! `tests/fuzz_seeds.rs` also replays the committed seeds through.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/vet.rs"]
mod vet;

fuzz_target!(|input: vet::Input| vet::run(&input));
