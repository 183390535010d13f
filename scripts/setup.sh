#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install gq-serve into it.
# The venv lives outside the checkout, keyed by a hash of the pins, so reruns and CI reuse it.
# Usage: source scripts/setup.sh    (exports GQ_VENV and puts its bin/ first on PATH)
set -euo pipefail
_gq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_gq_key="$(cat "$_gq_root/requirements/dev.txt" | sha256sum | cut -c1-12)"
export GQ_VENV="${GQ_VENV:-$HOME/.cache/gq-serve/venv-$_gq_key}"
if [ ! -x "$GQ_VENV/bin/python" ] || [ ! -f "$GQ_VENV/.complete" ]; then
    echo "[setup] creating $GQ_VENV" >&2
    rm -rf "$GQ_VENV"
    python3 -m venv "$GQ_VENV"
    "$GQ_VENV/bin/pip" install -q --upgrade pip
    "$GQ_VENV/bin/pip" install -q -r "$_gq_root/requirements/dev.txt"
    # PyPI's torchvision/torchaudio are CUDA builds that break imports next to the CPU torch.
    "$GQ_VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    touch "$GQ_VENV/.complete"
fi
"$GQ_VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$_gq_root" 2>/dev/null \
    || "$GQ_VENV/bin/pip" install -q --no-deps -e "$_gq_root"
export PATH="$GQ_VENV/bin:$PATH"
set +euo pipefail
