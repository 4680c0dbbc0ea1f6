#!/usr/bin/env bash
# What a cgroup per replica costs: two modelgate instances side by side on CPU 0, the same add
# model, one with `replica_limits = "auto"` (a cgroup per replica where the machine allows it) and
# one with `"rlimit"`; loadgen on CPU 1 alternates between them, c=1 and c=16, ROUNDS rounds
# (default 3) of DURATION s (default 3). Bounded: ROUNDS x 4 runs of 0.5 + DURATION s.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
work=$(mktemp -d)
for mode in auto rlimit; do
  port=$([ "$mode" = auto ] && echo 18680 || echo 18681)
  cat > "$work/$mode.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
data_dir = "$work/data-$mode"
replica_limits = "$mode"
[[models]]
name = "add"
path = "$PWD/examples/add_numbers"
file = "add_numbers.py"
function = "add"
access_key = "limits-cost-key-0123456789"
enable_authentication = false
EOF
  taskset -c 0 ./target/release/modelgate serve --config "$work/$mode.toml" >/dev/null 2>"$work/$mode.log" &
done
trap 'kill -INT $(jobs -p); wait; rm -rf "$work"' EXIT
wait_ready 18680 "$work/auto.log"
wait_ready 18681 "$work/rlimit.log"
grep -ho 'replica limits use [a-z0-9 ]*' "$work/auto.log" | head -1 >&2 || true
D=${DURATION:-3}
for _ in $(seq 1 "${ROUNDS:-3}"); do
  for mode in auto rlimit; do
    port=$([ "$mode" = auto ] && echo 18680 || echo 18681)
    for c in 1 16; do
      printf '%s\t%s\t' "$mode" "$c"
      bench_load --url "http://127.0.0.1:$port/model" --access-key limits-cost-key-0123456789 \
        --expect 8 --concurrency "$c" --warmup 0.5 --duration "$D"
    done
  done
done | tee "$work/runs" >&2
python3 - "$work/runs" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    mode, c, j = line.rstrip("\n").split("\t", 2)
    r = json.loads(j)
    assert r["error_total"] == 0, line
    runs.setdefault((mode, int(c)), []).append((r["achieved_rps"], r["latency_us"]["p50"]))
print("| | cgroup (auto) req/s, p50 | RLIMIT_AS req/s, p50 | ratio of medians |")
print("|---|---|---|---|")
for c in (1, 16):
    cells = []
    for mode in ("auto", "rlimit"):
        rs = sorted(runs[(mode, c)])
        cells.append(" · ".join(f"{rps:,.0f} ({p50} µs)" for rps, p50 in rs))
    a = statistics.median(r for r, _ in runs[("auto", c)])
    b = statistics.median(r for r, _ in runs[("rlimit", c)])
    print(f"| c={c} | {cells[0]} | {cells[1]} | {a / b:.2f} |")
PY
