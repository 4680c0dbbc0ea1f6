#!/usr/bin/env bash
# Runs every fuzz target for SECONDS (default 60) each, with libFuzzer under AddressSanitizer
# (nightly Rust and cargo-fuzz: `cargo +nightly install cargo-fuzz`). New inputs go to
# fuzz/work/<target> (not committed); the committed seeds in fuzz/corpus/<target> are what CI
# replays (`cargo test -p modelgate --test fuzz_corpus`). A crash leaves its input in
# fuzz/artifacts/<target>/ and fails the run. Bounded: targets x SECONDS, plus build time.
set -euo pipefail
cd "$(dirname "$0")"
secs=${SECONDS_PER_TARGET:-60}
# json_python embeds CPython: it needs libpython at run time, and CPython's allocations that
# live until exit are not leaks to report.
LD_LIBRARY_PATH="$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=0}
for target in ${TARGETS:-envelope api_key config archive json_python}; do
  mkdir -p "work/$target"
  echo "== $target ($secs s)"
  cargo +nightly fuzz run "$target" "work/$target" "corpus/$target" -- \
    -max_total_time="$secs" -timeout=5 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>&1 \
    | grep -E "^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)|ERROR|panicked|SUMMARY" || true
  if [ -n "$(ls -A "artifacts/$target" 2>/dev/null)" ]; then
    echo "$target: crash inputs in fuzz/artifacts/$target"; exit 1
  fi
done
