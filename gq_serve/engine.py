"""Embedded engine: one worker thread, a bounded FIFO queue, batch-1 decode with a KV cache.

The server (async) and plain scripts (sync) both talk to it through `RequestHandle`s: `submit()`
validates and enqueues, the worker streams `TokenEvent`s back, `cancel()` stops a request within
one decode step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from gq_serve.decode import make_decoder
from gq_serve.sampling import SamplingParams, TokenLogprob
from gq_serve.textstream import IncrementalDetokenizer, StopStringFilter

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The engine's waiting queue is at capacity (the server answers 429)."""


class ContextTooLong(ValueError):
    """Prompt + max_tokens exceed the model's context (the server answers 400)."""


class EngineStopped(RuntimeError):
    """submit() after shutdown()."""


class TokenEvent(NamedTuple):
    token_id: int
    text: str  # text delta (may be "" while a multi-byte char or a possible stop string is held)
    finish_reason: str | None  # "stop" | "length" on the last event, else None


_DONE = object()


@dataclass
class RequestHandle:
    """One submitted request: iterate it (sync or async) for TokenEvents; cancel() to abort."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    # With params.logprobs: one TokenLogprob per generated token, appended before its event is
    # sent (event i's is logprobs[i]); with params.prompt_logprobs: one per prompt token after the
    # first, set before the first event.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None
    _cancel: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # Events cross from the worker thread: an asyncio.Queue fed via call_soon_threadsafe for
        # async consumers (never block the event loop), a queue.Queue for sync ones.
        self._aq: asyncio.Queue | None = asyncio.Queue() if self.loop is not None else None
        self._q: queue.Queue = queue.Queue()

    # -- worker side -------------------------------------------------------------------------
    def _put(self, item) -> None:
        if self._aq is not None:
            try:
                self.loop.call_soon_threadsafe(self._aq.put_nowait, item)
            except RuntimeError:  # the event loop closed under us (server shutting down)
                self.cancel()
        else:
            self._q.put(item)

    # -- consumer side -----------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def is_cancelled(self) -> bool:
        return self._cancel.is_set()

    def __iter__(self) -> Iterator[TokenEvent]:
        if self._aq is not None:
            raise TypeError("this handle was submitted with an event loop: iterate with `async for`")
        try:
            while True:
                item = self._q.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()  # a consumer that stops early frees the worker

    async def __aiter__(self):
        if self._aq is None:
            raise TypeError("this handle was submitted without an event loop: iterate with `for`")
        try:
            while True:
                item = await self._aq.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()

    @property
    def ttft(self) -> float | None:
        """Submit -> first token, queue wait included (what a client experiences)."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted_at

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first."""
        if self.first_token_at is None or self.finished_at is None or self.completion_tokens < 2:
            return None
        return (self.finished_at - self.first_token_at) / (self.completion_tokens - 1)


class Engine:
    """Batch-1 engine over a loaded model: requests run one at a time, in submission order.

    decode: "auto" | "static" | "dynamic" | "lean" (see `gq_serve.decode.make_decoder`); static uses a
    `StaticDecoder` sized to max_model_len, so every request check_context admits fits its cache.
    compile: torch.compile the static decode step before its CUDA graph capture (default: on a GPU).
    """

    def __init__(
        self,
        model,
        tokenizer,
        device: str | torch.device | None = None,
        max_queue: int = 16,
        max_model_len: int | None = None,
        decode: str = "auto",
        compile: bool | None = None,
    ) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1 (got {max_queue})")
        self.model = model
        self.tokenizer = tokenizer
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        config_len = getattr(model.config, "max_position_embeddings", None)
        self.max_model_len = int(max_model_len or config_len or 2048)
        if config_len and self.max_model_len > config_len:
            log.warning("max_model_len %d exceeds the model's max_position_embeddings %d",
                        self.max_model_len, config_len)
        self.eos_ids = self._eos_ids(model, tokenizer)
        try:
            self.decoder = make_decoder(model, decode, self.device, self.max_model_len, compile=compile)
        except Exception:
            if decode != "auto":  # asked for explicitly: say so
                raise
            log.exception("the %s decoder is not available for this model: using dynamic decode",
                          "static" if self.device.type == "cuda" else "lean")
            self.decoder = make_decoder(model, "dynamic", self.device)
        self.max_queue = max_queue
        self._queue: queue.Queue[RequestHandle | None] = queue.Queue(maxsize=max_queue)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self.running: RequestHandle | None = None
        self.cancelled_total = 0  # requests that ended by cancellation (tests and metrics read it)
        self.completed_total = 0
        self._stopped = False
        self._draining = False
        self._in_flight = 0  # submitted and not yet finished (queued + running)
        # Called in the worker thread with each finished RequestHandle (the server's metrics).
        self._finish_listeners: list = []
        self._worker = threading.Thread(target=self._work, name="gq-engine", daemon=True)
        self._worker.start()

    @staticmethod
    def _eos_ids(model, tokenizer) -> list[int]:
        ids: set[int] = set()
        gen_cfg = getattr(model, "generation_config", None)
        for source in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(int(i) for i in source)
        return sorted(ids)

    # -- public API ----------------------------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        """Waiting requests (not counting the running one)."""
        return self._queue.qsize()

    def check_context(self, prompt_len: int, max_tokens: int) -> None:
        total = prompt_len + max_tokens
        if prompt_len < 1:
            raise ValueError("the prompt is empty: send at least one token")
        if total > self.max_model_len:
            raise ContextTooLong(
                f"This model's maximum context length is {self.max_model_len} tokens, but "
                f"{total} were requested ({prompt_len} in the prompt + {max_tokens} for the "
                f"completion). Shorten the prompt or lower max_tokens."
            )

    @property
    def decode(self) -> str:
        """The decode loop in use: "static", "dynamic" or "lean"."""
        return self.decoder.mode if self.decoder.mode in ("dynamic", "lean") else "static"

    @property
    def static_decoder(self):
        """The `StaticDecoder`, or None with dynamic or lean decode."""
        return self.decoder if self.decode == "static" else None

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
        **sampling,
    ) -> RequestHandle:
        """Validate and enqueue; raises ContextTooLong, QueueFull or ValueError.

        ``params`` (or, for scripts, its fields as keyword arguments: ``max_tokens=32``) says how
        to decode; ``loop``: the event loop of an async consumer.
        """
        if self._stopped or self._draining:
            raise EngineStopped("the engine is shut down" if self._stopped else
                                "the engine is draining before shutdown and takes no new requests")
        if params is None:
            params = SamplingParams(**sampling)
        elif sampling:
            raise TypeError(f"pass either params or sampling keyword arguments, not both ({sorted(sampling)})")
        self.check_context(len(prompt_ids), params.max_tokens)
        handle = RequestHandle(id=next(self._ids), prompt_ids=[int(t) for t in prompt_ids], params=params, loop=loop)
        with self._lock:
            try:
                self._queue.put_nowait(handle)
            except queue.Full:
                raise QueueFull(
                    f"the request queue is full ({self.max_queue} waiting): retry later, or start the "
                    f"server with a larger --max-queue"
                ) from None
            self._in_flight += 1
        return handle

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                 **sampling) -> Iterator[TokenEvent]:
        """Blocking convenience: submit and yield TokenEvents (token_id, text, finish_reason)."""
        yield from self.submit(prompt_ids, params, **sampling)

    def add_finish_listener(self, fn) -> None:
        """fn(handle) runs in the worker thread when a request ends (finished, cancelled, failed)."""
        self._finish_listeners.append(fn)

    @property
    def in_flight(self) -> int:
        """Requests submitted and not finished yet (waiting or running)."""
        return self._in_flight

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self, timeout: float | None = None) -> bool:
        """Stop taking new requests (submit raises EngineStopped) and wait up to ``timeout`` seconds
        (None: forever) for the queued and running ones to finish. True when none is left."""
        self._draining = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._in_flight:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopped = True
        if self.running is not None:
            self.running.cancel()
        while True:  # cancel waiters so their consumers finish
            try:
                waiting = self._queue.get_nowait()
            except queue.Empty:
                break
            if waiting is not None:
                waiting.cancel()
                waiting._put(_DONE)
                with self._lock:
                    self._in_flight -= 1
        self._queue.put(None)
        self._worker.join(timeout)

    # -- worker --------------------------------------------------------------------------------
    def _work(self) -> None:
        # Grad mode is thread-local: set it inside the worker thread.
        with torch.inference_mode():
            # Capture the smallest bucket's graph now, not inside the first request (its TTFT).
            try:
                self.decoder.warmup()
            except Exception:  # the first request retries and reports the error to its client
                log.exception("decode warm-up failed")
            while True:
                handle = self._queue.get()
                if handle is None:
                    return
                self.running = handle
                try:
                    self._run(handle)
                except Exception as exc:  # report to the consumer; keep serving others
                    log.exception("generation %d failed", handle.id)
                    handle._put(RuntimeError(f"generation failed: {type(exc).__name__}: {exc}"))
                finally:
                    handle.finished_at = time.perf_counter()
                    with self._lock:
                        if handle.is_cancelled and handle.finish_reason is None:
                            handle.cancelled = True
                            self.cancelled_total += 1
                        else:
                            self.completed_total += 1
                    self.running = None
                    for fn in self._finish_listeners:
                        try:
                            fn(handle)
                        except Exception:  # a metrics bug must not kill the worker
                            log.exception("finish listener failed")
                    handle._put(_DONE)
                    with self._lock:
                        self._in_flight -= 1

    def _run(self, h: RequestHandle) -> None:
        h.started_at = time.perf_counter()
        if h.is_cancelled:  # cancelled while waiting in the queue
            return
        p = h.params
        detok = IncrementalDetokenizer(self.tokenizer)
        stops = StopStringFilter(list(p.stop))
        eos = () if p.ignore_eos else self.eos_ids
        # Per-request generator: a seed reproduces the output whatever else the server runs.
        tokens = self.decoder.iter_tokens(h.prompt_ids, p, generator=p.generator(self.device), eos_ids=eos,
                                          should_stop=lambda: h.is_cancelled)
        for token in tokens:
            now = time.perf_counter()
            if h.first_token_at is None:
                h.first_token_at = now
                h.prompt_logprobs = getattr(token, "prompt", None)
            if p.logprobs is not None:
                h.logprobs.append(token.logprob)
            h.completion_tokens += 1
            if token in eos:
                h.finish_reason = "stop"
                h._put(TokenEvent(token, stops.flush(), "stop"))
                return
            text = stops.feed(detok.push(token))
            if stops.stopped:
                h.finish_reason = "stop"
                h._put(TokenEvent(token, text, "stop"))
                return
            if h.completion_tokens >= p.max_tokens:
                h.finish_reason = "length"
                h._put(TokenEvent(token, text + stops.flush(), "length"))
                return
            h._put(TokenEvent(token, text, None))
