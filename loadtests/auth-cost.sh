#!/usr/bin/env bash
# What API key authentication adds to a prediction, end to end: one modelgate serving the same add
# function as two models, one with enable_authentication on and one with it off, loaded in
# alternation (off, on, off, on, ...) so both see the same machine; run-to-run noise here is about
# +-15 us at p50, so the summary is the median over ROUNDS rounds. modelgate and its replicas are
# pinned to CPU 0, loadgen to CPU 1. Bounded: 4 x ROUNDS (default 6) runs of 0.5 s warm-up +
# DURATION s (default 3), against 127.0.0.1 only. MG=/path/to/modelgate measures that build.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
work=$(mktemp -d)
{
  printf '[server]\nlisten = "127.0.0.1:18610"\ndata_dir = "data"\n'
  model_toml add-open bench-open-key-0123456789abcdef false
  model_toml add-auth bench-auth-key-0123456789abcdef true
} >"$work/c.toml"
taskset -c 0 "${MG:-./target/release/modelgate}" serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
server=$!
trap 'kill -INT $server; wait $server; rm -rf "$work"' EXIT
wait_ready 18610 "$work/log"
export MODELGATE_API_KEY
MODELGATE_API_KEY=$(cat "$work/data/admin-api-key")
for round in $(seq 1 "${ROUNDS:-6}"); do
  for c in 1 16; do
    for model in open auth; do
      printf '%s %s ' "$model" "$c"
      bench_load --url http://127.0.0.1:18610/model \
        --access-key "bench-$model-key-0123456789abcdef" --expect 8 --concurrency "$c" \
        --warmup 0.5 --duration "${DURATION:-3}"
    done
  done
done | tee "$work/runs" >&2
python3 - "$work/runs" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    model, c, j = line.split(" ", 2)
    runs.setdefault((int(c), model), []).append(json.loads(j))
print("| concurrency | authentication | median req/s | median p50 | median p99 | errors |")
print("|---|---|---|---|---|---|")
for (c, model), rs in sorted(runs.items()):
    med = lambda f: statistics.median(f(r) for r in rs)
    print(f"| {c} | {'on' if model == 'auth' else 'off'} | {med(lambda r: r['achieved_rps']):,.0f} "
          f"| {med(lambda r: r['latency_us']['p50']):.0f} us | {med(lambda r: r['latency_us']['p99']):.0f} us "
          f"| {sum(r['error_total'] for r in rs)} of {sum(r['sent'] for r in rs):,} |")
PY
