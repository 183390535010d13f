"""The server under bad input (issue 13): no client input gets a 5xx.

Each class of input found by fuzzing has a test here: broken JSON and Unicode, control characters,
huge / negative / non-finite numbers, wrong types, deep nesting, oversized bodies (413), unknown
methods (405 with Allow), clients that leave mid-request; then a property test that throws
arbitrary JSON at every field, beyond what the schema allows. The OpenAPI document is checked for
what schema-driven tools need (schemathesis runs over it in tests/test_openapi_fuzz.py).
"""
from __future__ import annotations

import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

MODEL = "tiny-llama"
ERROR_KEYS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def http(tiny_server):
    with httpx.Client(base_url=tiny_server.base_url, timeout=60,
                      headers={"Authorization": f"Bearer {tiny_server.api_key}"}) as client:
        yield client


def _is_openai_error(r: httpx.Response) -> bool:
    try:
        return set(r.json()["error"]) == ERROR_KEYS
    except (ValueError, KeyError, TypeError):
        return False


# ---- the OpenAPI document -------------------------------------------------------------------------

def test_openapi_declares_bodies_statuses_and_media_types(tiny_server, http):
    spec = http.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, model in (("/v1/completions", "CompletionRequest"), ("/v1/chat/completions", "ChatCompletionRequest")):
        op = spec["paths"][path]["post"]
        body = op["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{model}"} and op["requestBody"]["required"]
        assert {"200", "400", "401", "404", "413", "429", "500", "503"} <= set(op["responses"])
        assert "text/event-stream" in op["responses"]["200"]["content"]
        assert "Retry-After" in op["responses"]["429"]["headers"]
        assert op["security"] == [{"bearer": []}]
        props = schemas[model]["properties"]
        assert props["model"]["enum"] == [MODEL] and schemas[model]["additionalProperties"] is False
        assert "logprobs" in props and "temperature" in props
    assert "echo" in schemas["CompletionRequest"]["properties"]
    assert "top_logprobs" in schemas["ChatCompletionRequest"]["properties"]
    metrics = spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]
    assert http.get("/metrics").headers["content-type"].startswith("text/plain")


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/completions", "POST"),
    ("PUT", "/v1/chat/completions", "POST"),
    ("DELETE", "/v1/models", "GET"),
    ("POST", "/health", "GET"),
])
def test_405_names_the_allowed_methods(http, method, path, allow):
    r = http.request(method, path)
    assert r.status_code == 405 and _is_openai_error(r)
    assert allow in r.headers["allow"].split(", ")


# ---- bodies -----------------------------------------------------------------------------------------

def test_oversized_body_is_413(http):
    big = json.dumps({"model": MODEL, "prompt": "x" * (3 * 1024 * 1024)}).encode()
    r = http.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and _is_openai_error(r) and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(48):
            yield b" " * 65536

    r = http.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and _is_openai_error(r)
    assert http.get("/health").status_code == 200


def _post(http, path, raw: bytes | str):
    content = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    return http.post(path, content=content, headers={"content-type": "application/json"})


