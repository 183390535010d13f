#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install gq-serve into it.
# The venv lives outside the checkout, keyed by a hash of the pins, so reruns and CI reuse it.
# Usage: source scripts/setup.sh    (exports GQ_VENV and puts its bin/ first on PATH)
set -euo pipefail
_gq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$_gq_root/scripts/venv-lib.sh"
export GQ_VENV="${GQ_VENV:-$HOME/.cache/gq-serve/venv-$(gq_key "$_gq_root/requirements/dev.txt")}"
gq_ensure_venv "$GQ_VENV" "$_gq_root/requirements/dev.txt"
"$GQ_VENV/bin/pip" install -q --no-deps -e "$_gq_root"
export PATH="$GQ_VENV/bin:$PATH"
set +euo pipefail
