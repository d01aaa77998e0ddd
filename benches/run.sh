#!/usr/bin/env bash
# Reproduces the README's benchmark figures for a standalone node (issues 2 and 12 targets):
# v1 lookup, internal bind (16 and 64 connections) and bulk_lookup (1,000 3PIDs) with wrk,
# against a release build holding 10,000 bindings, then bulk_lookup and v1 lookup again at
# each of SIZES bindings (default 100,000 and 1,000,000), and idle RSS.
#
#   benches/run.sh            # needs wrk (apt-get install wrk)
#   SIZES=100000 benches/run.sh   # skip the million
#
# Everything runs on loopback in a temp dir; the node is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }

DURATION=${DURATION:-10s}
CONNS=${CONNS:-16}          # lookups: latency matters
BIND_CONNS=${BIND_CONNS:-"16 64"} # binds: 16 as the lookups, 64 for throughput (bigger group commits)
SIZES=${SIZES:-"100000 1000000"}
WORKERS=${WORKERS:-1}
# BIN=path/to/sydent-rs measures that binary instead of building this checkout (side-by-side
# comparisons of two builds).
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=${CARGO_TARGET_DIR:-target}/release/sydent-rs
fi
DIR=$(mktemp -d)
trap 'kill $NODE 2>/dev/null || true; wait $NODE 2>/dev/null || true; rm -rf "$DIR"' EXIT

CPORT=$(free_port); IPORT=$(free_port)
node_config "$DIR" "$CPORT" "$IPORT" WARNING
"$BIN" --config "$DIR/sydent.conf" &
NODE=$!
wait_serving "$CPORT"

# wrk scripts: binds of fresh addresses, lookups of random existing ones, bulk lookups.
cat > "$DIR/bind.lua" <<'LUA'
local n = 0
local thread_id = 0
local threads = {}
function setup(thread) thread:set("tid", thread_id); thread_id = thread_id + 1 end
function init(args) prefix = args[1] or "u" end
request = function()
  n = n + 1
  local body = string.format('{"medium":"email","address":"%s%d-%d@example.org","mxid":"@u%d:example.org"}', prefix, tid, n, n)
  return wrk.format("POST", "/_matrix/identity/internal/bind", {["Content-Type"] = "application/json"}, body)
end
LUA
cat > "$DIR/lookup.lua" <<'LUA'
math.randomseed(os.time())
request = function()
  -- half the addresses exist (seeded as seed-<i>@example.org), half do not
  local i = math.random(0, 19999)
  return wrk.format("GET", "/_matrix/identity/api/v1/lookup?medium=email&address=seed-" .. i .. "%40example.org")
end
LUA
python3 - "$DIR/bulk.lua" <<'PY'
import json, sys
pairs = [["email", f"seed-{i*7 % 20000}@example.org"] for i in range(1000)]
body = json.dumps({"threepids": pairs})
open(sys.argv[1], "w").write('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [==[%s]==]\n' % body)
PY

seed() { seed_on "$IPORT" "$1" "$2"; }


echo "seeding 10,000 bindings..."
seed 0 10000
sleep 2
sleep 1
RSS_KB=$(awk '/VmRSS/ {print $2}' /proc/$NODE/status)
echo "== sydent-rs $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, $WORKERS worker(s), $CONNS connections, $DURATION each"
printf "%-34s %10s MB\n" "idle RSS with 10,000 bindings" "$((RSS_KB / 1024))"
wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/lookup.lua" "http://127.0.0.1:$CPORT" | report "v1 lookup (10k rows, 50% hits)"
wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/bulk.lua" "http://127.0.0.1:$CPORT/_matrix/identity/api/v1/bulk_lookup" | report "bulk_lookup 1,000 3PIDs (10k rows)"
for c in $BIND_CONNS; do
  wrk -t2 -c"$c" -d"$DURATION" --latency -s "$DIR/bind.lua" "http://127.0.0.1:$IPORT" -- "b$c" | report "internal bind ($c connections)"
done
rows() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from global_threepid_associations').fetchone()[0])" "$DIR/sydent.db"; }
for SIZE in $SIZES; do
  ROWS=$(rows)
  if [ "$ROWS" -lt "$SIZE" ]; then echo "seeding to $SIZE bindings..."; seed "$ROWS" "$SIZE"; fi
  ROWS=$(rows)
  wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/bulk.lua" "http://127.0.0.1:$CPORT/_matrix/identity/api/v1/bulk_lookup" | report "bulk_lookup 1,000 3PIDs ($ROWS rows)"
  wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/lookup.lua" "http://127.0.0.1:$CPORT" | report "v1 lookup ($ROWS rows)"
done
