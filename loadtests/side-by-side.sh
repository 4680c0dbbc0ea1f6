#!/usr/bin/env bash
# Side-by-side runner: the add model served five ways, measured in one run on this machine.
#   (a) modelgate (proxy + one replica)          (b) FastAPI + uvicorn, one worker
#   (c) the replica called directly over its socket (no proxy)
#   (d) a bare hyper server answering a fixed body: the HTTP floor
#   (e) hop-floor: bare hyper + the same replica over the same protocol and nothing else: the
#       floor of modelgate's design (HTTP plus one hop to a separate Python process)
# Every server is pinned to CPU 0 and the load generator to CPU 1. Each run is bounded
# (1 s warm-up + DURATION s) and targets 127.0.0.1 only. The peer's packages go into a
# throwaway virtualenv. Prints a table and the ratios. SPIN=1 makes the clients (loadgen and
# replica-direct) poll instead of sleeping between answers in the closed-loop runs (see
# docs/PERFORMANCE.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-5}
KEY=bench-add-key-0123456789abcdef
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
out=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$out"; }
trap cleanup EXIT
wait_up() { for _ in $(seq 1 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 did not come up" >&2; exit 1; }
load() { # name url conc [extra...]
  local name=$1 url=$2 c=$3; shift 3
  local spin=${SPIN:+--spin}
  [[ " $* " != *" --mode open "* ]] || spin=  # the open loop's pacer needs the CPU
  taskset -c 1 ./target/release/loadgen --url "$url" --access-key "$KEY" --expect 8 \
    --concurrency "$c" --warmup 1 --duration "$DURATION" --json $spin "$@" >"$out/$name.json"
}
field() { python3 -c "import json; r=json.load(open('$out/$1.json')); print(r$2)"; }
# open_rate NAME URL: 80 % of NAME's c=16 maximum with a client that sleeps, the open loop's kind
# (with SPIN=1 that takes one more c=16 run: a polling client's maximum would overload it).
open_rate() {
  local of=$1-c16
  [ -z "${SPIN:-}" ] || { of=$1-c16-sleeping; SPIN='' load "$of" "$2" 16; }
  python3 -c "print(int(0.8 * $(field "$of" "['achieved_rps']")))"
}

echo "== (d) bare hyper floor" >&2
taskset -c 0 ./target/release/floor --listen 127.0.0.1:18901 >/dev/null & pids+=($!)
wait_up http://127.0.0.1:18901/
load floor-c1 http://127.0.0.1:18901/model 1
load floor-c16 http://127.0.0.1:18901/model 16

echo "== (a) modelgate" >&2
taskset -c 0 ./target/release/modelgate serve --config loadtests/configs/add-1replica.toml >/dev/null 2>"$out/modelgate.log" & pids+=($!)
for _ in $(seq 1 600); do curl -sf http://127.0.0.1:18600/readyz >/dev/null && break; sleep 0.1; done
load mg-c1 http://127.0.0.1:18600/model 1
load mg-c16 http://127.0.0.1:18600/model 16
rate=$(open_rate mg http://127.0.0.1:18600/model)
load mg-open80 http://127.0.0.1:18600/model 1 --mode open --rate "$rate" --connections 32

echo "== (c) replica direct" >&2
taskset -c 1 ./target/release/replica-direct --runtime target/release/replica-runtime --runtime-cpu 0 \
  --warmup 1 --duration "$DURATION" ${SPIN:+--spin} >"$out/direct.json"

echo "== (e) hop-floor" >&2
taskset -c 0 ./target/release/hop-floor --listen 127.0.0.1:18903 >/dev/null & pids+=($!)
wait_up http://127.0.0.1:18903/
load hop-c1 http://127.0.0.1:18903/model 1
load hop-c16 http://127.0.0.1:18903/model 16
rate=$(open_rate hop http://127.0.0.1:18903/model)
load hop-open80 http://127.0.0.1:18903/model 1 --mode open --rate "$rate" --connections 32

echo "== (b) FastAPI + uvicorn (throwaway virtualenv)" >&2
venv=${VENV:-$out/venv}
[ -x "$venv/bin/uvicorn" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q fastapi 'uvicorn[standard]'; }
(cd loadtests/peers && MODEL_DIR="$PWD/../../examples/add_numbers" ACCESS_KEY=$KEY \
  exec taskset -c 0 "$venv/bin/uvicorn" fastapi_app:app --host 127.0.0.1 --port 18902 --workers 1 --log-level warning) & pids+=($!)
wait_up http://127.0.0.1:18902/docs
load fastapi-c1 http://127.0.0.1:18902/model 1
load fastapi-c16 http://127.0.0.1:18902/model 16

python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
r = {n[:-5]: json.load(open(os.path.join(d, n))) for n in os.listdir(d) if n.endswith(".json")}
rows = [("floor (bare hyper)", "floor-c1", "floor-c16"), ("modelgate", "mg-c1", "mg-c16"),
        ("FastAPI + uvicorn", "fastapi-c1", "fastapi-c16"), ("replica direct (no proxy)", "direct", None),
        ("hop-floor (HTTP + one hop)", "hop-c1", "hop-c16")]
print(f"{'server':28} {'c=1 req/s':>10} {'c=1 p50':>8} {'c=1 p99':>8} {'c=16 req/s':>11} {'c=16 p50':>9} {'c=16 p99':>9} {'errors':>7}")
for name, a, b in rows:
    A, B = r[a], r.get(b) if b else None
    errs = A["error_total"] + (B["error_total"] if B else 0)
    c16 = f"{B['achieved_rps']:>11.0f} {B['latency_us']['p50']:>7}us {B['latency_us']['p99']:>7}us" if B else f"{'-':>11} {'-':>9} {'-':>9}"
    print(f"{name:28} {A['achieved_rps']:>10.0f} {A['latency_us']['p50']:>6}us {A['latency_us']['p99']:>6}us {c16} {errs:>7}")
print()
for name, key in [("modelgate", "mg-open80"), ("hop-floor", "hop-open80")]:
    o = r[key]
    print(f"{name} open loop at {o['target_rps']:.0f} req/s (80% of its c=16 maximum, client sleeping): p50 {o['latency_us']['p50']}us p99 {o['latency_us']['p99']}us p99.9 {o['latency_us']['p99_9']}us errors {o['error_total']}")
mg, fa, fl, di = r["mg-c16"]["achieved_rps"], r["fastapi-c16"]["achieved_rps"], r["floor-c16"]["achieved_rps"], r["direct"]
print(f"throughput c=16: modelgate / FastAPI = {mg / fa:.1f}x (target >= 10x); modelgate / floor = {100 * mg / fl:.0f}% (target >= 40%)")
print(f"p50 c=1: modelgate {r['mg-c1']['latency_us']['p50']}us (target <= 100us); proxy share = modelgate - direct = {r['mg-c1']['latency_us']['p50'] - di['latency_us']['p50']}us (target <= 30us)")
hop = r["hop-c16"]["achieved_rps"]
print(f"what the design allows (hop-floor): {hop / fa:.1f}x FastAPI, {100 * hop / fl:.0f}% of the floor, c=1 p50 {r['hop-c1']['latency_us']['p50']}us, hop share = hop-floor - direct = {r['hop-c1']['latency_us']['p50'] - di['latency_us']['p50']}us")
print(f"modelgate / hop-floor: c=16 {mg / hop:.2f}, c=1 p50 {r['mg-c1']['latency_us']['p50'] / r['hop-c1']['latency_us']['p50']:.2f}")
PY
