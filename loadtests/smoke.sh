#!/usr/bin/env bash
# Smoke run of loadgen against a real modelgate on 127.0.0.1: a few seconds, bounded, and it
# passes only if every request was answered correctly. Not a timed test: no figure is asserted.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
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
hop=
tls_server=
cleanup() {
  kill -INT "$server" 2>/dev/null || true
  [ -z "$tls_server" ] || kill -INT "$tls_server" 2>/dev/null || true
  [ -z "$hop" ] || kill -TERM "$hop" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

addr=$(listening_addr modelgate "$work/out") || { cat "$work/log"; exit 1; }
wait_ready "$addr" "$work/log"

# The model has authentication on (the default): load carries the first admin's API key.
export MODELGATE_API_KEY
MODELGATE_API_KEY=$(cat "$work/data/admin-api-key")
url="http://$addr/model"
./target/debug/loadgen --url "$url" --access-key "$key" --expect 8 --concurrency 4 --warmup 0.5 --duration 2
./target/debug/loadgen --url "$url" --access-key "$key" --expect 8 --mode open --rate 300 --warmup 0.5 --duration 2
./target/debug/loadgen --url "$url" --access-key "$key" --expect 8 --http2 --concurrency 4 --warmup 0.5 --duration 1
./target/debug/loadgen --url "$url" --access-key "$key" --expect 8 --raw --concurrency 4 --warmup 0.5 --duration 1
# Without the API key every request is refused, and loadgen says so.
if MODELGATE_API_KEY= ./target/debug/loadgen --url "$url" --access-key "$key" --concurrency 1 --warmup 0 --duration 0.3 --json >"$work/refused" 2>&1; then
  echo "requests without an API key were served"; cat "$work/refused"; exit 1
fi
grep -q '"errors":{"status_401":' "$work/refused" || { echo "expected only 401s without an API key:"; cat "$work/refused"; exit 1; }

# Over TLS (a self-signed certificate): HTTP/1.1 and HTTP/2 by ALPN, every answer checked.
sed 's/^data_dir = .*/data_dir = "tls-data"/' "$work/modelgate.toml" >"$work/tls.toml"
tls_config "$work/tls.toml" "$work"
./target/debug/modelgate serve --config "$work/tls.toml" >"$work/tls-out" 2>"$work/tls-log" &
tls_server=$!
tls_addr=$(listening_addr modelgate "$work/tls-out") || { cat "$work/tls-log"; exit 1; }
MG_SCHEME=https wait_ready "$tls_addr" "$work/tls-log"
# This server's own admin key, for these runs only: the later ones load the first server.
tls_key=$(cat "$work/tls-data/admin-api-key")
tls=(--url "https://$tls_addr/model" --access-key "$key" --expect 8 --warmup 0.3 --duration 1)
MODELGATE_API_KEY=$tls_key ./target/debug/loadgen "${tls[@]}" --ca-cert "$work/cert.pem" --concurrency 4
MODELGATE_API_KEY=$tls_key ./target/debug/loadgen "${tls[@]}" --ca-cert "$work/cert.pem" --concurrency 4 --http2
# A client that trusts another certificate gets no answer, and loadgen says why.
mkdir "$work/other" && tls_cert "$work/other"
if ./target/debug/loadgen "${tls[@]}" --ca-cert "$work/other/cert.pem" --concurrency 1 >"$work/untrusted" 2>&1; then
  echo "a client that does not trust the server's certificate was answered"; cat "$work/untrusted"; exit 1
fi
grep -q 'invalid peer certificate' "$work/untrusted" || { echo "expected a certificate error:"; cat "$work/untrusted"; exit 1; }
kill -INT "$tls_server"; wait "$tls_server" 2>/dev/null || true; tls_server=

# The comparison servers of the load scripts work too: hop-floor in front of a real replica, with
# a polling client, and the replica called directly with a polling client.
./target/debug/hop-floor --listen 127.0.0.1:0 --runtime target/debug/replica-runtime >"$work/hop" &
hop=$!
hop_addr=$(listening_addr hop-floor "$work/hop")
./target/debug/loadgen --url "http://$hop_addr/model" --access-key "$key" --expect 8 --concurrency 4 --spin --warmup 0.3 --duration 1
kill -TERM "$hop"; wait "$hop" 2>/dev/null || true; hop=
# hop-floor --batch, the floor of modelgate's batched dispatch: every answer checked (--expect).
./target/debug/hop-floor --listen 127.0.0.1:0 --batch 16 --runtime target/debug/replica-runtime >"$work/hop" &
hop=$!
hop_addr=$(listening_addr hop-floor "$work/hop")
./target/debug/loadgen --url "http://$hop_addr/model" --access-key "$key" --expect 8 --concurrency 16 --warmup 0.2 --duration 0.5
kill -TERM "$hop"; wait "$hop" 2>/dev/null || true; hop=
# hop-floor --stream, the large-body floor, forwards the body frame by frame: 1 MB bodies, which
# arrive in several frames, to a model that answers their length.
mkdir -p "$work/size"
printf 'def size(args):\n    return len(args["pad"])\n' >"$work/size/size.py"
./target/debug/hop-floor --listen 127.0.0.1:0 --stream --runtime target/debug/replica-runtime \
  --dir "$work/size" --file size.py --function size >"$work/hop" &
hop=$!
hop_addr=$(listening_addr hop-floor "$work/hop")
./target/debug/loadgen --url "http://$hop_addr/model" --access-key "$key" --payload-bytes 1000000 --expect 1000000 \
  --concurrency 2 --warmup 0.2 --duration 0.5
kill -TERM "$hop"; wait "$hop" 2>/dev/null || true; hop=
./target/debug/replica-direct --runtime target/debug/replica-runtime --spin --warmup 0.2 --duration 0.5 >/dev/null
# blocking-floor, the fewest system calls per request, alone and (--hop) in front of a real
# replica: every answer checked, on several connections at once.
# The fixed answer is 8, so --hop is checked with a request whose sum is not.
for mode in "" --hop; do
  args=(--expect 8)
  [ -z "$mode" ] || args=(--body '{"a":2,"b":40}' --expect 42)
  # shellcheck disable=SC2086 # an empty mode is no argument
  ./target/debug/blocking-floor --listen 127.0.0.1:0 $mode --runtime target/debug/replica-runtime >"$work/hop" &
  hop=$!
  hop_addr=$(listening_addr blocking-floor "$work/hop")
  ./target/debug/loadgen --url "http://$hop_addr/model" --access-key "$key" "${args[@]}" --concurrency 4 --warmup 0.2 --duration 0.5
  kill -TERM "$hop"; wait "$hop" 2>/dev/null || true; hop=
done
# The open loop with a polling client, whose spinning task releases the slots itself: every slot
# of the schedule is sent, at the rate asked.
./target/debug/loadgen --url "$url" --access-key "$key" --expect 8 --mode open --rate 400 --spin \
  --connections 4 --warmup 0.2 --duration 1 --json >"$work/open-spin"
python3 - "$work/open-spin" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["sent"] == 400, r  # the 1 s measured, at 400/s
assert 300 <= r["achieved_rps"] <= 500, r
PY
echo "loadgen smoke: ok"
