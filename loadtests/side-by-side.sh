#!/usr/bin/env bash
# Side-by-side runner: the add model served five ways, measured in one run on this machine.
#   (a) modelgate (proxy + one replica)          (b) FastAPI + uvicorn, one worker
#   (c) the replica called directly over its socket (no proxy)
#   (d) a bare hyper server answering a fixed body: the HTTP floor
#   (e) hop-floor --batch 16: bare hyper + the same replica over the same protocol, the requests
#       already waiting written together as modelgate's dispatcher does, and nothing else: the
#       floor of modelgate's design (HTTP plus one hop to a separate Python process). HOP_ARGS
#       replaces `--batch 16` (HOP_ARGS= for one request at a time).
# Every server is pinned to CPU 0 and the load generator to CPU 1. Each run is bounded
# (1 s warm-up + DURATION s) and targets 127.0.0.1 only. The peer's packages go into a
# throwaway virtualenv. Prints a table and the ratios. SPIN=1 makes the clients (loadgen and
# replica-direct) poll instead of sleeping between answers, in the open loop too (see
# docs/PERFORMANCE.md). ROUNDS=N (default 1) measures every server N times, round by round, and
# prints medians and each round's ratios: this machine's run-to-run noise is larger than some of
# the differences the targets ask about. The open loops run after every round's closed loops, at
# 80 % of each server's median c=16 rate, and the bare floor runs an open loop at modelgate's
# rate: the tail this host gives a server that forwards nothing, at the same load (a host that
# stalls its vCPU for milliseconds puts every server's p99 over 1 ms). All four servers run for
# the whole run; each sits idle while another is measured. MG=/path/to/modelgate measures that
# build instead (e.g. the profile-guided one of loadtests/pgo-build.sh); hop-floor and the direct
# replica then run the replica-runtime beside it, as modelgate does. FLOORS=DIR takes `floor` and
# `hop-floor` from DIR (FLOORS=target/pgo/release: the profile-guided ones of `FLOORS=1
# loadtests/pgo-build.sh`). The client is `loadgen --raw` (RAW=0: hyper's client; lib.sh's
# `loadgen_client`). Bounded: ROUNDS x about 13 runs of 1 + DURATION s.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
DURATION=${DURATION:-5}
ROUNDS=${ROUNDS:-1}
KEY=bench-add-key-0123456789abcdef
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
mg=${MG:-./target/release/modelgate}
# The runtime modelgate runs: the one beside it, else this tree's.
rt=$(dirname "$mg")/replica-runtime
[ -x "$rt" ] || rt=./target/release/replica-runtime
floors=${FLOORS:-./target/release}
raw=$(loadgen_client)
out=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$out"; }
trap cleanup EXIT
wait_up() { for _ in $(seq 1 600); do curl -s -o /dev/null "$1" && return 0; sleep 0.1; done; echo "$1 did not come up" >&2; exit 1; }
load() { # name url conc [extra...]
  local name=$1 url=$2 c=$3; shift 3
  taskset -c 1 ./target/release/loadgen --url "$url" --access-key "$KEY" --expect 8 \
    --concurrency "$c" --warmup 1 --duration "$DURATION" --json ${SPIN:+--spin} $raw "$@" >"$out/$name.json"
}
# open_rate NAME: 80 % of NAME's c=16 maximum, the median of every round's, with the same kind of
# client. (One round's maximum can come from a lucky spell the open loop then cannot keep up with.)
open_rate() {
  python3 -c "import statistics, sys; sys.path.insert(0, 'loadtests'); import rounds
print(int(0.8 * statistics.median(r['achieved_rps'] for r in rounds.load('$out')['$1-c16'].values())))"
}

echo "== starting: (d) bare hyper floor, (a) modelgate, (e) hop-floor, (b) FastAPI + uvicorn" >&2
taskset -c 0 "$floors/floor" --listen 127.0.0.1:18901 >/dev/null & pids+=($!)
taskset -c 0 "$mg" serve --config loadtests/configs/add-1replica.toml >/dev/null 2>"$out/modelgate.log" & pids+=($!)
# shellcheck disable=SC2086 # HOP_ARGS is a list of arguments
taskset -c 0 "$floors/hop-floor" --runtime "$rt" --listen 127.0.0.1:18903 ${HOP_ARGS---batch 16} >/dev/null & pids+=($!)
venv=${VENV:-$out/venv}
[ -x "$venv/bin/uvicorn" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install -q fastapi 'uvicorn[standard]'; }
(cd loadtests/peers && MODEL_DIR="$PWD/../../examples/add_numbers" ACCESS_KEY=$KEY \
  exec taskset -c 0 "$venv/bin/uvicorn" fastapi_app:app --host 127.0.0.1 --port 18902 --workers 1 --log-level warning) & pids+=($!)
wait_up http://127.0.0.1:18901/
for _ in $(seq 1 600); do curl -sf http://127.0.0.1:18600/readyz >/dev/null && break; sleep 0.1; done
wait_up http://127.0.0.1:18903/
wait_up http://127.0.0.1:18902/docs

