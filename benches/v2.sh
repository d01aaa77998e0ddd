#!/usr/bin/env bash
# The v2 figures of the README (issue 14 targets): account/register against a homeserver
# stand-in (nginx or Python, HTTPS with a certificate from `sydent-rs new-mesh --local`), then with an
# account's token: v2 /lookup of one sha256 hash (16 connections) and of 1,000 hashes, at
# 100,000 bindings, and of 1,000 hashes again at 1,000,000 (SIZES).
#
#   benches/v2.sh                 # needs wrk (apt-get install wrk); nginx, when installed,
#                                 # is the homeserver (else a Python one, ~300 req/s)
#   SIZES=100000 benches/v2.sh    # skip the million
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/common.sh
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }

DURATION=${DURATION:-10s}
CONNS=${CONNS:-16}
SIZES=${SIZES:-"100000 1000000"}
cargo build --release --quiet
BIN=${CARGO_TARGET_DIR:-target}/release/sydent-rs
DIR=$(mktemp -d)
trap 'kill $NODE $HS 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"' EXIT

# The homeserver stand-in's certificate: CN and SAN localhost (+127.0.0.1), from new-mesh.
"$BIN" new-mesh --local --certs "$DIR/certs" --peers "$DIR/peers.d" localhost >/dev/null
HS_PORT=$(free_port)
if command -v nginx >/dev/null; then
  # nginx answers userinfo for one user: a homeserver far faster than the node (132k req/s here),
  # so the figure is the node's.
  HS_KIND=nginx
  cat > "$DIR/nginx.conf" <<NGINX
daemon off;
worker_processes 1;
pid $DIR/nginx.pid;
error_log $DIR/nginx-error.log;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $DIR; proxy_temp_path $DIR; fastcgi_temp_path $DIR; uwsgi_temp_path $DIR; scgi_temp_path $DIR;
  server {
    listen 127.0.0.1:$HS_PORT ssl;
    ssl_certificate $DIR/certs/localhost/localhost.pem;
    ssl_certificate_key $DIR/certs/localhost/localhost.key;
    location / { default_type application/json; return 200 '{"sub":"@u:localhost:$HS_PORT"}'; }
  }
}
NGINX
  nginx -c "$DIR/nginx.conf" &
else
  # Without nginx (apt-get install nginx-light): Python's threaded server, whose ~300 req/s is
  # then the register figure.
  HS_KIND=python
python3 - "$DIR/certs" "$HS_PORT" <<'PY' &
import itertools, json, ssl, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
certs, port = sys.argv[1], int(sys.argv[2])
users = itertools.count()
class Userinfo(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"sub": f"@u{next(users)}:localhost:{port}"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", port), Userinfo)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(f"{certs}/localhost/localhost.pem", f"{certs}/localhost/localhost.key")
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
PY
fi
HS=$!

CPORT=$(free_port); IPORT=$(free_port)
node_config "$DIR" "$CPORT" "$IPORT" WARNING "ip.whitelist = 127.0.0.0/8"
SSL_CERT_FILE="$DIR/certs/mesh-ca.pem" "$BIN" --config "$DIR/sydent.conf" &
NODE=$!
wait_serving "$CPORT"
BASE="http://127.0.0.1:$CPORT/_matrix/identity/v2"
REGISTER="{\"access_token\":\"x\",\"matrix_server_name\":\"localhost:$HS_PORT\"}"
TOKEN=$(curl -sf -XPOST "$BASE/account/register" -d "$REGISTER" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
PEPPER=$(curl -sf "$BASE/hash_details?access_token=$TOKEN" | python3 -c 'import json,sys; print(json.load(sys.stdin)["lookup_pepper"])')

# wrk scripts: register; one hash (half of them bound); 1,000 hashes.
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = [[%s]]\n' "$REGISTER" > "$DIR/register.lua"
python3 - "$DIR" "$PEPPER" "$TOKEN" <<'PY'
import base64, hashlib, json, sys
d, pepper, token = sys.argv[1:]
h = lambda a: base64.urlsafe_b64encode(hashlib.sha256(f"{a} email {pepper}".encode()).digest()).rstrip(b"=").decode()
hashes = [h(f"seed-{i}@example.org") for i in range(50000, 150000, 5)]  # half bound at 100k
auth = f'wrk.headers["Authorization"] = "Bearer {token}"\nwrk.headers["Content-Type"] = "application/json"\nwrk.method = "POST"\n'
with open(f"{d}/one.lua", "w") as f:
    f.write(auth + "math.randomseed(os.time())\nlocal hashes = {" + ",".join(f'"{x}"' for x in hashes) + "}\n")
    f.write('request = function()\n  local body = string.format(\'{"algorithm":"sha256","pepper":"%s","addresses":["%s"]}\', "' + pepper + '", hashes[math.random(#hashes)])\n  return wrk.format(nil, nil, nil, body)\nend\n')
thousand = [h(f"seed-{i * 7 % 200000}@example.org") for i in range(1000)]
with open(f"{d}/thousand.lua", "w") as f:
    f.write(auth + "wrk.body = [==[" + json.dumps({"algorithm": "sha256", "pepper": pepper, "addresses": thousand}) + "]==]\n")
PY

rows() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from global_threepid_associations').fetchone()[0])" "$DIR/sydent.db"; }
echo "== sydent-rs $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(nproc) cores, $CONNS connections, $DURATION each"
wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/register.lua" "$BASE/account/register" | report "v2 account/register ($HS_KIND homeserver)"
for SIZE in $SIZES; do
  ROWS=$(rows)
  if [ "$ROWS" -lt "$SIZE" ]; then echo "seeding to $SIZE bindings..."; seed_on "$IPORT" "$ROWS" "$SIZE"; fi
  ROWS=$(rows)
  wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/one.lua" "$BASE/lookup" | report "v2 lookup, 1 sha256 hash ($ROWS rows)"
  wrk -t2 -c"$CONNS" -d"$DURATION" --latency -s "$DIR/thousand.lua" "$BASE/lookup" | report "v2 lookup, 1,000 hashes ($ROWS rows)"
done
RSS_KB=$(awk '/VmRSS/ {print $2}' /proc/$NODE/status)
printf "%-44s %10s MB\n" "RSS at the end" "$((RSS_KB / 1024))"
