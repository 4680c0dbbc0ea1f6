#!/usr/bin/env bash
# What a large answer costs: an echo model (the request comes back as the answer, so each body
# crosses every hop twice), side by side in one run, servers on CPU 0 and the client on CPU 1:
#   floor     floor --echo: bare hyper reading the body (into one buffer) and answering its `request` in the
#             success envelope: what HTTP alone costs for that many bytes each way;
#   modelgate this tree's proxy and one replica of the echo model (MG="<modelgate>
#             [<replica-runtime>]" another build, e.g. the profile-guided one);
#   baseline  BASELINE="<modelgate> <replica-runtime>", another build in the same rounds, e.g. this
#             tree's proxy with a runtime from before lent answers (which then never lends);
#   direct    the same replica code called over its Unix socket, no HTTP, no proxy (the runtime
#             MG names, else this tree's).
# Every answer is checked. The table shows each one's median p50 over ROUNDS rounds (default 3)
# of DURATION s (default 3), and every round's. Bounded: ROUNDS x sizes x 4 runs of
# 0.5 + DURATION s, 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
. loadtests/lib.sh
cargo build -q --release -p modelgate -p replica-runtime -p modelgate-loadtests
work=$(mktemp -d)
server= floor= baseline=
trap 'kill -INT $server $baseline 2>/dev/null || true; kill $floor 2>/dev/null || true; wait; rm -rf "$work"' EXIT
mkdir -p "$work/models"
printf 'def echo(args):\n    return args\n' > "$work/models/echo.py"
KEY=large-answers-key-0123456789
config() { # file port data [runtime]
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\ndata_dir = "%s"\n' "$2" "$3"
    [ -z "${4:-}" ] || printf 'replica_runtime = "%s"\n' "$4"
    model_toml echo "$KEY" false "$work/models" echo.py echo
  } >"$1"
}
read -r mg mg_rt <<<"${MG:-./target/release/modelgate}"
config "$work/c.toml" 18635 "$work/data" "${mg_rt:-}"
taskset -c 0 "$mg" serve --config "$work/c.toml" >/dev/null 2>"$work/log" &
server=$!
taskset -c 0 ./target/release/floor --listen 127.0.0.1:18636 --echo >"$work/floor.log" &
floor=$!
if [ -n "${BASELINE:-}" ]; then
  read -r base_mg base_rt <<<"$BASELINE"
  config "$work/b.toml" 18637 "$work/data-baseline" "$base_rt"
  taskset -c 0 "$base_mg" serve --config "$work/b.toml" >/dev/null 2>"$work/b.log" &
  baseline=$!
fi
wait_ready 18635 "$work/log"
listening_addr floor "$work/floor.log" >/dev/null
[ -z "$baseline" ] || wait_ready 18637 "$work/b.log"
D=${DURATION:-3}
ROUNDS=${ROUNDS:-3}
SIZES=${SIZES:-100000 1000000 5000000}
load() { # name port size
  printf '%s\t%s\t' "$1" "$3"
  bench_load --url "http://127.0.0.1:$2/model" --access-key "$KEY" \
    --payload-bytes "$3" --expect-echo --concurrency 1 --warmup 0.5 --duration "$D"
}
for round in $(seq 1 "$ROUNDS"); do
  for n in $SIZES; do
    load floor 18636 "$n"
    load modelgate 18635 "$n"
    [ -z "$baseline" ] || load baseline 18637 "$n"
    printf 'direct\t%s\t' "$n"
    taskset -c 1 ./target/release/replica-direct --runtime "${mg_rt:-target/release/replica-runtime}" \
      --runtime-cpu 0 --dir "$work/models" --file echo.py \
      --function echo --payload-bytes "$n" --expect-echo --warmup 0.5 --duration "$D"
  done
done | tee "$work/runs" >&2
echo "answers lent by modelgate's replica: $(curl -s http://127.0.0.1:18635/metrics |
  sed -n 's/^modelgate_answers_in_place_total //p')"
python3 - "$work/runs" <<'PY'
import statistics, sys
sys.path.insert(0, "loadtests")
import rounds
runs = rounds.p50_by_size(sys.argv[1])
sizes = sorted({n for n, _ in runs})
whos = [w for w in ("floor", "modelgate", "baseline", "direct") if any(who == w for _, who in runs)]
med = {k: statistics.median(v) for k, v in runs.items()}
fmt = lambda us: f"{us / 1000:.2f} ms" if abs(us) >= 1000 else f"{us:.0f} µs"
extra = ["modelgate − baseline"] if "baseline" in whos else []
print("| body each way | " + " | ".join(f"{w} p50" for w in whos) + " | modelgate − direct | modelgate − floor | "
      + " | ".join(extra) + (" |" if extra else ""))
print("|---|" + "---|" * (len(whos) + 2 + len(extra)))
for n in sizes:
    cells = [fmt(med[(n, w)]) for w in whos]
    cells += [fmt(med[(n, "modelgate")] - med[(n, "direct")]), fmt(med[(n, "modelgate")] - med[(n, "floor")])]
    if extra:
        per = [m - b for m, b in zip(runs[(n, "modelgate")], runs[(n, "baseline")])]
        cells.append(f"{fmt(statistics.median(per))} (rounds: {', '.join(fmt(x) for x in per)})")
    print(f"| {n:,} B | " + " | ".join(cells) + " |")
print()
print("| body each way | " + " | ".join(f"{w} p50 (each round)" for w in whos) + " |")
print("|---|" + "---|" * len(whos))
for n in sizes:
    row = lambda who: " · ".join(fmt(x) for x in runs[(n, who)])
    print(f"| {n:,} B | " + " | ".join(row(w) for w in whos) + " |")
PY
