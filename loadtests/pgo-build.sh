#!/usr/bin/env bash
# Builds modelgate with profile-guided optimisation (PGO) and prints the binary's path,
# target/pgo/release/modelgate.
#   1. an instrumented build (`-Cprofile-generate`) in target/pgo-gen;
#   2. training: that build serves, on 127.0.0.1 only, the add model without and with API key
#      authentication and an echo model, under loadgen: HTTP/1.1 at c=1 and c=16, h2c, 100 KB
#      and 1 MB bodies, a wrong access key (401) and /metrics scrapes; once with one runtime
#      thread on one CPU and loadgen on another, as the benchmarks run them, once with two
#      runtime threads, unpinned, as a machine with more CPUs runs it, and once over TLS
#      (HTTP/1.1 and HTTP/2 by ALPN, a self-signed certificate). Every answer is checked, and a
#      failed request fails the build;
#   3. the profile merged with llvm-profdata (rustup's llvm-tools component, which this script
#      installs when it is missing) and a build that uses it (`-Cprofile-use`) in target/pgo.
# replica-runtime, the other half of every request, goes the same way with a profile of its own
# (target/pgo-gen-rt, then target/pgo-rt): the instrumented runtime serves behind the
# instrumented proxy in every pass above (large requests written into its memory and large
# answers lent included), and replica-direct then drives it over its socket: the add model one at
# a time and with requests written ahead as the proxy batches them, and 1 KB to 1 MB echoes. A
# replica writes its profile as it exits, which it does when the proxy stops it (SIGTERM) or its
# socket closes. The result is copied beside modelgate, target/pgo/release/replica-runtime, where
# modelgate looks for it.
# FLOORS=1 also builds the reference servers `floor` and `hop-floor` this way (trained by
# loadgen, as the benchmarks load them) into target/pgo/release, so that a profile-guided
# modelgate is compared with profile-guided floors (`FLOORS=target/pgo/release` in
# side-by-side.sh).
# The profile tells LLVM which code runs per request and which branches it takes: the hot code
# is inlined and laid out together, code that never ran is marked cold (set apart, optimised for
# size). Fewer instructions and far fewer instruction-cache misses per request ("A profile-guided
# build" in docs/PERFORMANCE.md). The builds take the flags below, not RUSTFLAGS from the
# environment. Bounded: five release builds (the plain one the other scripts share, and an
# instrumented and a profile-guided one each of modelgate and replica-runtime; two more with
# FLOORS=1) and about 45 s of load (55 s with FLOORS=1).
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
[ -x "$profdata" ] || rustup component add llvm-tools
[ -x "$profdata" ] || { echo "llvm-profdata not found at $profdata" >&2; exit 1; }
# The same packages as the other scripts build, so that features, and builds, are shared.
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
work=$(mktemp -d)
server=
trap '[ -z "$server" ] || { kill -TERM $server; wait $server; } 2>/dev/null || true; rm -rf "$work"' EXIT

echo "== instrumented build (target/pgo-gen)" >&2
# A fixed profile directory, so that the flags, and with them cargo's cache, stay the same.
raw=$PWD/target/pgo-gen/profraw
# CARGO_ENCODED_RUSTFLAGS holds one flag per field, so a path with spaces stays whole.
CARGO_TARGET_DIR=target/pgo-gen CARGO_ENCODED_RUSTFLAGS="-Cprofile-generate=$raw" \
  cargo build -q --release -p modelgate
# The runtime in a target directory of its own: other flags would rebuild the shared crates.
raw_rt=$PWD/target/pgo-gen-rt/profraw
CARGO_TARGET_DIR=target/pgo-gen-rt CARGO_ENCODED_RUSTFLAGS="-Cprofile-generate=$raw_rt" \
  cargo build -q --release -p replica-runtime
raw_floors=$PWD/target/pgo-gen-floors/profraw
if [ "${FLOORS:-0}" = 1 ]; then
  CARGO_TARGET_DIR=target/pgo-gen-floors CARGO_ENCODED_RUSTFLAGS="-Cprofile-generate=$raw_floors" \
    cargo build -q --release -p modelgate-loadtests --bin floor --bin hop-floor
