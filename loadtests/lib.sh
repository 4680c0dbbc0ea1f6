# Helpers shared by the load scripts; sourced (`. loadtests/lib.sh`), not run. They assume the
# working directory is the repository root and release binaries in target/release.

# wait_ready PORT|ADDR LOG...: waits up to 60 s for modelgate's /readyz on 127.0.0.1:PORT, or on
# ADDR (host:port), over HTTPS when MG_SCHEME=https (as for a config that tls_config changed); if
# it never answers, prints the end of each LOG and exits 1.
wait_ready() {
  local addr=$1; shift
  [[ $addr == *:* ]] || addr=127.0.0.1:$addr
  for _ in $(seq 1 600); do
    curl -sfk "${MG_SCHEME:-http}://$addr/readyz" >/dev/null && return 0
    sleep 0.1
  done
  echo "modelgate on $addr not ready" >&2
  for log in "$@"; do tail -30 "$log" >&2; done
  exit 1
}

# listening_addr NAME LOG: waits up to 10 s for "NAME listening on http://ADDR" (or https://) in
# LOG (what modelgate, floor and hop-floor print once they accept connections) and prints ADDR; if
# it never appears, prints LOG and exits 1.
listening_addr() {
  local name=$1 log=$2 addr=""
  for _ in $(seq 1 200); do
    addr=$(sed -n "s#^$name listening on https\?://##p" "$log")
    [ -n "$addr" ] && { echo "$addr"; return 0; }
    sleep 0.05
  done
  echo "$name did not start" >&2
  cat "$log" >&2
  exit 1
}

# bench_load ARGS...: one loadgen run on CPU 1 (the servers are on CPU 0), printing only its JSON
# report line.
bench_load() {
  taskset -c 1 ./target/release/loadgen --json "$@" | tail -n 1
}

# loadgen_client: the loadgen flag for scripts that hold servers to the bare floor at c=16:
# `--raw` (HTTP/1.1 written and parsed by loadgen itself, cheap enough that one CPU keeps the
# floor busy; hyper's client could not), or nothing with RAW=0 (hyper's client, as every figure
# before the twentieth session of 2026-12-02).
loadgen_client() {
  [ "${RAW:-1}" = 0 ] || echo --raw
}

# add_config FILE PORT DATA_DIR ACCESS_KEY [REPLICA_RUNTIME]: writes a modelgate config that serves
# the bundled add model (one replica, authentication off) on 127.0.0.1:PORT.
add_config() {
  local file=$1 port=$2 data=$3 key=$4 runtime=${5:-}
  {
    printf '[server]\nlisten = "127.0.0.1:%s"\ndata_dir = "%s"\n' "$port" "$data"
    [ -z "$runtime" ] || printf 'replica_runtime = "%s"\n' "$runtime"
    model_toml add "$key" false
  } >"$file"
}

# tls_cert DIR: a self-signed certificate for 127.0.0.1 in DIR (cert.pem, key.pem), made with
# openssl unless DIR already holds one; loadgen trusts it with --ca-cert DIR/cert.pem.
tls_cert() {
  local dir=$1
  [ ! -f "$dir/cert.pem" ] || return 0
  command -v openssl >/dev/null || { echo "needs openssl (apt-get install openssl)" >&2; exit 1; }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
    -nodes -days 2 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -addext basicConstraints=critical,CA:FALSE -addext extendedKeyUsage=serverAuth \
    -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null
}

# tls_config FILE DIR: adds tls_cert DIR's certificate to the [server] table of the modelgate
# config FILE, which then serves HTTPS only (HTTP/1.1 and HTTP/2 by ALPN).
tls_config() {
  local file=$1 dir=$2
  tls_cert "$dir"
  sed -i "/^\[server\]\$/a tls_cert = \"$dir/cert.pem\"\ntls_key = \"$dir/key.pem\"" "$file"
}

# declare_models PORT DATA_DIR N: creates a project and N models in it (m1 to mN, no builds) on
# the modelgate at 127.0.0.1:PORT, through its API with the admin key in DATA_DIR (curl reads
# the header from a file there, so the key is never on a command line).
declare_models() {
  local api=http://127.0.0.1:$1/api/v2 auth=$2/auth-header project i
  printf 'Authorization: Bearer %s\n' "$(cat "$2/admin-api-key")" >"$auth"
  project=$(curl -sf -m 30 -H @"$auth" "$api/projects" -d '{"name":"many"}' |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')
  for i in $(seq 1 "$3"); do
    curl -sf -m 30 -o /dev/null -H @"$auth" "$api/projects/$project/models" -d "{\"name\":\"m$i\"}"
  done
}

# model_toml NAME ACCESS_KEY AUTHENTICATION [DIR FILE FUNCTION]: prints a [[models]] block for
# the config, by default of the bundled add model; AUTHENTICATION is true or false.
model_toml() {
  local dir=${4:-$PWD/examples/add_numbers} file=${5:-add_numbers.py} function=${6:-add}
  printf '[[models]]\nname = "%s"\npath = "%s"\nfile = "%s"\nfunction = "%s"\n' \
    "$1" "$dir" "$file" "$function"
  printf 'access_key = "%s"\nenable_authentication = %s\n' "$2" "$3"
}
