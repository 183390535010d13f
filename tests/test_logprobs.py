"""logprobs / top_logprobs on both endpoints, echo on /v1/completions, batched prompts, and
lm-evaluation-harness against `gq serve` (issue 13).

Log-probabilities are the model's (fp32 log-softmax of the logits): both decoders must give the
ones a plain full forward gives, and lm_eval's `local-completions` backend must score a local task
exactly as its own HF backend does on the same checkpoint.
"""
from __future__ import annotations

import json
import math

import httpx
import openai
import pytest
import torch

from gq_serve.decode import DynamicDecoder
from gq_serve.sampling import SampledToken, SamplingParams
from gq_serve.static_decode import StaticDecoder

MODEL = "tiny-llama"
PROMPT = "the cat sat on the mat"
FIXED = {"ignore_eos": True}


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t+1] | ids[:t+1]) for every t, from one full forward (no cache): [len(ids) - 1]."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return lp[:-1].gather(-1, torch.tensor(ids[1:]).unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("decoder_cls", ["dynamic", "static"])
def test_decoders_give_the_full_forward_logprobs(tiny_lm, decoder_cls):
    model, _ = tiny_lm
    dec = DynamicDecoder(model) if decoder_cls == "dynamic" else StaticDecoder(model, 128, min_bucket=32)
    prompt = [1, 5, 6, 7, 8, 9, 10]
    params = SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=2)
    tokens = list(dec.iter_tokens(prompt, params))
    assert all(isinstance(t, SampledToken) for t in tokens)
    ref = reference_logprobs(model, prompt + [int(t) for t in tokens])
    got_prompt = [lp.logprob for lp in tokens[0].prompt]
    got_gen = [t.logprob.logprob for t in tokens]
    assert [lp.token for lp in tokens[0].prompt] == prompt[1:]
    torch.testing.assert_close(torch.tensor(got_prompt + got_gen), ref, atol=1e-4, rtol=1e-4)
    for t in tokens:  # greedy: the chosen token is the most likely one, and tops are sorted
        assert len(t.logprob.top) == 3 and t.logprob.top[0][0] == int(t)
        assert [v for _, v in t.logprob.top] == sorted((v for _, v in t.logprob.top), reverse=True)
    assert all(len(lp.top) == 2 for lp in tokens[0].prompt)
    assert tokens[1].prompt is None
    # without logprobs the decoders yield plain ints, the same tokens
    plain = list(dec.iter_tokens(prompt, SamplingParams(max_tokens=6)))
    assert plain == tokens and not any(isinstance(t, SampledToken) for t in plain)


def test_dynamic_and_static_logprobs_agree_when_sampling(tiny_lm):
    model, _ = tiny_lm
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, logprobs=2)
    runs = []
    for dec in (DynamicDecoder(model), StaticDecoder(model, 128, min_bucket=32)):
        toks = list(dec.iter_tokens([3, 4, 5], params, generator=torch.Generator().manual_seed(3)))
        runs.append([(int(t), round(t.logprob.logprob, 4)) for t in toks])
    assert runs[0] == runs[1]


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.base_url + "/v1", api_key=tiny_server.api_key,
                         max_retries=0, timeout=30)


def test_completion_logprobs_shape(client, tiny_lm):
    model, tokenizer = tiny_lm
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2,
                                  extra_body=FIXED)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    # each token's own text (as vLLM reports it: the token decoded alone)
    gen_ids = [tokenizer.convert_tokens_to_ids(t) for t in lp.tokens]
    assert tokenizer.decode(gen_ids) == r.choices[0].text.strip()
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) <= 2 and math.isclose(max(top.values()), chosen, abs_tol=1e-6)
    prompt_ids = tokenizer(PROMPT).input_ids
    ref = reference_logprobs(model, prompt_ids + gen_ids)[len(prompt_ids) - 1:]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), ref, atol=1e-4, rtol=1e-4)


def test_echo_returns_prompt_logprobs(client, tiny_lm):
    """What lm_eval's loglikelihood sends: token ids, echo, logprobs=1, max_tokens=1."""
    model, tokenizer = tiny_lm
    ids = tokenizer(PROMPT).input_ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=1, echo=True,
                                  seed=1234)
    c = r.choices[0]
    assert c.text.startswith(tokenizer.decode(ids))
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    ref = reference_logprobs(model, ids)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]), ref, atol=1e-4, rtol=1e-4)
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    # echo without logprobs: the text only
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, echo=True)
    assert r.choices[0].text.startswith(PROMPT) and r.choices[0].logprobs is None


def test_stream_logprobs_equal_non_stream(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=1, extra_body=FIXED)
    full = client.completions.create(**kw).choices[0].logprobs
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    tokens = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == full.tokens and values == pytest.approx(full.token_logprobs)
    echoed = [c for c in client.completions.create(stream=True, echo=True, **kw) if c.choices]
    assert echoed[0].choices[0].text == PROMPT and echoed[0].choices[0].logprobs.token_logprobs[0] is None


