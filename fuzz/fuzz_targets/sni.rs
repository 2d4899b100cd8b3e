//! libFuzzer entry point of the `sni` target; the checks are in `fuzz/common/sni.rs`, which
//! `tests/fuzz_seeds.rs` also replays the committed seeds through.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/sni.rs"]
mod sni;

fuzz_target!(|data: &[u8]| sni::run(data));
