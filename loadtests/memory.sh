#!/usr/bin/env bash
# Memory figures of docs/PERFORMANCE.md, on a release build, 127.0.0.1 only:
#   1. modelgate's RSS idle (no models);
#   2. its RSS with 1,000 models in the routing state (created through the API, no replicas),
#      then after 20 scrapes of their 5 MB /metrics one after another and 16 four at a time;
#   3. the RSS of a replica of the add model against a bare python3 that imported the same module;
#   4. what an idle keep-alive connection costs: modelgate's RSS before and after CONNS (default
#      1,000) connections that each made one prediction and stay open;
#   5. modelgate's RSS before and after LOAD_SECONDS (default 10) of predictions at c=16 with
#      nobody scraping /metrics (nothing may pile up between scrapes).
# MG (default this tree's release build) is the modelgate binary measured.
# Bounded: one server, 1,000 API calls, 38 scrapes, one replica, CONNS connections and
# predictions, one loadgen run of 1 + LOAD_SECONDS s.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
MG=${MG:-./target/release/modelgate}
CONNS=${CONNS:-1000}
# The connections and modelgate's own descriptors must fit its open-file limit (it inherits ours).
ulimit -n "$((CONNS + 256))" 2>/dev/null || [ "$(ulimit -n)" -ge "$((CONNS + 256))" ] ||
  { echo "ulimit -n is $(ulimit -n): too low for CONNS=$CONNS" >&2; exit 1; }
work=$(mktemp -d)
printf '[server]\nlisten = "127.0.0.1:18640"\ndata_dir = "data"\n' > "$work/c.toml"
"$MG" serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
server=$!
trap 'kill -INT $server 2>/dev/null; wait $server 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do curl -sf http://127.0.0.1:18640/healthz >/dev/null && break; sleep 0.05; done
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
sleep 1
echo "idle: RSS $(rss $server) kB (peak $(hwm $server) kB)"
declare_models 18640 "$work/data" 1000
curl -sf http://127.0.0.1:18640/metrics >/dev/null  # the exposition, rendered once
echo "1000 models: RSS $(rss $server) kB (peak $(hwm $server) kB), $(curl -sf http://127.0.0.1:18640/metrics | wc -c) bytes of /metrics"
# Scrapes render 5 MB each, one at a time on a blocking thread: what they leave behind.
for _ in $(seq 1 20); do curl -sf -m 30 -o /dev/null http://127.0.0.1:18640/metrics; done
echo "1000 models after 20 more scrapes: RSS $(rss $server) kB (peak $(hwm $server) kB)"
for _ in 1 2 3 4; do
  scrapers=()
  for _ in 1 2 3 4; do curl -sf -m 30 -o /dev/null http://127.0.0.1:18640/metrics & scrapers+=($!); done
  wait "${scrapers[@]}"
done
echo "1000 models after 16 more, 4 at a time: RSS $(rss $server) kB (peak $(hwm $server) kB)"
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
access_key = "memory-key-0123456789"
enable_authentication = false
TOML
"$MG" serve --config "$work/add.toml" >/dev/null 2>"$work/log2" &
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

# Idle keep-alive connections, each after one prediction (so hyper has set up everything a
# connection keeps between requests).
python3 - "$server" "$CONNS" <<'PY'
import json, socket, sys, time

pid, n = sys.argv[1], int(sys.argv[2])
body = json.dumps({"accessKey": "memory-key-0123456789", "request": {"a": 3, "b": 5}}).encode()
req = (b"POST /model HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
       b"Content-Length: %d\r\n\r\n" % len(body)) + body

def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])

def connect():
    return socket.create_connection(("127.0.0.1", 18641), timeout=10)

def recv(s):
    data = s.recv(65536)
    if not data:
        raise SystemExit("modelgate closed a connection")
    return data

def predict(s):
    s.sendall(req)
    got = b""
    while b"\r\n\r\n" not in got:
        got += recv(s)
    head, rest = got.split(b"\r\n\r\n", 1)
    length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
    while len(rest) < length:
        rest += recv(s)
    assert head.startswith(b"HTTP/1.1 200") and json.loads(rest)["response"] == 8, (head, rest)

warm = connect()
for _ in range(20):
    predict(warm)
time.sleep(0.5)
before = rss()
conns = []
for _ in range(n):
    s = connect()
    predict(s)
    conns.append(s)
time.sleep(1)
after = rss()
# Every connection must still be open (an idle one is closed after header_read_timeout_secs, 10 s
# by default), or the figure would count fewer than n.
for s in conns:
    predict(s)
print(f"{n} idle keep-alive connections: RSS {before} -> {after} kB, "
      f"{(after - before) * 1024 / n:,.0f} bytes per connection")
PY

# Sustained load with nobody scraping /metrics.
before=$(rss $server)
./target/release/loadgen --url http://127.0.0.1:18641/model --access-key memory-key-0123456789 \
  --expect 8 --concurrency 16 --warmup 1 --duration "${LOAD_SECONDS:-10}" --timeout 30 --json >"$work/load"
echo "$(python3 -c "import json; print(f\"{json.load(open('$work/load'))['ok']:,}\")") predictions at c=16, nobody scraping: RSS $before -> $(rss $server) kB"
