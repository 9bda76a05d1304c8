#!/usr/bin/env bash
# Create .venv (if needed) and install edgepack with the given extras (default: all).
# Usage: scripts/setup.sh [EXTRAS]     e.g. scripts/setup.sh test
# Works on a fresh machine with Python 3.10+; as root on Debian it installs python3-venv itself
# when the venv module is missing. Re-running is cheap: it reinstalls only when pyproject.toml
# or the extras changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-all}"
python="${PYTHON:-python3}"

if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "error: edgepack needs Python 3.10 or newer; found: $("$python" --version 2>&1 || echo none)" >&2
    echo "       set PYTHON=/path/to/python3.10+ and run again" >&2
    exit 1
fi

if [ ! -x .venv/bin/python ]; then
    if ! "$python" -m venv .venv 2>/dev/null; then
        rm -rf .venv
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
            echo "setup: installing python3-venv with apt-get" >&2
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
            "$python" -m venv .venv
        else
            echo "error: '$python -m venv' failed; install your distribution's venv package (Debian/Ubuntu: sudo apt-get install python3-venv)" >&2
            exit 1
        fi
    fi
fi

stamp=".venv/.edgepack-installed"
want="$extras $(sha256sum pyproject.toml | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "setup: installing edgepack[$extras] into .venv (first run takes a minute or two)" >&2
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[$extras]"
    echo "$want" > "$stamp"
fi
