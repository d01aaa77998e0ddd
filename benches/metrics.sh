#!/usr/bin/env bash
# What the metrics cost (issue 18 target: v1 lookup throughput with metrics on >= 95 % of the
# figure with metrics off, in the same run). Two release nodes, 10,000 bindings each, one with
# [general] prometheus_port/prometheus_addr set and scraped every second during its runs, one
# without; wrk's v1 lookups alternate between them ROUNDS times (default 3), so both see the
# same machine.
#
#   benches/metrics.sh        # needs wrk (apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }

DURATION=${DURATION:-8s}
CONNS=${CONNS:-16}
ROUNDS=${ROUNDS:-3}
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=${CARGO_TARGET_DIR:-target}/release/sydent-rs
fi
DIR=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT

start() { # start NAME [LINE...]: a node in DIR/NAME; prints its client port
  local name=$1; shift
  mkdir -p "$DIR/$name"
  local cport iport
  cport=$(free_port); iport=$(free_port)
  node_config "$DIR/$name" "$cport" "$iport" WARNING "$@"
  "$BIN" --config "$DIR/$name/sydent.conf" >"$DIR/$name/log" 2>&1 &
  PIDS+=($!)
  wait_serving "$cport"
  seed_on "$iport" 0 10000
  echo "$cport"
}
OFF=$(start off)
MPORT=$(free_port)
ON=$(start on "prometheus_port = $MPORT" "prometheus_addr = 127.0.0.1")
curl -sf "http://127.0.0.1:$MPORT/metrics" | grep -q '^sydent_http_received_requests_total' \
  || { echo "no metrics on $MPORT" >&2; exit 1; }

lookup_lua "$DIR/lookup.lua"
rps() { wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/lookup.lua" "http://127.0.0.1:$1" | awk '/Requests\/sec/ {print $2}'; }

echo "== v1 lookup (10k bindings, 50% hits), $CONNS connections, $DURATION each, $ROUNDS rounds"
for round in $(seq "$ROUNDS"); do
  off=$(rps "$OFF")
  # Prometheus' part: a scrape every second while the node with metrics serves.
  ( while true; do curl -sf "http://127.0.0.1:$MPORT/metrics" >/dev/null; sleep 1; done ) &
  SCRAPER=$!
  on=$(rps "$ON")
  kill $SCRAPER; wait $SCRAPER 2>/dev/null || true
  python3 -c "import sys; off, on = float(sys.argv[1]), float(sys.argv[2]); print(f'round {sys.argv[3]}: metrics off {off:,.0f} req/s, on {on:,.0f} req/s: {100 * on / off:.1f} %')" "$off" "$on" "$round"
done
