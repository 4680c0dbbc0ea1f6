#!/usr/bin/env bash
# User-space instructions per request, counted by callgrind: a figure that does not drift with
# this machine's noise, for comparing builds and for seeing where the proxy's own code goes.
# modelgate (the add model, one replica), hop-floor and the bare hyper floor each run under
# `valgrind --tool=callgrind` (the replica runs natively: callgrind follows modelgate's restart
# of itself but not the replicas it starts);
# after WARM requests the counters are zeroed, then N requests at c=CONC (default 1) are counted
# and dumped. The servers run on CPU 0 (`taskset`), as in the timed scripts; before 2026-11-30's
# sixth session they ran unpinned, so modelgate ran two runtime workers under callgrind.
# Prints instructions per request for both and modelgate's top functions (self cost). CACHE=1 also
# simulates the caches (`--cache-sim=yes`, the host's L1 and last-level sizes) and prints L1
# instruction, data-read and data-write misses per request: how much code and data a request
# touches, which this machine's lack of hardware counters hides otherwise.
# MG=/path/to/another/modelgate counts that build instead (with this tree's replica-runtime).
# REPLICA=1 also counts the replica's own instructions per request (Python and the JSON
# conversion included): a second modelgate run, native, whose replica runs under callgrind
# (`--trace-children=yes`, since the replica re-executes itself once). The slow replica makes
# larger batches than usual, so its per-batch costs are spread thinner than at full speed.
# RUNTIME=/absolute/path/to/another/replica-runtime counts that build of the replica instead.
# FLOORS=DIR counts the `floor` and `hop-floor` in DIR (target/pgo/release: the profile-guided
# ones of `FLOORS=1 loadtests/pgo-build.sh`).
# TLS=1 serves modelgate over HTTPS (a self-signed certificate, HTTP/1.1 by ALPN); the floors
# still answer plain HTTP. The counted loadgen run's own handshakes (its first probe and one per
# connection: two at c=1) fall inside the count, spread over its N requests.
# HOP_ARGS adds arguments to hop-floor (HOP_ARGS="--batch 16": the floor of modelgate's batched
# dispatch, which side-by-side.sh compares with; by default it sends one request at a time).
# Bounded: 2 x (WARM + N) requests (defaults 500 + 5000) at callgrind's pace, 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
WARM=${WARM:-500}
cache_sim=
[ "${CACHE:-0}" = 0 ] || cache_sim=--cache-sim=yes
N=${N:-5000}
KEY=instructions-key-0123456789
work=$(mktemp -d)
pid=
trap '[ -z "$pid" ] || kill -TERM $pid 2>/dev/null; wait 2>/dev/null; [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"' EXIT
runtime=${RUNTIME:-$PWD/target/release/replica-runtime}
add_config "$work/c.toml" 18690 "$work/data" "$KEY" "$runtime"
MG_SCHEME=http
[ "${TLS:-0}" = 0 ] || { tls_config "$work/c.toml" "$work"; MG_SCHEME=https; }
# origin PORT: the scheme, host and port a server on PORT answers on (modelgate's 18690 and
# 18693 over HTTPS under TLS=1).
origin() {
  case "${TLS:-0}:$1" in
    0:*|*:1869[12]) echo "http://127.0.0.1:$1" ;;
    *) echo "https://127.0.0.1:$1" ;;
  esac
}

# poke PORT: one request a little later, so that a process idle in epoll_wait runs and notices
# callgrind_control's command (it is read only while the process executes); at most one request
# in the N is partly counted or missed.
poke() { sleep 0.3; curl -sk -o /dev/null "$(origin "$1")/" || true; }

# load PORT COUNT: COUNT predictions of the add model at c=CONC on CPU 1, each checked.
load() {
  local tls=()
  [ "$(origin "$1")" = "http://127.0.0.1:$1" ] || tls=(--ca-cert "$work/cert.pem")
  taskset -c 1 ./target/release/loadgen --url "$(origin "$1")/model" "${tls[@]}" --access-key "$KEY" \
    --expect 8 --concurrency "${CONC:-1}" --warmup 0 --duration 600 --max-requests "$2" --timeout 30 --json >/dev/null
}

# count NAME PORT COMMAND...: runs COMMAND under callgrind, loads it, prints "NAME <Ir per request>".
count() {
  local name=$1 port=$2; shift 2
  # On CPU 0 as in every other measurement, so a server sizes its runtime for one CPU.
  # modelgate serve starts itself again with its allocator settings (the same process), so
  # callgrind follows that exec; replicas run natively.
  taskset -c 0 valgrind --tool=callgrind $cache_sim --trace-children=yes --trace-children-skip="$runtime,*replica-runtime*" \
    --callgrind-out-file="$work/$name.%p" "$@" >/dev/null 2>"$work/$name.log" &
  pid=$!
  for _ in $(seq 1 1200); do
    curl -sk -o /dev/null "$(origin "$port")/" && break
    sleep 0.1
  done
  [ "$name" != modelgate ] || wait_ready "$port" "$work/$name.log"
  load "$port" "$WARM"
  poke "$port" & callgrind_control --zero "$pid" >/dev/null 2>&1
  load "$port" "$N"
  poke "$port" & callgrind_control --dump=measured "$pid" >/dev/null 2>&1
  kill -TERM "$pid"; wait "$pid" 2>/dev/null || true; pid=
  report "$name" "$(grep -l "^desc: Trigger: dump measured" "$work/$name".* | head -1)"
}

