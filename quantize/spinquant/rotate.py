"""Fuse RMSNorm gains and the SpinQuant rotations R1, R2 into a Llama-like HF causal LM.

Convention: activations are row vectors, a linear computes ``y = x W^T`` with ``W [out, in]``, and
every rotation ``R`` is orthogonal (``R R^T = I``). The rotated model computes the same function:

* R1 ``[hidden, hidden]`` rotates the residual stream: ``h -> h R1``. RMS normalisation commutes
  with an orthogonal R (it only divides by the norm), a per-channel gain does not: hence
  :func:`fuse_norms` first.
* R2 ``[head_dim, head_dim]`` (one per layer) rotates every head's value vector ``v_h -> v_h R2``;
  attention is linear in V, so undoing it in o_proj's input columns leaves the output unchanged.

R3 (head_dim Hadamard on K after RoPE) and R4 (Hadamard on down_proj's input) are not fused here:
the ``w4a4`` format applies them online (:mod:`gq_kernels.w4a4.reference`).
"""
from __future__ import annotations

import torch
from torch import nn

from gq_kernels.format import head_dim
from gq_kernels.hadamard import hadamard_factor, hadamard_matrix, has_hadamard

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
# Norms whose effect survives the rotations: the two per-layer norms are fused, and q/k norms (Qwen3)
# act on unrotated per-head q/k outputs.
_ALLOWED_NORMS = {"input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"}


class RotationError(ValueError):
    """A model, size or rotation file the rotations cannot handle; the message says what to do."""


# ----------------------------------------------------------------------------------- structure
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """``model.model.layers`` after checking the model is Llama-like; raises :class:`RotationError`.

    Llama-like: ``model.model.{embed_tokens, layers, norm}``, ``model.lm_head``, and in every layer
    ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` (nn.Linear), ``input_layernorm`` and
    ``post_attention_layernorm``, and no other norm that sits on the residual stream (Gemma's
    post-attention norms would not commute with R1)."""
    arch = type(model).__name__
    hint = ("SpinQuant rotations support Llama-like decoders: model.model.layers[i].self_attn.{q,k,v,o}_proj, "
            "mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm")
    base = getattr(model, "model", None)
    for name in ("embed_tokens", "layers", "norm"):
        if base is None or not hasattr(base, name):
            raise RotationError(f"{arch} is not Llama-like: no model.model.{name}. {hint}")
    if not isinstance(getattr(model, "lm_head", None), nn.Linear):
        raise RotationError(f"{arch} is not Llama-like: no lm_head linear. {hint}")
    for i, layer in enumerate(base.layers):
        for group, names in (("self_attn", ATTN_LINEARS), ("mlp", MLP_LINEARS)):
            for n in names:
                lin = getattr(getattr(layer, group, None), n, None)
                if not isinstance(lin, nn.Linear):
                    raise RotationError(f"{arch} is not Llama-like: layer {i} has no {group}.{n} linear. {hint}")
        for n in ("input_layernorm", "post_attention_layernorm"):
            if not hasattr(layer, n):
                raise RotationError(f"{arch} is not Llama-like: layer {i} has no {n}. {hint}")
        for name, mod in layer.named_modules():
            if "norm" in type(mod).__name__.lower() and name not in _ALLOWED_NORMS:
                raise RotationError(f"{arch} is not Llama-like: layer {i} has the extra norm {name!r} "
                                    f"({type(mod).__name__}), which an R1 rotation would not commute with. {hint}")
    return base.layers


def attention_shape(model: nn.Module) -> tuple[int, int, int]:
    """(num_attention_heads, num_key_value_heads, head_dim) of a Llama-like model's config."""
    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    return heads, kv, head_dim(cfg)


# ----------------------------------------------------------------------------------- norms
def _check_plain_rmsnorm(norm: nn.Module, name: str, dim: int) -> None:
    # With the gain at 1 the norm must be x / rms(x): Gemma's (1 + w) gain or a LayerNorm's mean
    # subtraction would silently break the identity, so test it numerically.
    x = torch.randn(3, dim, generator=torch.Generator().manual_seed(0), dtype=norm.weight.dtype)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    want = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps).to(x.dtype)
    with torch.no_grad():
        got = norm(x)
    if not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-3):
        raise RotationError(f"{name} ({type(norm).__name__}) is not a plain RMSNorm with a multiplicative "
                            "gain; SpinQuant rotations support Llama-like norms only")


