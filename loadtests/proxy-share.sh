#!/usr/bin/env bash
# The proxy's share at concurrency 1 (a server's p50 minus the replica's p50 over its own socket)
# and how small any proxy's share can be on this machine. One run, rounds alternating:
#   floor   bare hyper answering a fixed body (HTTP alone, tokio's event loop);
#   bfloor  blocking-floor: the same answer from a thread per connection with blocking reads and
#           writes, 2 system calls per request (HTTP alone, the fewest calls blocking sockets allow);
#   hop     hop-floor: bare hyper + one real replica over the replica protocol, nothing else;
#   bhop    blocking-floor --hop: the same hop with a thread and blocking calls, 4 system calls
#           per request in the proxy: the fewest a proxy in front of a separate replica process
#           can make with blocking sockets;
#   mg      modelgate with the add model and one replica;
#   direct  replica-direct: the replica called over its socket, no proxy.
# Servers (and their replicas) on CPU 0, the clients on CPU 1, 127.0.0.1 only; every server runs
# for the whole run and sits idle while another is measured; each round starts one server later
# in the list, so none is always measured first or last. SPIN=1 makes the clients poll instead
# of sleeping between answers. Prints medians of ROUNDS (default 5) and each server's share per
# round (its p50 minus the direct replica's in that round). MG=/path/to/modelgate measures that
# build instead (e.g. loadtests/pgo-build.sh's); hop-floor, blocking-floor --hop and the direct
# replica then run the replica-runtime beside it, as modelgate does, so every share is of one
# runtime. FLOORS=DIR takes `floor` and `hop-floor` from DIR (target/pgo/release: the
# profile-guided ones of `FLOORS=1 loadtests/pgo-build.sh`). Bounded: ROUNDS x 6 runs of
# 1 + DURATION s (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
mg=${MG:-./target/release/modelgate}
# The runtime modelgate runs: the one beside it, else this tree's.
rt=$(dirname "$mg")/replica-runtime
[ -x "$rt" ] || rt=./target/release/replica-runtime
floors=${FLOORS:-./target/release}
ROUNDS=${ROUNDS:-5}
D=${DURATION:-3}
KEY=proxy-share-key-0123456789
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
add_config "$work/c.toml" 18915 "$work/data" "$KEY"
taskset -c 0 "$floors/floor" --listen 127.0.0.1:18910 >"$work/floor.log" & pids+=($!)
taskset -c 0 ./target/release/blocking-floor --listen 127.0.0.1:18911 >"$work/bfloor.log" & pids+=($!)
taskset -c 0 "$floors/hop-floor" --runtime "$rt" --listen 127.0.0.1:18912 >"$work/hop.log" & pids+=($!)
taskset -c 0 ./target/release/blocking-floor --hop --runtime "$rt" --listen 127.0.0.1:18913 >"$work/bhop.log" & pids+=($!)
taskset -c 0 "$mg" serve --config "$work/c.toml" >/dev/null 2>"$work/mg.log" & pids+=($!)
listening_addr floor "$work/floor.log" >/dev/null
listening_addr blocking-floor "$work/bfloor.log" >/dev/null
listening_addr hop-floor "$work/hop.log" >/dev/null
listening_addr blocking-floor "$work/bhop.log" >/dev/null
wait_ready 18915 "$work/mg.log"
order=(floor:18910 bfloor:18911 hop:18912 bhop:18913 mg:18915 direct:-)
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS" >&2
  for i in "${!order[@]}"; do
    s=${order[$(( (i + round - 1) % ${#order[@]} ))]}
    if [ "${s%:*}" = direct ]; then
      taskset -c 1 ./target/release/replica-direct --runtime "$rt" --runtime-cpu 0 \
        --warmup 1 --duration "$D" ${SPIN:+--spin} >"$work/direct-r$round.json"
    else
      bench_load --url "http://127.0.0.1:${s#*:}/model" --access-key "$KEY" --expect 8 \
        --concurrency 1 --warmup 1 --duration "$D" ${SPIN:+--spin} >"$work/${s%:*}-r$round.json"
    fi
  done
done
echo "modelgate: $mg; replica-runtime: $rt; floors: $floors"
python3 - "$work" <<'PY'
import os, statistics, sys
sys.path.insert(0, "loadtests")
import rounds as rounds_lib
runs = rounds_lib.load(sys.argv[1])
rounds = sorted(runs["mg"])
errors = sum(r["error_total"] for per in runs.values() for r in per.values())
assert errors == 0, f"{errors} errors"
p50 = lambda k, i: runs[k][i]["latency_us"]["p50"]
names = {"floor": "floor (hyper, fixed body)", "bfloor": "blocking-floor (fixed body)",
         "hop": "hop-floor (hyper + replica)", "bhop": "blocking-floor --hop",
         "mg": "modelgate", "direct": "replica direct"}
print(f"c=1 p50, medians of {len(rounds)} rounds, client {'polling' if os.environ.get('SPIN') else 'sleeping'}; "
      "share = median of each round's p50 minus the direct replica's p50 in that round")
print("(the last column, the difference of the medians, can differ from the share by several µs)")
print("| server | p50 | share | share per round | p50 − direct p50, medians |")
print("|---|---|---|---|---|")
direct = statistics.median(p50("direct", i) for i in rounds)
for k in ["floor", "bfloor", "hop", "bhop", "mg", "direct"]:
    share = [p50(k, i) - p50("direct", i) for i in rounds]
    mine = statistics.median(p50(k, i) for i in rounds)
    if k == "direct":
        print(f"| {names[k]} | {mine:.0f} µs | – | | – |")
    else:
        each = ", ".join(f"{x:.0f}" for x in share)
        print(f"| {names[k]} | {mine:.0f} µs | {statistics.median(share):.0f} µs | {each} | {mine - direct:.0f} µs |")
PY
