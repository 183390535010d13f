"""Load test against any OpenAI-compatible endpoint: a concurrency sweep of streaming requests.

Streaming is what makes TTFT (time to first token) and TPOT (time per output token after the
first) measurable from the client side; the same code runs against gq serve (hf or vLLM engine),
vLLM itself or a hosted API. Bounded: a fixed number of requests per level, a per-request
timeout and a per-level wall-clock limit.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

DEFAULT_PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    latency_s: float | None = None
    output_tokens: int = 0


def _api_root(base_url: str) -> str:
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def _payload(endpoint: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool) -> dict:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                  # usage in the last chunk gives exact token counts instead of counting chunks
                  "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True  # a vLLM / gq serve extension; hosted APIs refuse it
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def _one_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict,
                       timeout: float) -> RequestResult:
    start = time.perf_counter()
    first = last = None
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return RequestResult(ok=False, error=f"http_{resp.status_code}")
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                obj = json.loads(data)
                if "error" in obj:
                    return RequestResult(ok=False, error="stream_error")
                if obj.get("usage"):
                    usage_tokens = obj["usage"].get("completion_tokens")
                for choice in obj.get("choices") or ():
                    text = choice.get("text")
                    if text is None:
                        text = (choice.get("delta") or {}).get("content")
                    if text:
                        last = time.perf_counter()
                        first = first or last
                        chunks += 1
    except httpx.TimeoutException:
        return RequestResult(ok=False, error="timeout")
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        return RequestResult(ok=False, error=type(exc).__name__)
    end = time.perf_counter()
    # Without usage, one content chunk per token is what OpenAI-style servers send.
    n_out = usage_tokens if usage_tokens is not None else chunks
    tpot = (last - first) / (n_out - 1) if first is not None and n_out > 1 else None
    return RequestResult(ok=True, ttft_s=None if first is None else first - start, tpot_s=tpot,
                         latency_s=end - start, output_tokens=n_out)


def _pct_ms(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q) * 1e3) if values else None


def _summarize(concurrency: int, planned: int, results: list[RequestResult], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    lat = [r.latency_s for r in ok if r.latency_s is not None]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "concurrency": concurrency,
        "requests_planned": planned,
        "requests_sent": len(results),
        "ok": len(ok),
        "errors": len(results) - len(ok),
        "error_kinds": dict(Counter(r.error for r in results if not r.ok)),
        "not_sent": planned - len(results),  # cut by the level's time limit
        "duration_s": duration,
        "req_per_s": len(ok) / duration if duration > 0 else 0.0,
        "output_tok_per_s": tokens / duration if duration > 0 else 0.0,
        "output_tokens": tokens,
        "ttft_p50_ms": _pct_ms(ttft, 50),
        "ttft_p99_ms": _pct_ms(ttft, 99),
        "tpot_p50_ms": _pct_ms(tpot, 50),
        "tpot_p99_ms": _pct_ms(tpot, 99),
        "latency_p50_ms": _pct_ms(lat, 50),
        "latency_p99_ms": _pct_ms(lat, 99),
    }


async def _sweep(base_url: str, model: str, api_key: str | None, concurrency: list[int],
                 requests_per_level: int, body: dict, endpoint: str, timeout: float,
                 level_time_limit: float, warmup: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    url = f"{_api_root(base_url)}/{'chat/completions' if endpoint == 'chat' else 'completions'}"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    levels = []
    limits = httpx.Limits(max_connections=max(concurrency) + 2, max_keepalive_connections=max(concurrency) + 2)
    async with httpx.AsyncClient(limits=limits) as client:
        for _ in range(warmup):  # first request pays lazy init (kernels, caches): not measured
            await _one_request(client, url, body, headers, timeout)
        total = requests_per_level * len(concurrency)
        with tqdm(total=total, desc="bench online", unit="req", disable=not progress, file=sys.stderr) as bar:
            for c in concurrency:
                bar.set_postfix(concurrency=c)
                results: list[RequestResult] = []
                issued = 0
                deadline = time.perf_counter() + level_time_limit

                async def worker() -> None:
                    nonlocal issued
                    while issued < requests_per_level and time.perf_counter() < deadline:
                        issued += 1
                        results.append(await _one_request(client, url, body, headers, timeout))
                        bar.update(1)

                start = time.perf_counter()
                await asyncio.gather(*(worker() for _ in range(c)))
                levels.append(_summarize(c, requests_per_level, results, time.perf_counter() - start))
                bar.update(requests_per_level - issued)  # keep the bar honest when the limit hit
    return levels


def bench_online(
    base_url: str,
    model: str,
    api_key: str | None = None,
    concurrency: list[int] = (1, 2, 4, 8),
    requests_per_level: int = 16,
    max_tokens: int = 64,
    prompt: str = DEFAULT_PROMPT,
    endpoint: str = "completions",
    ignore_eos: bool = False,
    timeout: float = 120.0,
    level_time_limit: float = 300.0,
    warmup: int = 1,
    progress: bool = True,
) -> dict:
    """Run the sweep; returns {"config": ..., "levels": [one summary dict per concurrency]}."""
    if endpoint not in ("completions", "chat"):
        raise ValueError(f"endpoint must be 'completions' or 'chat' (got {endpoint!r})")
    concurrency = [int(c) for c in concurrency]
    if not concurrency or min(concurrency) < 1:
        raise ValueError(f"concurrency levels must be >= 1 (got {concurrency})")
    if requests_per_level < 1:
        raise ValueError(f"requests_per_level must be >= 1 (got {requests_per_level})")
    body = _payload(endpoint, model, prompt, max_tokens, ignore_eos)
    levels = asyncio.run(_sweep(base_url, model, api_key, concurrency, requests_per_level, body,
                                endpoint, timeout, level_time_limit, warmup, progress))
    config = {"base_url": base_url, "model": model, "endpoint": endpoint, "concurrency": concurrency,
              "requests_per_level": requests_per_level, "max_tokens": max_tokens, "ignore_eos": ignore_eos,
              "prompt_chars": len(prompt), "timeout_s": timeout, "level_time_limit_s": level_time_limit}
    return {"config": config, "levels": levels}


def plot_online(result: dict, path: str | Path) -> Path:
    """PNG: throughput (left) and TTFT/TPOT percentiles (right) against concurrency."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    levels = result["levels"]
    conc = [lv["concurrency"] for lv in levels]
    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_tp.plot(conc, [lv["output_tok_per_s"] for lv in levels], "o-", label="output tok/s")
    ax_tp.set_xlabel("concurrency")
    ax_tp.set_ylabel("output tokens / s")
    ax_rps = ax_tp.twinx()
    ax_rps.plot(conc, [lv["req_per_s"] for lv in levels], "s--", color="tab:orange", label="req/s")
    ax_rps.set_ylabel("requests / s")
    ax_tp.legend(loc="upper left")
    ax_rps.legend(loc="lower right")
    ax_tp.set_title("throughput")
    for key, style in (("ttft_p50_ms", "o-"), ("ttft_p99_ms", "o:"), ("tpot_p50_ms", "s-"), ("tpot_p99_ms", "s:")):
        ys = [lv[key] if lv[key] is not None else np.nan for lv in levels]
        ax_lat.plot(conc, ys, style, label=key.replace("_ms", "").replace("_", " "))
    ax_lat.set_xlabel("concurrency")
    ax_lat.set_ylabel("ms")
    ax_lat.set_title("latency")
    ax_lat.legend()
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(conc, [str(c) for c in conc])
    cfg = result.get("config", {})
    fig.suptitle(f"{cfg.get('model', '')} @ {cfg.get('base_url', '')}  (max_tokens={cfg.get('max_tokens')})")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_online(result: dict) -> str:
    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    header = f"{'conc':>4} {'ok':>4} {'err':>4} {'req/s':>7} {'tok/s':>8} {'TTFT p50':>9} {'p99':>8} {'TPOT p50':>9} {'p99':>8}"
    lines = [header, "-" * len(header)]
    for lv in result["levels"]:
        lines.append(f"{lv['concurrency']:>4} {lv['ok']:>4} {lv['errors']:>4} {f(lv['req_per_s'], '.2f'):>7} "
                     f"{f(lv['output_tok_per_s']):>8} {f(lv['ttft_p50_ms']):>9} {f(lv['ttft_p99_ms']):>8} "
                     f"{f(lv['tpot_p50_ms']):>9} {f(lv['tpot_p99_ms']):>8}")
    return "\n".join(lines) + "\n(latencies in ms)"
