#!/usr/bin/env bash
# The scenarios of docs/PERFORMANCE.md's "Scenarios" section, on a release build; modelgate and its
# replicas on CPU 0, loadgen (and replica-direct) on CPU 1, 127.0.0.1 only:
#   1. add, with an API key (authentication on) and without (off), c=1 and c=16;
#   2. iris (scikit-learn) with an API key, c=1 and c=16;
#   3. a slow model (20 ms a call, one replica) under 64 callers: the queue fills, 429s follow;
#   4. a payload sweep (1 KB, 100 KB, 1 MB, 5 MB): requests of that size to a model that answers
#      their length, and through an echo model (the same size back), each against the same replica
#      code called directly over its socket, to isolate what the proxy adds per size.
# MG=/path/to/modelgate serves with that build (e.g. the profile-guided one, with its runtime).
# Bounded: every run is 0.5 s warm-up + DURATION s (default 3); about 30 runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
work=$(mktemp -d)
mkdir -p "$work/models" target/loadtest-data
cat > "$work/models/scenarios.py" <<'PY'
import time


def slow(args):
    time.sleep(0.02)
    return {"slept_ms": 20}


def echo(args):
    return args


def size(args):
    return len(args["pad"])
PY
model() { # name path file function auth
  printf '[[models]]\nname = "%s"\npath = "%s"\nfile = "%s"\nfunction = "%s"\naccess_key = "scenario-%s-key-0123456789"\nenable_authentication = %s\n' "$1" "$2" "$3" "$4" "$1" "$5"
}
{
  printf '[server]\nlisten = "127.0.0.1:18620"\n# Persistent, so the iris build reuses its pip cache.\ndata_dir = "%s/target/loadtest-data"\nqueue_timeout_secs = 0.5\nmax_queue = 16\n' "$PWD"
  model add-auth "$PWD/examples/add_numbers" add_numbers.py add true
  model add-open "$PWD/examples/add_numbers" add_numbers.py add false
  model iris "$PWD/examples/iris" predict.py predict true
  model slow "$work/models" scenarios.py slow false
  model echo "$work/models" scenarios.py echo false
  model size "$work/models" scenarios.py size false
} > "$work/c.toml"
taskset -c 0 "${MG:-./target/release/modelgate}" serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
server=$!
trap 'kill -INT $server; wait $server; rm -rf "$work"' EXIT
for _ in $(seq 1 6000); do curl -sf http://127.0.0.1:18620/readyz >/dev/null && break; sleep 0.1; done
curl -sf http://127.0.0.1:18620/readyz >/dev/null || { echo "not ready"; tail -30 "$work/log"; exit 1; }
export MODELGATE_API_KEY
MODELGATE_API_KEY=$(cat target/loadtest-data/admin-api-key 2>/dev/null || true)
[ -n "$MODELGATE_API_KEY" ] || { echo "no admin key in target/loadtest-data (remove the directory and rerun)"; exit 1; }
D=${DURATION:-3}
run() { # label, loadgen arguments...
  local label=$1; shift
  printf '%s\t' "$label"
  taskset -c 1 ./target/release/loadgen --url http://127.0.0.1:18620/model --warmup 0.5 --duration "$D" --json "$@" | tail -n 1
}
{
  for c in 1 16; do
    run "add, API key, c=$c" --access-key scenario-add-auth-key-0123456789 --expect 8 --concurrency "$c"
    run "add, no API key, c=$c" --access-key scenario-add-open-key-0123456789 --expect 8 --concurrency "$c"
  done
  for c in 1 16; do
    run "iris, API key, c=$c" --access-key scenario-iris-key-0123456789 --body '{"petal_length":4.0}' --concurrency "$c"
  done
  run "slow (20 ms), 64 callers" --access-key scenario-slow-key-0123456789 --expect '{"slept_ms":20}' \
    --concurrency 64 --expect-status 200,429
  for n in 1000 100000 1000000 5000000; do
    run "$n B in, length out: modelgate" --access-key scenario-size-key-0123456789 --payload-bytes "$n" --expect "$n" --concurrency 1
    printf '%s\t' "$n B in, length out: replica direct"
    taskset -c 1 ./target/release/replica-direct --runtime-cpu 0 --dir "$work/models" --file scenarios.py --function size \
      --payload-bytes "$n" --expect "$n" --warmup 0.5 --duration "$D"
    run "$n B echoed: modelgate" --access-key scenario-echo-key-0123456789 --payload-bytes "$n" --expect-echo --concurrency 1
    printf '%s\t' "$n B echoed: replica direct"
    taskset -c 1 ./target/release/replica-direct --runtime-cpu 0 --dir "$work/models" --file scenarios.py --function echo \
      --payload-bytes "$n" --expect-echo --warmup 0.5 --duration "$D"
  done
} | tee "$work/runs" >&2
python3 - "$work/runs" <<'PY'
import json, sys
print("| scenario | req/s | p50 | p99 | p99.9 | statuses | errors |")
print("|---|---|---|---|---|---|---|")
for line in open(sys.argv[1]):
    label, j = line.rstrip("\n").split("\t", 1)
    r = json.loads(j)
    l = r["latency_us"]
    fmt = lambda us: f"{us / 1000:.2f} ms" if us >= 1000 else f"{us} µs"
    statuses = ", ".join(f"{k}: {v:,}" for k, v in sorted(r.get("statuses", {}).items())) or "-"
    print(f"| {label} | {r['achieved_rps']:,.0f} | {fmt(l['p50'])} | {fmt(l['p99'])} | {fmt(l['p99_9'])} "
          f"| {statuses} | {r['error_total']} of {r['sent']:,} |")
PY
# The iris figures follow the libraries its build installed (`scikit-learn>=1.3`: the newest at the
# time of the data directory's first run), so they go with the table.
deps=
for f in $(ls -t target/loadtest-data/builds/*/deps.path 2>/dev/null || true); do
  [ -s "$f" ] && deps=$(cat "$f") && break
done
[ -z "$deps" ] || echo "iris's libraries: $(ls "$deps" | sed -n 's/^\(scikit_learn\|numpy\|scipy\)-\(.*\)\.dist-info$/\1 \2/p' | paste -sd, | sed 's/,/, /g')"
