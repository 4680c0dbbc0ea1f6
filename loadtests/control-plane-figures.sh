#!/usr/bin/env bash
# Control-plane figures for docs/PERFORMANCE.md, on a release build against 127.0.0.1 only:
#   1. time to build a model without dependencies (examples/add_numbers),
#   2. time from creating a deployment to its replica serving,
#   3. failed requests while a new build is deployed under a fixed-rate load.
# First it times what every build and replica start includes and modelgate does not control:
# starting the embedded interpreter and importing the add model (`replica-runtime check`, which
# imports and exits), median of 5. Python's `site` runs the environment's .pth files there, so a
# slow one shows in this line rather than as a slower modelgate.
# MG=/path/to/modelgate measures that build (e.g. the profile-guided one, with its runtime).
# Bounded: 5 checks, three builds, a few deployments, one 8 s load run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
work=$(mktemp -d)
starts=()
for _ in 1 2 3 4 5; do
  t0=$(date +%s%N)
  ./target/release/replica-runtime check --dir examples/add_numbers --file add_numbers.py --function add
  starts+=($((($(date +%s%N) - t0) / 1000000)))
done
echo "interpreter start and import of the add model (replica-runtime check): median $(printf '%s\n' "${starts[@]}" | sort -n | sed -n 3p) ms of ${starts[*]} ms" >&2
cat > "$work/c.toml" <<TOML
[server]
listen = "127.0.0.1:18700"
data_dir = "data"
TOML
"${MG:-./target/release/modelgate}" serve --config "$work/c.toml" >"$work/out" 2>"$work/log" &
server=$!
trap 'kill -INT $server; wait $server 2>/dev/null; rm -rf "$work"' EXIT
A=http://127.0.0.1:18700/api/v2
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18700/healthz >/dev/null && break; sleep 0.05; done
# The API needs the first admin's key; curl reads the header from a file, not the command line.
printf 'Authorization: Bearer %s\n' "$(cat "$work/data/admin-api-key")" >"$work/auth"
curl() { command curl -H @"$work/auth" "$@"; }
export MODELGATE_API_KEY
MODELGATE_API_KEY=$(cat "$work/data/admin-api-key")
cp -r examples/add_numbers "$work/project"
jq() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
# Milliseconds between two RFC 3339 fields of a JSON object, from the server's own timestamps
# (polling from a shell adds its own delay).
span_ms() { python3 -c "
import json, sys, datetime
o = json.load(sys.stdin)
t = lambda s: datetime.datetime.fromisoformat(s.replace('Z', '+00:00'))
print(round((t(o['$2']) - t(o['$1'])).total_seconds() * 1000))"; }

pid=$(curl -sf $A/projects -d "{\"name\":\"bench\",\"path\":\"$work/project\"}" | jq "['id']")
model=$(curl -sf $A/projects/$pid/models -d '{"name":"add"}')
mid=$(echo "$model" | jq "['id']"); key=$(echo "$model" | jq "['access_key']")
M=$A/projects/$pid/models/$mid

build() {
  local bid status
  bid=$(curl -sf $M/builds -d '{"file_path":"add_numbers.py","function_name":"add"}' | jq "['id']")
  while status=$(curl -sf $M/builds/$bid | jq "['status']"); [ "$status" != built ] && [ "$status" != "build failed" ]; do sleep 0.01; done
  echo "build $bid: $status, $(curl -sf $M/builds/$bid | span_ms created_at finished_at) ms from creation to finish" >&2
  echo "$bid"
}
deploy() {
  local did
  did=$(curl -sf $M/deployments -d "{\"build_id\":$1,\"replicas\":$2}" | jq "['id']")
  while [ "$(curl -sf $M/deployments/$did | jq "['status']")" != deployed ]; do sleep 0.005; done
  echo "deployment $did ($2 replicas): serving $(curl -sf $M/deployments/$did | span_ms created_at updated_at) ms after it was created" >&2
}

b1=$(build); b2=$(build); build >/dev/null
deploy "$b1" 1; deploy "$b2" 1; deploy "$b1" 2
echo "replica start times from the server log:" >&2
grep -o 'replica ready in [0-9]* ms' "$work/log" | sed 's/^/  /' >&2

# Redeploy under load: 1000 req/s open loop for 8 s; build 2 is deployed 2 s in.
./target/release/loadgen --url http://127.0.0.1:18700/model --access-key "$key" --expect 8 \
  --mode open --rate 1000 --warmup 0.5 --duration 8 --json >"$work/load.json" &
load=$!
sleep 2.5
deploy "$b2" 2
wait $load || true
echo "load during the redeploy: $(cat "$work/load.json")"
