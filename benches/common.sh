# Shared by the benchmark scripts (sourced): a free loopback port, seeding bindings through the
# internal API, and one line of wrk's figures.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# seed PORT FROM TO: binds seed-FROM..seed-(TO-1)@example.org to @sN:example.org through the
# internal API on PORT, 64 requests in flight.
seed_on() {
  python3 - "$1" "$2" "$3" <<'PY'
import http.client, json, sys, concurrent.futures
port, lo, hi = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def work(chunk):
    c = http.client.HTTPConnection("127.0.0.1", port)
    for i in chunk:
        c.request("POST", "/_matrix/identity/internal/bind",
                  json.dumps({"medium": "email", "address": f"seed-{i}@example.org", "mxid": f"@s{i}:example.org"}),
                  {"Content-Type": "application/json"})
        r = c.getresponse(); r.read(); assert r.status == 200, r.status
chunks = [range(s, hi, 64) for s in range(lo, lo + 64)]
with concurrent.futures.ThreadPoolExecutor(64) as ex: list(ex.map(work, chunks))
PY
}

# node_config DIR CPORT IPORT LEVEL [LINE...]: DIR/sydent.conf for a bench node: client and
# internal APIs on 127.0.0.1:CPORT and :IPORT (one client-API worker), database and pid file in
# DIR, log.level LEVEL, and each LINE added to [general].
node_config() {
  local dir=$1 cport=$2 iport=$3 level=$4; shift 4
  {
    printf '[general]\nserver.name = bench.example.org\npidfile.path = %s/sydent.pid\nlog.level = %s\n' "$dir" "$level"
    for line in "$@"; do printf '%s\n' "$line"; done
    printf '[db]\ndb.file = %s/sydent.db\n' "$dir"
    printf '[http]\nclientapi.http.bind_address = 127.0.0.1\nclientapi.http.port = %s\nclientapi.http.workers = 1\n' "$cport"
    printf 'internalapi.http.bind_address = 127.0.0.1\ninternalapi.http.port = %s\n' "$iport"
  } > "$dir/sydent.conf"
}

# wait_serving PORT: until the client API on PORT answers (10 s at most).
wait_serving() {
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$1/_matrix/identity/versions" >/dev/null && return; sleep 0.1; done
}

# report NAME: requests/s and latency percentiles from wrk's output.
report() {
  awk -v name="$1" '/Requests\/sec/ {rps=$2} /^ +50%/ {p50=$2} /^ +99%/ {p99=$2} END {printf "%-44s %10s req/s   p50 %-8s p99 %s\n", name, rps, p50, p99}'
}

# lookup_lua FILE: a wrk script of v1 lookups of random seed-<i>@example.org, i < 20,000 (half
# of them bound when 10,000 are seeded).
lookup_lua() {
  cat > "$1" <<'LUA'
math.randomseed(os.time())
request = function()
  local i = math.random(0, 19999)
  return wrk.format("GET", "/_matrix/identity/api/v1/lookup?medium=email&address=seed-" .. i .. "%40example.org")
end
LUA
}
