#!/usr/bin/env bash
# Open-loop tail latency (fixed arrival rate, latency from each request's intended send time), the
# add model with one replica, servers on CPU 0, loadgen on CPU 1, 127.0.0.1 only:
#   1. modelgate's maximum: closed loop at c=16 for DURATION s;
#   2. the bare hyper floor's maximum the same way;
#   3. ROUNDS rounds, each: modelgate open loop at each of PCTS per cent of its maximum (default
#      "50 80"); the floor open loop at modelgate's 80 % rate (under half of what the floor can
#      do), which shows this machine's own stalls with no proxy and no replica in the way; and
#      the floor at 80 % of its own maximum, the same load relative to what it can do.
# SPIN=1 makes every client poll instead of sleeping (loadgen --spin), maxima included. The
# client is `loadgen --raw` (RAW=0: hyper's client; lib.sh's `loadgen_client`).
# Bounded: (2 + ROUNDS x (PCTS + 2)) runs of 0.5 + DURATION s (defaults: ROUNDS=3, DURATION=5).
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
raw=$(loadgen_client)
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
work=$(mktemp -d)
add_config "$work/c.toml" 18660 "$work/data" open-loop-key-0123456789
taskset -c 0 ./target/release/modelgate serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
server=$!
taskset -c 0 ./target/release/floor --listen 127.0.0.1:18661 >/dev/null &
floor=$!
trap 'kill -INT $server; kill $floor; wait; rm -rf "$work"' EXIT
wait_ready 18660 "$work/log"
D=${DURATION:-5}
ROUNDS=${ROUNDS:-3}
load() { # url, loadgen arguments...
  local url=$1; shift
  bench_load --url "$url" --access-key open-loop-key-0123456789 --expect 8 \
    --warmup 0.5 --duration "$D" ${SPIN:+--spin} $raw "$@"
}
rps() { python3 -c "import json,sys; print(int(json.load(sys.stdin)['achieved_rps']))"; }
max=$(load http://127.0.0.1:18660/model --concurrency 16 | rps)
echo "modelgate closed loop c=16: $max req/s" >&2
floor_max=$(load http://127.0.0.1:18661/model --concurrency 16 | rps)
echo "floor closed loop c=16: $floor_max req/s" >&2
for round in $(seq 1 "$ROUNDS"); do
  for pct in ${PCTS:-50 80}; do
    rate=$((max * pct / 100))
    printf 'modelgate %s%%\t' "$pct"
    load http://127.0.0.1:18660/model --mode open --rate "$rate" --connections 32
  done
  printf 'floor at modelgate 80%%\t'
  load http://127.0.0.1:18661/model --mode open --rate $((max * 80 / 100)) --connections 32
  printf 'floor 80%%\t'
  load http://127.0.0.1:18661/model --mode open --rate $((floor_max * 80 / 100)) --connections 32
done | tee "$work/runs" >&2
python3 - "$work/runs" "$max" "$floor_max" "${SPIN:+polling}" <<'PY'
import json, sys
client = sys.argv[4] or "sleeping"
print(f"maxima (closed loop, c=16, client {client}): modelgate {int(sys.argv[2]):,} req/s, floor {int(sys.argv[3]):,} req/s\n")
print("| run | rate | achieved | p50 | p99 | p99.9 | max | slowest 100 ms windows (ms into the run: max) | errors |")
print("|---|---|---|---|---|---|---|---|---|")
fmt = lambda us: f"{us / 1000:.2f} ms" if us >= 1000 else f"{us} µs"
windows = lambda r: ", ".join(f"{w['at_ms']}: {fmt(w['max_us'])}" for w in r["worst_windows"][:3])
for line in open(sys.argv[1]):
    label, j = line.rstrip("\n").split("\t", 1)
    r = json.loads(j)
    l = r["latency_us"]
    print(f"| {label} | {r['target_rps']:,.0f} | {r['achieved_rps']:,.0f} | {fmt(l['p50'])} | {fmt(l['p99'])} "
          f"| {fmt(l['p99_9'])} | {fmt(l['max'])} "
          f"| {windows(r)} "
          f"| {r['error_total']} of {r['sent']:,} |")
PY
