#!/usr/bin/env bash
# How close modelgate comes to the floor of its own design: one run, rounds alternating
#   mg     modelgate with the add model and one replica;
#   hop    hop-floor: bare hyper + the same replica-runtime over the same protocol, one request at
#          a time, and nothing else (no routing, auth, limits, timeouts, metrics, supervision);
#   hopb   hop-floor --batch 16: the requests already waiting written together, as modelgate's
#          dispatcher does (the floor of modelgate's design as it is now);
#   floor  bare hyper answering a fixed body (HTTP alone).
# Servers (and their replicas) on CPU 0, loadgen on CPU 1, 127.0.0.1 only. Each round measures
# every server at c=1, c=16, and open loop at 80 % of the rate it reached at c=16 in that round.
# Prints medians over ROUNDS (default 5) and, per round, modelgate / hop and modelgate / floor.
# SPIN=1 makes the client poll instead of sleeping between answers (loadgen --spin), in the open
# loop too, whose rate is then 80 % of what the polling client reached. The client is
# `loadgen --raw` (RAW=0: hyper's client; lib.sh's `loadgen_client`).
# Bounded: ROUNDS x 4 servers x 3 runs of 0.5 + DURATION s (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
raw=$(loadgen_client)
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
ROUNDS=${ROUNDS:-5}
D=${DURATION:-3}
KEY=hop-floor-key-0123456789
work=$(mktemp -d)
server=
trap '[ -z "$server" ] || { kill -TERM $server; wait $server; } 2>/dev/null || true; rm -rf "$work"' EXIT
add_config "$work/c.toml" 18670 "$work/data" "$KEY"
start() { # name
  case $1 in
    mg) rm -rf "$work/data"
        taskset -c 0 ./target/release/modelgate serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
        server=$!; wait_ready 18670 "$work/log" ;;
    hop|hopb) local mode=; [ "$1" = hop ] || mode="--batch 16"
        taskset -c 0 ./target/release/hop-floor --listen 127.0.0.1:18670 $mode >"$work/log" &
        server=$!; listening_addr hop-floor "$work/log" >/dev/null ;;
    floor) taskset -c 0 ./target/release/floor --listen 127.0.0.1:18670 >"$work/log" &
        server=$!; listening_addr floor "$work/log" >/dev/null ;;
  esac
}
for round in $(seq 1 "$ROUNDS"); do
  for s in mg hop hopb floor; do
    start $s
    run() { bench_load --url http://127.0.0.1:18670/model --access-key "$KEY" --expect 8 --warmup 0.5 --duration "$D" $raw "$@"; }
    printf '%s\t%s\tc1\t' "$round" $s; run --concurrency 1 ${SPIN:+--spin}
    printf '%s\t%s\tc16\t' "$round" $s; run --concurrency 16 ${SPIN:+--spin} | tee "$work/c16"
    rate=$(python3 -c "import json; print(int(0.8 * json.load(open('$work/c16'))['achieved_rps']))")
    printf '%s\t%s\topen80\t' "$round" $s; run --mode open --rate "$rate" --connections 32 ${SPIN:+--spin}
    kill -TERM "$server"; wait "$server" || true; server=
  done
done | tee "$work/runs" >&2
python3 - "$work/runs" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    rnd, server, what, j = line.rstrip("\n").split("\t", 3)
    r = json.loads(j)
    assert r["error_total"] == 0, line
    runs.setdefault((server, what), []).append(r)
servers = ["mg", "hop", "hopb", "floor"]
med = lambda s, w, f: statistics.median(f(r) for r in runs[(s, w)])
rps = lambda r: r["achieved_rps"]
lat = lambda q: (lambda r: r["latency_us"][q])
rows = [("c=1 p50 µs", "c1", lat("p50")), ("c=1 p99 µs", "c1", lat("p99")),
        ("c=16 req/s", "c16", rps), ("c=16 p99 µs", "c16", lat("p99")),
        ("open 80 % rate req/s", "open80", lambda r: r["target_rps"]),
        ("open 80 % p99 µs", "open80", lat("p99")), ("open 80 % p99.9 µs", "open80", lat("p99_9"))]
print("| median of rounds | " + " | ".join(servers) + " |")
print("|---" * (len(servers) + 1) + "|")
for name, w, f in rows:
    if (servers[0], w) in runs:
        print(f"| {name} | " + " | ".join(f"{med(s, w, f):,.0f}" for s in servers) + " |")
n = len(runs[("mg", "c16")])
per = lambda w, f, b: [f(x) / f(y) for x, y in zip(runs[("mg", w)], runs[(b, w)])]
label = {"hop": "hop-floor", "hopb": "hop-floor --batch 16", "floor": "floor"}
for base, name, w, f in [("hop", "c=16 req/s", "c16", rps), ("hopb", "c=16 req/s", "c16", rps),
                         ("hopb", "c=1 p50", "c1", lat("p50")), ("floor", "c=16 req/s", "c16", rps)]:
    ratios = per(w, f, base)
    print(f"modelgate / {label[base]}, {name}, per round: "
          + ", ".join(f"{x:.2f}" for x in ratios)
          + f" (median {statistics.median(ratios):.2f}, {n} rounds)")
PY
