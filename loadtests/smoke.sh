#!/usr/bin/env bash
# Smoke run of loadgen against a real modelgate on 127.0.0.1: a few seconds, bounded, and it
# passes only if every request was answered correctly. Not a timed test: no figure is asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p modelgate -p replica-runtime -p modelgate-loadtests --bins

work=$(mktemp -d)
key="smoke-add-key-0123456789abcdef"
cat > "$work/modelgate.toml" <<TOML
[server]
listen = "127.0.0.1:0"
data_dir = "data"
[[models]]
name = "add"
path = "$PWD/examples/add_numbers"
file = "add_numbers.py"
function = "add"
replicas = 2
access_key = "$key"
TOML

./target/debug/modelgate serve --config "$work/modelgate.toml" >"$work/out" 2>"$work/log" &
server=$!
cleanup() {
  kill -INT "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

addr=""
for _ in $(seq 1 200); do
  addr=$(sed -n 's#^modelgate listening on http://##p' "$work/out")
  [ -n "$addr" ] && break
  sleep 0.05
done
[ -n "$addr" ] || { echo "modelgate did not start"; cat "$work/log"; exit 1; }
for _ in $(seq 1 200); do
  curl -sf "http://$addr/readyz" >/dev/null && break
  sleep 0.05
done

# The model has authentication on (the default): load carries the first admin's API key.
export MODELGATE_API_KEY
MODELGATE_API_KEY=$(cat "$work/data/admin-api-key")
url="http://$addr/model"
./target/debug/loadgen --url "$url" --access-key "$key" --expect 8 --concurrency 4 --warmup 0.5 --duration 2
./target/debug/loadgen --url "$url" --access-key "$key" --expect 8 --mode open --rate 300 --warmup 0.5 --duration 2
./target/debug/loadgen --url "$url" --access-key "$key" --expect 8 --http2 --concurrency 4 --warmup 0.5 --duration 1
# Without the API key every request is refused, and loadgen says so.
if MODELGATE_API_KEY= ./target/debug/loadgen --url "$url" --access-key "$key" --concurrency 1 --warmup 0 --duration 0.3 --json >"$work/refused" 2>&1; then
  echo "requests without an API key were served"; cat "$work/refused"; exit 1
fi
grep -q '"errors":{"status_401":' "$work/refused" || { echo "expected only 401s without an API key:"; cat "$work/refused"; exit 1; }
echo "loadgen smoke: ok"
