"""``SamplingParams``: how one request picks its tokens, as one object from the API request models
through ``Engine.submit`` to the decoders (dynamic and static alike), plus the sampling step."""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

MAX_TOP_LOGPROBS = 20  # alternatives per position a request may ask for (vLLM's default cap)


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding options; invalid values raise ValueError naming the field.

    temperature 0 is greedy (argmax, as ``generate(do_sample=False)``); ``top_p`` < 1 samples from
    the smallest set of tokens whose probability reaches it; ``seed`` makes a sampled request
    reproducible whatever else runs; ``stop`` strings end the text before they appear;
    ``ignore_eos`` generates exactly ``max_tokens`` tokens (benchmarks).

    ``logprobs``: None, or k >= 0: every sampled token comes with its log-probability and the k
    most likely alternatives (a :class:`SampledToken`); ``prompt_logprobs``: None, or k >= 0: the
    prefill keeps every position's logits and the first sampled token also carries the
    log-probability of each prompt token given the ones before it (echo). Log-probabilities are
    those of the model's distribution (fp32 log-softmax of the logits, before temperature and
    top_p), as vLLM reports them.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_TOP_LOGPROBS}] (got {k})")
        object.__setattr__(self, "stop", tuple(self.stop))

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A per-request generator on ``device`` (None for greedy): seeded when ``seed`` is set."""
        if self.temperature <= 0:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return g


GREEDY = SamplingParams()


class TokenLogprob(NamedTuple):
    """One position's log-probability: ``token`` (an id), its ``logprob`` and the ``top`` k
    alternatives as (id, logprob) pairs, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class SampledToken(int):
    """A sampled token id (an ``int``: compares, hashes and prints as the id) that also carries
    ``logprob`` (a :class:`TokenLogprob`) and, on the first token of a request that asked for
    prompt logprobs, ``prompt`` (one TokenLogprob per prompt token after the first)."""

    logprob: TokenLogprob | None
    prompt: list[TokenLogprob] | None

    def __new__(cls, token: int, logprob: TokenLogprob | None = None,
                prompt: list[TokenLogprob] | None = None) -> SampledToken:
        obj = super().__new__(cls, token)
        obj.logprob, obj.prompt = logprob, prompt
        return obj


def _top(logprobs: torch.Tensor, k: int) -> list[tuple[tuple[int, float], ...]]:
    """The k most likely (id, logprob) pairs of each row of logprobs [N, vocab]."""
    k = min(k, logprobs.shape[-1])
    if k == 0:
        return [()] * logprobs.shape[0]
    values, ids = torch.topk(logprobs, k, dim=-1)
    return [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int) -> list[TokenLogprob]:
    """Log-probability of ``tokens[i]`` under row i of ``logits`` [N, vocab], with the top k."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(list(tokens), dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(-1, ids.unsqueeze(-1)).squeeze(-1).tolist()
    return [TokenLogprob(int(t), lp, top) for t, lp, top in zip(tokens, chosen, _top(logprobs, k))]


def prompt_token_logprobs(logits: torch.Tensor, prompt_ids: Sequence[int], k: int) -> list[TokenLogprob]:
    """Log-probabilities of prompt tokens 1..T-1 from the prefill's logits [T, vocab] (position t
    predicts token t+1)."""
    return token_logprobs(logits[:-1], list(prompt_ids)[1:], k)


def sample_step(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                prompt_logits: torch.Tensor | None = None, prompt_ids: Sequence[int] = ()) -> int:
    """The decoders' sampling step: ``sample_next``, plus the log-probabilities the request asked
    for (then a :class:`SampledToken`). ``prompt_logits`` [T, vocab]: the prefill's logits of every
    prompt position, given on the first step when ``params.prompt_logprobs`` is set."""
    token = sample_next(logits, params, generator)
    if params.logprobs is None and params.prompt_logprobs is None:
        return token
    chosen = None
    if params.logprobs is not None:
        chosen = token_logprobs(logits.unsqueeze(0), [token], params.logprobs)[0]
    prompt = None
    if prompt_logits is not None and params.prompt_logprobs is not None:
        prompt = prompt_token_logprobs(prompt_logits, prompt_ids, params.prompt_logprobs)
    return SampledToken(token, chosen, prompt)


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from a [vocab] logits row."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    # Sampling in fp64 (fp16/bf16 softmax over a large vocab loses the tail mass), shifted so the
    # largest logit is 0: any temperature > 0, down to 5e-324, then sends the others to -inf
    # (probability 0) instead of overflowing to inf or dividing 0 by a temperature rounded to 0
    # (NaN probabilities).
    logits = logits.double()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
        drop = (cumulative - sorted_probs) >= params.top_p
        # The most likely token always stays: a top_p below fp32's smallest value (5e-324) rounds
        # to 0 in the comparison and would otherwise drop every token.
        drop[0] = False
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_idx[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())