def untie_lm_head(model: nn.Module) -> None:
    """Give lm_head its own weight when it shares the embeddings', and record it in the config:
    R1 enters both on the input side, and a shared tensor would be rotated twice."""
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    if head is emb or head.data_ptr() == emb.data_ptr():
        model.lm_head.weight = nn.Parameter(head.detach().clone(), requires_grad=head.requires_grad)
    model.config.tie_word_embeddings = False
    text_cfg = getattr(model.config, "get_text_config", lambda: None)()
    if text_cfg is not None and text_cfg is not model.config:
        text_cfg.tie_word_embeddings = False


@torch.no_grad()
def fuse_norms(model: nn.Module) -> nn.Module:
    """Fold every RMSNorm gain into the input columns of the linears it feeds, then set it to 1.

    ``input_layernorm -> q, k, v``; ``post_attention_layernorm -> gate, up``; ``model.norm -> lm_head``:
    ``W [out, in] <- W diag(gamma [in])`` in float64, cast back to W's dtype. Unties lm_head first.
    In place; returns the model."""
    layers = decoder_layers(model)
    untie_lm_head(model)
    hidden = model.config.hidden_size
    pairs = [(layer.input_layernorm, [getattr(layer.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")],
              f"model.layers.{i}.input_layernorm") for i, layer in enumerate(layers)]
    pairs += [(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj],
               f"model.layers.{i}.post_attention_layernorm") for i, layer in enumerate(layers)]
    pairs.append((model.model.norm, [model.lm_head], "model.norm"))
    for norm, linears, name in pairs:
        gamma = norm.weight.detach().double()
        for lin in linears:
            lin.weight.copy_((lin.weight.double() * gamma[None, :]).to(lin.weight.dtype))
        norm.weight.fill_(1.0)
        _check_plain_rmsnorm(norm, name, hidden)
    return model


@torch.no_grad()
def center_embeddings(model: nn.Module) -> nn.Module:
    """Subtract each embedding row's mean over the hidden dimension (``E <- E - mean(E, dim=1)``), as
    QuaRot's and SpinQuant's code do. Exact only ahead of a LayerNorm, which removes the mean anyway;
    under RMSNorm it changes the model (the mean adds to the norm the layers divide by), so it is an
    option of ``gq rotate``, not a step of it. Call after :func:`fuse_norms` (which unties lm_head, so
    the head keeps the uncentred rows). In place, in float64; returns the model."""
    emb = model.model.embed_tokens.weight
    if model.lm_head.weight.data_ptr() == emb.data_ptr():
        raise RotationError("center_embeddings would also change the tied lm_head: call fuse_norms first")
    e = emb.double()
    emb.copy_((e - e.mean(dim=1, keepdim=True)).to(emb.dtype))
    return model


# ----------------------------------------------------------------------------------- Hadamard
def random_hadamard(n: int, generator: torch.Generator | None = None, what: str = "") -> torch.Tensor:
    """``diag(s) @ H_n``: float64 ``[n, n]``, orthogonal, s i.i.d. random signs from ``generator``.

    H_n is the normalised Hadamard of :mod:`gq_kernels.hadamard` (n = 2^a or K * 2^a, built in
    O(n^2 log n) by transforming the identity). ``what`` names the rotation in the error raised for
    a size with no Hadamard construction."""
    if not has_hadamard(n):
        try:
            hadamard_factor(n)
        except ValueError as e:
            reason = str(e)
        raise RotationError(f"{what or 'rotation'}: no Hadamard matrix of size {n} ({reason}); "
                            "SpinQuant needs Hadamard-sized hidden_size, head_dim and intermediate_size, "
                            "so use --rotation none, or a model with supported sizes")
    signs = torch.randint(0, 2, (n,), generator=generator).double().mul_(2).sub_(1)
    return signs[:, None] * hadamard_matrix(n, torch.float64)


# ----------------------------------------------------------------------------------- pieces
# Differentiable building blocks, shared by apply_rotations (float64, in place) and the training
# forward (float32, autograd through R).
def rotate_input(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``W R``: w ``[out, in]``, r ``[in, in]``; the layer then reads inputs rotated by r."""
    return w @ r


def rotate_output(w: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``R^T W``: w ``[out, in]``, r ``[out, out]``; the layer's outputs come out as ``y R``."""
    return r.t() @ w


def rotate_head_outputs(w: torch.Tensor, r2: torch.Tensor, heads: int) -> torch.Tensor:
    """v_proj ``[heads * d, in]``: each head's output block becomes ``v_h R2`` (``W_h <- R2^T W_h``)."""
    out, fan_in = w.shape
    return (r2.t() @ w.reshape(heads, out // heads, fan_in)).reshape(out, fan_in)


def rotate_head_inputs(w: torch.Tensor, r2: torch.Tensor, heads: int) -> torch.Tensor:
    """o_proj ``[out, heads * d]``: each head's input-column block right-multiplied by R2, so it
    reads ``v_h R2`` as it read ``v_h`` (query heads of one KV group share R2 under GQA)."""
    out, fan_in = w.shape
    return (w.reshape(out, heads, fan_in // heads) @ r2).reshape(out, fan_in)


def check_rotations(model: nn.Module, r1: torch.Tensor, r2: list[torch.Tensor] | None) -> None:
    """Raise :class:`RotationError` unless R1 is ``[hidden, hidden]`` and R2 one ``[head_dim, head_dim]``
    per layer."""
    hidden = model.config.hidden_size
    n_layers = len(model.model.layers)
    _, _, head_dim = attention_shape(model)
    if tuple(r1.shape) != (hidden, hidden):
        raise RotationError(f"R1 has shape {list(r1.shape)}, expected [{hidden}, {hidden}] (hidden_size)")
    if r2 is not None:
        if len(r2) != n_layers:
            raise RotationError(f"got {len(r2)} R2 matrices for a model with {n_layers} layers")
        for i, r in enumerate(r2):
            if tuple(r.shape) != (head_dim, head_dim):
                raise RotationError(f"R2.{i} has shape {list(r.shape)}, expected [{head_dim}, {head_dim}] (head_dim)")


@torch.no_grad()
def apply_rotations(model: nn.Module, r1: torch.Tensor, r2: list[torch.Tensor] | None = None) -> nn.Module:
    """Fuse R1 ``[hidden, hidden]`` and R2 (one ``[head_dim, head_dim]`` per layer, or None) into the
    weights of a norm-fused, untied model (:func:`fuse_norms`), in float64 then cast back. In place.

    Embeddings ``E <- E R1``; inputs ``W <- W R1`` (q, k, v, gate, up, lm_head); outputs
    ``W <- R1^T W``, ``b <- b R1`` (o_proj, down_proj); per layer v_proj's head blocks ``v_h -> v_h R2``
    and o_proj's head input blocks ``W_h <- W_h R2``."""
    layers = decoder_layers(model)
    if model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr():
        raise RotationError("lm_head shares the embedding weight: call fuse_norms (which unties it) first")
    check_rotations(model, r1, r2)
    heads, kv_heads, _ = attention_shape(model)
    r1 = r1.double()

    def put(param: torch.Tensor, value: torch.Tensor) -> None:
        param.copy_(value.to(param.dtype))

    emb = model.model.embed_tokens.weight
    put(emb, emb.double() @ r1)
    put(model.lm_head.weight, rotate_input(model.lm_head.weight.double(), r1))
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            put(lin.weight, rotate_input(lin.weight.double(), r1))
        for lin in (attn.o_proj, mlp.down_proj):
            put(lin.weight, rotate_output(lin.weight.double(), r1))
            if lin.bias is not None:
                put(lin.bias, lin.bias.double() @ r1)
        if r2 is not None:
            r = r2[i].double()
            put(attn.v_proj.weight, rotate_head_outputs(attn.v_proj.weight.double(), r, kv_heads))
            if attn.v_proj.bias is not None:
                b = attn.v_proj.bias.double()
                put(attn.v_proj.bias, (b.reshape(kv_heads, -1) @ r).reshape(-1))
            put(attn.o_proj.weight, rotate_head_inputs(attn.o_proj.weight.double(), r, heads))
    return model


__all__ = [
    "RotationError", "decoder_layers", "attention_shape", "untie_lm_head", "fuse_norms", "random_hadamard",
    "rotate_input", "rotate_output", "rotate_head_outputs", "rotate_head_inputs", "check_rotations",
    "apply_rotations",
]
