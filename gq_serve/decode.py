"""Batch-1 decode loop over a Hugging Face causal LM with a DynamicCache.

Shared by the serving engine and the offline benchmark so both measure and serve the same loop:
one prefill forward over the prompt, then one forward per new token. The static-cache / CUDA-graph
variant of the same loop is `gq_serve.static_decode.StaticDecoder`; `resolve_decode_mode` picks
between them (the `--decode` option).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

DECODE_MODES = ("auto", "static", "dynamic")


def resolve_decode_mode(mode: str, device: torch.device | str) -> str:
    """`--decode` -> "static" or "dynamic".

    auto: static (static KV cache + CUDA graph) on a CUDA device, where kernel launches dominate a
    batch-1 step; dynamic on the CPU, where there is no graph to capture and a dynamic cache attends
    only over the tokens so far.
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}: use one of {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return "static" if torch.device(device).type == "cuda" else "dynamic"
    return mode


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_p: float,
    generator: torch.Generator | None,
) -> int:
    """Pick the next token from a [vocab] logits row.

    temperature == 0 is greedy (argmax), matching `generate(do_sample=False)` exactly.
    """
    if temperature <= 0.0:
        return int(torch.argmax(logits).item())
    # Sampling in fp32: fp16/bf16 softmax over a large vocab loses the tail mass.
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
        drop = (cumulative - sorted_probs) >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_idx[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())


def iter_tokens(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_ids: Sequence[int] = (),
    should_stop: Callable[[], bool] | None = None,
    device: torch.device | str | None = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` new token ids, one forward per token.

    Stops early after yielding an id in `eos_ids`, or before a step when `should_stop()` is true
    (the cancellation flag: checked every step, so a cancelled request frees the worker within
    one forward). Callers must run this under `torch.inference_mode()`.
    """
    if not prompt_ids:
        raise ValueError("prompt_ids is empty: the decode loop needs at least one prompt token")
    device = device if device is not None else next(model.parameters()).device
    eos = set(int(i) for i in eos_ids)
    cache = DynamicCache(config=getattr(model, "config", None))
    input_ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        if should_stop is not None and should_stop():
            return
        # logits_to_keep=1: the prefill only needs the last position's logits.
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        token = sample_next(out.logits[0, -1], temperature, top_p, generator)
        yield token
        if token in eos:
            return
        input_ids = torch.tensor([[token]], dtype=torch.long, device=device)
