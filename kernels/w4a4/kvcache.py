"""The ``w4a4`` format's KV cache for transformers: keys and values held as low-bit codes.

``QuantizedKVCache`` is a transformers ``Cache`` whose layers store, per (token, KV head), the
codes of ``K R_d`` and of ``V`` (:func:`gq_kernels.w4a4.reference.fake_quant_kv` is the spec: at 4
bits two codes per byte plus an fp32 scale and a uint8 zero per head, or per ``group_size`` of its
channels: 37 bytes per head of 64 values against 128 in fp16, 42 in groups of 32) and hand
attention the dequantized ``K_hat``, ``V_hat`` of every cached token. Each step dequantizes the
whole cache (O(tokens x head_dim)), which is what keeps only codes resident.

``store=False`` keeps nothing: every ``update`` returns the fake-quantized K, V of the current
forward (a full-sequence forward without generation: perplexity, calibration, learning rotations,
where ``ste=True`` lets gradients through).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from gq_kernels.w4a4 import reference as ref


def _quantize(x: torch.Tensor, bits: int, clip: float, group: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """codes [B, H, T, D (/ 2 at <= 4 bits)], scale float32 [B, H, T, G], zero uint8 [B, H, T, G]."""
    codes, scale, zero = ref.quantize_act(x, bits, group, clip)          # [B, H, T, G, D/G], [.., G, 1]
    codes = codes.flatten(-2)
    if bits <= 4:
        codes = ref.pack_nibbles(codes)
    return codes, scale.squeeze(-1), zero.squeeze(-1).to(torch.uint8)


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    if bits <= 4:
        codes = ref.unpack_nibbles(codes, d)
    g = scale.shape[-1]
    x = (codes.float().unflatten(-1, (g, d // g)) - zero.float().unsqueeze(-1)) * scale.unsqueeze(-1)
    return x.flatten(-2)


class QuantizedKVLayer(DynamicLayer):
    """One decoder layer's cache: codes of K R_d and V, [B, H_kv, T, head_dim / (2 at <= 4 bits)]."""

    def __init__(self, bits: int, clip: float = 1.0, store: bool = True, ste: bool = False, group_size: int = 0):
        super().__init__()
        if bits not in ref.KV_BITS:
            raise ValueError(f"KV cache bits must be one of {list(ref.KV_BITS)}, got {bits}")
        self.bits, self.clip, self.store, self.ste, self.group_size = bits, clip, store, ste, group_size
        self.k_codes = self.v_codes = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.head_dim = key_states.shape[-1]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.bits >= 16:
            return super().update(key_states, value_states) if self.store else (key_states, value_states)
        if not self.store:
            return ref.fake_quant_kv(key_states, value_states, self.bits, self.clip, self.ste, self.group_size)
        kq = _quantize(ref.kv_rotate_keys(key_states), self.bits, self.clip, self.group_size)
        vq = _quantize(value_states, self.bits, self.clip, self.group_size)
        if self.k_codes is None:
            self.k_codes, self.v_codes = kq, vq
        else:
            self.k_codes = tuple(torch.cat([a, b], dim=-2) for a, b in zip(self.k_codes, kq))
            self.v_codes = tuple(torch.cat([a, b], dim=-2) for a, b in zip(self.v_codes, vq))
        d = self.head_dim
        keys = ref.kv_rotate_keys(_dequantize(*self.k_codes, self.bits, d), transpose=True).to(self.dtype)
        values = _dequantize(*self.v_codes, self.bits, d).to(self.dtype)
        return keys, values

    def get_seq_length(self) -> int:
        if self.bits >= 16:
            return super().get_seq_length()
        return 0 if self.k_codes is None else self.k_codes[0].shape[-2]

    def crop(self, tokens_to_remove: int) -> None:
        if self.bits >= 16:
            return super().crop(tokens_to_remove)
        raise NotImplementedError("a quantized KV cache cannot be cropped")

    def nbytes(self) -> int:
        """Bytes held by this layer's cache."""
        if self.bits >= 16:
            return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
        if self.k_codes is None:
            return 0
        return sum(t.numel() * t.element_size() for t in (*self.k_codes, *self.v_codes))


class QuantizedKVCache(Cache):
    """A cache of ``num_layers`` :class:`QuantizedKVLayer` (see the module docstring)."""

    def __init__(self, num_layers: int, bits: int, clip: float = 1.0, store: bool = True, ste: bool = False,
                 group_size: int = 0):
        super().__init__(layers=[QuantizedKVLayer(bits, clip, store, ste, group_size) for _ in range(num_layers)])
        self.bits = bits
        self.gq_format = "w4a4"  # which format's loader installed it (see gq_serve.quant_linear)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)
