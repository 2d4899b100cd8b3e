#!/usr/bin/env bash
# Bounded libFuzzer smoke, run before a release (not in .ci/run, which replays the seeds through
# the same checks in `cargo test --test fuzz_seeds`): build every target, run each from its
# committed seeds for FUZZ_SECONDS (default 20) on one job. A crash fails the script; its input
# is left in fuzz/artifacts/<target>/ (the script prints the path and the reproducing command).
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-20}"

# libFuzzer needs -Zsanitizer; on a stable toolchain that takes RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

# Every [[bin]] of fuzz/Cargo.toml, so a new target cannot be left out.
mapfile -t targets < <(cargo fuzz list)
if [ ${#targets[@]} -eq 0 ]; then
  echo "fuzz smoke: cargo fuzz list names no target" >&2
  exit 1
fi

start=$(date +%s)
# A dev build (fuzz/Cargo.toml: opt-level 1; debug assertions, overflow checks, AddressSanitizer):
# a cold release build of chokepoint's dependency tree with cargo-fuzz's codegen-units=1 took
# about twice as long. Long campaigns use the default (release) build.
profile=(--dev)
cargo fuzz build "${profile[@]}"
built=$(date +%s)
echo "fuzz smoke: built in $((built - start)) s"

for t in "${targets[@]}"; do
  # A scratch corpus so the committed seeds stay as they are. One in-process job (no -jobs):
  # the stats land in the log read below.
  corpus="target/smoke-corpus/$t"
  rm -rf "$corpus" && mkdir -p "$corpus" "artifacts/$t"
  echo "fuzz smoke: $t for ${seconds} s"
  log="target/smoke-$t.log"
  rc=0
  cargo fuzz run "${profile[@]}" "$t" "$corpus" "seeds/$t" -- \
    -max_total_time="$seconds" -print_final_stats=1 \
    -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1 || rc=$?
  grep -E '^(stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added)' "$log" || true
  if [ "$rc" -ne 0 ]; then
    tail -n 60 "$log" >&2
    echo "fuzz smoke: $t FAILED (exit $rc); reproduce with: cargo fuzz run $t fuzz/artifacts/$t/<file>" >&2
    exit 1
  fi
done
echo "fuzz smoke: done in $(( $(date +%s) - start )) s"
