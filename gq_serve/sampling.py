"""``SamplingParams``: how one request picks its tokens, as one object from the API request models
through ``Engine.submit`` to the decoders (dynamic and static alike), plus the sampling step."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding options; invalid values raise ValueError naming the field.

    temperature 0 is greedy (argmax, as ``generate(do_sample=False)``); ``top_p`` < 1 samples from
    the smallest set of tokens whose probability reaches it; ``seed`` makes a sampled request
    reproducible whatever else runs; ``stop`` strings end the text before they appear;
    ``ignore_eos`` generates exactly ``max_tokens`` tokens (benchmarks).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1 (got {self.max_tokens})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (got {self.temperature})")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (got {self.top_p})")
        object.__setattr__(self, "stop", tuple(self.stop))

    def generator(self, device: torch.device | str) -> torch.Generator | None:
        """A per-request generator on ``device`` (None for greedy): seeded when ``seed`` is set."""
        if self.temperature <= 0:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
        return g


GREEDY = SamplingParams()


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from a [vocab] logits row."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits).item())
    # Sampling in fp32: fp16/bf16 softmax over a large vocab loses the tail mass.
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_idx = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it stays).
        drop = (cumulative - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_idx[choice].item())
    return int(torch.multinomial(probs, 1, generator=generator).item())
