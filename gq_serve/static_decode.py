"""Batch-1 decode with a static KV cache, the one-token step replayed as a CUDA graph on a GPU.

Why: at batch 1 a decode step of a 7B model reads its fp16 weights once (a few ms on a datacenter
GPU) but also launches ~40 small kernels per layer (norms, rotary, residual adds, the cache update);
launched one by one from Python, that launch latency, not memory bandwidth, sets the speed (plain
transformers' figure is in ../shared/anchors.md). A CUDA graph replays the whole step with one launch,
and a graph needs fixed shapes and fixed addresses, hence a *static* KV cache.

How (transformers 5.17, `transformers.StaticCache`):
  * The cache's layers allocate their key/value tensors [1, kv_heads, max_cache_len, head_dim] on
    their first update and then write in place; the write position is the layer's
    `cumulative_length`, a 0-d tensor on the device that each update advances in place. Position
    ids and the causal mask are computed from it inside the forward, so there is no
    `cache_position` argument to feed (5.17 removed it): the step's only input is the token,
    `input_ids` [1, 1], and a graph captured once replays correctly at every position.
  * `cache.reset()` zeroes the tensors and `cumulative_length` in place: addresses do not move, so
    one capture serves every request (reset between requests, never recapture).
  * The prefill (prompt of any length) runs eagerly into the same cache; only the decode step is
    captured.
  * Length buckets: attention over a static cache reads all `max_cache_len` positions every step
    (the unused ones are masked, but still read). Sized to a 4k context, a 7B model would read 2 GiB
    of mostly-empty cache per token, ~15% of the step. So there is one cache (and one graph) per
    power-of-two length bucket, from `min_bucket` up to `max_len`, each built on first use and then
    kept. A request starts in the smallest bucket holding its prompt and moves up one bucket when
    the current one is full (`_grow` copies the filled prefix: cheap, once per doubling), so a chat
    request whose max_tokens defaults to the whole context still decodes short answers from a
    short cache. Memory: at most about twice that of one max_len cache, for the buckets used.

Graph capture method: manual `torch.cuda.CUDAGraph` capture, optionally of a `torch.compile`d step
(inductor with its own CUDA graphs off), rather than `torch.compile(mode="reduce-overhead")`:
  * capture is explicit and cheap: warm up on a side stream, capture once per bucket, replay. No
    cudagraph-trees machinery (its state is per thread, and it silently falls back to running
    without a graph when it sees an input mutation it cannot prove safe), so what runs is what
    `slot_mode` reports;
  * the eager capture needs nothing beyond CUDA (no Triton/inductor toolchain) and works for any
    model whose forward does not synchronise with the host; quantized `GQLinear`s go through
    `torch.ops.gq.*` custom ops, which are capturable;
  * on top, `compile=True` (the default on CUDA) compiles the step with inductor first, which fuses
    the small elementwise kernels (RMSNorm, rotary, SiLU*mul) that the graph otherwise replays one
    by one; one compile per bucket (dynamic=False). If compiling or capturing fails, the bucket
    degrades to the eager graph, then to the plain eager step, with a warning: the decoder never
    refuses to decode. `compile=False` (`gq serve --no-compile`) captures the eager step only.
On the CPU (`--decode static`) the same static cache runs the step eagerly, or with `compile=True`
compiled by Inductor per bucket (no graph).

Requests longer than `max_len` fall back to `gq_serve.decode.DynamicDecoder` (the engine
never sends one: `Engine.check_context` rejects prompt + max_tokens > max_model_len first, and the
engine sizes this decoder to max_model_len).

Not thread-safe: one request at a time (the engine's single worker; the offline benchmark's loop).
Starting a request invalidates the previous request's generator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from gq_serve.decode import DynamicDecoder
from gq_serve.sampling import SamplingParams, sample_step

log = logging.getLogger(__name__)

DEFAULT_MIN_BUCKET = 256
_WARMUP_STEPS = 3  # before capture: lazy inits, cuBLAS handles, inductor compile + Triton autotune


def bucket_sizes(max_len: int, min_bucket: int = DEFAULT_MIN_BUCKET) -> list[int]:
    """Cache lengths: min_bucket, 2*min_bucket, ... below max_len, then max_len itself.

    >>> bucket_sizes(1000, 256)
    [256, 512, 1000]
    """
    if max_len < 1 or min_bucket < 1:
        raise ValueError(f"max_len and min_bucket must be >= 1 (got {max_len}, {min_bucket})")
    sizes, b = [], min_bucket
    while b < max_len:
        sizes.append(b)
        b *= 2
    sizes.append(max_len)
    return sizes


def _decode_step(model: torch.nn.Module, input_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """One cached forward of input_ids [1, 1] -> next-token logits [vocab] (model dtype).

    The position is the cache's own on-device counter, so the same call (or a graph of it) is
    valid at every step; it appends one key/value per layer and advances that counter.
    """
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[0, -1]


def _prefill_all(model: torch.nn.Module, input_ids: torch.Tensor, cache: StaticCache) -> torch.Tensor:
    """The cached prefill keeping every position's logits [T, vocab] (prompt log-probabilities)."""
    return model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=0).logits[0]


