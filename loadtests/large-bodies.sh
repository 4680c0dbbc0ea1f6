#!/usr/bin/env bash
# What a large request costs, side by side in one run, servers on CPU 0 and the client on CPU 1:
#   floor     the bare hyper server reading the same body over HTTP and answering a fixed body:
#             what HTTP alone costs for that many bytes on this machine;
#   modelgate the proxy and one replica of a model answering the body's length;
#   hop       hop-floor --stream: bare hyper passing each frame of the body to the same replica
#             as it arrives, unparsed: about the least a proxy in front of a replica can do;
#   whole     hop-floor --stream --whole: the same, but only once the whole body has arrived, as
#             modelgate does so that a slow client never holds a replica: the least a proxy
#             with that rule can do;
#   direct    the same replica code called over its Unix socket, no HTTP, no proxy.
# The issue's "proxy overhead" is modelgate - direct; hop - direct is the least of it this design
# allows, whole - direct the least with modelgate's rule, and floor - floor(1 KB) the share that
# is moving the bytes over HTTP at all. Rounds alternate the five, and the table shows each
# one's median p50 over ROUNDS rounds (default 3) of DURATION s (default 3). Bounded: about
# ROUNDS x sizes x 5 runs (6 with BASELINE) of 0.5 + DURATION s.
# BASELINE=/path/to/an/older/modelgate adds that build as a sixth column, in the same rounds,
# to compare two builds side by side (it uses this tree's replica-runtime).
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
work=$(mktemp -d)
server= floor= hop= whole= baseline=
# Set before the first server starts, so that one failing to start stops the others.
trap 'kill -INT $server $hop $whole $baseline 2>/dev/null || true; kill $floor 2>/dev/null || true; wait; rm -rf "$work"' EXIT
mkdir -p "$work/models"
cat > "$work/models/size.py" <<'PY'
def size(args):
    return len(args["pad"])
PY
cat > "$work/c.toml" <<EOF
[server]
listen = "127.0.0.1:18630"
data_dir = "$work/data"
[[models]]
name = "size"
path = "$work/models"
file = "size.py"
function = "size"
access_key = "large-bodies-key-0123456789"
enable_authentication = false
EOF
taskset -c 0 ./target/release/modelgate serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
server=$!
taskset -c 0 ./target/release/floor --listen 127.0.0.1:18631 >/dev/null &
floor=$!
taskset -c 0 ./target/release/hop-floor --listen 127.0.0.1:18633 --stream \
  --dir "$work/models" --file size.py --function size >"$work/hop.log" &
hop=$!
taskset -c 0 ./target/release/hop-floor --listen 127.0.0.1:18634 --stream --whole \
  --dir "$work/models" --file size.py --function size >"$work/whole.log" &
whole=$!
if [ -n "${BASELINE:-}" ]; then
  sed -e 's/18630/18632/' -e "s|$work/data|$work/data-baseline|" "$work/c.toml" > "$work/b.toml"
  printf 'replica_runtime = "%s"\n' "$PWD/target/release/replica-runtime" > "$work/b-server"
  # replica_runtime belongs to [server]: insert it after that header.
  sed -i "/^\[server\]/r $work/b-server" "$work/b.toml"
  taskset -c 0 "$BASELINE" serve --config "$work/b.toml" >/dev/null 2>"$work/b.log" &
  baseline=$!
fi
wait_ready 18630 "$work/log"
listening_addr hop-floor "$work/hop.log" >/dev/null
listening_addr hop-floor "$work/whole.log" >/dev/null
[ -z "$baseline" ] || wait_ready 18632 "$work/b.log"
D=${DURATION:-3}
ROUNDS=${ROUNDS:-3}
SIZES=${SIZES:-1000 1000000 5000000}
for round in $(seq 1 "$ROUNDS"); do
  for n in $SIZES; do
    printf 'floor\t%s\t' "$n"
    bench_load --url http://127.0.0.1:18631/model --access-key x \
      --payload-bytes "$n" --expect 8 --concurrency 1 --warmup 0.5 --duration "$D"
    printf 'modelgate\t%s\t' "$n"
    bench_load --url http://127.0.0.1:18630/model --access-key large-bodies-key-0123456789 \
      --payload-bytes "$n" --expect "$n" --concurrency 1 --warmup 0.5 --duration "$D"
    printf 'hop\t%s\t' "$n"
    bench_load --url http://127.0.0.1:18633/model --access-key large-bodies-key-0123456789 \
      --payload-bytes "$n" --expect "$n" --concurrency 1 --warmup 0.5 --duration "$D"
    printf 'whole\t%s\t' "$n"
    bench_load --url http://127.0.0.1:18634/model --access-key large-bodies-key-0123456789 \
      --payload-bytes "$n" --expect "$n" --concurrency 1 --warmup 0.5 --duration "$D"
    if [ -n "$baseline" ]; then
      printf 'baseline\t%s\t' "$n"
      bench_load --url http://127.0.0.1:18632/model --access-key large-bodies-key-0123456789 \
        --payload-bytes "$n" --expect "$n" --concurrency 1 --warmup 0.5 --duration "$D"
    fi
    printf 'direct\t%s\t' "$n"
    taskset -c 1 ./target/release/replica-direct --runtime-cpu 0 --dir "$work/models" --file size.py --function size \
      --payload-bytes "$n" --expect "$n" --warmup 0.5 --duration "$D"
  done
done | tee "$work/runs" >&2
python3 - "$work/runs" <<'PY'
import statistics, sys
sys.path.insert(0, "loadtests")
import rounds
runs = rounds.p50_by_size(sys.argv[1])
sizes = sorted({n for n, _ in runs})
med = {k: statistics.median(v) for k, v in runs.items()}
fmt = lambda us: f"{us / 1000:.2f} ms" if us >= 1000 else f"{us:.0f} µs"
small = sizes[0]
print("| body | floor p50 | modelgate p50 | hop-floor p50 | hop-floor --whole p50 | direct p50 | modelgate − direct | hop-floor − direct | --whole − direct | floor − floor(%d B) |" % small)
print("|---|---|---|---|---|---|---|---|---|---|")
for n in sizes:
    f, m, h, w, d = (med[(n, who)] for who in ("floor", "modelgate", "hop", "whole", "direct"))
    http = f - med[(small, "floor")]
    print(f"| {n:,} B | {fmt(f)} | {fmt(m)} | {fmt(h)} | {fmt(w)} | {fmt(d)} | {fmt(m - d)} | {fmt(h - d)} | {fmt(w - d)} | {fmt(http)} |")
print()
whos = [w for w in ("baseline", "modelgate", "hop", "whole", "direct") if any(who == w for _, who in runs)]
print("| body | " + " | ".join(f"{w} p50 (each round)" for w in whos) + " |")
print("|---|" + "---|" * len(whos))
for n in sizes:
    row = lambda who: " · ".join(fmt(x) for x in sorted(runs[(n, who)]))
    print(f"| {n:,} B | " + " | ".join(row(w) for w in whos) + " |")
PY
