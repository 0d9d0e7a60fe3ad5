#!/usr/bin/env bash
# The whole check a change must pass: lint, types, and the test suite against real qemu-img.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests fuzz bench scripts
.venv/bin/ruff format --check src tests fuzz bench scripts
.venv/bin/mypy
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
