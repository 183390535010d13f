"""Batch-1 decode loops and the interface they share.

A decoder yields the new token ids of one request, one forward per token::

    decoder.iter_tokens(prompt_ids, params, generator=None, eos_ids=(), should_stop=None)

``DynamicDecoder`` (here) grows a ``DynamicCache`` and runs eagerly; ``StaticDecoder``
(:mod:`gq_serve.static_decode`) uses a static cache whose decode step replays as a CUDA graph on a
GPU. The engine and the offline benchmark both go through :func:`make_decoder`, so they measure
and serve the same loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache

from gq_serve.sampling import SamplingParams, sample_step

DECODE_MODES = ("auto", "static", "dynamic", "lean")


def resolve_decode_mode(mode: str, device: torch.device | str) -> str:
    """`--decode` -> "static", "dynamic" or "lean".

    auto: static (static KV cache + CUDA graph) on a CUDA device, where kernel launches dominate a
    batch-1 step; lean on the CPU (:mod:`gq_serve.lean_decode`: no graph to capture there, so the
    per-op cost is cut instead; :func:`make_decoder` takes the dynamic loop for a model it does
    not serve).
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {mode!r}: use one of {', '.join(DECODE_MODES)}")
    if mode == "auto":
        return "static" if torch.device(device).type == "cuda" else "lean"
    return mode


class DynamicDecoder:
    """The plain loop: a ``DynamicCache``, one eager forward per token. Subclasses change what a
    request's state is (``_start``) and how a step computes its logits (``_step``)."""

    mode = "dynamic"

    def __init__(self, model: torch.nn.Module, device: torch.device | str | None = None) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device

    def warmup(self, prompt_len: int = 1, max_new_tokens: int = 1) -> None:
        """Nothing to prepare (the static decoder captures its graphs here)."""

    def slot_mode(self, prompt_len: int, max_new_tokens: int) -> str:
        return self.mode

    def iter_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        eos_ids: Sequence[int] = (),
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[int]:
        """Yield up to ``params.max_tokens`` new token ids, one forward per token.

        Stops early after yielding an id in ``eos_ids``, or before a step when ``should_stop()`` is
        true (the cancellation flag: checked every step, so a cancelled request frees the worker
        within one forward). The forwards run under ``torch.inference_mode()``, entered per step
        and never held across a ``yield``. When ``params`` asks for log-probabilities the ids are
        :class:`gq_serve.sampling.SampledToken`s (ints carrying them).
        """
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the decode loop needs at least one prompt token")
        eos = set(int(i) for i in eos_ids)
        state = self._start(len(prompt_ids), params.max_tokens)
        ids = torch.tensor(list(prompt_ids), dtype=torch.long, device=self.device)
        for step in range(params.max_tokens):
            if should_stop is not None and should_stop():
                return
            # The prefill keeps only the last position's logits, unless the request asked for the
            # prompt's log-probabilities (echo): then every position's.
            full = step == 0 and params.prompt_logprobs is not None
            with torch.inference_mode():
                logits, state = self._step(ids, state, full)
                token = sample_step(logits[-1], params, generator, prompt_logits=logits if full else None,
                                    prompt_ids=prompt_ids)
            yield token
            if token in eos:
                return
            ids = torch.tensor([int(token)], dtype=torch.long, device=self.device)

    def _start(self, prompt_len: int, max_new_tokens: int):
        """A new request's state: here its ``DynamicCache``."""
        return DynamicCache(config=getattr(self.model, "config", None))

    def _step(self, ids: torch.Tensor, cache, full: bool) -> tuple[torch.Tensor, object]:
        """ids long [T] -> (logits [T, vocab] if ``full`` else [1, vocab], the state to carry on).
        The model may replace the cache (a format with its own KV cache does)."""
        out = self.model(input_ids=ids[None], past_key_values=cache, use_cache=True, logits_to_keep=0 if full else 1)
        return out.logits[0], out.past_key_values


def make_decoder(model: torch.nn.Module, mode: str = "auto", device: torch.device | str | None = None,
                 max_len: int | None = None, compile: bool | None = None):
    """The decoder for ``--decode mode`` ("auto" | "static" | "dynamic" | "lean").

    ``max_len``: the longest request a static decoder serves from its cache (default: the model's
    context); ``compile``: torch.compile the static step before capturing it (default: on a GPU).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if getattr(model, "gq_kv_bits", None) is not None:
        # The checkpoint's format keeps its own quantized KV cache, which grows like a DynamicCache.
        if mode == "static":
            raise ValueError(f"this checkpoint keeps a {model.gq_kv_bits}-bit KV cache, which the static "
                             "decoder cannot hold; use --decode dynamic (or auto)")
        return DynamicDecoder(model, device)
    resolved = resolve_decode_mode(mode, device)
    if resolved == "lean":
        from gq_serve.lean_decode import LeanDecoder, can_implement

        ok, why = can_implement(model)
        if ok:
            return LeanDecoder(model, device)
        if mode == "lean":
            raise ValueError(f"--decode lean cannot run this model: {why}; use --decode dynamic (or auto)")
        resolved = "dynamic"
    if resolved == "dynamic":
        return DynamicDecoder(model, device)
    from gq_serve.static_decode import StaticDecoder

    if max_len is None:
        max_len = int(getattr(model.config, "max_position_embeddings", None) or 2048)
    return StaticDecoder(model, max_len, device=device, compile=compile)
