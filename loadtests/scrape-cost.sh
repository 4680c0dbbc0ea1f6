#!/usr/bin/env bash
# What a /metrics scrape costs the predictions served while it renders. modelgate runs with the
# add model (one replica) and MODELS (default 1,000) more models declared through the API, whose
# series make the exposition about 5 MB; it and its replica on CPU 0, the clients on CPU 1,
# 127.0.0.1 only. Each round measures predictions at a fixed arrival rate RATE (default 2,000/s,
# open loop, so that requests due while the server is stalled count their wait) twice: alone,
# then while `curl` scrapes /metrics every EVERY s (default 0.5; Prometheus's default is 15 s, so
# this is many scrapers or a short interval, to see the effect in a short run). Prints each
# run's rate, p50, p99, p99.9 and max, and the scrapes' median time.
# MG=/path/to/modelgate measures that build (default this tree's release build); BASELINE=/path
# adds a second build, measured in the same rounds, alternating. Both use this tree's
# replica-runtime.
# The scraper's curl shares CPU 1 with loadgen, which is open-loop and sleeps between sends.
# Bounded: 1 + MODELS API calls per server, ROUNDS (default 3) x 2 runs of 0.5 + DURATION s
# (default 5, whole seconds) per server, at most DURATION / EVERY scrapes per scraping run, each
# curl at most 30 s.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
MG=$(realpath "${MG:-./target/release/modelgate}")
BASELINE=${BASELINE:+$(realpath "$BASELINE")}
MODELS=${MODELS:-1000}
ROUNDS=${ROUNDS:-3}
D=${DURATION:-5}
EVERY=${EVERY:-0.5}
RATE=${RATE:-2000}
every_ns=$(awk -v e="$EVERY" 'BEGIN { printf "%d", e * 1e9 }')
[ "$every_ns" -gt 0 ] || { echo "EVERY must be above 0" >&2; exit 1; }
# Every curl here is bounded in time, and never goes through a proxy from the environment.
curl() { command curl --noproxy '*' -m 30 "$@"; }
KEY=scrape-cost-key-0123456789
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

# start NAME BINARY PORT: a server with the add model and MODELS declared models.
start() {
  local name=$1 bin=$2 port=$3
  add_config "$work/$name.toml" "$port" "$work/$name-data" "$KEY" "$PWD/target/release/replica-runtime"
  taskset -c 0 "$bin" serve --config "$work/$name.toml" >/dev/null 2>"$work/$name.log" &
  pids+=($!)
  wait_ready "$port" "$work/$name.log"
  declare_models "$port" "$work/$name-data" "$MODELS"
  echo "$name: $(curl -sf "http://127.0.0.1:$port/metrics" | wc -c) bytes of /metrics" >&2
}

# run NAME PORT SCRAPE(0|1): one open-loop run, with or without a scraper beside it.
run() {
  local name=$1 port=$2 scrape=$3 scraper=
  if [ "$scrape" = 1 ]; then
    # A scrape starts every EVERY s (or as soon as the last one ends, if it took longer) during
    # loadgen's measured window, and none after it, whatever a build's scrapes take.
    (
      set +e
      sleep 0.5 # loadgen's warm-up
      end=$(($(date +%s%N) + ${D%.*} * 1000000000))
      while [ "$(date +%s%N)" -lt "$end" ]; do
        next=$(($(date +%s%N) + every_ns))
        taskset -c 1 curl --noproxy '*' -m 30 -sf -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:$port/metrics" ||
          echo "scrape failed" >&2
        left=$((next - $(date +%s%N)))
        [ "$left" -le 0 ] || sleep "$(awk -v n="$left" 'BEGIN { printf "%.3f", n / 1e9 }')"
      done
    ) >>"$work/$name.scrapes" &
    scraper=$!
  fi
  printf '%s\t%s\t' "$name" "$scrape"
  taskset -c 1 ./target/release/loadgen --url "http://127.0.0.1:$port/model" --access-key "$KEY" \
    --expect 8 --mode open --rate "$RATE" --warmup 0.5 --duration "$D" --json | tail -n 1
  [ -z "$scraper" ] || wait "$scraper"
}

start mg "$MG" 18960
[ -z "$BASELINE" ] || start baseline "$BASELINE" 18961
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r of $ROUNDS" >&2
  for s in 0 1; do
    run mg 18960 "$s"
    [ -z "$BASELINE" ] || run baseline 18961 "$s"
  done
done >"$work/runs"

echo "modelgate: $MG${BASELINE:+; baseline: $BASELINE}"
RATE=$RATE python3 - "$work" <<'PY'
import json, os, statistics, sys
work = sys.argv[1]
runs = {}
for line in open(os.path.join(work, "runs")):
    name, scrape, j = line.rstrip("\n").split("\t", 2)
    runs.setdefault((name, scrape), []).append(json.loads(j))
fmt = lambda us: f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"
med = lambda rs, f: statistics.median(f(r) for r in rs)
print(f"predictions at {os.environ['RATE']}/s (open loop), medians of the rounds; errors in all runs:",
      sum(r["error_total"] for rs in runs.values() for r in rs))
print("| server | /metrics scraped | req/s | p50 | p99 | p99.9 | max |")
print("|---|---|---|---|---|---|---|")
for (name, scrape), rs in sorted(runs.items()):
    l = lambda k: med(rs, lambda r: r["latency_us"][k])
    print(f"| {name} | {'yes' if scrape == '1' else 'no'} | {med(rs, lambda r: r['achieved_rps']):,.0f} "
          f"| {fmt(l('p50'))} | {fmt(l('p99'))} | {fmt(l('p99_9'))} | {fmt(l('max'))} |")
for name in sorted({n for n, _ in runs}):
    path = os.path.join(work, f"{name}.scrapes")
    if os.path.exists(path):
        t = sorted(float(x) for x in open(path) if x.strip())
        print(f"{name}: {len(t)} scrapes, median {statistics.median(t) * 1000:.0f} ms, max {t[-1] * 1000:.0f} ms")
PY
