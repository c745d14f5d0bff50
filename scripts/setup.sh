#!/usr/bin/env bash
# Make (or refresh) the project's virtual environment and build the pinned llama.cpp tools.
# Idempotent: a second run reuses the environment and the cached build (seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python -m pip install --quiet --upgrade pip
fi
# torch is pinned to the CPU build (a plain `torch` would pull a multi-GB CUDA build).
.venv/bin/python -m pip install --quiet -e '.[convert,hub,plots,ray,test]'
.venv/bin/tbpw build
