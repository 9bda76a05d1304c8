#!/usr/bin/env bash
# Type-check the packages under the names they install as (edgepack.agent, ...).
# The repository keeps one top-level folder per part and pyproject.toml maps them into the
# edgepack package; mypy cannot follow that mapping, so it reads them through a tree of
# symbolic links under build/typecheck that mirrors the installed layout.
# Usage: scripts/typecheck.sh   (after scripts/setup.sh test)
set -euo pipefail
cd "$(dirname "$0")/.."
tree=build/typecheck/edgepack
rm -rf build/typecheck && mkdir -p "$tree"
for f in edgepack/*.py; do ln -s "../../../$f" "$tree/"; done
for part in agent fleet formats packager; do ln -s "../../../$part" "$tree/$part"; done
MYPYPATH=build/typecheck exec .venv/bin/mypy --cache-dir build/typecheck-cache -p edgepack "$@"
