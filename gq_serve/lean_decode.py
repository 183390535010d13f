"""Batch-1 decode of Llama-family models in a handful of functions, without transformers' per-layer
machinery: the CPU decoder (``--decode lean``, and ``auto`` on the CPU where it applies).

Why: on the CPU nothing hides the cost of an op. A decode step of a small model runs ~45 small ops
per layer through transformers' modules (the DynamicCache's concatenations, mask building,
RMSNorm in six ops, rotary in ten, SDPA's dispatch), ~4 ms of SmolLM2's step besides its linears,
and 210 separate calls into the packed-weight kernels. Here a layer is about a dozen ops: q/k/v and
gate/up each one kernel call where the kernel can take several weights at once
(:meth:`gq_kernels.kernel.LinearKernel.shared`), a KV cache allocated per request and written in place,
and in fp32 on the CPU RMSNorm, rotary, the SiLU gate and one query's attention one fused op each of
the CPU extension (``csrc/decode_ops.cpp``; elsewhere the PyTorch expressions below, attention for
one query as two batched matmuls and a softmax).

Scope (:func:`can_implement`): decoder-only models with Llama's layer (LlamaForCausalLM and the
same layout: RMSNorm, rotary q/k, grouped-query attention without bias, SiLU-gated MLP), no hooks
and no replaced ``forward`` on any module (a format that keeps its own KV cache installs a hook),
every layer attending to every earlier position. Everything else decodes with :class:`gq_serve.decode.DynamicDecoder`. The
modules are the model's own: the same weights, kernels and lm_head (``--head``), no copies.

Exactness: the same math as transformers' Llama in the model's dtype, up to summation order
(``tests/test_lean_decode.py`` checks logits and greedy tokens against the dynamic loop).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gq_kernels.cpu import build
from gq_kernels.format import head_dim
from gq_serve.decode import DynamicDecoder

MODEL_TYPES = ("llama", "mistral")
INITIAL_NEW_POSITIONS = 256  # a request's KV cache starts at prompt + this many, then doubles


def can_implement(model: nn.Module) -> tuple[bool, str | None]:
    """(True, None) when the lean decoder computes exactly what ``model`` does, else (False, why)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) not in MODEL_TYPES:
        return False, f"serves model types {list(MODEL_TYPES)}, not {getattr(cfg, 'model_type', None)!r}"
    if getattr(model, "gq_kv_bits", None) is not None:
        return False, "the checkpoint keeps its own quantized KV cache"
    if getattr(cfg, "sliding_window", None) is not None:
        return False, "sliding-window attention"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return False, "biased attention or MLP projections"
    if getattr(cfg, "hidden_act", "silu") != "silu" or getattr(cfg, "pretraining_tp", 1) != 1:
        return False, "an activation other than SiLU, or pretraining_tp > 1"
    hooked = [name or "model" for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m)]
    if hooked:
        return False, f"forward hooks or a replaced forward on {hooked[0]} (they would not run)"
    inner = getattr(model, "model", None)
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(inner, part):
            return False, f"model.model has no {part}"
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        names = ("q_proj", "k_proj", "v_proj", "o_proj")
        if attn is None or mlp is None or not all(hasattr(attn, n) for n in names) or not all(
                hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            return False, "a decoder layer without Llama's q/k/v/o and gate/up/down projections"
    return True, None


class Projections:
    """Linears fed the same input (q/k/v; gate/up; or a single one): one kernel call where their
    kernel offers it (:meth:`gq_kernels.kernel.LinearKernel.shared`), else each module in turn."""

    def __init__(self, linears: Sequence[nn.Module]) -> None:
        self.linears = list(linears)
        self._kernels: tuple | None = None  # the kernels self._call was made for (None: not bound yet)
        self._call: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> the outputs side by side [..., out_0 + out_1 + ...]."""
        kernels = tuple(getattr(lin, "kernel", None) for lin in self.linears)
        # Rebind when a kernel changed (a move or reload resets it) or x's dtype did; dense
        # linears have no kernel and bind once, to "call each module".
        if kernels != self._kernels or (kernels[0] is not None and kernels[0].dtype != x.dtype):
            self._bind(x)
        if self._call is not None:
            return self._call(x)
        if len(self.linears) == 1:
            return self.linears[0](x)
        return torch.cat([lin(x) for lin in self.linears], dim=-1)

    def _bind(self, x: torch.Tensor) -> None:
        """Choose the kernels for x's device and dtype, and their one call if they have one."""
        self._call = None
        if all(hasattr(lin, "select_kernel") and lin.bias is None for lin in self.linears):
            members = [(lin.select_kernel(x.device, x.dtype), lin._runtime) for lin in self.linears]
            self._call = type(members[0][0]).shared(members)
        self._kernels = tuple(getattr(lin, "kernel", None) for lin in self.linears)


def rms_norm(x: torch.Tensor, norm: nn.Module, fused: bool = False) -> torch.Tensor:
    """transformers' Llama RMSNorm: in fp32, scaled by the weight in the input's dtype. ``fused``:
    one call into the CPU extension (fp32 x and weight on the CPU; see :func:`fused_ok`)."""
    eps = getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", 1e-6)
    if fused and norm.weight.dtype == torch.float32:
        return torch.ops.gq_cpu.rms_norm(x, norm.weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return norm.weight * x32.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """Rotary embedding (the half-split form transformers' Llama uses); x [T, heads, D], cos/sin [T, 1, D]."""
    if fused:
        return torch.ops.gq_cpu.rope(x, cos, sin)
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class KVCache:
    """Keys and values of one request: [layers, kv_heads, capacity, head_dim] each, written in place;
    the capacity doubles when full (one copy per doubling)."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, capacity: int, dtype, device) -> None:
        shape = (layers, kv_heads, max(capacity, 1), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    def reserve(self, length: int) -> None:
        cap = self.k.shape[2]
        if length <= cap:
            return
        while cap < length:
            cap *= 2
        grown = [t.new_zeros((*t.shape[:2], cap, t.shape[3])) for t in (self.k, self.v)]
        for new, old in zip(grown, (self.k, self.v)):
            new[:, :, : self.length] = old[:, :, : self.length]
        self.k, self.v = grown


class LeanLlama:
    """The forward of a Llama-layout model over its own modules, into a :class:`KVCache`."""

    def __init__(self, model: nn.Module) -> None:
        ok, why = can_implement(model)
        if not ok:
            raise ValueError(f"the lean decoder cannot run this model: {why}; use --decode dynamic")
        cfg, inner = model.config, model.model
        self.model, self.inner = model, inner
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = head_dim(cfg)
        self.layers = [(layer, Projections([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                        Projections([layer.self_attn.o_proj]), Projections([layer.mlp.gate_proj, layer.mlp.up_proj]),
                        Projections([layer.mlp.down_proj])) for layer in inner.layers]

    def new_cache(self, capacity: int, device) -> KVCache:
        dtype = self.inner.norm.weight.dtype  # the model's (the embedding may be stored narrower)
        return KVCache(len(self.layers), self.kv_heads, self.head_dim, capacity, dtype, device)

    def forward(self, ids: torch.Tensor, cache: KVCache, all_logits: bool = False) -> torch.Tensor:
        """ids long [T] at positions cache.length.. -> logits [T or 1, vocab] (the last row unless
        ``all_logits``). A prompt (T > 1) must start an empty cache."""
        t, start = ids.shape[0], cache.length
        if t > 1 and start:
            raise ValueError("the lean decoder prefills only into an empty cache")
        cache.reserve(start + t)
        h = self.inner.embed_tokens(ids)  # [T, hidden]
        pos = torch.arange(start, start + t, device=ids.device)
        cos, sin = self.inner.rotary_emb(h, pos[None])
        cos, sin = cos[0, :, None, :].to(h.dtype), sin[0, :, None, :].to(h.dtype)  # [T, 1, D]
        nq, nkv, d = self.heads, self.kv_heads, self.head_dim
        fused = fused_ok(h)
        for i, (layer, qkv_proj, o_proj, gate_up_proj, down_proj) in enumerate(self.layers):
            attn = layer.self_attn
            qkv = qkv_proj(rms_norm(h, layer.input_layernorm, fused))
            q = rotate(qkv[:, : nq * d].view(t, nq, d), cos, sin, fused)
            k = rotate(qkv[:, nq * d : (nq + nkv) * d].view(t, nkv, d), cos, sin, fused)
            cache.k[i, :, start : start + t] = k.transpose(0, 1)
            cache.v[i, :, start : start + t] = qkv[:, (nq + nkv) * d :].view(t, nkv, d).transpose(0, 1)
            keys, values = cache.k[i, :, : start + t], cache.v[i, :, : start + t]  # [KV, S, D]
            out = attention(q, keys, values, attn.scaling, causal=t > 1, fused=fused)  # [T, H * D]
            h = h + o_proj(out)
            gate_up = gate_up_proj(rms_norm(h, layer.post_attention_layernorm, fused))
            h = h + down_proj(silu_mul(gate_up, fused))
        cache.length = start + t
        h = rms_norm(h if all_logits else h[-1:], self.inner.norm, fused)
        return self.model.lm_head(h)


def fused_ok(h: torch.Tensor) -> bool:
    """Whether the step's small ops can be the CPU extension's fused ones (gq_cpu::rms_norm, rope,
    silu_mul, decode_attention): fp32 on the CPU, with the extension built (else PyTorch's ops)."""
    return h.dtype == torch.float32 and h.device.type == "cpu" and build.status()[0]


def silu_mul(gate_up: torch.Tensor, fused: bool = False) -> torch.Tensor:
    """gate_up [T, 2F] -> silu(gate) * up [T, F]."""
    if fused:
        return torch.ops.gq_cpu.silu_mul(gate_up)
    half = gate_up.shape[-1] // 2
    return F.silu(gate_up[:, :half]) * gate_up[:, half:]


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float, causal: bool,
              fused: bool = False) -> torch.Tensor:
    """q [T, H, D], keys/values [KV, S, D] (H a multiple of KV) -> [T, H * D]."""
    t, nq, d = q.shape
    nkv = keys.shape[0]
    if causal:  # the prompt: one fused call
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], is_causal=True,
                                             scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(t, nq * d)
    if fused:
        return torch.ops.gq_cpu.decode_attention(q[0], keys, values, scale)
    # One query: grouped heads as a batch of [group, D] x [D, S] products.
    qg = q[0].view(nkv, nq // nkv, d)
    probs = torch.softmax(torch.bmm(qg, keys.transpose(1, 2)).mul_(scale).float(), dim=-1).to(q.dtype)
    return torch.bmm(probs, values).reshape(1, nq * d)


class LeanDecoder(DynamicDecoder):
    """The decode loop of :class:`gq_serve.decode.DynamicDecoder` over :class:`LeanLlama` (batch 1,
    one request at a time): its state is a :class:`KVCache` that grows with the request."""

    mode = "lean"

    def __init__(self, model: nn.Module, device: torch.device | str | None = None) -> None:
        self.lean = LeanLlama(model)
        super().__init__(model, device)

    def _start(self, prompt_len: int, max_new_tokens: int) -> KVCache:
        # Not sized for max_new_tokens up front: a chat request's default is the rest of the
        # context (SmolLM2: 8k positions, 377 MB of cache) and most answers end far sooner.
        return self.lean.new_cache(prompt_len + min(max_new_tokens, INITIAL_NEW_POSITIONS), self.device)

    def _step(self, ids: torch.Tensor, cache: KVCache, full: bool) -> tuple[torch.Tensor, KVCache]:
        return self.lean.forward(ids, cache, all_logits=full), cache
