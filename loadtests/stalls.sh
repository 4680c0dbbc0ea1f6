#!/usr/bin/env bash
# The machine's own stalls: `stalls` spins on CPU 0 reading the clock and records every gap of
# more than 200 µs (time it wanted the CPU and did not run), alone and while CPU 1 is kept busy
# the way a load generator keeps it. ROUNDS (default 3) rounds of both, DURATION (default 5) s
# each. No network. Bounded: ROUNDS x 2 runs of DURATION s.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p modelgate-loadtests
D=${DURATION:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for round in $(seq 1 "${ROUNDS:-3}"); do
  printf 'alone\t'; taskset -c 0 ./target/release/stalls --duration "$D"
  taskset -c 1 ./target/release/stalls --busy --duration "$(python3 -c "print($D + 1)")" & busy=$!
  sleep 0.2
  printf 'CPU 1 busy\t'; taskset -c 0 ./target/release/stalls --duration "$D"
  wait $busy
done | tee "$out/runs" >&2
python3 - "$out/runs" <<'PY'
import json, sys
print("| CPU 1 | gaps > 200 µs | gaps > 1 ms | CPU 0 stalled | longest (ms into the run: µs) |")
print("|---|---|---|---|---|")
for line in open(sys.argv[1]):
    label, j = line.rstrip("\n").split("\t", 1)
    r = json.loads(j)
    worst = ", ".join(f"{w['at_ms']}: {w['us']:,}" for w in r["worst"][:4])
    print(f"| {label} | {r['gaps']} | {r['gaps_over_1ms']} | {r['stalled_pct']:.2f} % | {worst} |")
PY
