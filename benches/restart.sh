#!/usr/bin/env bash
# Memory per binding and restart-to-serving time (issue 12 targets): a release node is filled
# through the internal API to 100,000 and then 1,000,000 bindings; after each it is stopped and
# started again, and we measure how long until it answers a lookup of a binding (it serves
# while its index loads), how long the index took to load (the node's log), and its RSS once
# the index is loaded, against the same node started empty.
#
#   benches/restart.sh            # COUNTS="100000 1000000" by default
#
# Everything runs on loopback in a temp dir; the node is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
COUNTS=${COUNTS:-"100000 1000000"}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/sydent-rs
DIR=$(mktemp -d)
NODE=
trap 'if [ -n "$NODE" ]; then kill $NODE 2>/dev/null || true; wait $NODE 2>/dev/null || true; fi; rm -rf "$DIR"' EXIT

CPORT=$(free_port); IPORT=$(free_port)
node_config "$DIR" "$CPORT" "$IPORT" INFO

now_ms() { date +%s%3N; }
# start PROBE: starts the node (NODE), waits until a v1 lookup of PROBE answers its binding (or,
# with PROBE empty, until the node answers at all), and sets MS to the milliseconds that took.
start() {
  local t0; t0=$(now_ms)
  "$BIN" --config "$DIR/sydent.conf" 2>"$DIR/node.log" >/dev/null & NODE=$!
  local url="http://127.0.0.1:$CPORT/_matrix/identity/versions" expect=versions
  if [ -n "$1" ]; then url="http://127.0.0.1:$CPORT/_matrix/identity/api/v1/lookup?medium=email&address=$1%40example.org"; expect=mxid; fi
  until curl -sf "$url" 2>/dev/null | grep -q "$expect"; do sleep 0.005; done
  MS=$(( $(now_ms) - t0 ))
}
stop() { kill $NODE; wait $NODE || true; NODE=; }
# ready: waits until the lookup index is loaded; sets LOAD_MS to what the node logged.
ready() {
  until grep -q "lookup index ready" "$DIR/node.log"; do sleep 0.05; done
  LOAD_MS=$(sed -n 's/.*lookup index ready: .* in \([0-9]*\) ms.*/\1/p' "$DIR/node.log")
}
rss_kb() { sleep 1; awk '/VmRSS/ {print $2}' /proc/$NODE/status; }

seed() { seed_on "$IPORT" "$1" "$2"; }

start ""
ready
EMPTY=$(rss_kb)
echo "== sydent-rs $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores"
printf "%-12s %14s %12s %10s %14s\n" bindings "restart→lookup" "index ready" "RSS" "bytes/binding"
printf "%-12s %12s ms %9s ms %7s MB %14s\n" 0 "$MS" "$LOAD_MS" "$((EMPTY / 1024))" "-"
HAVE=0
for N in $COUNTS; do
  echo "seeding to $N bindings..." >&2
  seed "$HAVE" "$N"; HAVE=$N
  stop
  start "seed-$((N - 1))"
  ready
  RSS=$(rss_kb)
  printf "%-12s %12s ms %9s ms %7s MB %14s\n" "$N" "$MS" "$LOAD_MS" "$((RSS / 1024))" "$(( (RSS - EMPTY) * 1024 / N ))"
done
