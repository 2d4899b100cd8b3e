//! Arbitrary text as a config file, through the loader (`config::parse`).
//!
//! Never panics; a syntax or shape error names a line (within the file), a column and a
//! message (toml's, which names the key for unknown, missing and mistyped keys); every semantic
//! issue and warning names a line and column within the file and a non-empty key; a loaded
//! config holds only rules, ranges and limits the loader's own checks accept.
//! Inputs whose `token_file` points outside the (empty) config directory are skipped.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../common/config_check.rs"]
mod config_check;

fuzz_target!(|src: &str| {
    config_check::load_and_check(src);
});
