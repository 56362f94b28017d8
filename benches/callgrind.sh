#!/usr/bin/env bash
# Instructions and simulated cache misses per request of the new-RS256-token
# case (issue 14), the identity service against the raw-verify control, under
# valgrind's callgrind. Counts, not seconds: the same for the same binaries
# whatever else the machine is doing, so a change can be judged without a quiet
# machine. (valgrind hides SHA-NI: SHA-256 runs in software under it only.)
#
#   bash benches/callgrind.sh           # SQLite, 3,000 measured requests after 60,000 of warm-up
#   DB=postgres N=3000 WARM=60000 CACHE_SIM=no bash benches/callgrind.sh
#
# CASE=traces compares instead what a sampled RPC costs: the repeated legacy
# token (h2load) through a service exporting every span over OTLP
# (`OTEL_TRACES_SAMPLER=always_on`, to the local otlp-sink) against the same
# service in its default configuration (N=10000 after WARM=10000 by default;
# the measured window includes the batch exporter's work for those spans).
#
# Uses the release binaries of `cargo build --release -p identity --bin identity`
# and `-p identity-bench --bins` (built if missing). Both servers run with
# instrumentation off until the warm-up is done; the service's user cache keeps
# its entries for the whole run (IDENTITY_USER_CACHE_SECONDS=3600) so that the
# figures are the per-request path, not database look-ups. Prints Ir and the
# misses per request, then the functions whose instruction counts differ most.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=$ROOT/target/release
CASE=${CASE:-cold}
case $CASE in
  cold) N=${N:-3000}; WARM=${WARM:-60000} ;;
  traces) N=${N:-10000}; WARM=${WARM:-10000} ;;
  *) echo "CASE must be cold or traces" >&2; exit 2 ;;
esac
DB=${DB:-sqlite}
CACHE_SIM=${CACHE_SIM:-yes}
BENCH_PG=${BENCH_PG:-postgres://postgres@127.0.0.1:5432}
ISSUER=https://clerk.bench.example.com
CLERK_KEY=$ROOT/tests/fixtures/clerk_a.key.pem
CLERK_PUB=$ROOT/tests/fixtures/clerk_a.pub.pem
ADDR_ID=127.0.0.1:21181
ADDR_CTL=127.0.0.1:21182
WORK=$(mktemp -d /tmp/identity-callgrind.XXXXXX)
PIDS=()
PG_DB=""
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ -n "$PG_DB" ]; then psql "$BENCH_PG/postgres" -qAtc "DROP DATABASE IF EXISTS $PG_DB WITH (FORCE)" >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v valgrind >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null; }
[ -x "$BIN/identity" ] || cargo build --release --quiet -p identity --bin identity
[ -x "$BIN/benchtool" ] || cargo build --release --quiet -p identity-bench --bins

python3 - 1000 "$WORK" <<'PY'
import sys, uuid
n, work = int(sys.argv[1]), sys.argv[2]
ids = [str(uuid.uuid4()) for _ in range(n)]
with open(f"{work}/users.csv", "w") as f:
    f.write("id,email,password_hash\n")
    f.writelines(f"{u},bench{i}@example.com,$2b$12$abcdefghijklmnopqrstuv\n" for i, u in enumerate(ids))
with open(f"{work}/clerk_ids.txt", "w") as f:
    f.write("\n".join(f"user_bench{i:06d}" for i in range(n)) + "\n")
with open(f"{work}/pairs.txt", "w") as f:
    f.write("\n".join(f"{u},user_bench{i:06d}" for i, u in enumerate(ids)) + "\n")
PY
KEYGEN=$("$BIN/identity" gen-api-key --name bench --scopes verify,migrate,admin)
API_KEY=$(echo "$KEYGEN" | grep -Eo 'idk_[A-Za-z0-9_-]+' | head -1)
IDENTITY_API_KEYS=$(echo "$KEYGEN" | grep -E '^ *bench:' | tr -d ' ')
export IDENTITY_API_KEYS IDENTITY_LEGACY_JWT_SECRET=bench-legacy-secret-0123456789abcdef
export IDENTITY_CLERK_ISSUER=$ISSUER IDENTITY_CLERK_JWT_KEY_FILE=$CLERK_PUB IDENTITY_UNMAPPED_CLERK_USER=reject
unset IDENTITY_LISTEN_ADDR IDENTITY_METRICS_ADDR OTEL_EXPORTER_OTLP_ENDPOINT OTEL_TRACES_SAMPLER
if [ "$DB" = postgres ]; then
  PG_DB="identity_callgrind_$$"
  psql "$BENCH_PG/postgres" -qAtc "CREATE DATABASE $PG_DB" >/dev/null
  URL=$BENCH_PG/$PG_DB
