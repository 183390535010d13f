"""Minimal Prometheus text exposition (format 0.0.4): counters, gauges and histograms.

Written here rather than depending on prometheus_client: the server needs a handful of series,
and the engine's worker thread updates them, so every update takes one lock.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _fmt(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in pairs) + "}"


class Counter:
    def __init__(self, name: str, help_: str, labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.labelnames = name, help_, labelnames
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()
        if not labelnames:
            self._values[()] = 0.0

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        key = tuple((k, str(labels[k])) for k in self.labelnames)
        with self._lock:
            return self._values.get(key, 0.0)

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        with self._lock:
            for key, v in sorted(self._values.items()):
                lines.append(f"{self.name}{_labels(key)} {_fmt(v)}")
        return lines


class Gauge:
    """A gauge read from a callback at scrape time (queue depth lives in the engine)."""

    def __init__(self, name: str, help_: str, read: Callable[[], float]) -> None:
        self.name, self.help, self._read = name, help_, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge",
                f"{self.name} {_fmt(float(self._read()))}"]


class Histogram:
    def __init__(self, name: str, help_: str, buckets: tuple[float, ...]) -> None:
        self.name, self.help = name, help_
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # last slot: above every bound (+Inf only)
        self._sum = 0.0
        self._count = 0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        with self._lock:
            cumulative = 0
            for bound, c in zip(self.buckets, self._counts):
                cumulative += c
                lines.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cumulative}')
            lines.append(f'{self.name}_bucket{{le="+Inf"}} {self._count}')
            lines.append(f"{self.name}_sum {_fmt(self._sum)}")
            lines.append(f"{self.name}_count {self._count}")
        return lines


_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    """The series gq serve exposes on /metrics."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.requests = Counter("gq_requests_total", "HTTP requests by endpoint and status code.",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("gq_prompt_tokens_total", "Prompt tokens processed.")
        self.generated_tokens = Counter("gq_generation_tokens_total", "Tokens generated.")
        self.cancelled = Counter("gq_requests_cancelled_total",
                                 "Generations stopped early because the client went away.")
        self.queue_depth = Gauge("gq_queue_depth", "Requests waiting for the engine.", queue_depth)
        self.running = Gauge("gq_requests_running", "Requests being decoded (0 or 1).", running)
        self.ttft = Histogram("gq_time_to_first_token_seconds",
                              "Submit to first token, queue wait included.", _LATENCY_BUCKETS)
        self.tpot = Histogram("gq_time_per_output_token_seconds",
                              "Mean inter-token latency of a request after its first token.",
                              _LATENCY_BUCKETS)
        self.e2e = Histogram("gq_request_latency_seconds", "Submit to last token.", _LATENCY_BUCKETS)

    def render(self) -> str:
        series = (self.requests, self.prompt_tokens, self.generated_tokens, self.cancelled,
                  self.queue_depth, self.running, self.ttft, self.tpot, self.e2e)
        return "\n".join(line for s in series for line in s.render()) + "\n"
