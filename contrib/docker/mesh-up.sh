#!/usr/bin/env bash
# From a fresh clone to a running 3-node mesh: builds the image (contrib/docker/build-image.sh),
# makes the mesh CA, each node's certificate, signing key and config in certs/, and peers.d/
# (sydent-rs new-mesh; existing keys are kept), then starts docker-compose.yml and waits until
# the three nodes are healthy.
#
#   contrib/docker/mesh-up.sh            # then: docker-compose down (-v also drops the data)
#
# Honours the variables docker-compose.yml reads (SYDENT_RS_IMAGE, SYDENT_RS_CERTS,
# SYDENT_RS_PEERS, SYDENT_RS_NODE*_PORT) and COMPOSE_PROJECT_NAME.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SYDENT_RS_IMAGE=${SYDENT_RS_IMAGE:-sydent-rs:latest}
export SYDENT_RS_CERTS=${SYDENT_RS_CERTS:-./certs}
export SYDENT_RS_PEERS=${SYDENT_RS_PEERS:-./peers.d}
if docker compose version >/dev/null 2>&1; then DC=(docker compose); else DC=(docker-compose); fi

contrib/docker/build-image.sh "$SYDENT_RS_IMAGE"
target/docker/rootfs/usr/bin/sydent-rs new-mesh --certs "$SYDENT_RS_CERTS" \
    --peers "$SYDENT_RS_PEERS" node1 node2 node3
# The containers' user reads the keys through the group of the files (mode 0640).
SYDENT_RS_CERTS_GID=$(stat -c %g "$SYDENT_RS_CERTS/node1/node1.key")
export SYDENT_RS_CERTS_GID

"${DC[@]}" up -d --no-build
nodes=$("${DC[@]}" ps -q | wc -l)
for _ in $(seq 60); do
    healthy=$("${DC[@]}" ps -q | xargs docker inspect -f '{{.State.Health.Status}}' | grep -c '^healthy$' || true)
    [ "$healthy" = "$nodes" ] && break
    sleep 1
done
"${DC[@]}" ps
[ "$healthy" = "$nodes" ] || { echo "mesh-up: not every node became healthy; see: ${DC[*]} logs" >&2; exit 1; }
echo "mesh up: node1 http://127.0.0.1:${SYDENT_RS_NODE1_PORT:-8090} (internal http://127.0.0.1:${SYDENT_RS_NODE1_INTERNAL_PORT:-8091}), node2 http://127.0.0.1:${SYDENT_RS_NODE2_PORT:-8092}, node3 http://127.0.0.1:${SYDENT_RS_NODE3_PORT:-8093}"
