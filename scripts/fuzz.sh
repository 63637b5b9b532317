#!/usr/bin/env bash
# Fuzzes the Debezium decoder with cargo-fuzz (libFuzzer) for SECONDS (default 60), seeded
# with the fixture corpus. cargo-fuzz needs -Z flags: RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them (fuzzing only; the daemon is built without it).
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
SECONDS_TO_RUN=${1:-60}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cd "$REPO/fuzz"
mkdir -p corpus/decode
for f in "$REPO"/tests/fixtures/debezium/*.json; do
  seed="corpus/decode/seed-$(basename "$f")"
  [ -f "$seed" ] || { printf '\000' > "$seed"; cat "$f" >> "$seed"; }
done
export RUSTC_BOOTSTRAP=1
# Our rustc wrapper is for the daemon's build only.
export RUSTC_WRAPPER=
cargo fuzz run decode corpus/decode -- -max_total_time="$SECONDS_TO_RUN" -max_len=65536 -print_final_stats=1
