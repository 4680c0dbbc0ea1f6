#!/usr/bin/env bash
# Memory figures of docs/PERFORMANCE.md, on a release build, 127.0.0.1 only:
#   1. modelgate's RSS idle (no models);
#   2. its RSS with 1,000 models in the routing state (created through the API, no replicas);
#   3. the RSS of a replica of the add model against a bare python3 that imported the same module.
# Bounded: one server, 1,000 API calls, one replica.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p modelgate -p replica-runtime
work=$(mktemp -d)
printf '[server]\nlisten = "127.0.0.1:18640"\ndata_dir = "data"\n' > "$work/c.toml"
./target/release/modelgate serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18640/healthz >/dev/null && break; sleep 0.05; done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
sleep 1
echo "idle: RSS $(rss $server) kB (peak $(hwm $server) kB)"
printf 'Authorization: Bearer %s\n' "$(cat "$work/data/admin-api-key")" >"$work/auth"
A=http://127.0.0.1:18640/api/v2
pid=$(curl -sf -H @"$work/auth" $A/projects -d '{"name":"many"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for i in $(seq 1 1000); do
  curl -sf -o /dev/null -H @"$work/auth" $A/projects/$pid/models -d "{\"name\":\"m$i\"}"
done
curl -sf http://127.0.0.1:18640/metrics >/dev/null  # the exposition, rendered once
echo "1000 models: RSS $(rss $server) kB (peak $(hwm $server) kB), $(curl -sf http://127.0.0.1:18640/metrics | wc -c) bytes of /metrics"
kill -INT $server; wait $server 2>/dev/null || true

# A replica of the add model against python3 with the same module imported.
cat > "$work/add.toml" <<TOML
[server]
listen = "127.0.0.1:18641"
data_dir = "data2"
[[models]]
name = "add"
path = "$PWD/examples/add_numbers"
file = "add_numbers.py"
function = "add"
enable_authentication = false
TOML
./target/release/modelgate serve --config "$work/add.toml" >/dev/null 2>"$work/log2" &
server=$!
for _ in $(seq 1 300); do curl -sf http://127.0.0.1:18641/readyz >/dev/null && break; sleep 0.1; done
sleep 1
replica=$(pgrep -P $server -f replica-runtime | head -1)
python3 -c "
import sys, time
sys.path.insert(0, '$PWD/examples/add_numbers')
import add_numbers
time.sleep(30)" &
bare=$!
sleep 1
echo "add replica: RSS $(rss $replica) kB; python3 with add_numbers imported: RSS $(rss $bare) kB"
kill $bare
