#!/usr/bin/env bash
# Installs imgguard into .venv and scans the demo corpus: a few benign images and a few attacks.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
# Exit status 1 is the expected answer: the corpus holds images the default policy rejects.
.venv/bin/python -m imgguard scan corpus/demo "$@" || [ $? -eq 1 ]