M = f'"model": "{MODEL}"'
BAD_BODIES = {
    "empty body": b"",
    "not JSON": b"{not json",
    "truncated": ('{' + M + ', "prompt": "the cat').encode(),
    "invalid UTF-8": b'{"model": "tiny-llama", "prompt": "\xff\xfe\xc3"}',
    "lone surrogate (escaped)": '{' + M + ', "prompt": "\\ud800 cat"}',
    "lone surrogate (raw bytes)": '{' + M + ', "prompt": "\ud800"}',
    "UTF-16 body": ('{' + M + ', "prompt": "x"}').encode("utf-16"),
    "NaN": '{' + M + ', "prompt": "x", "temperature": NaN}',
    "Infinity": '{' + M + ', "prompt": "x", "top_p": Infinity}',
    "float overflow": '{' + M + ', "prompt": "x", "temperature": 1e400}',
    "5000-digit integer": '{' + M + ', "prompt": "x", "max_tokens": 1' + "0" * 5000 + "}",
    "huge max_tokens": '{' + M + ', "prompt": "x", "max_tokens": 100000000000000000000}',
    "seed past int64": '{' + M + ', "prompt": "x", "seed": 18446744073709551616}',
    "negative max_tokens": '{' + M + ', "prompt": "x", "max_tokens": -5}',
    "zero max_tokens": '{' + M + ', "prompt": "x", "max_tokens": 0}',
    "negative temperature": '{' + M + ', "prompt": "x", "temperature": -1}',
    "negative top_p": '{' + M + ', "prompt": "x", "top_p": -0.5}',
    "negative logprobs": '{' + M + ', "prompt": "x", "logprobs": -1}',
    "negative token id": '{' + M + ', "prompt": [-1, 3]}',
    "token id past the vocabulary": '{' + M + ', "prompt": [3, 1000000]}',
    "token id 2**70": '{' + M + ', "prompt": [1180591620717411303424]}',
    "fractional max_tokens": '{' + M + ', "prompt": "x", "max_tokens": 1.5}',
    "string max_tokens": '{' + M + ', "prompt": "x", "max_tokens": "16"}',
    "bool seed": '{' + M + ', "prompt": "x", "seed": true}',
    "string temperature": '{' + M + ', "prompt": "x", "temperature": "0.5"}',
    "number prompt": '{' + M + ', "prompt": 5}',
    "object prompt": '{' + M + ', "prompt": {"text": "x"}}',
    "mixed batch": '{' + M + ', "prompt": ["x", 3]}',
    "null model": '{"model": null, "prompt": "x"}',
    "number model": '{"model": 3, "prompt": "x"}',
    "missing prompt": '{' + M + '}',
    "string stream": '{' + M + ', "prompt": "x", "stream": "yes"}',
    "stop number": '{' + M + ', "prompt": "x", "stop": 7}',
    "five stops": '{' + M + ', "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}',
    "array body": "[]",
    "string body": '"hello"',
    "null body": "null",
    "deep nesting (prompt)": '{' + M + ', "prompt": ' + "[" * 100000 + "]" * 100000 + "}",
    "deep nesting (extra key)": '{' + M + ', "prompt": "x", "x": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}",
    "unknown key": '{' + M + ', "prompt": "x", "frobnicate": 1}',
    "n=2": '{' + M + ', "prompt": "x", "n": 2}',
    "n=true": '{' + M + ', "prompt": "x", "n": true}',
    "batch too large": '{' + M + ', "prompt": ' + json.dumps(["x"] * 17) + "}",
    "stream_options junk": '{' + M + ', "prompt": "x", "stream": true, "stream_options": {"x": 1}}',
    "prompt over the context": '{' + M + ', "prompt": "' + "the " * 400 + '"}',
}
BAD_CHAT = {
    "messages not a list": '{' + M + ', "messages": "hi"}',
    "empty messages": '{' + M + ', "messages": []}',
    "tool role": '{' + M + ', "messages": [{"role": "tool", "content": "x"}]}',
    "image part": '{' + M + ', "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
    "content number": '{' + M + ', "messages": [{"role": "user", "content": 5}]}',
    "deep content": '{' + M + ', "messages": [{"role": "user", "content": ' + "[" * 3000 + "]" * 3000 + "}]}",
    "response_format json": '{' + M + ', "messages": [{"role": "user", "content": "x"}], '
                            '"response_format": {"type": "json_object"}}',
    "top_logprobs 21": '{' + M + ', "messages": [{"role": "user", "content": "x"}], "logprobs": true, '
                       '"top_logprobs": 21}',
}


@pytest.mark.parametrize("raw", list(BAD_BODIES.values()), ids=list(BAD_BODIES))
def test_bad_completion_bodies_are_400(http, raw):
    r = _post(http, "/v1/completions", raw)
    assert r.status_code == 400, r.text[:300]
    assert _is_openai_error(r)


@pytest.mark.parametrize("raw", list(BAD_CHAT.values()), ids=list(BAD_CHAT))
def test_bad_chat_bodies_are_400(http, raw):
    r = _post(http, "/v1/chat/completions", raw)
    assert r.status_code == 400, r.text[:300]
    assert _is_openai_error(r)


