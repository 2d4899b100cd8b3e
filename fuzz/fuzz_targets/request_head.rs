//! libFuzzer entry point of the `request_head` target; the checks are in `fuzz/common/request_head.rs`, which
//! `tests/fuzz_seeds.rs` also replays the committed seeds through.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/request_head.rs"]
mod request_head;

fuzz_target!(|data: &[u8]| request_head::run(data));
