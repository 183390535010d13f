"""Hessian pass: plain H = X^T X and GuidedQuant H_k = X^T Diag(s_k) X, layer by layer (GPTQ-style).

Normalization (the one used everywhere): with N = n * seq_len calibration tokens,
    H_plain    = (1/N) sum_t x_t x_t^T                      float32 [1, in, in]
    H_guided_k = (1/N) sum_t s_k[t] x_t x_t^T               float32 [g, in, in]
accumulated in fp32. With s == 1 (g = 1) the two coincide. H is linear in s and the groups are equal
sized, so averaging consecutive blocks of guided H_k gives exactly the H of a coarser grouping
(``coarsen_groups``): one g=4 cache serves g=1, 2 and 4.

Memory: only one layer's inputs for all windows (n x seq_len x hidden) and its outputs are alive at a
time; each layer's Hessians are handed to a callback (the cache saves them) before the next layer.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn


class _StopForward(Exception):
    """Raised by the layer-0 pre-hook once the decoder layer's call arguments are captured."""


# ---------------------------------------------------------------- pure math
def plain_update(x: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in] (any float) -> float32 [in, in] = x^T x (unnormalized), added in place to ``acc``
    when given (no second [in, in] buffer: the accumulators are the pass's largest tensors)."""
    x = x.float()
    return x.T @ x if acc is None else acc.addmm_(x.T, x)


def guided_update(x: torch.Tensor, s: torch.Tensor, acc: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, in], s: [T, g] -> float32 [g, in, in], entry k = x^T Diag(s[:, k]) x (unnormalized),
    added in place to ``acc`` when given."""
    x = x.float()
    s = s.to(device=x.device, dtype=torch.float32)
    # [g, in, T] @ [T, in]: one batched matmul instead of g separate ones.
    xs = x.T.unsqueeze(0) * s.T.unsqueeze(1)
    return xs @ x if acc is None else acc.baddbmm_(xs, x.unsqueeze(0).expand(xs.shape[0], -1, -1))


def shrink_to_plain(guided: torch.Tensor, plain: torch.Tensor, amount: float) -> torch.Tensor:
    """Guided Hessians pulled toward the plain one: ``(1 - a) H_k + a (tr H_k / tr H) H`` per group k.

    The plain term is the guided Hessian of a saliency flattened to its token mean (exactly so when
    saliency and input norm are uncorrelated; the trace keeps each group's scale either way), so
    ``a`` shrinks every token's weight toward the mean: more tokens count when a few carry the
    saliency. Args: guided float [g, in, in]; plain float [1, in, in] or [in, in]; a in [0, 1].
    Returns float [g, in, in] (``guided`` itself when a = 0).
    """
    if not 0.0 <= amount <= 1.0:
        raise ValueError(f"shrink amount must lie in [0, 1], got {amount}")
    if amount == 0.0:
        return guided
    plain = plain.reshape(plain.shape[-2:]).to(guided.dtype)
    ratio = torch.diagonal(guided, dim1=-2, dim2=-1).sum(-1) / torch.diagonal(plain).sum()  # [g]
    return (1.0 - amount) * guided + amount * ratio[:, None, None] * plain


def coarsen_groups(h: torch.Tensor, groups: int) -> torch.Tensor:
    """Average consecutive blocks of guided Hessians: float [G, in, in] -> [groups, in, in].

    Exact for equal-sized output groups because H_k is linear in s_k and the coarse s is the mean of
    the fine ones. ``groups`` must divide G.
    """
    big = h.shape[0]
    if groups < 1 or big % groups:
        raise ValueError(f"cannot derive {groups} groups from {big}: it must divide {big}")
    if groups == big:
        return h
    return h.reshape(groups, big // groups, *h.shape[1:]).mean(dim=1)


# ---------------------------------------------------------------- layer inputs
@dataclass
class LayerCall:
    """How the model called one decoder layer for one window: the keyword arguments besides the
    hidden states (attention mask, rotary embeddings, ...), and the hidden states' dtype."""

    kwargs: dict
    dtype: torch.dtype


def decoder_layers(model: nn.Module) -> tuple[nn.ModuleList, str]:
    """(the decoder layers, their module name): ``model.model.layers`` in every transformers causal LM
    this project supports (Llama, Gemma 3, Qwen2, ...)."""
    layers = model.model.layers
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    return layers, prefix


@contextmanager
def forwards_replaced(layers: nn.ModuleList, forward_for: Callable[[int], Callable]) -> Iterator[None]:
    """Each decoder layer's forward replaced by ``forward_for(idx)`` inside the block, restored after.

    The replacement is an instance attribute (``nn.Module.__call__`` picks it up); one that was
    already there (e.g. a hook library's wrapper) is put back, not deleted.
    """
    saved = [layer.__dict__.get("forward") for layer in layers]
    for idx, layer in enumerate(layers):
        layer.forward = forward_for(idx)
    try:
        yield
    finally:
        for layer, fwd in zip(layers, saved):
            if fwd is None:
                del layer.forward
            else:
                layer.forward = fwd


def capture_layer_calls(model: nn.Module, windows: torch.Tensor, device) -> tuple[torch.Tensor, list[list[LayerCall]]]:
    """Run the model's embedding and mask set-up for every window and record how it calls each layer.

    Returns (inputs float32 [n, seq_len, hidden] on the CPU: layer 0's hidden states, and
    calls[layer][window]). Nothing is assumed about the arguments: whatever the model's forward
    passes to each layer (in transformers 5.17 the attention mask and rotary embeddings, which
    differ between layers in models that mix sliding-window and global attention, such as
    Gemma 3) is kept verbatim. The layers themselves do not run: each is replaced for the
    capture by a stub that records its call and hands the hidden states on unchanged, and the
    final norm raises to skip the LM head. Tensors shared between layers (one mask per attention
    type) are stored once.
    """
    layers, _ = decoder_layers(model)
    calls: list[list[LayerCall]] = [[] for _ in layers]
    first: list[torch.Tensor] = []

    def stub_for(idx: int):
        def stub(*args, **kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if len(args) > 1:
                raise RuntimeError("decoder layer called with extra positional arguments; not supported")
            if idx == 0:
                first.append(hidden.detach().float().cpu())
            calls[idx].append(LayerCall(kwargs, hidden.dtype))
            if idx == len(layers) - 1:
                raise _StopForward
            return hidden
        return stub

    with forwards_replaced(layers, stub_for), torch.no_grad():
        for w in range(windows.shape[0]):
            try:
                model(input_ids=windows[w : w + 1].to(device), use_cache=False)
            except _StopForward:
                pass
    if any(len(c) != windows.shape[0] for c in calls):
        raise RuntimeError("a decoder layer was not called once per window")
    return torch.cat(first, dim=0), calls


def layer_linears(layer: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    """Linears of one decoder layer, named ``{prefix}.{sub}`` (prefix like ``model.layers.3``)."""
    return {f"{prefix}.{n}": m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def linear_stages(layer: torch.nn.Module, prefix: str, inputs: torch.Tensor, call, device) -> list[list[str]]:
    """The layer's linears in groups that can be quantized together, in the order they run.

    Linears fed the very same input tensor form one group (q/k/v, gate/up); the groups come in
    execution order (q/k/v, o, gate/up, down in a Llama or Gemma layer): GPTQ's "true sequential"
    order, found by running one window rather than from module names.
    """
    # The input tensors themselves are kept, not their id(): a freed input's id can be reused by
    # the next one, which would merge two groups at random.
    order: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_hook(lambda _m, inp, _o, n=n: order.append((n, inp[0])))
               for n, m in layer_linears(layer, prefix).items()]
    try:
        with torch.no_grad():
            layer(inputs[:1].to(device=device, dtype=call.dtype), **call.kwargs)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    last = None
    for name, key in order:
        if key is not last:
            stages.append([])
            last = key
        if name not in stages[-1]:
            stages[-1].append(name)
    names = [n for st in stages for n in st]
    if sorted(names) != sorted(layer_linears(layer, prefix)) or len(set(names)) != len(names):
        raise RuntimeError(f"the linears of {prefix} do not run exactly once per forward; "
                           "sequential calibration cannot order them")
    return stages


# ---------------------------------------------------------------- one layer
@dataclass
class LayerHessians:
    """Normalized Hessians of one decoder layer.

    plain: owner name -> float32 [in, in] (one per distinct input; q/k/v share, gate/up share)
    plain_owner: linear name -> owner name whose plain Hessian it uses
    guided: linear name -> float32 [g, in, in] (empty when no saliency was given)
    """

    plain: dict[str, torch.Tensor]
    plain_owner: dict[str, str]
    guided: dict[str, torch.Tensor]


def run_layer(
    layer: nn.Module,
    prefix: str,
    inputs: torch.Tensor,
    calls: list[LayerCall],
    saliency: dict[str, torch.Tensor] | None,
    device,
    progress_bar=None,
    only: set[str] | None = None,
    outputs: bool = True,
) -> tuple[LayerHessians, torch.Tensor | None]:
    """Feed every window through one decoder layer, accumulating its linears' Hessians.

    inputs:   float [n, seq_len, hidden] (CPU or device): this layer's input hidden states.
    calls:    this layer's call arguments per window (see :func:`capture_layer_calls`).
    saliency: linear name -> float32 [n * seq_len, g] (window-major), or None for plain only.
    only:     accumulate Hessians of these linears only (default: every linear of the layer).
    outputs:  return the layer's outputs; when False, each window's forward stops as soon as
              every linear in ``only`` has seen its input (sequential calibration runs the layer
              once per group of linears and needs the outputs only at the end).
    Returns (hessians normalized by N = n * seq_len, outputs float [n, seq_len, hidden] on CPU or None).
    """
    linears = layer_linears(layer, prefix)
    if only is not None:
        linears = {k: v for k, v in linears.items() if k in only}
    n, seq_len = inputs.shape[0], inputs.shape[1]
    plain: dict[str, torch.Tensor] = {}
    guided: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    window = {"idx": 0, "seen": {}, "fired": set()}  # seen: id(input tensor) -> owner name, reset per window

    def make_hook(name: str):
        def hook(_mod, inp, _out):
            x = inp[0]
            seen = window["seen"]
            # Linears fed the very same tensor object share one plain Hessian (dedupe q/k/v, gate/up).
            own = seen.setdefault(id(x), (name, x))[0]
            if owner.setdefault(name, own) != own:
                raise RuntimeError(f"input sharing of {name} changed between windows")
            x2 = x.reshape(-1, x.shape[-1])
            if own == name:
                plain[name] = plain_update(x2, plain.get(name))
            if saliency is not None:
                w = window["idx"]
                s = saliency[name][w * seq_len : (w + 1) * seq_len].to(x2.device)
                guided[name] = guided_update(x2, s, guided.get(name))
            window["fired"].add(name)
            if not outputs and len(window["fired"]) == len(linears):
                raise _StopForward
        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    out_all = torch.empty(inputs.shape, dtype=torch.float32) if outputs else None
    try:
        with torch.no_grad():
            for w in range(n):
                window["idx"], window["seen"], window["fired"] = w, {}, set()
                hidden = inputs[w : w + 1].to(device=device, dtype=calls[w].dtype)
                try:
                    out = layer(hidden, **calls[w].kwargs)
                except _StopForward:
                    out = None
                if outputs:
                    out = out[0] if isinstance(out, tuple) else out
                    out_all[w] = out[0].float().cpu()
                if progress_bar is not None:
                    progress_bar.update(1)
    finally:
        window["seen"] = {}
        for h in handles:
            h.remove()
    tokens = float(n * seq_len)
    # In place: a copy would double the layer's largest tensors for a moment.
    plain = {k: v.div_(tokens).cpu() for k, v in plain.items()}
    guided = {k: v.div_(tokens).cpu() for k, v in guided.items()}
    return LayerHessians(plain, owner, guided), out_all


def layer_outputs(layer: nn.Module, inputs: torch.Tensor, calls: list[LayerCall], device) -> torch.Tensor:
    """The layer's outputs for every window: float32 [n, seq_len, hidden] on the CPU."""
    out_all = torch.empty(inputs.shape, dtype=torch.float32)
    with torch.no_grad():
        for w in range(inputs.shape[0]):
            out = layer(inputs[w : w + 1].to(device=device, dtype=calls[w].dtype), **calls[w].kwargs)
            out = out[0] if isinstance(out, tuple) else out
            out_all[w] = out[0].float().cpu()
    return out_all


def hessian_pass(
    model: nn.Module,
    windows: torch.Tensor,
    saliency_for_layer: Callable[[int, list[str]], dict[str, torch.Tensor]] | None,
    device,
    on_layer_done: Callable[[int, LayerHessians, torch.Tensor], None],
    start_layer: int = 0,
    start_inputs: torch.Tensor | None = None,
    progress_bar=None,
    streamed=None,
    stagewise: bool = False,
) -> None:
    """Layer-by-layer Hessian pass over all windows.

    saliency_for_layer(layer_idx, linear_names) -> name -> float32 [n*seq_len, g] (None: plain only).
    on_layer_done(layer_idx, hessians, outputs) is called after each layer, with that layer's outputs
    (= next layer's inputs, float32 [n, seq_len, hidden], CPU) so a caller can checkpoint them.
    Resume with start_layer > 0 and start_inputs = the saved inputs of that layer.
    Only the current layer's inputs/outputs are held: the loop rebinds ``inputs`` each layer.
    streamed: a ``streamed.StreamedModel`` whose ``model`` is ``model``: its weights are read per
    layer (one decoder layer resident at a time) instead of all being in memory.
    stagewise: accumulate the Hessians of one group of linears (:func:`linear_stages`: q/k/v, o,
    gate/up, down) at a time, running the layer once per group (each run stops once the group has
    its inputs) and once more for the outputs: device memory holds the largest group's Hessians
    instead of the whole layer's (for a 70B model at g=4, 16 GiB instead of 22 GiB); same values.
    """
    layers, prefix = decoder_layers(model)
    with streamed.embeddings() if streamed is not None else nullcontext():
        first, calls = capture_layer_calls(model, windows, device)
    if start_layer == 0:
        inputs = first
    else:
        if start_inputs is None:
            raise ValueError("start_inputs are required to resume at a layer > 0")
        inputs = start_inputs
    del first
    for idx in range(start_layer, len(layers)):
        names = list(layer_linears(layers[idx], f"{prefix}.{idx}"))
        sal = saliency_for_layer(idx, names) if saliency_for_layer is not None else None
        with streamed.layer(idx) if streamed is not None else nullcontext():
            if stagewise:
                hess, outputs = _run_layer_stagewise(layers[idx], f"{prefix}.{idx}", inputs, calls[idx], sal,
                                                     device, progress_bar)
            else:
                hess, outputs = run_layer(layers[idx], f"{prefix}.{idx}", inputs, calls[idx], sal, device,
                                          progress_bar)
        del sal
        on_layer_done(idx, hess, outputs)
        # Drop this layer's Hessians before the next layer accumulates its own: still bound here,
        # they would stay alive through the whole next layer (1.1 GB at g=4 on a 1B model).
        del hess
        inputs = outputs  # the previous layer's inputs are dropped here


def _run_layer_stagewise(layer, prefix, inputs, calls, saliency, device, progress_bar=None):
    """:func:`run_layer`'s result, one group of linears at a time (see ``hessian_pass``)."""
    plain: dict[str, torch.Tensor] = {}
    owner: dict[str, str] = {}
    guided: dict[str, torch.Tensor] = {}
    for stage in linear_stages(layer, prefix, inputs, calls[0], device):
        sal = None if saliency is None else {n: saliency[n] for n in stage}
        part, _ = run_layer(layer, prefix, inputs, calls, sal, device, only=set(stage), outputs=False)
        plain.update(part.plain)
        owner.update(part.plain_owner)
        guided.update(part.guided)
    outputs = layer_outputs(layer, inputs, calls, device)
    if progress_bar is not None:
        progress_bar.update(inputs.shape[0])
    return LayerHessians(plain, owner, guided), outputs
