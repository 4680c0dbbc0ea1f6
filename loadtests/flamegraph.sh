#!/usr/bin/env bash
# Where CPU 0 goes while modelgate serves the add model at c=16: `perf record -C 0` samples the
# whole core the server and its replica share (proxy, replica, kernel), with DWARF call graphs;
# inferno folds the stacks and draws a flame graph.
# Prints the split by process and by binary (kernel, modelgate, libpython, libc, ...), and writes
# the SVG to OUT (default docs/flamegraph-c16.svg; frames narrower than 0.1 % left out) and, with
# FOLDED=path, the folded stacks (for inferno-diff-folded against another build's).
# Needs perf (apt-get install linux-perf) and inferno (cargo install inferno); sampling every CPU
# needs perf_event_paranoid <= 0 or root. MG picks the modelgate binary (default this tree's).
# Bounded: one server, one loadgen run of WARM + SAMPLE + 2 s (defaults 2 and 3), 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
for tool in perf inferno-collapse-perf inferno-flamegraph; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 1; }
done
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
MG=${MG:-./target/release/modelgate}
OUT=${OUT:-docs/flamegraph-c16.svg}
SAMPLE=${SAMPLE:-3}
WARM=${WARM:-2}
KEY=flamegraph-key-0123456789
work=$(mktemp -d)
server=
load=
# Each step may fail (a server that already ended): none may skip the removal.
trap 'for p in $load $server; do kill -TERM $p 2>/dev/null || true; wait $p 2>/dev/null || true; done; rm -rf "$work"' EXIT
add_config "$work/c.toml" 18680 "$work/data" "$KEY" "$PWD/target/release/replica-runtime"
taskset -c 0 "$MG" serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
server=$!
wait_ready 18680 "$work/log"
taskset -c 1 ./target/release/loadgen --url http://127.0.0.1:18680/model --access-key "$KEY" \
  --expect 8 --concurrency 16 --warmup "$WARM" --duration "$((SAMPLE + 2))" \
  --timeout 30 --json >"$work/load" &
load=$!
sleep "$WARM"
perf record -q -C 0 -F 499 --call-graph dwarf,16384 -o "$work/perf.data" -- sleep "$SAMPLE" \
  2>"$work/perf.log" || { cat "$work/perf.log" >&2; exit 1; }
wait $load; load=
echo "load during the sample: $(python3 -c "import json; r = json.load(open('$work/load')); print(f\"{r['achieved_rps']:,.0f} req/s, {r['error_total']} errors\")")"
kill -TERM $server; wait $server 2>/dev/null || true; server=
echo
echo "CPU 0 by process and binary (self time):"
perf report -i "$work/perf.data" --no-children --sort comm,dso -g none --stdio 2>/dev/null |
  grep -E '^ +[0-9]' | awk '$1+0 >= 0.5' | sed 's/ *$//'
folded=${FOLDED:-$work/folded}
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf >"$folded"
inferno-flamegraph --title "CPU 0: modelgate + replica, add model, c=16 ($(date -u +%F))" \
  --width 1600 --minwidth 0.1 <"$folded" >"$OUT"
echo
echo "wrote $OUT${FOLDED:+ and $FOLDED}"