else
  URL=sqlite://$WORK/bench.db
fi
IDENTITY_DATABASE_URL=$URL "$BIN/identity" import-users "$WORK/users.csv" >/dev/null
VG=(valgrind --tool=callgrind --instr-atstart=no "--cache-sim=$CACHE_SIM")
if [ "$CASE" = cold ]; then
  "$BIN/benchtool" mint-clerk --key "$CLERK_KEY" --kid ins_clerk_a --issuer "$ISSUER" --subs "$WORK/clerk_ids.txt" \
    --count $((WARM + N)) --out "$WORK/cold.bin" >/dev/null

  IDENTITY_DATABASE_URL=$URL IDENTITY_LISTEN_ADDR=$ADDR_ID IDENTITY_USER_CACHE_SECONDS=3600 \
    "${VG[@]}" --callgrind-out-file="$WORK/identity.out" "$BIN/identity" serve >"$WORK/identity.log" 2>&1 &
  PIDS+=("$!")
  CONTROL_RSA_PEM=$CLERK_PUB CONTROL_ISSUER=$ISSUER \
    "${VG[@]}" --callgrind-out-file="$WORK/control.out" "$BIN/control-verify" "$ADDR_CTL" >"$WORK/control.log" 2>&1 &
  PIDS+=("$!")
  "$BIN/benchtool" wait-serving --addr "$ADDR_ID" >/dev/null
  "$BIN/benchtool" wait-serving --tcp --addr "$ADDR_CTL" >/dev/null
  "$BIN/benchtool" link --addr "$ADDR_ID" --api-key "$API_KEY" --pairs "$WORK/pairs.txt" >/dev/null
  load() { # addr path offset n
    "$BIN/benchtool" load --label callgrind --addr "$1" --path "$2" --frames "$WORK/cold.bin" --offset "$3" -n "$4" \
      -c 16 -m 8 --api-key "$API_KEY" >/dev/null
  }
  VERIFY=/identity.v1.IdentityService/VerifyToken
  RAW=/control.v1.RawVerify/Verify
  echo "warm-up: $WARM new tokens to the service (fills its token cache), $N to the control"
  load "$ADDR_ID" "$VERIFY" 0 "$WARM"
  load "$ADDR_CTL" "$RAW" 0 "$N"
  for pid in "${PIDS[@]}"; do callgrind_control -i on "$pid" >/dev/null; done
  echo "measuring: $N new tokens to each"
  load "$ADDR_ID" "$VERIFY" "$WARM" "$N"
  load "$ADDR_CTL" "$RAW" "$WARM" "$N"
  for pid in "${PIDS[@]}"; do callgrind_control -i off "$pid" >/dev/null; kill -INT "$pid"; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  PIDS=()