def test_chat_logprobs(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "hello world"}], max_tokens=4, temperature=0,
              extra_body=FIXED)
    r = client.chat.completions.create(logprobs=True, top_logprobs=3, **kw)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    assert r.choices[0].message.content.startswith(content[0].token)
    for e in content:
        assert len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token
    streamed = [c for c in client.chat.completions.create(logprobs=True, stream=True, **kw) if c.choices]
    entries = [e for c in streamed if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in entries] == [e.token for e in content]
    assert client.chat.completions.create(**kw).choices[0].logprobs is None


def test_batched_prompts_are_one_choice_each(client, tiny_lm):
    _, tokenizer = tiny_lm
    prompts = ["the cat", "a dog ran", ""]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=3, temperature=0,
                                         extra_body=FIXED).choices[0].text for p in prompts]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0, extra_body=FIXED)
    assert [c.index for c in r.choices] == [0, 1, 2] and [c.text for c in r.choices] == singles
    assert r.usage.completion_tokens == 9
    ids = [tokenizer(p).input_ids for p in prompts[:2]]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, temperature=0, extra_body=FIXED)
    assert [c.text for c in r.choices] == singles[:2]
    chunks = [c for c in client.completions.create(model=MODEL, prompt=prompts, max_tokens=3, temperature=0,
                                                   extra_body=FIXED, stream=True) if c.choices]
    by_index = {}
    for c in chunks:
        by_index[c.choices[0].index] = by_index.get(c.choices[0].index, "") + c.choices[0].text
    assert [by_index[i] for i in range(3)] == singles


def test_logprobs_limits_are_400(tiny_server):
    headers = {"Authorization": f"Bearer {tiny_server.api_key}"}
    for body in ({"prompt": "x", "logprobs": 21}, {"prompt": "x", "logprobs": True},
                 {"prompt": "x", "echo": 1}, {"messages": [{"role": "user", "content": "x"}], "top_logprobs": -1}):
        url = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
        r = httpx.post(tiny_server.base_url + url, json={"model": MODEL, **body}, headers=headers)
        assert r.status_code == 400, (body, r.text)


# ---- lm-evaluation-harness -----------------------------------------------------------------------

MC_DOCS = [
    {"question": "the cat sat on the", "choices": ["mat", "tree", "dog"], "answer": 0},
    {"question": "the dog ran under the", "choices": ["house", "bird"], "answer": 1},
    {"question": "hello", "choices": ["world", "night", "red blue"], "answer": 0},
    {"question": "one two three", "choices": ["four", "five", "big"], "answer": 0},
]
GEN_DOCS = [{"prompt": "one two three", "target": "four"}, {"prompt": "red blue", "target": "green"}]


def _write_tasks(root) -> None:
    """Two local lm_eval tasks (no hub): a multiple-choice (loglikelihood) and a generate_until one."""
    for name, docs in (("mc", MC_DOCS), ("gen", GEN_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = "dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
    (root / "mc.yaml").write_text(
        "task: gq_tiny_mc\n" + common.format(path=root / "mc.jsonl")
        + "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
          "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / "gen.yaml").write_text(
        "task: gq_tiny_gen\n" + common.format(path=root / "gen.jsonl")
        + "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
          "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 6\n  do_sample: false\n"
          "metric_list:\n  - metric: exact_match\n")


def test_lm_eval_against_gq_serve_matches_its_hf_backend(quantized_dir, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    from conftest import ThreadedServer
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine
    from gq_serve.server import create_app

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    _write_tasks(tmp_path)
    tasks = TaskManager(include_path=str(tmp_path))
    names = ["gq_tiny_mc", "gq_tiny_gen"]
    # lm_eval's own HF backend: transformers loads the GuidedQuant checkpoint (gq_serve's quantizer).
    hf = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={quantized_dir},dtype=float32",
                                 tasks=names, task_manager=tasks, device="cpu", batch_size=1, log_samples=True)
    engine = Engine(load_model(str(quantized_dir), "cpu", "float32"), load_tokenizer(str(quantized_dir)), "cpu")
    srv = ThreadedServer(create_app(engine, "q"), engine)
    try:
        api = lm_eval.simple_evaluate(
            model="local-completions", task_manager=tasks, tasks=names, log_samples=True,
            model_args=f"model=q,base_url={srv.base_url}/v1/completions,tokenizer={quantized_dir},"
                       f"tokenizer_backend=huggingface,max_length=128")
    finally:
        srv.stop()
    assert api["results"]["gq_tiny_mc"]["acc,none"] == hf["results"]["gq_tiny_mc"]["acc,none"]
    assert api["results"]["gq_tiny_gen"]["exact_match,none"] == hf["results"]["gq_tiny_gen"]["exact_match,none"]
    # every loglikelihood the server gave equals the HF backend's, and so does every generation
    ours = [r[0] for s in api["samples"]["gq_tiny_mc"] for r in s["resps"]]
    theirs = [r[0] for s in hf["samples"]["gq_tiny_mc"] for r in s["resps"]]
    assert len(ours) == sum(len(d["choices"]) for d in MC_DOCS)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in theirs], abs=1e-4)
    assert [s["resps"] for s in api["samples"]["gq_tiny_gen"]] == [s["resps"] for s in hf["samples"]["gq_tiny_gen"]]
