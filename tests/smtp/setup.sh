#!/usr/bin/env bash
# Installs aiosmtpd (PyPI) into a private venv: the real SMTP server the email tests send to.
# Idempotent; the last line printed is the absolute path of the venv's python.
#
#   bash tests/smtp/setup.sh
set -euo pipefail
AIOSMTPD_VERSION="1.4.6"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo_root/target}"
case "$target_dir" in /*) ;; *) target_dir="$repo_root/$target_dir" ;; esac
venv="$target_dir/smtp-venv"
py="$venv/bin/python"
if ! { [ -x "$py" ] && "$py" -c "import aiosmtpd, sys; sys.exit(aiosmtpd.__version__ != '$AIOSMTPD_VERSION')" 2>/dev/null; }; then
    # Two test runs may race to create it: one at a time.
    exec 9>"$target_dir/.smtp-venv.lock"
    flock 9
    if ! { [ -x "$py" ] && "$py" -c "import aiosmtpd, sys; sys.exit(aiosmtpd.__version__ != '$AIOSMTPD_VERSION')" 2>/dev/null; }; then
        rm -rf "$venv"
        python3 -m venv "$venv" >&2
        "$py" -m pip install --quiet "aiosmtpd==$AIOSMTPD_VERSION" >&2
    fi
fi
echo "$py"
