#!/usr/bin/env bash
# Builds the sydent-rs container image without a registry: a release binary linked statically
# (glibc, +crt-static) and the host's CA bundle, staged in target/docker/, then the top-level
# Dockerfile (FROM scratch) around them. Needs cargo and docker; nothing is pulled.
#
#   contrib/docker/build-image.sh [TAG]        # default sydent-rs:latest
#
# The static build has a target directory of its own (SYDENT_RS_STATIC_TARGET_DIR, default
# target/static): its flags differ from a normal build's, so sharing one would rebuild both.
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-sydent-rs:latest}
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
TARGET_DIR=${SYDENT_RS_STATIC_TARGET_DIR:-target/static}

# --target keeps these flags away from build scripts and proc macros. getrandom is told to use
# the getrandom() system call: a static binary cannot look it up at run time.
RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom"' \
    CARGO_PROFILE_RELEASE_STRIP=symbols CARGO_TARGET_DIR="$TARGET_DIR" \
    cargo build --release --locked --quiet --target "$TRIPLE" --bin sydent-rs
BIN=$TARGET_DIR/$TRIPLE/release/sydent-rs
if ldd "$BIN" >/dev/null 2>&1 && ! ldd "$BIN" 2>&1 | grep -q 'statically linked'; then
    echo "build-image: $BIN is not statically linked" >&2
    exit 1
fi

CA_BUNDLE=
for f in "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
    if [ -n "$f" ] && [ -s "$f" ]; then CA_BUNDLE=$f; break; fi
done
[ -n "$CA_BUNDLE" ] || { echo "build-image: no CA bundle found (install ca-certificates)" >&2; exit 1; }

STAGE=target/docker
rm -rf "$STAGE"
mkdir -p "$STAGE/rootfs/usr/bin" "$STAGE/rootfs/etc/ssl/certs" "$STAGE/data"
cp "$BIN" "$STAGE/rootfs/usr/bin/sydent-rs"
cp "$CA_BUNDLE" "$STAGE/rootfs/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/:/nonexistent\nsydent:x:10001:10001:sydent-rs:/data:/nonexistent\n' \
    > "$STAGE/rootfs/etc/passwd"
printf 'root:x:0:\nsydent:x:10001:\n' > "$STAGE/rootfs/etc/group"

docker build --quiet -t "$TAG" -f Dockerfile . >/dev/null
echo "built $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.1f MB", $1 / 1e6}'))"
