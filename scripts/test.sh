#!/usr/bin/env bash
# Set up everything and run the whole test suite (what CI runs).
# GPU tests skip without a GPU; `model` tests use the offline SmolLM2 model prepared by `gq prepare`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
set -euo pipefail
gq prepare >/dev/null
python -m pytest -q -ra "$@"
