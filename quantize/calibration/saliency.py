"""Gradient pass: per-token, per-output-group saliency and the diagonal weight Fisher.

For one calibration window (a batch of ONE sequence, so gradients are per sample) we take
L = mean next-token cross-entropy over the window's ``seq_len - 1`` predicted positions and record,
for every quantizable linear with output z = W x:

* saliency   s_k[t] = mean_{j in group k} (GRAD_SCALE * dL/dz_j[t])^2     float32 [seq_len, g]
* Fisher     F     += (dL/dW)^2   (summed over windows, not averaged)       float32 [out, in]

Scaling convention (documented once, used everywhere): L is the per-window *mean* over tokens, as in
the GuidedQuant and SqueezeLLM code, so every gradient carries a 1/(seq_len - 1) factor; GRAD_SCALE
= 1e3 (the paper's) lifts the squared values out of the fp32 denormal range. The last token of a
window predicts nothing, so its saliency is exactly 0 — it contributes nothing to guided Hessians.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

GRAD_SCALE = 1e3


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside ``model.model.layers`` (q,k,v,o,gate,up,down), lm_head excluded.

    Names are the full module names (``model.layers.0.self_attn.q_proj``) so they match state-dict
    prefixes and the checkpoint contract. Order: the module tree's order (layer by layer).
    """
    layers = model.model.layers
    prefix = next(name for name, mod in model.named_modules() if mod is layers)
    return {
        f"{prefix}.{name}": mod for name, mod in layers.named_modules() if isinstance(mod, nn.Linear)
    }


def check_groups(linears: dict[str, nn.Linear], groups: int) -> None:
    """Raise ValueError unless ``groups`` divides every linear's out_features (equal-sized groups)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    bad = {n: m.out_features for n, m in linears.items() if m.out_features % groups}
    if bad:
        name, out = next(iter(bad.items()))
        raise ValueError(
            f"groups={groups} does not divide out_features={out} of {name} "
            f"({len(bad)} linear(s) affected); choose a divisor of every layer's output size"
        )


def group_saliency(grad_z: torch.Tensor, groups: int, scale: float = GRAD_SCALE) -> torch.Tensor:
    """Per-token group means of squared scaled output gradients.

    grad_z: dL/dz, any float dtype, shape [..., out] (leading dims are tokens).
    Returns float32 [tokens, groups]: column k is mean over the k-th block of out/groups consecutive
    output channels of (scale * dL/dz_j)^2.
    """
    out = grad_z.shape[-1]
    if out % groups:
        raise ValueError(f"groups={groups} does not divide out_features={out}")
    g = grad_z.reshape(-1, groups, out // groups).float() * scale
    return g.square().mean(dim=-1)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy. logits float [1, T, V], ids long [1, T] -> scalar (fp32)."""
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())


def saliency_hooks(linears: dict[str, nn.Linear], groups: int, current: dict[str, torch.Tensor]) -> list:
    """Forward hooks on ``linears`` whose backward puts each output's group saliency
    (:func:`group_saliency`, [tokens, groups] float32) into ``current[name]``; returns the handles."""

    def make_fwd_hook(name: str):
        def fwd_hook(_mod, _inp, out):
            # A tensor hook sees the total dL/dz of this output (all downstream uses summed).
            def grad_hook(grad):
                current[name] = group_saliency(grad[0], groups)
            out.register_hook(grad_hook)
        return fwd_hook

    return [m.register_forward_hook(make_fwd_hook(n)) for n, m in linears.items()]


def take_saliency(linears: dict[str, nn.Linear], current: dict[str, torch.Tensor],
                  rows: dict[str, list[torch.Tensor]]) -> None:
    """Move one window's saliency from ``current`` (filled by :func:`saliency_hooks`) to ``rows``
    on the host; refuse a linear that got no gradient (it is not on the loss path)."""
    missing = set(linears) - set(current)
    if missing:
        raise RuntimeError(f"no gradient reached {sorted(missing)[0]}; is it on the loss path?")
    for name in linears:
        rows[name].append(current[name].cpu())
    current.clear()


@contextmanager
def _grad_setup(model: nn.Module, linears: dict[str, nn.Linear], need_fisher: bool) -> Iterator[None]:
    """Only the linear weights (if the Fisher is wanted) require grad; restores the flags after.

    Keeping every other parameter frozen avoids computing (and holding) embedding / norm gradients.
    """
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        if need_fisher:
            for lin in linears.values():
                lin.weight.requires_grad_(True)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def saliency_for_windows(
    model: nn.Module,
    windows: torch.Tensor,
    groups: int,
    need_fisher: bool,
    device: str | torch.device = "cpu",
    progress_bar=None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Run the gradient pass over ``windows`` (LongTensor [b, seq_len]), one window at a time.

    The model must already sit on ``device`` in the compute dtype (see cache.model_on_device).
    Returns (saliency, fisher):
      saliency: name -> float32 [b * seq_len, groups] on CPU, window-major token order;
      fisher:   name -> float32 [out, in] on CPU, sum over the b windows of (dL/dW)^2 (None if not
                need_fisher).
    """
    linears = quantizable_linears(model)
    check_groups(linears, groups)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    fisher = (
        {n: torch.zeros(m.weight.shape, dtype=torch.float32, device=device) for n, m in linears.items()}
        if need_fisher
        else None
    )
    current: dict[str, torch.Tensor] = {}
    handles = saliency_hooks(linears, groups, current)
    embed = model.get_input_embeddings()
    weights = [m.weight for m in linears.values()]
    try:
        with _grad_setup(model, linears, need_fisher), torch.enable_grad():
            for w in range(windows.shape[0]):
                ids = windows[w : w + 1].to(device)
                # Differentiate w.r.t. the embeddings so every linear output is on the graph even
                # when no weight requires grad (saliency only).
                emb = embed(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=emb, use_cache=False).logits
                loss = next_token_loss(logits, ids)
                targets = weights if need_fisher else [emb]
                grads = torch.autograd.grad(loss, targets)
                if fisher is not None:
                    for name, gw in zip(linears, grads):
                        fisher[name].add_(gw.float().square())
                take_saliency(linears, current, rows)
                if progress_bar is not None:
                    progress_bar.update(1)
    finally:
        for h in handles:
            h.remove()
    saliency = {n: torch.cat(r, dim=0) for n, r in rows.items()}
    if fisher is not None:
        fisher = {n: f.cpu() for n, f in fisher.items()}
    return saliency, fisher