ODD_BUT_VALID = {
    "control characters": "\u0000\u0001\u0007\u001b[31m\r\n\t\u007f",
    "emoji and combining marks": "e\u0301 \U0001F600 \U0001F469\u200D\U0001F4BB",
    "right-to-left and BOM": "\u202e\u05e9\u05dc\u05d5\u05dd \ufeff",
    "private use and noncharacters": "\ue000 \uffff \U0010FFFF",
    "only whitespace": "   \n\t ",
    "empty": "",
}


@pytest.mark.parametrize("text", list(ODD_BUT_VALID.values()), ids=list(ODD_BUT_VALID))
def test_odd_unicode_is_served(http, text):
    body = {"model": MODEL, "prompt": text, "max_tokens": 2, "stop": [text[:3] or "x", "\u0000"], "seed": -1,
            "temperature": 0.5}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    chat = {"model": MODEL, "messages": [{"role": "user", "content": text, "name": text, "extra": [text]}],
            "max_tokens": 2, "user": text}
    r = http.post("/v1/chat/completions", json=chat)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("temperature, top_p", [(5e-324, 5e-324), (1e-300, 1.0), (2.0, 1e-30), (2.0, 1.0)])
def test_extreme_sampling_values_are_served(http, temperature, top_p):
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 3, "temperature": temperature, "top_p": top_p}
    assert http.post("/v1/completions", json=body).status_code == 200


def test_integral_floats_are_integers(http):
    body = {"model": MODEL, "prompt": [3.0, 4, 5.0], "max_tokens": 2.0, "seed": -7.0, "temperature": 1}
    assert http.post("/v1/completions", json=body).status_code == 200


# ---- clients that leave -------------------------------------------------------------------------------

def test_disconnect_mid_request_frees_the_engine(gated_server):
    gate, engine = gated_server.gate, gated_server.engine
    gate.delay = 0.03
    before = engine.cancelled_total
    body = {"model": MODEL, "prompt": "the cat", "max_tokens": 100, "ignore_eos": True}
    try:
        with pytest.raises(httpx.ReadTimeout):  # non-streaming: the client gives up waiting
            httpx.post(gated_server.base_url + "/v1/completions", json=body, timeout=0.5)
        _wait(lambda: engine.cancelled_total > before)
        for _ in range(3):  # streaming: read one chunk, hang up; repeatedly
            with httpx.stream("POST", gated_server.base_url + "/v1/completions", json={**body, "stream": True},
                              timeout=30) as r:
                next(line for line in r.iter_lines() if line.startswith("data:"))
        _wait(lambda: engine.cancelled_total >= before + 4 and engine.running is None)
    finally:
        gate.delay = 0.0
    r = httpx.post(gated_server.base_url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200 and httpx.get(gated_server.base_url + "/health").json()["status"] == "ok"


def _wait(cond, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


# ---- beyond the schema: any JSON in any field -----------------------------------------------------------

# Fixed: the same cases in every run (derandomize), nothing stored between runs (database=None).
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                      "stream_options", "logprobs", "echo", "n", "best_of", "suffix", "logit_bias", "user",
                      "presence_penalty", "ignore_eos", "x-unknown"]
_CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
                "tool_choice", "response_format", "stream", "stop", "seed", "temperature"]


def _fuzz(http, path: str, base: dict, field: str, value) -> None:
    body = dict(base)
    body[field] = value
    r = http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert _is_openai_error(r), r.text[:300]


@settings(max_examples=120, **FUZZ)
@given(field=st.sampled_from(_COMPLETION_FIELDS), value=_json)
def test_any_json_in_any_completion_field_is_never_5xx(http, field, value):
    _fuzz(http, "/v1/completions", {"model": MODEL, "prompt": "the cat", "max_tokens": 2}, field, value)


@settings(max_examples=80, **FUZZ)
@given(field=st.sampled_from(_CHAT_FIELDS), value=_json)
def test_any_json_in_any_chat_field_is_never_5xx(http, field, value):
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    _fuzz(http, "/v1/chat/completions", base, field, value)


@settings(max_examples=60, **FUZZ)
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_arbitrary_bytes_are_never_5xx(http, raw):
    for path in ("/v1/completions", "/v1/chat/completions"):
        r = http.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500 and _is_openai_error(r), (raw, r.text[:300])
