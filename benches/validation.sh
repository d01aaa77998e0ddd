#!/usr/bin/env bash
# The validation figures of the README (issue 15 targets):
#  1. v1 email requestToken, each request a new session whose mail goes to a local SMTP sink
#     (aiosmtpd, tests/smtp/, keeping only a count), CONNS connections: requests/s, p99, and
#     the mails the sink received;
#  2. v1 store-invite (issue 16 target), each request a new address, the invite mail to the
#     same sink: requests/s, p99, mails received;
#  3. submitToken then 3pid/bind of sessions made beforehand (written into the database as a
#     Sydent would, tokens known), one connection per wrk thread so each bind follows its own
#     submitToken: pairs/s (half the requests/s).
#
#   benches/validation.sh        # needs wrk (apt-get install wrk); the SMTP sink is Postfix's
#                                # smtp-sink when installed (apt-get install postfix), a C
#                                # server far faster than the node; else aiosmtpd from
#                                # tests/smtp/setup.sh's venv, whose ~300 mails/s then cap it
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }

DURATION=${DURATION:-10s}
CONNS=${CONNS:-16}
THREADS=${THREADS:-16}
SESSIONS=${SESSIONS:-300000}
cargo build --release --quiet
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/sydent-rs}
PY=""
command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ] || PY=$(bash tests/smtp/setup.sh | tail -n 1)
DIR=$(mktemp -d)
trap 'kill $NODE $SINK 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT

SMTP_PORT=$(free_port)
mkdir -p "$DIR/mail"
if command -v smtp-sink >/dev/null || [ -x /usr/sbin/smtp-sink ]; then
  SINK_KIND=smtp-sink
  chmod 755 "$DIR"; chmod 777 "$DIR/mail"
  # Each mail is appended to the dump file; its Message-ID lines count the mails.
  PATH=$PATH:/usr/sbin smtp-sink -u nobody -D "$DIR/mail/dump" "127.0.0.1:$SMTP_PORT" 512 &
  SINK=$!
  sleep 0.5
  mails() { cat "$DIR"/mail/dump* 2>/dev/null | grep -c '^Message-ID: ' || true; }
else
  SINK_KIND=aiosmtpd
  "$PY" tests/smtp/sink.py "$SMTP_PORT" "$DIR/mail" count > "$DIR/sink.out" &
  SINK=$!
  for _ in $(seq 100); do grep -q ready "$DIR/sink.out" 2>/dev/null && break; sleep 0.1; done
  mails() { cat "$DIR/mail/count"; }
fi

start_node() {
  CPORT=$(free_port); IPORT=$(free_port)
  node_config "$DIR" "$CPORT" "$IPORT" WARN "templates.path = $PWD/res"
  cat >> "$DIR/sydent.conf" <<CONF
client_http_base = https://id.example.org
[email]
email.smtphost = 127.0.0.1
email.smtpport = $SMTP_PORT
email.hostname = id.example.org
email.from = Bench <noreply@id.example.org>
email.ratelimit_sender.burst = 1000000000
CONF
  "$BIN" --config "$DIR/sydent.conf" 2> "$DIR/node.log" &
  NODE=$!
  wait_serving "$CPORT"
}

# 1. requestToken: a new address per request (thread number and counter).
start_node
cat > "$DIR/request.lua" <<'LUA'
local counter = 0
local id = 0
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
function init(args) id = wrk.thread:get("id") end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  local body = string.format('{"email": "bench-%d-%d@example.org", "client_secret": "s", "send_attempt": 1}', id, counter)
  return wrk.format(nil, "/_matrix/identity/api/v1/validate/email/requestToken", nil, body)
end
LUA
wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/request.lua" "http://127.0.0.1:$CPORT" > "$DIR/request.out"
sleep 1
report "email requestToken ($CONNS conns, $SINK_KIND)" < "$DIR/request.out"
grep -E 'Non-2xx|Socket errors' "$DIR/request.out" || true
echo "  mails received by the sink: $(mails), requests answered: $(awk '/requests in/ {print $1}' "$DIR/request.out")"

# 2. store-invite: a new address per request; every invite stored and mailed.
before=$(mails)
cat > "$DIR/invite.lua" <<'LUA'
local counter = 0
local id = 0
local threads = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
function init(args) id = wrk.thread:get("id") end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  counter = counter + 1
  local body = string.format('{"medium": "email", "address": "invitee-%d-%d@example.org", "room_id": "!room:example.org", "sender": "@alice:example.org", "sender_display_name": "Alice", "room_name": "Bench room"}', id, counter)
  return wrk.format(nil, "/_matrix/identity/api/v1/store-invite", nil, body)
end
LUA
wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/invite.lua" "http://127.0.0.1:$CPORT" > "$DIR/invite.out"
sleep 1
report "store-invite ($CONNS conns, $SINK_KIND)" < "$DIR/invite.out"
grep -E 'Non-2xx|Socket errors' "$DIR/invite.out" || true
echo "  invite mails received by the sink: $(( $(mails) - before )), requests answered: $(awk '/requests in/ {print $1}' "$DIR/invite.out")"
kill $NODE; wait $NODE 2>/dev/null || true
echo "  invites stored: $(python3 -c 'import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute("SELECT COUNT(*) FROM invite_tokens").fetchone()[0])' "$DIR/sydent.db")"
rm -f "$DIR"/sydent.db*

# 3. submitToken + bind: SESSIONS sessions as a Sydent would have left them (sid = n, secret
# "s", token "t<n>"), written into the node's database between two starts.
start_node
kill $NODE; wait $NODE 2>/dev/null || true
python3 - "$DIR/sydent.db" "$SESSIONS" <<'PY'
import sqlite3, sys, time
db, n = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db)
now = int(time.time() * 1000)
c.executemany("INSERT INTO threepid_validation_sessions VALUES (?, 'email', ?, 's', 0, ?)",
              ((i, f"pair-{i}@example.org", now) for i in range(1, n + 1)))
c.executemany("INSERT INTO threepid_token_auths (validationSession, token, sendAttemptNumber) VALUES (?, ?, 1)",
              ((i, f"t{i}") for i in range(1, n + 1)))
c.commit()
PY
start_node
cat > "$DIR/pairs.lua" <<LUA
local n = 0
local threads = 0
local step = 0
local next_sid = 0
function setup(thread) thread:set("id", threads); threads = threads + 1 end
function init(args) n = wrk.thread:get("id") + 1 end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
function request()
  step = step + 1
  if step % 2 == 1 then
    next_sid = n
    n = n + $THREADS
    return wrk.format(nil, "/_matrix/identity/api/v1/validate/email/submitToken", nil,
      string.format('{"sid": "%d", "client_secret": "s", "token": "t%d"}', next_sid, next_sid))
  end
  return wrk.format(nil, "/_matrix/identity/api/v1/3pid/bind", nil,
    string.format('{"sid": "%d", "client_secret": "s", "mxid": "@p%d:example.org"}', next_sid, next_sid))
end
local shown = false
function response(status, headers, body)
  if status ~= 200 and not shown then shown = true; print("first failure: " .. status .. " " .. body) end
end
LUA
wrk -t"$THREADS" -c"$THREADS" -d"$DURATION" --latency -s "$DIR/pairs.lua" "http://127.0.0.1:$CPORT" > "$DIR/pairs.out"
report "submitToken + bind ($THREADS conns, requests)" < "$DIR/pairs.out"
grep -E 'Non-2xx|Socket errors|first failure' "$DIR/pairs.out" || true
awk '/Requests\/sec/ {printf "  pairs (submitToken + bind) per second: %d\n", $2 / 2}' "$DIR/pairs.out"