# report NAME DUMP: prints "NAME <Ir per request>" from a callgrind dump of the N requests and
# writes its top functions to $work/NAME.top.
report() {
  local name=$1 out=$2
  local ir i1 d1r d1w
  # Events: Ir, then with CACHE=1 Dr Dw I1mr D1mr D1mw ILmr DLmr DLmw.
  read -r ir _ _ i1 d1r d1w _ <<<"$(sed -n 's/^summary: //p' "$out") _ _ _ _ _ _ _"
  echo "$name $((ir / N))"
  [ -z "$cache_sim" ] || echo "$name $((i1 / N)) $((d1r / N)) $((d1w / N))" >>"$work/cache"
  # Self cost per function, summed from the dump (callgrind_annotate 3.19 folds a multi-threaded
  # dump into `clone`): cost lines count, except the one after `calls=` (a callee's inclusive).
  python3 - "$out" "$N" >"$work/$name.top" <<'PY'
import re, sys
names, self_cost, fn, after_call = {}, {}, None, False
for line in open(sys.argv[1]):
    if line.startswith(("fn=", "cfn=")):
        # Names are compressed: "(id) name" the first time an id appears, "(id)" after that.
        m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
        if m.group(2):
            names[m.group(1)] = m.group(2)
        if line.startswith("fn="):
            fn = m.group(1)
    elif line.startswith("calls="):
        after_call = True
    elif line[:1].isdigit() or line[:1] in "+-*":
        if after_call:
            after_call = False
        elif fn is not None:
            self_cost[fn] = self_cost.get(fn, 0) + int(line.split()[1])
n = int(sys.argv[2])
total = sum(self_cost.values())
for f, c in sorted(self_cost.items(), key=lambda kv: -kv[1])[:25]:
    print(f"{c / n:>9,.0f} per request  {100 * c / total:5.1f} %  {names.get(f, f)[:110]}")
PY
}

# count_replica: modelgate natively on CPU 0, its replica under callgrind; prints
# "replica <Ir per request>".
count_replica() {
  local port=18693 mg_pid replica
  printf '#!/bin/sh\nexec valgrind --tool=callgrind %s --trace-children=yes --callgrind-out-file='"'"'%s/replica.%%p'"'"' '"'"'%s'"'"' "$@" 2>>'"'"'%s/replica.log'"'"'\n' \
    "$cache_sim" "$work" "$runtime" "$work" >"$work/replica.sh"
  chmod +x "$work/replica.sh"
  add_config "$work/r.toml" "$port" "$work/rdata" "$KEY" "$work/replica.sh"
  [ "${TLS:-0}" = 0 ] || tls_config "$work/r.toml" "$work"
  taskset -c 0 "${MG:-./target/release/modelgate}" serve --config "$work/r.toml" >"$work/rmg.log" 2>&1 &
  mg_pid=$!
  pid=$mg_pid
  wait_ready "$port" "$work/rmg.log" "$work/replica.log"
  # The replica is modelgate's only child once it is ready.
  replica=$(pgrep -P "$mg_pid" | head -1) || true
  [ -n "$replica" ] || { echo "no replica process under modelgate" >&2; exit 1; }
  load "$port" "$WARM"
  poke "$port" & callgrind_control --zero "$replica" >/dev/null 2>&1
  load "$port" "$N"
  poke "$port" & callgrind_control --dump=measured "$replica" >/dev/null 2>&1
  kill -TERM "$mg_pid"; wait "$mg_pid" 2>/dev/null || true; pid=
  report replica "$(grep -l "^desc: Trigger: dump measured" "$work"/replica.[0-9]* | head -1)"
}

floors=${FLOORS:-./target/release}
count floor 18691 "$floors/floor" --listen 127.0.0.1:18691 | tee "$work/result"
# shellcheck disable=SC2086 # HOP_ARGS is a list of arguments
count hop-floor 18692 "$floors/hop-floor" --listen 127.0.0.1:18692 ${HOP_ARGS-} | tee -a "$work/result"
count modelgate 18690 "${MG:-./target/release/modelgate}" serve --config "$work/c.toml" | tee -a "$work/result"
floor=$(awk '$1 == "floor" {print $2}' "$work/result")
hop=$(awk '$1 == "hop-floor" {print $2}' "$work/result")
mg=$(awk '$1 == "modelgate" {print $2}' "$work/result")
echo
echo "user-space instructions per request (c=${CONC:-1}, $N requests after $WARM):"
echo "  floor      $floor"
echo "  hop-floor  $hop  (+$((hop - floor)) over the floor)${HOP_ARGS:+ with $HOP_ARGS}"
echo "  modelgate  $mg  (+$((mg - floor)) over the floor, +$((mg - hop)) over hop-floor${HOP_ARGS:+ $HOP_ARGS})$([ "${TLS:-0}" = 0 ] || echo ", over TLS")"
if [ "${REPLICA:-0}" != 0 ]; then
  count_replica >>"$work/result"
  echo "  replica    $(awk '$1 == "replica" {print $2}' "$work/result")  (its own process: Python, the JSON conversion, the socket)"
fi
if [ -n "$cache_sim" ]; then
  echo
  echo "simulated L1 misses per request: instruction, data read, data write"
  awk '{printf "  %-10s %6d %6d %6d\n", $1, $2, $3, $4}' "$work/cache"
fi
echo
echo "modelgate, functions by own instructions over those $N requests:"
cat "$work/modelgate.top"
if [ -f "$work/replica.top" ]; then
  echo
  echo "replica, functions by own instructions over those $N requests:"
  cat "$work/replica.top"
fi
