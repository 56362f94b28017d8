#!/usr/bin/env bash
# Load benchmark of the identity service against bare-tonic controls (issues 7 and 14).
#
#   bash benches/load.sh            # full run (about 5-10 minutes on 2 cores, plus the build)
#   ROUNDS=1 N_HOT=50000 N_DISTINCT=100000 bash benches/load.sh   # a quick look
#
# What it does: builds the release binaries; starts the identity service on
# SQLite and on PostgreSQL (when 127.0.0.1:5432 answers) in the default
# configuration as users run it (info logs, no trace export; IDENTITY_LOG_LEVEL
# from the environment if set) plus the settings below and API keys, 1,000
# imported users linked to Clerk ids; starts two more on SQLite with OTLP
# trace export on to a local sink that drops spans (benches/control
# otlp-sink): one with the parent-based 1 % ratio sampler, one with
# OTEL_TRACES_SAMPLER=always_on; prints the configuration of every server
# it starts; starts the
# controls (benches/control: a bare tonic echo server and a raw jsonwebtoken
# verify server, same tonic version, release profile and allocator); writes the gRPC
# request bodies; checks each body with a real gRPC client (grpc-status 0 and
# a principal, not a rejection); then runs every case ROUNDS times,
# interleaved, and prints req/s, latency percentiles and the issue's ratios.
#
# Load generators: h2load (`-c 16 -m 8 -t 1`) for a repeated request body.
# h2load sends one body (`-d FILE`) for every request, so the cases that need
# a new token per call use `benchtool load`, a one-thread HTTP/2 generator in
# benches/control built on the h2 crate with the same -c/-m model; it checks
# grpc-status and the answer of every response. A ratio is always taken
# between runs of the same generator.
#
# Knobs (environment): ROUNDS (5), N_HOT (200000), N_RAW (100000), N_COLD_LEGACY
# (100000), N_COLD_RS (40000), N_LOW (5000), N_DISTINCT (1000000), USERS (1000),
# BENCH_PIN (0; 1 pins servers to CPU 1 and the load generator to CPU 0),
# BENCH_PG (postgres://postgres@127.0.0.1:5432), SKIP_BUILD (0), IDENTITY_LOG_LEVEL
# (unset: the default, info).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

ROUNDS=${ROUNDS:-5}
N_HOT=${N_HOT:-200000}
N_RAW=${N_RAW:-100000}
N_COLD_LEGACY=${N_COLD_LEGACY:-100000}
N_COLD_RS=${N_COLD_RS:-40000}
N_LOW=${N_LOW:-5000}
N_DISTINCT=${N_DISTINCT:-1000000}
USERS=${USERS:-1000}
BENCH_PIN=${BENCH_PIN:-0}
BENCH_PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
C=16
M=8

ISSUER=https://clerk.bench.example.com
LEGACY_SECRET=bench-legacy-secret-0123456789abcdef
CLERK_KEY=$ROOT/tests/fixtures/clerk_a.key.pem
CLERK_PUB=$ROOT/tests/fixtures/clerk_a.pub.pem
VERIFY_PATH=/identity.v1.IdentityService/VerifyToken
ECHO_PATH=/control.v1.Echo/Echo
RAW_PATH=/control.v1.RawVerify/Verify

# Fixed ports below the kernel's ephemeral range (32768-60999 by default), so an
# outgoing connection of another program on the machine cannot hold one.
ADDR_ECHO=127.0.0.1:21161
ADDR_RAW_RS=127.0.0.1:21162
ADDR_RAW_HS=127.0.0.1:21163
ADDR_SQLITE=127.0.0.1:21164
ADDR_PG=127.0.0.1:21165
ADDR_OTLP_SINK=127.0.0.1:21166
ADDR_OTLP1=127.0.0.1:21167
ADDR_ALWAYS=127.0.0.1:21168
ADDR_STARTUP=127.0.0.1:21171
# Prometheus endpoints of the identity processes (IDENTITY_METRICS_ADDR), one each.
METRICS_SQLITE=127.0.0.1:21174
METRICS_PG=127.0.0.1:21175
METRICS_STARTUP=127.0.0.1:21176
METRICS_OTLP1=127.0.0.1:21177
METRICS_ALWAYS=127.0.0.1:21178

WORK=$(mktemp -d /tmp/identity-bench.XXXXXX)
RESULTS=$WORK/results.jsonl
PIDS=()
PG_DB=""
BIN=$ROOT/target/release
SCRIPT_START=$(date +%s)

say() { printf '\n== %s\n' "$*"; }
die() { echo "load.sh: $*" >&2; exit 1; }

