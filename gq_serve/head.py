"""The lm_head's precision at load time (``--head``): ``model`` keeps the checkpoint's head,
``int8`` replaces it by int8 weights with an fp32 scale per row, multiplied by the CPU kernel of
:mod:`gq_kernels.cpu.rowint8` without widening the matrix; ``q8`` stores the same int8 weights and
multiplies them with int8 activations (:mod:`gq_kernels.cpu.q8`, AVX-512 VNNI: llama.cpp's way),
one more rounding for fewer instructions per weight.

Why: the head is the largest matrix a decode step reads (SmolLM2 ties its 49152 x 576 head to the
embedding: 113 MB of fp32 per token, more than the 210 quantized decoder linears of a 3-bit
checkpoint together). Rounding it per row to int8 is a load-time choice, not part of the
checkpoint; its perplexity cost is measured in docs/results.md (scripts/head_precision.py). A tied
head is untied: the input embedding keeps its values (a lookup reads one row per token), stored in
fp16 when they all are fp16 numbers (:func:`shrink_embedding`: the same lookups in half the memory).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from gq_kernels.cpu import build, features
from gq_kernels.cpu.kernel import GEMV_MAX_ROWS
from gq_kernels.cpu.q8 import dense_q8, dense_q8_matmul
from gq_kernels.cpu.rowint8 import best_isa, int8_matmul, quantize_rows

log = logging.getLogger(__name__)

HEADS = ("model", "int8", "q8")


class Int8Head(nn.Module):
    """``x @ (scale * q).T (+ bias)`` from int8 ``qweight`` [out, in] and fp32 ``scale`` [out]."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        q, scale = quantize_rows(weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.isa, why = best_isa()
        if self.isa is None:
            log.warning("--head int8: the CPU kernel is unavailable (%s); the reference runs instead, "
                        "which widens the matrix on every call", why)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_matmul(x, self.qweight, self.scale, self.isa)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, kernel={self.isa}"


class Q8Head(nn.Module):
    """Int8Head's weights (stored as ``u = q + 128``, rows padded to 64 columns) times int8
    activations rounded per 64 columns; prompts of more than 8 rows are multiplied exactly."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        ok, why = features.isa_support("avx512vnni")
        ok, why = (ok, why) if not ok else build.status()
        if not ok:
            raise ValueError(f"--head q8 needs the int8-activation CPU kernel: {why}; use --head int8")
        u, tscale, tmin = dense_q8(*quantize_rows(weight.detach()))
        self.register_buffer("weight_u8", u)
        self.register_buffer("tscale", tscale)
        self.register_buffer("tmin", tmin)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.max_rows = GEMV_MAX_ROWS  # None: int8 activations for prompts too (scripts/q8_quality.py)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = dense_q8_matmul(x, self.weight_u8, self.tscale, self.tmin, self.in_features, self.max_rows)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, int8 activations"


class Fp16Embedding(nn.Module):
    """An embedding table stored in fp16 whose rows come out in ``dtype``: for an fp32 table whose
    values are all fp16 numbers (a checkpoint saved in fp16), the same lookups in half the memory."""

    def __init__(self, weight: torch.Tensor, padding_idx: int | None = None) -> None:
        super().__init__()
        self.register_buffer("weight16", weight.detach().half())
        self.dtype, self.padding_idx = weight.dtype, padding_idx
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding(ids, self.weight16).to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, stored fp16, rows in {self.dtype}"


def shrink_embedding(model: nn.Module) -> bool:
    """Store an untied plain fp32 input embedding in fp16 when that loses nothing (every value an fp16
    number); True when it did. With ``--head int8`` the embedding no longer shares the head's
    tensor, and a lookup reads one row per token: its fp32 copy is only memory (SmolLM2: 113 MB)."""
    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding or emb.weight.dtype != torch.float32 or emb.max_norm is not None:
        return False  # subclasses may scale their rows (Gemma): leave them as they are
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is emb.weight:
        return False
    w = emb.weight.detach()
    if not torch.equal(w.half().float(), w):
        return False
    model.set_input_embeddings(Fp16Embedding(w, emb.padding_idx))
    return True


def apply_head(model: nn.Module, head: str) -> str:
    """Give ``model`` (an HF causal LM) the ``head`` precision; returns a description for logs and
    benchmark rows. ValueError names the problem: an unknown choice, a device other than the CPU,
    a head that is not a plain ``nn.Linear``."""
    if head not in HEADS:
        raise ValueError(f"unknown --head {head!r}; expected one of {', '.join(HEADS)}")
    if head == "model":
        return "model"
    lm_head = model.get_output_embeddings()
    if not isinstance(lm_head, nn.Linear):
        raise ValueError(f"--head {head}: the model's lm_head is a {type(lm_head).__name__}, not a plain "
                         "nn.Linear (already quantized?); drop --head")
    device = lm_head.weight.device
    if device.type != "cpu":
        raise ValueError(f"--head {head} is a CPU kernel and the model is on {device}; drop --head there "
                         "(a GPU reads the fp16 head at full bandwidth)")
    new = Int8Head(lm_head.weight, lm_head.bias) if head == "int8" else Q8Head(lm_head.weight, lm_head.bias)
    model.set_output_embeddings(new)
    model.config.tie_word_embeddings = False  # nothing may tie the embedding back to a module without .weight
    shrunk = shrink_embedding(model)
    kernel = (new.isa or "reference") if head == "int8" else "int8 activations"
    return f"{head} ({kernel})" + (", embedding stored in fp16" if shrunk else "")