@dataclass
class _Slot:
    """One length bucket: its cache and the decode step bound to it."""

    length: int
    cache: StaticCache
    input_ids: torch.Tensor  # [1, 1] long: the step's only input, written before each step/replay
    mode: str = "static"  # what actually runs: "static" | "static+cuda_graph" | "static+cuda_graph+compile"
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # [vocab]: the graph's output, rewritten by every replay
    step: Callable | None = None  # on the CPU with compile: the compiled _decode_step of this bucket


class StaticDecoder:
    """Batch-1 decoder over a static KV cache, reused across requests; see the module docstring.

    Args:
        model: an eval-mode HF causal LM (may hold GQLinear modules) already on `device`.
        max_len: the longest request (prompt + new tokens) served from a static cache; longer ones
            go through the dynamic loop. The engine passes its max_model_len.
        device: defaults to the model's.
        cuda_graph: capture the decode step in a CUDA graph; default: on for a CUDA device.
            Needs a CUDA device.
        compile: torch.compile the step; default: on with a CUDA graph (compiled, then captured).
            On the CPU (no graph) it compiles the step per bucket with Inductor, so a decode step
            runs as generated code around the kernels' ops instead of the layers' Python; off by
            default there (one compile per bucket, minutes on a small machine).
        min_bucket: smallest cache length (see `bucket_sizes`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_len: int,
        *,
        device: torch.device | str | None = None,
        cuda_graph: bool | None = None,
        compile: bool | None = None,
        min_bucket: int = DEFAULT_MIN_BUCKET,
    ) -> None:
        self.model = model
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.cuda_graph = (self.device.type == "cuda") if cuda_graph is None else bool(cuda_graph)
        if self.cuda_graph and self.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device (the model is on {self.device})")
        self.compile = self.cuda_graph if compile is None else bool(compile)
        if self.compile and not self.cuda_graph and self.device.type != "cpu":
            raise ValueError("compile=True needs the CUDA graph on a GPU (a compiled step alone: CPU only)")
        self.max_len = int(max_len)
        self.buckets = bucket_sizes(self.max_len, min_bucket)
        self._slots: dict[int, _Slot] = {}
        # Requests start small and move up a bucket when full (_grow), which copies the plain
        # [.., positions, ..] layout of StaticLayer; other layer kinds (sliding-window rings)
        # start in the bucket that holds the whole request instead.
        probe = StaticCache(config=model.config, max_cache_len=1)  # no tensors until an update
        self._growable = all(type(layer) is StaticLayer for layer in probe.layers)
        self._request = 0  # id of the request allowed to advance the caches
        self.fallbacks = 0  # requests served by the dynamic loop because they exceeded max_len
        if self.compile:
            # Each (model, bucket) is one compiled graph of the same function: allow that many.
            import torch._dynamo.config as dynamo_config

            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 8 + 2 * len(self.buckets))

    @property
    def mode(self) -> str:
        """What the decode step is configured to run as (a bucket may degrade: see slot_mode)."""
        if not self.cuda_graph:
            return "static+compile" if self.compile else "static"
        return "static+cuda_graph+compile" if self.compile else "static+cuda_graph"

    def slot_mode(self, prompt_len: int, max_new_tokens: int) -> str | None:
        """How the bucket such a request ends in actually runs (`mode`, or a degraded one after a
        failed capture); None while that bucket is not built."""
        bucket = self.bucket_for(self.cache_length(prompt_len, max_new_tokens))
        slot = self._slots.get(bucket) if bucket is not None else None
        return None if slot is None else slot.mode

    @staticmethod
    def cache_length(prompt_len: int, max_new_tokens: int) -> int:
        """Cache entries a request fills: the last sampled token is never fed back."""
        return prompt_len + max(max_new_tokens, 1) - 1

    def bucket_for(self, length: int) -> int | None:
        """The smallest bucket holding `length` cache entries, or None if longer than max_len."""
        for b in self.buckets:
            if length <= b:
                return b
        return None

    def _first_bucket(self, prompt_len: int, max_new_tokens: int) -> int | None:
        """Where a request starts: the bucket for its prompt and first decode step when it can grow
        later (a chat request's max_tokens defaults to the whole context: sizing to that would make
        every step read the largest cache), else the bucket for the whole request."""
        if self._growable:
            return self.bucket_for(self.cache_length(prompt_len, min(max_new_tokens, 2)))
        return self.bucket_for(self.cache_length(prompt_len, max_new_tokens))

    def warmup(self, prompt_len: int = 1, max_new_tokens: int = 1) -> None:
        """Build (on a GPU: capture) every bucket such a request may pass through.

        The engine calls this once at start (the smallest bucket) so that the first request does
        not pay for the capture; the offline benchmark calls it so that no timed run does.
        """
        prompt_len = max(prompt_len, 1)
        last = self.bucket_for(self.cache_length(prompt_len, max_new_tokens))
        if last is None:
            raise ValueError(f"{self.cache_length(prompt_len, max_new_tokens)} cache entries exceed the "
                             f"static cache's max_len {self.max_len}")
        first = self._first_bucket(prompt_len, max_new_tokens)
        with torch.inference_mode():
            for bucket in self.buckets:
                if first <= bucket <= last:
                    self._slot(bucket)

    # -- the loop ----------------------------------------------------------------------------
    def iter_tokens(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        *,
        generator: torch.Generator | None = None,
        eos_ids: Sequence[int] = (),
        should_stop: Callable[[], bool] | None = None,
    ) -> Iterator[int]:
        """Same contract and same tokens as `gq_serve.decode.DynamicDecoder.iter_tokens`, on the
        static cache.

        Yields up to `params.max_tokens` ids; stops after an id in `eos_ids`, or before a forward
        when `should_stop()` is true. The forwards run under `torch.inference_mode()` here (entered
        per step, never held across a `yield`, so the caller's grad mode is left alone).
        """
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the decode loop needs at least one prompt token")
        max_new_tokens = params.max_tokens
        if self.bucket_for(self.cache_length(len(prompt_ids), max_new_tokens)) is None:
            self.fallbacks += 1
            log.debug("request of %d + %d tokens exceeds the static cache (%d): dynamic decode",
                      len(prompt_ids), max_new_tokens, self.max_len)
            yield from DynamicDecoder(self.model, self.device).iter_tokens(
                prompt_ids, params, generator=generator, eos_ids=eos_ids, should_stop=should_stop)
            return
        self._request += 1
        me = self._request
        eos = set(int(i) for i in eos_ids)
        with torch.inference_mode():
            slot = self._slot(self._first_bucket(len(prompt_ids), max_new_tokens))
            slot.cache.reset()
            prompt = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        filled = 0  # cache entries written so far (host-side mirror of the caches' device counter)
        token = None
        for step in range(max_new_tokens):
            if should_stop is not None and should_stop():
                return
            if self._request != me:
                raise RuntimeError("StaticDecoder: a newer request reused the cache; this generator "
                                   "is no longer valid (the decoder serves one request at a time)")
            with torch.inference_mode():
                prompt_logits = None
                if step == 0:
                    if params.prompt_logprobs is not None:  # echo: every position's logits
                        prompt_logits = _prefill_all(self.model, prompt, slot.cache)
                        logits = prompt_logits[-1]
                    else:
                        logits = self._forward(slot, prompt)
                    filled = len(prompt_ids)
                else:
                    if filled == slot.length:
                        slot = self._grow(slot, filled)
                    logits = self._step(slot, token)
                    filled += 1
                token = sample_step(logits, params, generator, prompt_logits=prompt_logits,
                                    prompt_ids=prompt_ids)
            yield token
            if token in eos:
                return

    # -- internals -----------------------------------------------------------------------------
    def _forward(self, slot: _Slot, input_ids: torch.Tensor) -> torch.Tensor:
        """Eager cached forward of input_ids [1, T] (the prefill) -> last position's logits [vocab]."""
        return _decode_step(self.model, input_ids, slot.cache)

    def _step(self, slot: _Slot, token: int) -> torch.Tensor:
        """Feed one token, return the next logits [vocab] (a graph output: read before the next step)."""
        slot.input_ids.fill_(token)  # a device-side fill: no host sync
        if slot.graph is not None:
            slot.graph.replay()
            return slot.logits
        step = slot.step or _decode_step
        return step(self.model, slot.input_ids, slot.cache)

    def _grow(self, slot: _Slot, filled: int) -> _Slot:
        """Move a full bucket's `filled` entries into the next bucket and continue there.

        Copies [1, kv_heads, :filled, head_dim] of every layer's keys and values and the position
        counter: about the size of the small cache, once per doubling.
        """
        bigger = self._slot(self.bucket_for(filled + 1))
        bigger.cache.reset()
        for src, dst in zip(slot.cache.layers, bigger.cache.layers):
            dst.keys[:, :, :filled].copy_(src.keys[:, :, :filled])
            dst.values[:, :, :filled].copy_(src.values[:, :, :filled])
            dst.cumulative_length.copy_(src.cumulative_length)
        return bigger

    def _slot(self, bucket: int) -> _Slot:
        slot = self._slots.get(bucket)
        if slot is None:
            cache = StaticCache(config=self.model.config, max_cache_len=bucket)
            slot = _Slot(bucket, cache, torch.zeros((1, 1), dtype=torch.long, device=self.device))
            # The layers allocate their tensors on their first update: do it now, with a one-token
            # forward, so the addresses exist before any capture (and outlive it) and _grow can
            # copy into them.
            _decode_step(self.model, slot.input_ids, cache)
            cache.reset()
            if self.cuda_graph:
                self._capture(slot)
            elif self.compile:
                self._compile_cpu(slot)
            self._slots[bucket] = slot
        return slot

    def _capture(self, slot: _Slot) -> None:
        """Capture slot's decode step, compiled first if asked; degrade on failure (logged)."""
        attempts = [True, False] if self.compile else [False]
        for compiled in attempts:
            try:
                self._capture_once(slot, compiled)
                slot.mode = "static+cuda_graph+compile" if compiled else "static+cuda_graph"
                log.info("static decode: captured the %d-token bucket (%s)", slot.length, slot.mode)
                return
            except Exception as exc:  # noqa: BLE001 -- any failure: fall back, never refuse to decode
                log.warning("static decode: %s CUDA graph capture of the %d-token bucket failed "
                            "(%s: %s); falling back", "compiled" if compiled else "eager",
                            slot.length, type(exc).__name__, exc)
                slot.graph, slot.logits = None, None
                torch.cuda.synchronize(self.device)
        slot.mode = "static"
        slot.cache.reset()

    def _compile_cpu(self, slot: _Slot) -> None:
        """Compile slot's decode step (no graph on the CPU); on failure decode eagerly (logged)."""
        step = torch.compile(_decode_step, fullgraph=True, dynamic=False)
        try:
            # The first calls compile; reset after each so the bucket starts empty.
            for _ in range(2):
                slot.cache.reset()
                step(self.model, slot.input_ids, slot.cache)
            slot.step, slot.mode = step, "static+compile"
            log.info("static decode: compiled the %d-token bucket's step", slot.length)
        except Exception as exc:  # noqa: BLE001 -- any failure: fall back, never refuse to decode
            log.warning("static decode: compiling the %d-token bucket's step failed (%s: %s); decoding "
                        "it eagerly", slot.length, type(exc).__name__, exc)
            slot.step, slot.mode = None, "static"
        slot.cache.reset()

    def _capture_once(self, slot: _Slot, compiled: bool) -> None:
        model, ids, cache = self.model, slot.input_ids, slot.cache
        step = torch.compile(_decode_step, fullgraph=True, dynamic=False) if compiled else _decode_step
        # Warm up on a side stream (what torch.cuda.graph expects): first calls allocate workspaces,
        # compile and autotune, none of which may happen during capture. Reset before each step so
        # the warm-up writes stay at position 0 whatever the bucket's length.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_STEPS):
                cache.reset()
                step(model, ids, cache)
            cache.reset()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: another thread's CUDA calls (the server's) must not invalidate the capture.
        with torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local"):
            logits = step(model, ids, cache)  # recorded, not run: the cache does not advance
        torch.cuda.synchronize(self.device)
        slot.graph, slot.logits = graph, logits
        cache.reset()
