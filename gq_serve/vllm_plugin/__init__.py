"""vLLM plugin for GuidedQuant checkpoints (``quant_method: "guidedquant"``).

vLLM discovers :func:`register` through the ``vllm.general_plugins`` entry point and calls it in every
process it starts (API server, engine core, each worker), so registration must be cheap and idempotent.

Nothing here imports vLLM at module import time: ``import gq_serve`` (and this package) must keep
working for users who serve with the transformers engine and never installed vLLM.
"""
from __future__ import annotations

from gq_kernels.schema import QUANT_METHOD

_registered = False


def register() -> None:
    """Register ``GuidedQuantConfig`` with vLLM's quantization registry (safe to call repeatedly)."""
    global _registered
    if _registered:
        return
    # Importing the module runs ``@register_quantization_config(QUANT_METHOD)``; Python caches the module,
    # so a second import (e.g. from another entry point) does not register twice either.
    from gq_serve.vllm_plugin import config  # noqa: F401

    _registered = True


__all__ = ["QUANT_METHOD", "register"]
