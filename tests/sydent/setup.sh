#!/usr/bin/env bash
# Installs a real Sydent (matrix-sydent 2.6.1) into a private venv for the interop tests.
#
#   bash tests/sydent/setup.sh        # from anywhere; idempotent
#
# The venv lives at "${CARGO_TARGET_DIR:-<repo>/target}/sydent-venv". The last line printed is
# the absolute path of the venv's python (use it to run tests/sydent/run_sydent.py).
# Set SYDENT_PYTHON to choose the base interpreter (default: python3.11, else python3).
set -euo pipefail

SYDENT_VERSION="2.6.1"
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
case "$target_dir" in /*) ;; *) target_dir="$repo_root/$target_dir" ;; esac
venv="$target_dir/sydent-venv"
py="$venv/bin/python"

installed_ok() {
    [ -x "$py" ] && "$py" - "$SYDENT_VERSION" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
assert version("matrix-sydent") == sys.argv[1]
import prometheus_client, service_identity, sydent.sydent  # noqa: F401
PY
}

if installed_ok; then
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

echo "creating $venv with $base" >&2
mkdir -p "$target_dir"
"$base" -m venv --clear "$venv" >&2
"$py" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
"$py" -m pip install --quiet --disable-pip-version-check \
    "matrix-sydent[prometheus]==$SYDENT_VERSION" >&2

installed_ok || { echo "setup.sh: sydent install check failed in $venv" >&2; exit 1; }
echo "$py"
