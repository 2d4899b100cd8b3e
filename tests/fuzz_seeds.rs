//! The fuzz targets' committed seeds, replayed as ordinary tests.
//!
//! Each libFuzzer target in `fuzz/fuzz_targets/` is a thin wrapper around a function in
//! `fuzz/common/`; this file includes the same modules and runs every file in
//! `fuzz/seeds/<target>/` through that function, decoded the way `libfuzzer-sys` decodes it
//! (`arbitrary`'s `arbitrary_take_rest`, after the same minimum-size check). So the fuzzers'
//! invariants are checked on every `cargo test`, on a stable toolchain and without
//! AddressSanitizer; the libFuzzer campaign itself is `bash fuzz/smoke.sh` (fuzz/README.md).
//!
//! `every_target_has_seeds_and_a_replay` fails when a target is added without seeds or without a
//! line in `targets!` below.

#![allow(clippy::unwrap_used, clippy::expect_used)] // the fuzz checks' oracle is a panic

use std::collections::BTreeSet;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use arbitrary::{Arbitrary, Unstructured};

#[path = "../fuzz/common/allowlist_diff.rs"]
mod allowlist_diff;
#[path = "../fuzz/common/authority.rs"]
mod authority;
#[path = "../fuzz/common/config_check.rs"]
mod config_check;
#[path = "../fuzz/common/config_mutate.rs"]
mod config_mutate;
#[path = "../fuzz/common/request_head.rs"]
mod request_head;
#[path = "../fuzz/common/sni.rs"]
mod sni;
#[path = "../fuzz/common/vet.rs"]
mod vet;

/// One test per target (`seeds::<target>`), and `TARGETS` naming them all, from one list so the
/// two cannot drift apart. Each entry: the target's name, and how one seed's bytes are checked
/// (`None`: the bytes do not decode into the target's input, so the seed tests nothing).
macro_rules! targets {
    ($($name:ident => $replay:expr,)*) => {
        /// Every target this file replays.
        const TARGETS: &[&str] = &[$(stringify!($name)),*];

        mod seeds {
            use super::*;
            $(
                #[test]
                fn $name() {
                    super::replay(stringify!($name), $replay);
                }
            )*
        }
    };
}

targets! {
    allowlist_diff => |b| decode(b).map(|i| allowlist_diff::run(&i)),
    authority => |b| decode(b).map(authority::run),
    config => |b| decode(b).map(config_check::load_and_check),
    config_mutate => |b| decode(b).map(|i| config_mutate::run(&i)),
    request_head => |b| {
        request_head::run(b);
        Some(())
    },
    sni => |b| {
        sni::run(b);
        Some(())
    },
    vet => |b| decode(b).map(|i| vet::run(&i)),
}

/// The fuzz target's typed input, as `libfuzzer-sys`'s `fuzz_target!` builds it: inputs shorter
/// than the type's minimum size are rejected, the rest go through `arbitrary_take_rest`.
fn decode<'a, T: Arbitrary<'a>>(bytes: &'a [u8]) -> Option<T> {
    if bytes.len() < T::size_hint(0).0 {
        return None;
    }
    T::arbitrary_take_rest(Unstructured::new(bytes)).ok()
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The names in `dir` (file stems when `ext` is given, else directory names), sorted.
fn names(dir: &Path, ext: Option<&str>) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| match ext {
            Some(ext) => p.extension().is_some_and(|e| e == ext),
            None => p.is_dir(),
        })
        .map(|p| {
            let name = if ext.is_some() {
                p.file_stem()
            } else {
                p.file_name()
            };
            name.expect("named entry").to_string_lossy().into_owned()
        })
        .collect()
}

/// Run every seed of `target` through `check`; fail on an empty seed directory, on a seed that
/// does not decode, and on any seed whose check panics (all of them named, not just the first).
fn replay(target: &str, check: impl Fn(&[u8]) -> Option<()>) {
    let dir = fuzz_dir().join("seeds").join(target);
    let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{}: no seeds", dir.display());

    let mut failed = Vec::new();
    for seed in &seeds {
        let bytes = std::fs::read(seed).unwrap_or_else(|e| panic!("{}: {e}", seed.display()));
        match panic::catch_unwind(AssertUnwindSafe(|| check(&bytes))) {
            Ok(Some(())) => {}
            Ok(None) => failed.push(format!("{}: does not decode", seed.display())),
            Err(_) => failed.push(format!(
                "{}: check panicked (message above)",
                seed.display()
            )),
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} seeds failed:\n{}",
        failed.len(),
        seeds.len(),
        failed.join("\n")
    );
}

#[test]
fn every_target_has_seeds_and_a_replay() {
    let fuzz = fuzz_dir();
    let targets = names(&fuzz.join("fuzz_targets"), Some("rs"));
    let seeded = names(&fuzz.join("seeds"), None);
    let replayed: BTreeSet<String> = TARGETS.iter().map(|t| (*t).to_owned()).collect();
    assert!(!targets.is_empty(), "no fuzz targets found");
    assert_eq!(
        targets, replayed,
        "fuzz/fuzz_targets/*.rs and the targets replayed here (targets! in tests/fuzz_seeds.rs)"
    );
    assert_eq!(
        targets, seeded,
        "fuzz/fuzz_targets/*.rs and the seed directories fuzz/seeds/*/"
    );
    // Every target is a [[bin]] of the fuzz crate, so `cargo fuzz build` builds it.
    let manifest: toml::Table = std::fs::read_to_string(fuzz.join("Cargo.toml"))
        .expect("fuzz/Cargo.toml")
        .parse()
        .expect("fuzz/Cargo.toml is TOML");
    let bins: BTreeSet<String> = manifest["bin"]
        .as_array()
        .expect("[[bin]] tables")
        .iter()
        .map(|b| b["path"].as_str().expect("[[bin]] path").to_owned())
        .collect();
    let want: BTreeSet<String> = targets
        .iter()
        .map(|t| format!("fuzz_targets/{t}.rs"))
        .collect();
    assert_eq!(bins, want, "fuzz/Cargo.toml's [[bin]] paths");
}