else
  command -v h2load >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }
  sed -n 2p "$WORK/users.csv" | cut -d, -f1 >"$WORK/user0.txt"
  "$BIN/benchtool" mint-legacy --secret "$IDENTITY_LEGACY_JWT_SECRET" --users "$WORK/user0.txt" --count 1 --out "$WORK/one.bin" >/dev/null
  ADDR_SINK=127.0.0.1:21183
  "$BIN/otlp-sink" "$ADDR_SINK" >"$WORK/sink.log" 2>&1 &
  PIDS+=("$!")
  URL_DEFAULT=$URL
  if [ "$DB" != postgres ]; then
    URL_DEFAULT=sqlite://$WORK/bench-default.db
    IDENTITY_DATABASE_URL=$URL_DEFAULT "$BIN/identity" import-users "$WORK/users.csv" >/dev/null
  fi
  # "identity": every span exported; "control": the same service by default.
  IDENTITY_DATABASE_URL=$URL IDENTITY_LISTEN_ADDR=$ADDR_ID IDENTITY_METRICS_ADDR=127.0.0.1:21184 \
    OTEL_EXPORTER_OTLP_ENDPOINT=http://$ADDR_SINK OTEL_TRACES_SAMPLER=always_on \
    "${VG[@]}" --callgrind-out-file="$WORK/identity.out" "$BIN/identity" serve >"$WORK/identity.log" 2>&1 &
  PIDS+=("$!")
  IDENTITY_DATABASE_URL=$URL_DEFAULT IDENTITY_LISTEN_ADDR=$ADDR_CTL IDENTITY_METRICS_ADDR=127.0.0.1:21185 \
    "${VG[@]}" --callgrind-out-file="$WORK/control.out" "$BIN/identity" serve >"$WORK/control.log" 2>&1 &
  PIDS+=("$!")
  "$BIN/benchtool" wait-serving --tcp --addr "$ADDR_SINK" >/dev/null
  "$BIN/benchtool" wait-serving --addr "$ADDR_ID" >/dev/null
  "$BIN/benchtool" wait-serving --addr "$ADDR_CTL" >/dev/null
  h2() { # addr n
    h2load -n "$2" -c 16 -m 8 -t 1 -d "$WORK/one.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
      -H "authorization: Bearer $API_KEY" "http://$1/identity.v1.IdentityService/VerifyToken" >"$WORK/h2.out" 2>&1
    grep -q "$2 succeeded" "$WORK/h2.out" || { cat "$WORK/h2.out"; echo "h2load: not every request succeeded" >&2; exit 1; }
  }
  echo "warm-up: $WARM calls with one legacy token to each service"
  h2 "$ADDR_ID" "$WARM"
  h2 "$ADDR_CTL" "$WARM"
  for pid in "${PIDS[@]:1}"; do callgrind_control -i on "$pid" >/dev/null; done
  echo "measuring: $N calls to each, then the batch exporter's scheduled export (5 s)"
  h2 "$ADDR_ID" "$N"
  h2 "$ADDR_CTL" "$N"
  sleep 6
  for pid in "${PIDS[@]:1}"; do callgrind_control -i off "$pid" >/dev/null; kill -INT "$pid"; done
  for pid in "${PIDS[@]:1}"; do wait "$pid" 2>/dev/null || true; done
  kill "${PIDS[0]}" 2>/dev/null || true
  PIDS=()
fi

python3 - "$WORK" "$N" "$DB" "$CASE" <<'PY'
import collections, re, subprocess, sys
work, n, db, case = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
a, b = ("identity", "raw-verify control") if case == "cold" else ("always_on", "default")
def annotate(name, *args):
    return subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", *args, f"{work}/{name}.out"],
                          capture_output=True, text=True, check=True).stdout
def profile(name):
    out = annotate(name)
    events = next(line.split(":", 1)[1].split() for line in out.splitlines() if line.startswith("Events shown:"))
    total_line = next(line for line in out.splitlines() if line.rstrip().endswith("PROGRAM TOTALS"))
    # A count is "N (p%)", or "." / "0" where nothing was counted.
    counts = re.findall(r"([\d,]+) \(\s*[\d.]+%\)|(?<!\S)(\.|0)(?!\S)", total_line.replace("PROGRAM TOTALS", ""))
    totals = {e: int(v.replace(",", "")) if v else 0 for e, (v, _) in zip(events, counts)}
    functions = collections.Counter()
    for line in annotate(name, "--show=Ir", "--sort=Ir").splitlines():
        m = re.match(r"^\s*([\d,]+) \(\s*[\d.]+%\)\s+(.*?)(?: \[.*\])?$", line)
        if m and m.group(2) != "PROGRAM TOTALS":
            functions[m.group(2)] += int(m.group(1).replace(",", ""))
    return totals, functions
(ti, fi), (tc, fc) = profile("identity"), profile("control")
print(f"\nper request, {db}: {a} vs {b}")
for event in ti:
    print(f"  {event:6} {ti[event] / n:10,.0f} {tc.get(event, 0) / n:10,.0f}")
ll = lambda t: sum(t.get(e, 0) for e in ("ILmr", "DLmr", "DLmw")) / n
if "DLmr" in ti:
    print(f"  LL misses {ll(ti):8.1f} {ll(tc):10.1f}")
print(f"\nlargest differences in instructions per request ({a} - {b}):")
diff = sorted(((fi[k] - fc[k]) / n, k) for k in set(fi) | set(fc))
for d, k in diff[::-1][:15] + diff[:5]:
    print(f"  {d:9,.0f}  {k[:110]}")
PY