cleanup() {
  local status=$? pid f
  if [ "$status" != 0 ]; then
    for f in "$WORK"/*.log; do
      [ -f "$f" ] && [ "$(basename "$f")" != h2.log ] && { echo "--- $(basename "$f") (last lines)"; tail -n 15 "$f"; }
    done
  fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -n "$PG_DB" ]; then psql "$BENCH_PG/postgres" -qAtc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

if [ "$BENCH_PIN" = 1 ]; then
  SERVER_PIN=(taskset -c 1)
  CLIENT_PIN=(taskset -c 0)
else
  SERVER_PIN=()
  CLIENT_PIN=()
fi

# ---------------------------------------------------------------- prerequisites
if ! command -v h2load >/dev/null 2>&1; then
  say "installing h2load (Debian package nghttp2-client)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null
fi
command -v python3 >/dev/null || die "python3 is needed for the report"

say "machine"
echo "cores: $(nproc); cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
echo "memory: $(free -g | awk '/Mem:/ {print $2}') GiB; kernel $(uname -r)"
echo "$(h2load --version 2>&1 | head -1); $(rustc --version)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)')"
if [ "$BENCH_PIN" = 1 ]; then
  echo "pinning: servers on CPU 1, load generator on CPU 0 (taskset; tokio then sizes its pool to 1 worker)"
else
  echo "pinning: none - servers (tokio, 2 workers) and the load generator (1 thread) share both cores"
fi
echo "load: -c $C -m $M, $ROUNDS rounds interleaved; low load: -c 1 -m 1"

# ------------------------------------------------------------------------ build
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  say "building release binaries"
  cargo build --release --quiet -p identity --bin identity
  cargo build --release --quiet -p identity-bench --bins
fi
for b in identity control-echo control-verify benchtool otlp-sink; do [ -x "$BIN/$b" ] || die "missing $BIN/$b"; done
TOOL=("${CLIENT_PIN[@]}" "$BIN/benchtool")

# ---------------------------------------------------------------- configuration
KEYGEN=$("$BIN/identity" gen-api-key --name bench --scopes verify,migrate,admin)
API_KEY=$(echo "$KEYGEN" | grep -Eo 'idk_[A-Za-z0-9_-]+' | head -1)
API_LINE=$(echo "$KEYGEN" | grep -E '^ *bench:' | tr -d ' ')
[ -n "$API_KEY" ] && [ -n "$API_LINE" ] || die "cannot read the generated API key"

# The fixed configuration of every identity process in this benchmark.
export IDENTITY_API_KEYS="$API_LINE"
export IDENTITY_LEGACY_JWT_SECRET="$LEGACY_SECRET"
export IDENTITY_CLERK_ISSUER="$ISSUER"
export IDENTITY_CLERK_JWT_KEY_FILE="$CLERK_PUB"
export IDENTITY_UNMAPPED_CLERK_USER=reject
# Logging and tracing stay as users get them unless the caller's environment
# says otherwise; trace export is switched on per server below only.
unset IDENTITY_DATABASE_URL IDENTITY_LISTEN_ADDR IDENTITY_METRICS_ADDR IDENTITY_CLERK_JWT_KEY
unset OTEL_EXPORTER_OTLP_ENDPOINT OTEL_EXPORTER_OTLP_TRACES_ENDPOINT OTEL_TRACES_SAMPLER OTEL_TRACES_SAMPLER_ARG OTEL_SDK_DISABLED
echo "identity configuration (every identity server): legacy HS256 secret, Clerk issuer $ISSUER with a PEM key"
echo "  (networkless RS256), unmapped Clerk users rejected, API keys (IDENTITY_API_KEYS; every call sends one), everything"
echo "  else default (token cache ${IDENTITY_TOKEN_CACHE_SIZE:-50000} entries, user cache ${IDENTITY_USER_CACHE_SECONDS:-10} s, settings refresh 2 s, health ping 5 s)"

# ------------------------------------------------------------------- start-up
say "start-up to SERVING on an empty SQLite database (3 runs)"
IDENTITY_METRICS_ADDR=$METRICS_STARTUP "${SERVER_PIN[@]}" "$BIN/benchtool" startup --bin "$BIN/identity" --addr "$ADDR_STARTUP" --dir "$WORK" --runs 3 | tee "$WORK/startup.out"
grep '^{' "$WORK/startup.out" >> "$RESULTS"

# ------------------------------------------------------------------ seed data
say "seed data: $USERS legacy users, each linked to a Clerk user"
python3 - "$USERS" "$WORK" <<'EOF'
import sys, uuid
n, work = int(sys.argv[1]), sys.argv[2]
ids = [str(uuid.uuid4()) for _ in range(n)]
with open(f"{work}/users.csv", "w") as f:
    f.write("id,email,password_hash\n")
    for i, u in enumerate(ids):
        f.write(f"{u},bench{i}@example.com,$2b$12$abcdefghijklmnopqrstuv\n")
with open(f"{work}/user_ids.txt", "w") as f:
    f.write("\n".join(ids) + "\n")
with open(f"{work}/clerk_ids.txt", "w") as f:
    f.write("\n".join(f"user_bench{i:06d}" for i in range(n)) + "\n")
with open(f"{work}/pairs.txt", "w") as f:
    f.write("\n".join(f"{u},user_bench{i:06d}" for i, u in enumerate(ids)) + "\n")
EOF
head -1 "$WORK/user_ids.txt" > "$WORK/user0.txt"
head -1 "$WORK/clerk_ids.txt" > "$WORK/clerk0.txt"

SQLITE_URL="sqlite://$WORK/bench.db"
IDENTITY_DATABASE_URL="$SQLITE_URL" "$BIN/identity" import-users "$WORK/users.csv" >/dev/null
PG_URL=""
if psql "$BENCH_PG/postgres" -qAtc "select 1" >/dev/null 2>&1; then
  PG_DB="identity_bench_$$"
  psql "$BENCH_PG/postgres" -qAtc "CREATE DATABASE $PG_DB" >/dev/null
  PG_URL="$BENCH_PG/$PG_DB"
  IDENTITY_DATABASE_URL="$PG_URL" "$BIN/identity" import-users "$WORK/users.csv" >/dev/null
  echo "PostgreSQL: fresh database $PG_DB"
else
  echo "PostgreSQL: not reachable at $BENCH_PG - its cases are skipped"
fi

# The trace-export servers get databases of their own (same users).
SQLITE_OTLP1_URL="sqlite://$WORK/bench-otlp1.db"
SQLITE_ALWAYS_URL="sqlite://$WORK/bench-always.db"
IDENTITY_DATABASE_URL="$SQLITE_OTLP1_URL" "$BIN/identity" import-users "$WORK/users.csv" >/dev/null
IDENTITY_DATABASE_URL="$SQLITE_ALWAYS_URL" "$BIN/identity" import-users "$WORK/users.csv" >/dev/null

# -------------------------------------------------------------------- servers
start() { # name addr cmd...
  local name=$1 addr=$2; shift 2
  "${SERVER_PIN[@]}" "$@" >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  eval "PID_${name//-/_}=$!"
}
# Prints what an identity server runs with, read from the environment it gets.
describe() { # name addr database (the OTEL_* / IDENTITY_* of the server in the environment)
  local otlp="off" sampler="-"
  if [ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]; then
    otlp="on -> ${OTEL_EXPORTER_OTLP_ENDPOINT} (local sink, drops spans)"
    sampler="${OTEL_TRACES_SAMPLER:-parentbased_always_on (default)}${OTEL_TRACES_SAMPLER_ARG:+ arg ${OTEL_TRACES_SAMPLER_ARG}}"
  fi
  printf '  %-14s %s  database %s; log level %s, format %s; OTLP %s; sampler %s; API keys %s\n' \
    "$1" "$2" "$3" "${IDENTITY_LOG_LEVEL:-info (default)}" "${IDENTITY_LOG_FORMAT:-text (default)}" \
    "$otlp" "$sampler" "$([ -n "${IDENTITY_API_KEYS:-}" ] && echo "on (required on every call)" || echo off)"
}
serve() { # name addr metrics-addr database-url [VAR=value...]: an identity server with these extra variables
  local name=$1 addr=$2 metrics=$3 db=$4; shift 4
  (if [ $# -gt 0 ]; then export "$@"; fi; describe "$name" "$addr" "$(echo "$db" | sed -E 's#//[^@/]*@#//#')")
  # env and taskset exec the server, so $! is the server's own pid (CPU time below).
  env IDENTITY_DATABASE_URL="$db" IDENTITY_LISTEN_ADDR="$addr" IDENTITY_METRICS_ADDR="$metrics" "$@" \
    "${SERVER_PIN[@]}" "$BIN/identity" serve >"$WORK/$name.log" 2>&1 &
  PIDS+=("$!")
  eval "PID_${name//-/_}=$!"
}
say "starting servers"
echo "  echo           $ADDR_ECHO  control-echo: bare tonic unary echo, no API key, no logs, no tracing"
start echo "$ADDR_ECHO" "$BIN/control-echo" "$ADDR_ECHO"
echo "  raw_rs         $ADDR_RAW_RS  control-verify: jsonwebtoken RS256 verify only, no API key, no logs, no tracing"
CONTROL_RSA_PEM="$CLERK_PUB" CONTROL_ISSUER="$ISSUER" start raw_rs "$ADDR_RAW_RS" "$BIN/control-verify" "$ADDR_RAW_RS"
echo "  raw_hs         $ADDR_RAW_HS  control-verify: jsonwebtoken HS256 verify only, no API key, no logs, no tracing"
CONTROL_HS_SECRET="$LEGACY_SECRET" start raw_hs "$ADDR_RAW_HS" "$BIN/control-verify" "$ADDR_RAW_HS"
echo "  otlp_sink      $ADDR_OTLP_SINK  otlp-sink: OTLP/gRPC TraceService that answers OK and drops the spans"
start otlp_sink "$ADDR_OTLP_SINK" "$BIN/otlp-sink" "$ADDR_OTLP_SINK"
serve sqlite "$ADDR_SQLITE" "$METRICS_SQLITE" "$SQLITE_URL"
if [ -n "$PG_URL" ]; then
  serve postgres "$ADDR_PG" "$METRICS_PG" "$PG_URL"
fi
OTLP_ENV=(OTEL_EXPORTER_OTLP_ENDPOINT="http://$ADDR_OTLP_SINK" OTEL_SERVICE_NAME=identity-bench)
serve sqlite-otlp1 "$ADDR_OTLP1" "$METRICS_OTLP1" "$SQLITE_OTLP1_URL" "${OTLP_ENV[@]}" \
  OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01
serve sqlite-always "$ADDR_ALWAYS" "$METRICS_ALWAYS" "$SQLITE_ALWAYS_URL" "${OTLP_ENV[@]}" OTEL_TRACES_SAMPLER=always_on
"$BIN/benchtool" wait-serving --tcp --addr "$ADDR_ECHO"
"$BIN/benchtool" wait-serving --tcp --addr "$ADDR_OTLP_SINK"
"$BIN/benchtool" wait-serving --addr "$ADDR_OTLP1"
"$BIN/benchtool" wait-serving --addr "$ADDR_ALWAYS"
"$BIN/benchtool" wait-serving --tcp --addr "$ADDR_RAW_RS"
"$BIN/benchtool" wait-serving --tcp --addr "$ADDR_RAW_HS"
"$BIN/benchtool" wait-serving --addr "$ADDR_SQLITE"
"$BIN/benchtool" link --addr "$ADDR_SQLITE" --api-key "$API_KEY" --pairs "$WORK/pairs.txt"
DBS=(sqlite)
if [ -n "$PG_URL" ]; then
  "$BIN/benchtool" wait-serving --addr "$ADDR_PG"
  "$BIN/benchtool" link --addr "$ADDR_PG" --api-key "$API_KEY" --pairs "$WORK/pairs.txt"
  DBS+=(postgres)
fi
addr_of() { case $1 in sqlite) echo "$ADDR_SQLITE" ;; postgres) echo "$ADDR_PG" ;; sqlite-otlp1) echo "$ADDR_OTLP1" ;; sqlite-always) echo "$ADDR_ALWAYS" ;; esac; }
# Servers with trace export on: the repeated legacy token only (issue 14).
TRACED=(sqlite-otlp1 sqlite-always)

# ------------------------------------------------------------- request bodies
say "request bodies (gRPC frames: flag 0, 4-byte big-endian length, protobuf VerifyTokenRequest)"
"$BIN/benchtool" mint-legacy --secret "$LEGACY_SECRET" --users "$WORK/user0.txt" --count 1 --out "$WORK/legacy_one.bin"
"$BIN/benchtool" mint-clerk --key "$CLERK_KEY" --kid ins_clerk_a --issuer "$ISSUER" --subs "$WORK/clerk0.txt" --count 1 --out "$WORK/clerk_one.bin"
"$BIN/benchtool" mint-legacy --secret "$LEGACY_SECRET" --users "$WORK/user_ids.txt" --count $((N_COLD_LEGACY * ROUNDS)) --out "$WORK/legacy_cold.bin"
"$BIN/benchtool" mint-clerk --key "$CLERK_KEY" --kid ins_clerk_a --issuer "$ISSUER" --subs "$WORK/clerk_ids.txt" --count $((N_COLD_RS * ROUNDS)) --out "$WORK/clerk_cold.bin"
"$BIN/benchtool" mint-legacy --secret "$LEGACY_SECRET" --users "$WORK/user_ids.txt" --count "$N_DISTINCT" --out "$WORK/legacy_distinct.bin"
echo "repeated legacy body: $(stat -c %s "$WORK/legacy_one.bin") bytes; repeated Clerk body: $(stat -c %s "$WORK/clerk_one.bin") bytes"

# Round r of a cold case takes slice r of the cold files, so every token an
# identity process sees there is new to it (the SQLite and PostgreSQL
# processes have their own caches); the controls (no cache) reuse slice 0.
slice() { # db round -> slice index
  echo $(( $2 - 1 ))
}

say "checking every request body with a gRPC client (grpc-status 0 and the expected answer)"
chk() { "$BIN/benchtool" check --api-key "$API_KEY" "$@"; }
chk --addr "$ADDR_ECHO" --path "$ECHO_PATH" --frames "$WORK/legacy_one.bin" --expect echo
chk --addr "$ADDR_ECHO" --path "$ECHO_PATH" --frames "$WORK/legacy_cold.bin" --expect echo
chk --addr "$ADDR_RAW_RS" --path "$RAW_PATH" --frames "$WORK/clerk_one.bin" --expect verified
chk --addr "$ADDR_RAW_RS" --path "$RAW_PATH" --frames "$WORK/clerk_cold.bin" --expect verified
chk --addr "$ADDR_RAW_HS" --path "$RAW_PATH" --frames "$WORK/legacy_one.bin" --expect verified
chk --addr "$ADDR_RAW_HS" --path "$RAW_PATH" --frames "$WORK/legacy_cold.bin" --expect verified
for db in "${DBS[@]}"; do
  a=$(addr_of "$db")
  chk --addr "$a" --path "$VERIFY_PATH" --frames "$WORK/legacy_one.bin" --expect principal
  chk --addr "$a" --path "$VERIFY_PATH" --frames "$WORK/clerk_one.bin" --expect principal
  for r in $(seq 1 "$ROUNDS"); do
    s=$(slice "$db" "$r")
    chk --addr "$a" --path "$VERIFY_PATH" --frames "$WORK/legacy_cold.bin" --index $((s * N_COLD_LEGACY + N_COLD_LEGACY - 1)) --expect principal >/dev/null
    chk --addr "$a" --path "$VERIFY_PATH" --frames "$WORK/clerk_cold.bin" --index $((s * N_COLD_RS + N_COLD_RS - 1)) --expect principal >/dev/null
  done
  echo "check ok: $db: the last token of every cold slice verifies to a principal"
done
for db in "${TRACED[@]}"; do
  chk --addr "$(addr_of "$db")" --path "$VERIFY_PATH" --frames "$WORK/legacy_one.bin" --expect principal
done

# ---------------------------------------------------------------- load cases
# This machine has 2 cores: a compile or test run elsewhere on it skews every
# figure. Before each case, wait (up to QUIET_MAX_S) until the whole machine
# is below QUIET_PCT % busy over half a second; the benchmark's own servers
# are idle between cases.
QUIET_PCT=${QUIET_PCT:-15}
QUIET_MAX_S=${QUIET_MAX_S:-300}
NOISY=0
busy_pct() {
  local u n s i w q sq st a b
  read -r _ u n s i w q sq st _ </proc/stat; a=$((u + n + s + q + sq + st)); b=$((a + i + w))
  sleep 0.5
  read -r _ u n s i w q sq st _ </proc/stat
  echo $(( 100 * ((u + n + s + q + sq + st) - a) / ((u + n + s + q + sq + st + i + w) - b + 1) ))
}
wait_quiet() {
  local started=$SECONDS b
  while b=$(busy_pct); [ "$b" -gt "$QUIET_PCT" ]; do
    if [ $((SECONDS - started)) -ge "$QUIET_MAX_S" ]; then
      echo "  note: the machine is still ${b}% busy with other work; measuring anyway"
      NOISY=$((NOISY + 1))
      return
    fi
  done
  if [ $((SECONDS - started)) -gt 0 ]; then echo "  (waited $((SECONDS - started)) s for other work on the machine)"; fi
}

H2_HEADERS=(-H 'content-type: application/grpc' -H 'te: trailers' -H "authorization: Bearer $API_KEY")

# The server's own CPU time per request (user + system, from /proc), beside
# throughput: it does not depend on how the two cores were shared in a run.
pid_of() { # addr -> pid of the server listening there
  case $1 in
    "$ADDR_ECHO") echo "$PID_echo" ;; "$ADDR_RAW_RS") echo "$PID_raw_rs" ;; "$ADDR_RAW_HS") echo "$PID_raw_hs" ;;
    "$ADDR_SQLITE") echo "$PID_sqlite" ;; "$ADDR_PG") echo "$PID_postgres" ;;
    "$ADDR_OTLP1") echo "$PID_sqlite_otlp1" ;; "$ADDR_ALWAYS") echo "$PID_sqlite_always" ;;
  esac
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
CLK_TCK=$(getconf CLK_TCK)
with_cpu() { # pid ticks-before requests; stdin: one JSON result -> the same with server_cpu_us
  local result after
  result=$(cat) # the run has ended once its result is read
  after=$(cpu_ticks "$1")
  echo "$result" | python3 -c 'import json, sys
r = json.loads(sys.stdin.read())
r["server_cpu_us"] = (int(sys.argv[2]) - int(sys.argv[1])) * 1e6 / int(sys.argv[3]) / int(sys.argv[4])
print(json.dumps(r))' "$2" "$after" "$CLK_TCK" "$3"
}

h2() { # label addr path body n c m
  local label=$1 addr=$2 path=$3 body=$4 n=$5 c=$6 m=$7 pid t0
  wait_quiet
  rm -f "$WORK/h2.log"
  pid=$(pid_of "$addr"); t0=$(cpu_ticks "$pid")
  "${CLIENT_PIN[@]}" h2load -n "$n" -c "$c" -m "$m" -t 1 -d "$body" "${H2_HEADERS[@]}" \
    --log-file="$WORK/h2.log" "http://$addr$path" >"$WORK/h2.out" 2>&1 || { cat "$WORK/h2.out"; die "h2load failed: $label"; }
  python3 "$ROOT/benches/report.py" h2load "$label" "$WORK/h2.out" "$WORK/h2.log" | with_cpu "$pid" "$t0" "$n" | tee -a "$RESULTS" | summarize
}
bt() { # label addr path frames offset n c m [repeat: each frame sent that many times in a row]
  local label=$1 addr=$2 path=$3 frames=$4 offset=$5 n=$6 c=$7 m=$8 repeat=${9:-1} pid t0
  wait_quiet
  pid=$(pid_of "$addr"); t0=$(cpu_ticks "$pid")
  "${TOOL[@]}" load --label "$label" --addr "$addr" --path "$path" --frames "$frames" --offset "$offset" \
    --repeat "$repeat" -n "$n" -c "$c" -m "$m" --api-key "$API_KEY" | with_cpu "$pid" "$t0" "$n" | tee -a "$RESULTS" | summarize
}
summarize() { python3 "$ROOT/benches/report.py" line; }

rss_mb() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }
# Samples a process's RSS every 0.2 s into a file (max kept) until killed.
rss_sampler() { # pid file
  local max=0 v
  while kill -0 "$1" 2>/dev/null; do
    v=$(awk '/VmRSS/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0)
    [ "${v:-0}" -gt "$max" ] && max=$v && echo "$max" >"$2"
    sleep 0.2
  done
}
pg_xacts() { psql "$BENCH_PG/postgres" -qAtc "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = '$PG_DB'"; }

RSS_IDLE=$(rss_mb "$PID_sqlite")
rss_sampler "$PID_sqlite" "$WORK/rss_load_kb" &
SAMPLER=$!

for r in $(seq 1 "$ROUNDS"); do
  say "round $r of $ROUNDS: high load (-c $C -m $M)"
  # The repeated-token runs: echo, each database, the trace-export servers,
  # in an order that rotates every round (as the new-token runs below).
  hot=(echo "${DBS[@]}" "${TRACED[@]}")
  for ((k = 0; k < ${#hot[@]}; k++)); do
    db=${hot[$(( (k + r - 1) % ${#hot[@]} ))]}
    a=$(addr_of "$db")
    case "$db" in
      echo)
        h2 "echo/h2load@high#$r" "$ADDR_ECHO" "$ECHO_PATH" "$WORK/legacy_one.bin" "$N_HOT" $C $M
        ;;
      sqlite-otlp1 | sqlite-always)
        h2 "$db/legacy-repeated@high#$r" "$a" "$VERIFY_PATH" "$WORK/legacy_one.bin" "$N_HOT" $C $M
        ;;
      postgres)
        if [ "$r" = 1 ]; then
          # Database transactions while the hot cases run, against the idle background rate.
          sleep 2; x0=$(pg_xacts); t0=$(date +%s.%N); sleep 10; sleep 2; x1=$(pg_xacts); t1=$(date +%s.%N)
          idle_rate=$(python3 -c "print(($x1 - $x0) / ($t1 - $t0))")
          x0=$(pg_xacts); t0=$(date +%s.%N)
        fi
        h2 "$db/legacy-repeated@high#$r" "$a" "$VERIFY_PATH" "$WORK/legacy_one.bin" "$N_HOT" $C $M
        h2 "$db/clerk-repeated@high#$r" "$a" "$VERIFY_PATH" "$WORK/clerk_one.bin" "$N_HOT" $C $M
        if [ "$r" = 1 ]; then
          sleep 2; x1=$(pg_xacts); t1=$(date +%s.%N)
          python3 -c "import json; print(json.dumps({'kind': 'queries', 'what': 'the repeated-token runs (legacy + Clerk, one round) and 2 s after', 'during': $x1 - $x0, 'seconds': $t1 - $t0, 'requests': 2 * $N_HOT, 'idle_rate': $idle_rate}))" >>"$RESULTS"
          echo "PostgreSQL transactions during the repeated-token runs: $((x1 - x0)) in $(python3 -c "print(round($t1 - $t0, 1))") s (idle background: $(python3 -c "print(round($idle_rate, 2))")/s)"
        fi
        ;;
      *)
        h2 "$db/legacy-repeated@high#$r" "$a" "$VERIFY_PATH" "$WORK/legacy_one.bin" "$N_HOT" $C $M
        h2 "$db/clerk-repeated@high#$r" "$a" "$VERIFY_PATH" "$WORK/clerk_one.bin" "$N_HOT" $C $M
        ;;
    esac
  done
  h2 "raw-rs256/h2load@high#$r" "$ADDR_RAW_RS" "$RAW_PATH" "$WORK/clerk_one.bin" "$N_RAW" $C $M
  h2 "raw-hs256/h2load@high#$r" "$ADDR_RAW_HS" "$RAW_PATH" "$WORK/legacy_one.bin" "$N_RAW" $C $M

  bt "echo/benchtool@high#$r" "$ADDR_ECHO" "$ECHO_PATH" "$WORK/legacy_cold.bin" 0 "$N_COLD_LEGACY" $C $M
  bt "raw-hs256/benchtool@high#$r" "$ADDR_RAW_HS" "$RAW_PATH" "$WORK/legacy_cold.bin" 0 "$N_COLD_LEGACY" $C $M
  for db in "${DBS[@]}"; do
    s=$(slice "$db" "$r")
    bt "$db/legacy-fresh@high#$r" "$(addr_of "$db")" "$VERIFY_PATH" "$WORK/legacy_cold.bin" $((s * N_COLD_LEGACY)) "$N_COLD_LEGACY" $C $M
  done
  # The new-RS256-token runs: the control and each database, in an order that
  # rotates every round, so that no case always runs right after another
  # (whose server may still be flushing what its run recorded).
  cold_rs=(raw "${DBS[@]}")
  for ((k = 0; k < ${#cold_rs[@]}; k++)); do
    db=${cold_rs[$(( (k + r - 1) % ${#cold_rs[@]} ))]}
    if [ "$db" = raw ]; then
      bt "raw-rs256/benchtool@high#$r" "$ADDR_RAW_RS" "$RAW_PATH" "$WORK/clerk_cold.bin" 0 "$N_COLD_RS" $C $M
      continue
    fi
    s=$(slice "$db" "$r")
    [ "$db" = postgres ] && x0=$(pg_xacts) && t0=$(date +%s.%N)
    bt "$db/clerk-cold@high#$r" "$(addr_of "$db")" "$VERIFY_PATH" "$WORK/clerk_cold.bin" $((s * N_COLD_RS)) "$N_COLD_RS" $C $M
    if [ "$db" = postgres ]; then
      # Issue 14: the database work of a new-token run (users cached 10 s; rounds are further apart).
      x1=$(pg_xacts); t1=$(date +%s.%N)
      python3 -c "import json; print(json.dumps({'kind': 'queries', 'what': 'the new-Clerk-token run of round $r', 'during': $x1 - $x0, 'seconds': $t1 - $t0, 'requests': $N_COLD_RS, 'idle_rate': ${idle_rate:-0}}))" >>"$RESULTS"
      echo "  PostgreSQL transactions during that run: $((x1 - x0)) for $N_COLD_RS requests"
    fi
  done

  say "round $r of $ROUNDS: low load (-c 1 -m 1), repeated tokens"
  h2 "echo/h2load@low#$r" "$ADDR_ECHO" "$ECHO_PATH" "$WORK/legacy_one.bin" "$N_LOW" 1 1
  for db in "${DBS[@]}"; do
    h2 "$db/legacy-repeated@low#$r" "$(addr_of "$db")" "$VERIFY_PATH" "$WORK/legacy_one.bin" "$N_LOW" 1 1
    h2 "$db/clerk-repeated@low#$r" "$(addr_of "$db")" "$VERIFY_PATH" "$WORK/clerk_one.bin" "$N_LOW" 1 1
  done
  for db in "${TRACED[@]}"; do
    h2 "$db/legacy-repeated@low#$r" "$(addr_of "$db")" "$VERIFY_PATH" "$WORK/legacy_one.bin" "$N_LOW" 1 1
  done
  h2 "raw-rs256/h2load@low#$r" "$ADDR_RAW_RS" "$RAW_PATH" "$WORK/clerk_one.bin" "$N_LOW" 1 1
done
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
RSS_LOAD=$(awk '{printf "%.1f", $1/1024}' "$WORK/rss_load_kb" 2>/dev/null || echo 0)

# Each distinct token is sent twice in a row: a legacy token enters the token
# cache on its second sighting, so the run fills the cache and keeps evicting.
say "memory: $N_DISTINCT distinct legacy tokens, each sent twice, through the SQLite service (benchtool -c $C -m $M)"
metric() { # metrics-addr sample name -> its value
  python3 - "$1" "$2" <<'PY'
import sys, urllib.request
body = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=10).read().decode()
print(next((line.split()[-1] for line in body.splitlines() if line.rsplit(" ", 1)[0] == sys.argv[2]), ""))
PY
}
rss_sampler "$PID_sqlite" "$WORK/rss_distinct_kb" &
SAMPLER=$!
bt "sqlite/distinct-1M@bulk#1" "$ADDR_SQLITE" "$VERIFY_PATH" "$WORK/legacy_distinct.bin" 0 $((2 * N_DISTINCT)) $C $M 2
CACHE_ENTRIES=$(metric "$METRICS_SQLITE" identity_token_cache_entries)
CACHE_CAPACITY=$(metric "$METRICS_SQLITE" identity_token_cache_capacity)
[ -n "$CACHE_ENTRIES" ] && [ -n "$CACHE_CAPACITY" ] || die "cannot read the token cache gauges from $METRICS_SQLITE"
echo "token cache after the run: $CACHE_ENTRIES entries of $CACHE_CAPACITY"
sleep 1
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
RSS_DISTINCT=$(awk '{printf "%.1f", $1/1024}' "$WORK/rss_distinct_kb" 2>/dev/null || echo 0)
sleep 2
RSS_AFTER=$(rss_mb "$PID_sqlite")
echo "RSS of the SQLite service: idle $RSS_IDLE MB, under load (max) $RSS_LOAD MB, during the distinct run (max) $RSS_DISTINCT MB, after it $RSS_AFTER MB"
python3 -c "import json; print(json.dumps({'kind': 'rss', 'server': 'identity on SQLite', 'idle_mb': $RSS_IDLE, 'load_mb': $RSS_LOAD, 'distinct': $N_DISTINCT, 'distinct_max_mb': $RSS_DISTINCT, 'after_mb': $RSS_AFTER, 'cache_entries': $CACHE_ENTRIES, 'cache_capacity': $CACHE_CAPACITY}))" >>"$RESULTS"
# The distinct-token run is a memory test; keep it out of the throughput table.
grep -v '"sqlite/distinct-1M@' "$RESULTS" > "$WORK/results.table.jsonl"
grep '"sqlite/distinct-1M@' "$RESULTS" > "$WORK/distinct.jsonl" || true

# ------------------------------------------------ GetMigrationStats at scale
STATS_LINE=""
# The scale case adds rows to the table the users live in: the application's
# `users` table when the database has one (the seed's layout), else the
# service's own `identity_users` (the default: users imported from an export).
USERS_TABLE=""
if [ -n "$PG_URL" ]; then
  USERS_TABLE=$(psql "$PG_URL" -qAtc "SELECT CASE WHEN to_regclass('users') IS NOT NULL THEN 'users' WHEN to_regclass('identity_users') IS NOT NULL THEN 'identity_users' ELSE '' END")
fi
if [ -n "$USERS_TABLE" ]; then
  STATS_PATH=/identity.v1.MigrationService/GetMigrationStats
  # GetMigrationStatsRequest { window: LAST_HOUR } as one gRPC frame.
  printf '\x00\x00\x00\x00\x02\x08\x02' > "$WORK/stats.bin"
  stats_run() { # label -> latency mean (ms) of a low-concurrency run
    "${TOOL[@]}" load --label "$1" --addr "$ADDR_PG" --path "$STATS_PATH" --frames "$WORK/stats.bin" \
      -n 200 -c 1 -m 1 --api-key "$API_KEY" | tee -a "$WORK/stats.jsonl" | summarize
  }
  say "GetMigrationStats on PostgreSQL at $(psql "$PG_URL" -qAtc "SELECT count(*) FROM $USERS_TABLE") users (table $USERS_TABLE)"
  stats_run "postgres/stats@1k"
  say "adding 999,000 users to $USERS_TABLE"
  if [ "$USERS_TABLE" = users ]; then
    COLUMNS="id, email, password_hash" VALUES="gen_random_uuid(), 'scale' || g || '@example.com'"
  else
    COLUMNS="id, email, email_key, password_hash" VALUES="gen_random_uuid(), 'scale' || g || '@example.com', 'scale' || g || '@example.com'"
  fi
  psql "$PG_URL" -qAtc "INSERT INTO $USERS_TABLE ($COLUMNS)
    SELECT $VALUES, '\$2b\$12\$abcdefghijklmnopqrstuuNfXB6JvJrUxFZzS8sCnTFVSU5Ux7v8a'
    FROM generate_series(1, 999000) AS g" >/dev/null
  psql "$PG_URL" -qAtc "ANALYZE $USERS_TABLE" >/dev/null
  say "GetMigrationStats on PostgreSQL at $(psql "$PG_URL" -qAtc "SELECT count(*) FROM $USERS_TABLE") users"
  stats_run "postgres/stats@1M"
  STATS_LINE=$(python3 - "$WORK/stats.jsonl" <<'PY'
import json, sys
runs = {json.loads(l)["label"]: json.loads(l) for l in open(sys.argv[1])}
small, large = runs["postgres/stats@1k"], runs["postgres/stats@1M"]
print(f"GetMigrationStats at 1,000,000 users costs {small['rps'] / large['rps']:.2f}x its cost at 1,000 "
      f"({large['rps']:,.0f} vs {small['rps']:,.0f} calls/s at -c 1 -m 1; target <= 1.5)")
PY
)
  echo "$STATS_LINE"
fi

sleep 3 # the batch exporters send every 5 s at most; the sink reports every 2 s
echo "spans received by the OTLP sink (both trace-export servers): $(grep -o 'otlp-sink: .*' "$WORK/otlp_sink.log" | tail -1 | sed 's/otlp-sink: //' || true)"

say "summary"
python3 "$ROOT/benches/report.py" summary "$WORK/results.table.jsonl"
echo
echo "- $N_DISTINCT distinct tokens, each sent twice: $(python3 -c "import json; r = json.load(open('$WORK/distinct.jsonl')); print(f\"{r['rps']:,.0f} req/s, {r['ok']:,}/{r['requests']:,} accepted\")")"
if [ -n "$STATS_LINE" ]; then echo "- $STATS_LINE"; else echo "- GetMigrationStats at 1,000,000 vs 1,000 users: not measured (no PostgreSQL, or no users table there)"; fi
echo "- Cases measured while other work kept the machine busy (after waiting ${QUIET_MAX_S} s): $NOISY"
echo "- Pinned with taskset: $([ "$BENCH_PIN" = 1 ] && echo 'yes (servers CPU 1, load generator CPU 0)' || echo 'no')"
echo "- Total time: $(( $(date +%s) - SCRIPT_START )) s"
