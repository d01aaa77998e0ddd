#!/usr/bin/env bash
# A lookup answered with a binding replicated from a peer against one made here (issue 12:
# ≥ 0.9×): two release nodes A and B with certificates from a throwaway mesh CA (openssl),
# 10,000 binds on A, replicated to B, then the same 50 %-hit v1 lookups with wrk on A and on B.
#
#   benches/replicated.sh         # needs wrk and openssl
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }
DURATION=${DURATION:-10s}
CONNS=${CONNS:-16}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/sydent-rs
DIR=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill $p 2>/dev/null || true; wait $p 2>/dev/null || true; done; rm -rf "$DIR"' EXIT

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -keyout "$DIR/ca.key" -out "$DIR/ca.pem" -subj "/CN=bench mesh CA" 2>/dev/null
mkdir "$DIR/peers.d"
for n in a b; do
  mkdir "$DIR/$n"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$DIR/$n/key.pem" \
      -out "$DIR/$n/csr.pem" -subj "/CN=$n.bench" 2>/dev/null
  openssl x509 -req -in "$DIR/$n/csr.pem" -CA "$DIR/ca.pem" -CAkey "$DIR/ca.key" -CAcreateserial \
      -days 2 -out "$DIR/$n/cert.pem" -extfile <(printf "subjectAltName=DNS:$n.bench,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE") 2>/dev/null
  eval "C_$n=$(free_port) I_$n=$(free_port) R_$n=$(free_port)"
  cport=C_$n; iport=I_$n; rport=R_$n
  cat > "$DIR/$n/sydent.conf" <<CONF
[general]
server.name = $n.bench
log.level = WARNING
peers.path = $DIR/peers.d
[db]
db.file = $DIR/$n/sydent.db
[http]
clientapi.http.bind_address = 127.0.0.1
clientapi.http.port = ${!cport}
clientapi.http.workers = 1
internalapi.http.bind_address = 127.0.0.1
internalapi.http.port = ${!iport}
replication.https.certfile = $DIR/$n/cert.pem
replication.https.keyfile = $DIR/$n/key.pem
replication.https.cacert = $DIR/ca.pem
replication.https.bind_address = 127.0.0.1
replication.https.port = ${!rport}
CONF
  "$BIN" --config "$DIR/$n/sydent.conf" peer-file --url "https://localhost:${!rport}" > "$DIR/peers.d/$n.conf"
done
for n in a b; do
  "$BIN" --config "$DIR/$n/sydent.conf" & PIDS+=($!)
done
for p in $C_a $C_b; do
  wait_serving "$p"
done

seed_on "$I_a" 0 10000
# Wait until B holds all of A's bindings.
until curl -sf "http://127.0.0.1:$I_b/_matrix/identity/internal/replication" | python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["peers"]["a.bench"]["received"] >= 10000 else 1)'; do sleep 0.2; done
curl -sf "http://127.0.0.1:$C_b/_matrix/identity/api/v1/lookup?medium=email&address=seed-1%40example.org" | grep -q '"b.bench"' \
  || { echo "B does not countersign A's binding" >&2; exit 1; }

lookup_lua "$DIR/lookup.lua"
echo "== sydent-rs $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $CONNS connections, $DURATION each"
wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/lookup.lua" "http://127.0.0.1:$C_a" | report "v1 lookup on A (bound on A), 50% hits"
wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/lookup.lua" "http://127.0.0.1:$C_b" | report "v1 lookup on B (replicated from A), 50% hits"
