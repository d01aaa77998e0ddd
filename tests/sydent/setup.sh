#!/usr/bin/env bash
# Installs a real Sydent (matrix-sydent[prometheus] 2.6.1) into a private venv for the interop
# tests. Idempotent: a quick no-op when the venv already matches.
#
#   bash tests/sydent/setup.sh
#
# The venv is "${CARGO_TARGET_DIR:-<repo>/target}/sydent-venv"; dependency versions are pinned by
# tests/sydent/constraints.txt (the set NOTES.md was verified with). The last line printed on
# stdout is the absolute path of the venv's python; everything else goes to stderr.
# SYDENT_PYTHON chooses the base interpreter (default: python3.11, else python3).
set -euo pipefail

SYDENT_VERSION="2.6.1"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
case "$target_dir" in /*) ;; *) target_dir="$repo_root/$target_dir" ;; esac
venv="$target_dir/sydent-venv"
py="$venv/bin/python"
constraints="$here/constraints.txt"
stamp_file="$venv/.sydent-setup-stamp"
stamp="matrix-sydent==$SYDENT_VERSION $(sha256sum "$constraints" | cut -d' ' -f1)"

installed_ok() {
    [ -x "$py" ] && "$py" - "$SYDENT_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("matrix-sydent") == sys.argv[1]
import prometheus_client, service_identity, sydent.sydent  # noqa: F401
PY
}

if [ -f "$stamp_file" ] && [ "$(cat "$stamp_file")" = "$stamp" ] && installed_ok; then
    echo "sydent $SYDENT_VERSION already installed in $venv" >&2
    echo "$py"
    exit 0
fi

base="${SYDENT_PYTHON:-}"
if [ -z "$base" ]; then
    for cand in python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1; then base="$cand"; break; fi
    done
fi
[ -n "$base" ] || { echo "setup.sh: no python3 found" >&2; exit 1; }

echo "setup.sh: creating $venv with $("$base" --version 2>&1)" >&2
mkdir -p "$target_dir"
"$base" -m venv --clear "$venv" >&2
"$py" -m pip install --quiet --disable-pip-version-check \
    -c "$constraints" "matrix-sydent[prometheus]==$SYDENT_VERSION" >&2

installed_ok || { echo "setup.sh: sydent import check failed in $venv" >&2; exit 1; }
echo "$stamp" > "$stamp_file"
echo "setup.sh: installed matrix-sydent $SYDENT_VERSION" >&2
echo "$py"