fi
# The build scripts of those builds wrote profiles of their own, and earlier runs theirs.
rm -rf "$raw" "$raw_rt" "$raw_floors"

mkdir -p "$work/models"
cat >"$work/models/echo.py" <<'PY'
def echo(args):
    return args
PY
open=pgo-open-key-0123456789abcdef
auth=pgo-auth-key-0123456789abcdef
echo_key=pgo-echo-key-0123456789abcdef
# config WORKERS: the training configuration, with a runtime of WORKERS threads.
config() {
  printf '[server]\nlisten = "127.0.0.1:18950"\ndata_dir = "%s"\nreplica_runtime = "%s"\nworker_threads = %s\n' \
    "$work/data" "$PWD/target/pgo-gen-rt/release/replica-runtime" "$1"
  model_toml add-open "$open" false
  model_toml add-auth "$auth" true
  model_toml echo "$echo_key" false "$work/models" echo.py echo
}

cat >"$work/check.py" <<'PY'
import json, sys
r = json.load(sys.stdin)
assert r["error_total"] == 0, r
print(f"  {r.get('ok', r.get('sent')):>7} answers:", *sys.argv[1:], file=sys.stderr)
PY

# The CPUs this script may use; the first pass puts the server on the first and loadgen on the
# second, as the benchmarks pin them to CPUs 0 and 1.
read -r -a cpus <<<"$(python3 -c 'import os; print(*sorted(os.sched_getaffinity(0)))')"
# pin N: the words that pin a command to the Nth of those CPUs; none with fewer than two, or for
# N = all. (Words, not a function that runs the command: `$!` must be the server's own process.)
pin() { [ "$1" = all ] || [ "${#cpus[@]}" -lt 2 ] || echo "taskset -c ${cpus[$1]}"; }
# The loadgen arguments that name the server: over HTTPS once `serve` was given `tls`.
url=(--url http://127.0.0.1:18950/model)
# train KEY ARGS...: one checked loadgen run, on the second CPU; a failed request ends the script.
train() {
  local key=$1; shift
  # shellcheck disable=SC2046 # pin's words are meant to split
  $(pin 1) target/release/loadgen "${url[@]}" --access-key "$key" \
    --warmup 0.5 --json "$@" | python3 "$work/check.py" "$@"
}
# serve N WORKERS [tls]: starts the instrumented build with a runtime of WORKERS threads, pinned
# as `pin N` says; with `tls`, serving HTTPS only.
serve() {
  config "$2" >"$work/c.toml"
  if [ "${3:-}" = tls ]; then
    tls_config "$work/c.toml" "$work"
    url=(--url https://127.0.0.1:18950/model --ca-cert "$work/cert.pem") MG_SCHEME=https
  fi
  # shellcheck disable=SC2046 # pin's words are meant to split
  $(pin "$1") target/pgo-gen/release/modelgate serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
  server=$!
  wait_ready 18950 "$work/log"
}
# stop: stops the server; the profile is written when the process exits.
stop() {
  kill -TERM $server
  wait $server
  server=
}

# short_load: the later passes' load, a shorter run of the first pass's main parts.
short_load() {
  train $open --expect 8 --concurrency 1 --duration 1
  train $open --expect 8 --concurrency 16 --duration 2
  train $open --expect 8 --concurrency 16 --duration 1 --http2
  train $auth --expect 8 --concurrency 16 --duration 1
  train $echo_key --payload-bytes 100000 --expect-echo --concurrency 2 --duration 1
}

echo "== training, one runtime thread, pinned (as benchmarked)" >&2
serve 0 1
MODELGATE_API_KEY=$(cat "$work/data/admin-api-key")
export MODELGATE_API_KEY
train $open --expect 8 --concurrency 1 --duration 2
train $open --expect 8 --concurrency 16 --duration 3
train $open --expect 8 --concurrency 16 --duration 2 --http2
train $auth --expect 8 --concurrency 16 --duration 2
train $echo_key --payload-bytes 100000 --expect-echo --concurrency 2 --duration 1
train $echo_key --payload-bytes 1000000 --expect-echo --concurrency 1 --duration 1
# Not bodies of 1 MiB or more, which are written ahead into the replica: a 4 MB echo here made
# the small requests 3-4 % slower at c=16 (docs/PERFORMANCE.md, seventeenth session).
train wrong-key-0123456789abcdef --expect-status 401 --concurrency 4 --duration 1
for _ in $(seq 1 20); do curl -sf -o /dev/null http://127.0.0.1:18950/metrics; done
stop
# A machine with more than one CPU runs the multi-thread runtime, whose code the first pass
# never ran; left out of the profile, it would be optimised for size.
echo "== training, two runtime threads, unpinned" >&2
serve all 2
short_load
stop
# TLS records, its handshakes and ALPN are code the passes above never ran.
echo "== training over TLS, one runtime thread, pinned" >&2
serve 0 1 tls
short_load
stop
ls "$raw"/*.profraw >/dev/null

# direct ARGS...: one checked replica-direct run of the instrumented runtime, pinned as `train`
# pins its load; the runtime writes its profile as it exits, when replica-direct hangs up.
direct() {
  # shellcheck disable=SC2046 # pin's words are meant to split
  $(pin 1) target/release/replica-direct --runtime target/pgo-gen-rt/release/replica-runtime \
    ${cpus[1]:+--runtime-cpu ${cpus[0]}} --warmup 0.2 "$@" | python3 "$work/check.py" "$@"
}
echo "== training replica-runtime, over its socket" >&2
direct --duration 1
direct --duration 1 --spin
direct --duration 2 --pipeline 16
for bytes in 1000 100000 1000000; do
  direct --duration 1 --dir "$work/models" --file echo.py --function echo --payload-bytes $bytes --expect-echo
done
ls "$raw_rt"/*.profraw >/dev/null

if [ "${FLOORS:-0}" = 1 ]; then
  echo "== training floor and hop-floor" >&2
  # floor_train NAME ARGS...: starts floor or hop-floor, loads it as side-by-side.sh does.
  floor_train() {
    local name=$1; shift
    # shellcheck disable=SC2046 # pin's words are meant to split
    $(pin 0) "target/pgo-gen-floors/release/$name" --listen 127.0.0.1:18950 "$@" >/dev/null 2>"$work/log" &
    server=$!
    for _ in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18950/ && break; sleep 0.1; done
    url=(--url http://127.0.0.1:18950/model)
    train any --expect 8 --concurrency 1 --duration 1
    train any --expect 8 --concurrency 16 --duration 2
    stop
  }
  floor_train floor
  floor_train hop-floor --batch 16
  ls "$raw_floors"/*.profraw >/dev/null
fi

echo "== merged profiles and optimised builds (target/pgo)" >&2
mkdir -p target/pgo
"$profdata" merge -o target/pgo/modelgate.profdata "$raw"/*.profraw
"$profdata" merge -o target/pgo/replica-runtime.profdata "$raw_rt"/*.profraw
CARGO_TARGET_DIR=target/pgo CARGO_ENCODED_RUSTFLAGS="-Cprofile-use=$PWD/target/pgo/modelgate.profdata" \
  cargo build -q --release -p modelgate
CARGO_TARGET_DIR=target/pgo-rt CARGO_ENCODED_RUSTFLAGS="-Cprofile-use=$PWD/target/pgo/replica-runtime.profdata" \
  cargo build -q --release -p replica-runtime
# modelgate looks for replica-runtime beside itself unless told otherwise.
cp target/pgo-rt/release/replica-runtime target/pgo/release/
if [ "${FLOORS:-0}" = 1 ]; then
  "$profdata" merge -o target/pgo/floors.profdata "$raw_floors"/*.profraw
  CARGO_TARGET_DIR=target/pgo-floors CARGO_ENCODED_RUSTFLAGS="-Cprofile-use=$PWD/target/pgo/floors.profdata" \
    cargo build -q --release -p modelgate-loadtests --bin floor --bin hop-floor
  cp target/pgo-floors/release/floor target/pgo-floors/release/hop-floor target/pgo/release/
fi
echo "$PWD/target/pgo/release/modelgate"
