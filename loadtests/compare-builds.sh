#!/usr/bin/env bash
# Two builds of modelgate (each with its own replica-runtime) compared in one run, since this
# machine's figures drift by tens of per cent between runs minutes apart: rounds alternate the
# two builds, each round starting a fresh server on CPU 0 with the add model and one replica,
# loadgen on CPU 1, 127.0.0.1 only. Each round measures closed loop at c=1 and c=16 and an open
# loop at RATE req/s (latency from the intended send time, 32 connections).
#   A="/path/modelgate /path/replica-runtime" B="..." bash loadtests/compare-builds.sh
# B defaults to this tree's release build. SPIN=1 makes the client poll (loadgen --spin).
# SERVER_CPUS (default 0) is the servers' CPU list. TLS names the builds that serve HTTPS (a
# self-signed certificate; HTTP/1.1 by ALPN): TLS=AB compares two builds over TLS, and A=B with
# TLS=B measures what TLS costs one build. Keep a build with, e.g.:
#   cargo build --release -p modelgate -p replica-runtime && mkdir -p /tmp/a &&
#   cp target/release/{modelgate,replica-runtime} /tmp/a/
# Bounded: ROUNDS (default 5) x 2 builds x 3 runs of 0.5 + DURATION s (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
: "${A:?set A to \"<modelgate binary> <replica-runtime binary>\" of the build to compare}"
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
B=${B:-"$PWD/target/release/modelgate $PWD/target/release/replica-runtime"}
ROUNDS=${ROUNDS:-5}
D=${DURATION:-3}
RATE=${RATE:-14000}
KEY=compare-builds-key-0123456789
[[ ${TLS:-} =~ ^[AB]*$ ]] || { echo "TLS names builds: A, B or AB" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The rounds run in a subshell (the left of the pipe), so the server they start is theirs to stop,
# also when a failed run ends them (bash runs an EXIT trap of a `{ }` group there, not of a bare
# loop).
{
  trap '[ -z "${server:-}" ] || { kill -INT $server; wait $server; } 2>/dev/null || true' EXIT
  for round in $(seq 1 "$ROUNDS"); do
    for build in A B; do
      read -r mg rr <<<"${!build}"
      rm -rf "$work/data"
      add_config "$work/c.toml" 18680 "$work/data" "$KEY" "$rr"
      url=(--url http://127.0.0.1:18680/model) MG_SCHEME=http
      if [[ ${TLS:-} == *$build* ]]; then
        tls_config "$work/c.toml" "$work"
        url=(--url https://127.0.0.1:18680/model --ca-cert "$work/cert.pem") MG_SCHEME=https
      fi
      taskset -c "${SERVER_CPUS:-0}" "$mg" serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
      server=$!
      wait_ready 18680 "$work/log"
      run() { bench_load "${url[@]}" --access-key "$KEY" --expect 8 --warmup 0.5 --duration "$D" ${SPIN:+--spin} "$@"; }
      printf '%s\tc1\t' "$build"; run --concurrency 1
      printf '%s\tc16\t' "$build"; run --concurrency 16
      printf '%s\topen\t' "$build"; run --mode open --rate "$RATE" --connections 32
      kill -INT "$server"; wait "$server" || true; server=
    done
  done
} | tee "$work/runs" >&2
python3 - "$work/runs" "$RATE" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    build, what, j = line.rstrip("\n").split("\t", 2)
    r = json.loads(j)
    assert r["error_total"] == 0, line
    runs.setdefault((what, build), []).append(r)
med = lambda what, build, f: statistics.median(f(r) for r in runs[(what, build)])
rps = lambda r: r["achieved_rps"]
lat = lambda q: (lambda r: r["latency_us"][q])
rows = [("c=1 req/s", "c1", rps), ("c=1 p50 µs", "c1", lat("p50")), ("c=1 p99 µs", "c1", lat("p99")),
        ("c=16 req/s", "c16", rps), ("c=16 p50 µs", "c16", lat("p50")), ("c=16 p99 µs", "c16", lat("p99")),
        (f"open {sys.argv[2]}/s p50 µs", "open", lat("p50")), (f"open {sys.argv[2]}/s p99 µs", "open", lat("p99")),
        (f"open {sys.argv[2]}/s p99.9 µs", "open", lat("p99_9"))]
import os
tls = os.environ.get("TLS", "")
if tls:
    print("over TLS: " + ", ".join(b for b in "AB" if b in tls))
print("| median of rounds | A | B | B / A, medians | B / A, median of rounds | B better in |")
print("|---|---|---|---|---|---|")
for name, what, f in rows:
    a, b = med(what, "A", f), med(what, "B", f)
    higher_better = f is rps
    pairs = list(zip((f(r) for r in runs[(what, "A")]), (f(r) for r in runs[(what, "B")])))
    wins = sum((fb > fa) == higher_better and fb != fa for fa, fb in pairs)
    per_round = statistics.median(fb / fa for fa, fb in pairs)
    print(f"| {name} | {a:,.0f} | {b:,.0f} | {b / a:.2f} | {per_round:.2f} | {wins} of {len(pairs)} rounds |")
PY
