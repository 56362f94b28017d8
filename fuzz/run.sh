#!/usr/bin/env bash
# Runs every fuzz target for FUZZ_SECONDS (default 60) on the committed
# corpus in fuzz/corpus/<target>, which the run grows: commit what it adds.
# Any crash (a panic, an abort, a timeout of 10 s on one input, more than
# 2 GiB of memory) fails the run and leaves the input in fuzz/artifacts.
#
#   bash fuzz/run.sh                  # all targets, 60 s each
#   FUZZ_SECONDS=600 bash fuzz/run.sh token
#   FUZZ_SANITIZER=address bash fuzz/run.sh   # with AddressSanitizer (slower)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
# cargo fuzz passes libFuzzer's instrumentation flags (-Z...) to rustc; this
# lets the machine's stable toolchain accept them.
export RUSTC_BOOTSTRAP=1

cargo fuzz build --sanitizer "$sanitizer"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
for target in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$target"
  printf '\n==> fuzz %s for %ss\n' "$target" "$seconds"
  cargo fuzz run --sanitizer "$sanitizer" "$target" "fuzz/corpus/$target" -- \
    -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
done
