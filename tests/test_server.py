"""The OpenAI-compatible server, exercised with the official `openai` client on a tiny model."""

import re
import threading
import time

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key=tiny_server.api_key,
                         max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def gated_client(gated_server):
    return openai.OpenAI(base_url=gated_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def tokenizer(tiny_lm):
    return tiny_lm[1]


MODEL = "tiny-llama"
PROMPT = "the cat sat on the mat"
FIXED = {"ignore_eos": True}  # fixed output lengths (the random model may pick EOS)


def _complete(client, **kw):
    args = dict(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0.0, extra_body=FIXED)
    args.update(kw)
    return client.completions.create(**args)


def test_health_and_models(tiny_server, client):
    assert httpx.get(tiny_server.base_url + "/health").json()["status"] == "ok"
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_usage_and_length(client, tokenizer):
    r = _complete(client, max_tokens=7)
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tokenizer(PROMPT).input_ids)
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].text.strip()


def test_chat_completion_applies_template(client, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0,
                                       extra_body=FIXED)
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False).input_ids)
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_stream_completion_equals_non_stream(client):
    full = _complete(client).choices[0].text
    chunks = list(_complete(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].usage.completion_tokens == 12


def test_stream_chat_equals_non_stream(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "the dog"}], max_tokens=10,
              temperature=0, extra_body=FIXED)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stream_sse_ends_with_done(tiny_server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    headers = {"Authorization": f"Bearer {tiny_server.api_key}"}
    with httpx.stream("POST", tiny_server.base_url + "/v1/completions", json=body, headers=headers,
                      timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and len(events) >= 2


def test_stop_strings(client):
    full = _complete(client, max_tokens=20).choices[0].text
    words = full.split()
    stop = " " + words[len(words) // 2]
    r = _complete(client, max_tokens=20, stop=[stop, "never-matches"])
    assert r.choices[0].text == full[: full.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in _complete(client, max_tokens=20, stop=stop, stream=True))
    assert streamed == r.choices[0].text


def test_seed_reproducible(client):
    def run(seed):
        return _complete(client, temperature=1.0, top_p=0.95, seed=seed, max_tokens=16).choices[0].text

    assert run(11) == run(11)
    assert run(11) != run(12)


def test_auth(tiny_server):
    bad = openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as exc:
        bad.models.list()
    assert exc.value.status_code == 401 and exc.value.body["code"] == "invalid_api_key"
    r = httpx.post(tiny_server.base_url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
    assert r.status_code == 401 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize(
    "kwargs, param, pattern",
    [
        (dict(prompt="the " * 200), "prompt", r"maximum context length is 128"),
        (dict(max_tokens=125), "max_tokens", r"maximum context length is 128.*131 were requested.*125 for the completion"),
        (dict(n=2), "n", r"n=2 is not supported"),
        (dict(temperature=5.0), "temperature", r"temperature"),
        (dict(top_p=0.0), "top_p", r"top_p"),
        (dict(logprobs=21), "logprobs", r"logprobs"),
        (dict(seed=2**64), "seed", r"seed"),
        (dict(best_of=3), "best_of", r"best_of"),
        (dict(extra_body={"frobnicate": 1}), "frobnicate", r"unknown parameter"),
    ],
)
def test_bad_requests_are_400_naming_the_parameter(client, kwargs, param, pattern):
    with pytest.raises(openai.BadRequestError) as exc:
        _complete(client, **kwargs)
    err = exc.value.body
    assert exc.value.status_code == 400
    assert err["param"] == param
    assert re.search(pattern, err["message"]), err["message"]


def test_unknown_model_is_404_naming_the_served_one(client):
    with pytest.raises(openai.NotFoundError) as exc:
        _complete(client, model="gpt-4")
    err = exc.value.body
    assert err["param"] == "model" and err["code"] == "model_not_found"
    assert re.search(r"'gpt-4' does not exist.*'tiny-llama'", err["message"])


def test_chat_refuses_tools(client):
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=[tool])
    assert exc.value.body["param"] == "tools"


def test_queue_full_is_429(gated_server, gated_client):
    gate, engine = gated_server.gate, gated_server.engine
    results = {}

    def background(name):
        try:
            results[name] = gated_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        except Exception as exc:  # recorded, asserted below
            results[name] = exc

    gate.open.clear()
    try:
        calls = gate.calls
        a = threading.Thread(target=background, args=("a",))
        a.start()
        _wait(lambda: gate.calls > calls)  # the worker holds request a
        b = threading.Thread(target=background, args=("b",))
        b.start()
        _wait(lambda: engine.queue_depth == 1)  # request b waits in the (size 1) queue
        with pytest.raises(openai.RateLimitError) as exc:
            gated_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3)
        assert exc.value.status_code == 429 and "--max-queue" in exc.value.body["message"]
    finally:
        gate.open.set()
    a.join(30)
    b.join(30)
    assert all(isinstance(results[k], openai.types.Completion) for k in "ab"), results


def test_client_disconnect_cancels_generation(gated_server):
    gate, engine = gated_server.gate, gated_server.engine
    before = engine.cancelled_total
    gate.delay = 0.03  # 100 tokens would take > 3 s
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "stream": True, "ignore_eos": True}
    # Read the first chunk, then hang up (closing the client closes the connection).
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", gated_server.base_url + "/v1/completions", json=body) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    break
    t_close = time.monotonic()
    try:
        _wait(lambda: engine.cancelled_total > before, timeout=10)
        assert time.monotonic() - t_close < 3.0  # well before the 100 tokens would have finished
    finally:
        gate.delay = 0.0


def test_metrics_exposition_counts_requests(tiny_server, client):
    def scrape():
        text = httpx.get(tiny_server.base_url + "/metrics").text
        values = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)', line)
            assert m, f"not Prometheus text format: {line!r}"
            values[m.group(1) + (m.group(2) or "")] = float(m.group(3))
        return values

    key = 'gq_requests_total{endpoint="/v1/completions",status="200"}'
    key400 = 'gq_requests_total{endpoint="/v1/completions",status="400"}'
    before = scrape()
    _complete(client, max_tokens=3)
    _complete(client, max_tokens=3)
    with pytest.raises(openai.BadRequestError):
        _complete(client, n=3)
    after = scrape()
    assert after[key] - before.get(key, 0) == 2
    assert after[key400] - before.get(key400, 0) == 1
    assert after["gq_generation_tokens_total"] - before["gq_generation_tokens_total"] == 6
    assert after["gq_time_to_first_token_seconds_count"] - before["gq_time_to_first_token_seconds_count"] == 2
    assert after['gq_time_per_output_token_seconds_bucket{le="+Inf"}'] >= 2
    assert "gq_queue_depth" in after


def _wait(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_unknown_route_and_bad_json_are_openai_shaped(tiny_server):
    r = httpx.get(tiny_server.base_url + "/v1/nope")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(tiny_server.base_url + "/v1/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {tiny_server.api_key}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