# Each round measures every server in turn; the others sit idle in the meantime.
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS" >&2
  load "floor-c1-r$round" http://127.0.0.1:18901/model 1
  load "floor-c16-r$round" http://127.0.0.1:18901/model 16
  for s in mg:18600 hop:18903; do
    name=${s%:*} url=http://127.0.0.1:${s#*:}/model
    load "$name-c1-r$round" "$url" 1
    load "$name-c16-r$round" "$url" 16
  done
  taskset -c 1 ./target/release/replica-direct --runtime "$rt" --runtime-cpu 0 \
    --warmup 1 --duration "$DURATION" ${SPIN:+--spin} >"$out/direct-r$round.json"
  load "fastapi-c1-r$round" http://127.0.0.1:18902/model 1
  load "fastapi-c16-r$round" http://127.0.0.1:18902/model 16
done
# Then the open loops, as many rounds, at 80 % of each server's median maximum.
mg_rate=$(open_rate mg)
hop_rate=$(open_rate hop)
for round in $(seq 1 "$ROUNDS"); do
  echo "== open loop, round $round of $ROUNDS" >&2
  load "mg-open80-r$round" http://127.0.0.1:18600/model 1 --mode open --rate "$mg_rate" --connections 32
  load "hop-open80-r$round" http://127.0.0.1:18903/model 1 --mode open --rate "$hop_rate" --connections 32
  load "floor-openmg-r$round" http://127.0.0.1:18901/model 1 --mode open --rate "$mg_rate" --connections 32
done

echo "modelgate: $mg; replica-runtime: $rt; floors: $floors; client: loadgen ${raw:-(hyper)}"
python3 - "$out" <<'PY'
import os, statistics, sys
sys.path.insert(0, "loadtests")
import rounds as rounds_lib
runs = rounds_lib.load(sys.argv[1])
rounds = sorted(runs["mg-c16"])
med = lambda key, f: statistics.median(f(runs[key][i]) for i in rounds)
rps = lambda r: r["achieved_rps"]
q = lambda name: (lambda r: r["latency_us"][name])
errors = sum(r["error_total"] for per in runs.values() for r in per.values())
print(f"medians of {len(rounds)} round(s); errors in all runs: {errors}")
rows = [("floor (bare hyper)", "floor-c1", "floor-c16"), ("modelgate", "mg-c1", "mg-c16"),
        ("FastAPI + uvicorn", "fastapi-c1", "fastapi-c16"), ("replica direct (no proxy)", "direct", None),
        ("hop-floor (HTTP + one hop)", "hop-c1", "hop-c16")]
print(f"{'server':28} {'c=1 req/s':>10} {'c=1 p50':>8} {'c=1 p99':>8} {'c=16 req/s':>11} {'c=16 p50':>9} {'c=16 p99':>9}")
for name, a, b in rows:
    c16 = f"{med(b, rps):>11.0f} {med(b, q('p50')):>7.0f}us {med(b, q('p99')):>7.0f}us" if b else f"{'-':>11} {'-':>9} {'-':>9}"
    print(f"{name:28} {med(a, rps):>10.0f} {med(a, q('p50')):>6.0f}us {med(a, q('p99')):>6.0f}us {c16}")
print()
for name, key, what in [("modelgate", "mg-open80", "80% of its"), ("hop-floor", "hop-open80", "80% of its"),
                        ("floor (bare hyper)", "floor-openmg", "80% of modelgate's")]:
    print(f"{name} open loop at {what} median c=16 rate (client {'polling' if os.environ.get('SPIN') else 'sleeping'}), median of rounds: rate {med(key, lambda r: r['target_rps']):.0f} req/s, "
          f"p50 {med(key, q('p50')):.0f}us p99 {med(key, q('p99')):.0f}us p99.9 {med(key, q('p99_9')):.0f}us")
def ratio(a, b, f=rps):
    per = [f(runs[a][i]) / f(runs[b][i]) for i in rounds]
    each = ", ".join(f"{x:.2f}" for x in per) if len(per) > 1 else ""
    return statistics.median(per), f" (per round: {each})" if each else ""
share = lambda a: [runs[f"{a}-c1"][i]["latency_us"]["p50"] - runs["direct"][i]["latency_us"]["p50"] for i in rounds]
x, each = ratio("mg-c16", "fastapi-c16"); print(f"throughput c=16: modelgate / FastAPI = {x:.1f}x{each} (target >= 10x)")
x, each = ratio("mg-c16", "floor-c16"); print(f"throughput c=16: modelgate / floor = {100 * x:.0f}%{each} (target >= 40%)")
# How much room this run leaves: what share of a bare hyper server 10x FastAPI asks for.
x, each = ratio("floor-c16", "fastapi-c16")
print(f"the hyper floor's ratio in this run: floor / FastAPI = {x:.1f}x{each}; 10x FastAPI asks for {100 * 10 / x:.0f}% of the floor")
print(f"p50 c=1: modelgate {med('mg-c1', q('p50')):.0f}us (target <= 100us); proxy share = modelgate - direct = {statistics.median(share('mg')):.0f}us (target <= 30us)")
x, _ = ratio("hop-c16", "fastapi-c16"); y, each = ratio("hop-c16", "floor-c16")
print(f"what the design allows (hop-floor): {x:.1f}x FastAPI, {100 * y:.0f}% of the floor{each}, c=1 p50 {med('hop-c1', q('p50')):.0f}us, hop share = hop-floor - direct = {statistics.median(share('hop')):.0f}us")
x, each = ratio("mg-c16", "hop-c16"); y, _ = ratio("mg-c1", "hop-c1", q("p50"))
print(f"modelgate / hop-floor: c=16 {x:.2f}{each}, c=1 p50 {y:.2f}")
PY
