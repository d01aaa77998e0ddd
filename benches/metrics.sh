#!/usr/bin/env bash
# What the metrics cost (issue 18 target: v1 lookup throughput with metrics on >= 95 % of the
# figure with metrics off, in the same run). Two release nodes, 10,000 bindings each, one with
# [general] prometheus_port/prometheus_addr set and scraped every second during its runs, one
# without; wrk's v1 lookups alternate between them ROUNDS times (default 6, the order swapped
# every round), so both see the same machine; the median ratio is the figure.
#
#   benches/metrics.sh        # needs wrk (apt-get install wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }

DURATION=${DURATION:-5s}
CONNS=${CONNS:-8}
ROUNDS=${ROUNDS:-6}
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=${CARGO_TARGET_DIR:-target}/release/sydent-rs
fi
DIR=$(mktemp -d)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT

start() { # start NAME [LINE...]: a node in DIR/NAME, seeded; its client port in PORT
  local name=$1; shift
  mkdir -p "$DIR/$name"
  local iport
  PORT=$(free_port); iport=$(free_port)
  node_config "$DIR/$name" "$PORT" "$iport" WARNING "$@"
  # The nodes on core 0, wrk on core 1: neither takes the other's core, so the rounds compare.
  taskset -c 0 "$BIN" --config "$DIR/$name/sydent.conf" >"$DIR/$name/log" 2>&1 &
  PIDS+=($!)
  wait_serving "$PORT"
  seed_on "$iport" 0 10000
}
start off
OFF=$PORT
MPORT=$(free_port)
start on "prometheus_port = $MPORT" "prometheus_addr = 127.0.0.1"
ON=$PORT
curl -sf "http://127.0.0.1:$MPORT/metrics" >"$DIR/metrics.txt"
grep -q '^sydent_http_received_requests_total' "$DIR/metrics.txt" \
  || { echo "no metrics on $MPORT" >&2; exit 1; }

lookup_lua "$DIR/lookup.lua"
rps() { taskset -c 1 wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/lookup.lua" "http://127.0.0.1:$1" | awk '/Requests\/sec/ {print $2}'; }

echo "== v1 lookup (10k bindings, 50% hits), $CONNS connections, $DURATION each, $ROUNDS rounds (order alternating)"
RATIOS=()
for round in $(seq "$ROUNDS"); do
  # Prometheus' part: a scrape every second while the node with metrics serves.
  ( while true; do curl -sf "http://127.0.0.1:$MPORT/metrics" >/dev/null; sleep 1; done ) &
  SCRAPER=$!
  if [ $((round % 2)) -eq 1 ]; then off=$(rps "$OFF"); on=$(rps "$ON"); else on=$(rps "$ON"); off=$(rps "$OFF"); fi
  kill $SCRAPER; wait $SCRAPER 2>/dev/null || true
  ratio=$(python3 -c "import sys; print(f'{100 * float(sys.argv[2]) / float(sys.argv[1]):.1f}')" "$off" "$on")
  RATIOS+=("$ratio")
  echo "round $round: metrics off $off req/s, on $on req/s: $ratio %"
done
python3 -c "import statistics, sys; r = sorted(map(float, sys.argv[1:])); print(f'median: metrics on at {statistics.median(r):.1f} % of off (rounds: {\", \".join(map(str, r))})')" "${RATIOS[@]}"
