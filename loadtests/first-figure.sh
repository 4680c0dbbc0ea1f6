#!/usr/bin/env bash
# The first figure of docs/PERFORMANCE.md: the add model, one replica, closed loop at concurrency 1
# and 16. modelgate and its replica are pinned to CPU 0, the load generator to CPU 1.
# Bounded: two 5 s runs after 1 s of warm-up each, against 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
taskset -c 0 ./target/release/modelgate serve --config loadtests/configs/add-1replica.toml >/dev/null 2>/tmp/modelgate-bench.log &
server=$!
trap 'kill -INT $server; wait $server' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18600/readyz >/dev/null && break; sleep 0.1; done
for c in 1 16; do
  taskset -c 1 ./target/release/loadgen --url http://127.0.0.1:18600/model \
    --access-key bench-add-key-0123456789abcdef --expect 8 --concurrency "$c" --warmup 1 --duration 5 --json
done
