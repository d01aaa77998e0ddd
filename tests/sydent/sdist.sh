#!/usr/bin/env bash
# Downloads Sydent 2.6.1's source distribution from PyPI and unpacks it: its res/ folder holds
# Sydent's own email templates (the wheel that setup.sh installs ships none). The templates
# test renders them with sydent-rs and with Jinja2 and compares the bytes. Idempotent: a quick
# no-op once unpacked.
#
#   bash tests/sydent/sdist.sh [PYTHON]
#
# PYTHON is the venv python that tests/sydent/setup.sh prints (default: run setup.sh for it);
# its pip does the download. The folder is "${CARGO_TARGET_DIR:-<repo>/target}/sydent-sdist".
# The last line printed on stdout is the absolute path of the unpacked res/ folder; everything
# else goes to stderr.
set -euo pipefail

SYDENT_VERSION="2.6.1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
case "$target_dir" in /*) ;; *) target_dir="$repo_root/$target_dir" ;; esac
out="$target_dir/sydent-sdist"
res="$out/matrix_sydent-$SYDENT_VERSION/res"

if [ -f "$res/matrix-org/verification_template.eml.j2" ]; then
    echo "sydent $SYDENT_VERSION sdist already unpacked in $out" >&2
    echo "$res"
    exit 0
fi

py="${1:-}"
if [ -z "$py" ]; then
    py="$(bash "$here/setup.sh" | tail -n 1)"
fi

# Download and unpack into a fresh folder, then move it into place: a run that stops halfway
# leaves nothing that looks finished.
mkdir -p "$target_dir"
work="$(mktemp -d "$target_dir/sydent-sdist.XXXXXX")"
trap 'rm -rf "$work"' EXIT
"$py" -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
    --dest "$work" "matrix-sydent==$SYDENT_VERSION" >&2
tar -xzf "$work/matrix_sydent-$SYDENT_VERSION.tar.gz" -C "$work"
[ -f "$work/matrix_sydent-$SYDENT_VERSION/res/matrix-org/verification_template.eml.j2" ] || {
    echo "sdist.sh: the sdist has no res/matrix-org templates" >&2
    exit 1
}
rm -rf "$out"
mv "$work" "$out"
trap - EXIT
echo "sdist.sh: unpacked matrix-sydent $SYDENT_VERSION into $out" >&2
echo "$res"
