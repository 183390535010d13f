"""Static-cache decode (gq_serve/static_decode.py): same tokens as the dynamic loop, cache reuse
across requests, stop/cancel, too-long requests, and the --decode option in engine, bench, serve.

On the CPU the static path runs eagerly (no CUDA graph); the `gpu` test checks the captured graph.
"""

import json

import pytest
import torch

from gq_serve.bench import bench_offline
from gq_serve.checkpoint import load_model, load_tokenizer
from gq_serve.cli import build_parser
from gq_serve.decode import DynamicDecoder, resolve_decode_mode
from gq_serve.engine import ContextTooLong, Engine
from gq_serve.sampling import SamplingParams
from gq_serve.static_decode import StaticDecoder, _decode_step, bucket_sizes

# (prompt, max_new_tokens): two requests in the same 32-token bucket (the second, shorter one proves
# the reset: without it, it would continue at the first one's positions), then one growing into 64.
REQUESTS = [([1, 5, 6, 7, 8, 9], 20), ([3, 4], 17), ([3, 4, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], 40)]


def run(decoder, prompt, n, temperature=0.0, top_p=1.0, **kw):
    """decoder.iter_tokens for a request of n tokens (kw: generator, eos_ids, should_stop)."""
    return decoder.iter_tokens(prompt, SamplingParams(max_tokens=n, temperature=temperature, top_p=top_p), **kw)


def dynamic(model, prompt, n, **kw):
    return list(run(DynamicDecoder(model), prompt, n, **kw))


@pytest.fixture(scope="module")
def decoder(tiny_lm):
    model, _ = tiny_lm
    return StaticDecoder(model, 128, min_bucket=32)


def test_buckets(decoder):
    assert bucket_sizes(128, 32) == [32, 64, 128]
    assert bucket_sizes(1000, 256) == [256, 512, 1000]
    assert bucket_sizes(100, 256) == [100]
    assert decoder.mode == "static" and not decoder.cuda_graph and not decoder.compile
    assert [decoder.bucket_for(n) for n in (1, 32, 33, 128, 129)] == [32, 32, 64, 128, None]
    assert decoder._growable  # Llama: plain StaticLayers
    assert decoder._first_bucket(40, 80) == 64  # prompt + first decode step; grows later
    decoder._growable = False  # e.g. sliding-window layers: sized for the whole request up front
    try:
        assert decoder._first_bucket(40, 80) == 128
    finally:
        decoder._growable = True


def test_greedy_matches_dynamic_across_requests(tiny_lm, decoder):
    model, _ = tiny_lm
    for prompt, n in REQUESTS + REQUESTS[:1]:
        expected = dynamic(model, prompt, n)
        assert len(expected) == n
        assert list(run(decoder, prompt, n)) == expected, (prompt, n)
    assert set(decoder._slots) == {32, 64}  # buckets built once, then reused


def test_request_grows_through_buckets(tiny_lm):
    model, _ = tiny_lm
    dec = StaticDecoder(model, 128, min_bucket=16)
    prompt = [1, 5, 6, 7, 8, 9]
    expected = dynamic(model, prompt, 100)
    assert list(run(dec, prompt, 100)) == expected  # 105 entries: 16 -> 32 -> 64 -> 128
    assert set(dec._slots) == {16, 32, 64, 128}
    # a long prompt starts in a larger bucket; chat-style max_tokens (the rest of the context)
    # starts small all the same
    assert list(run(dec, list(range(3, 40)), 20)) == dynamic(model, list(range(3, 40)), 20)
    assert list(run(dec, prompt, 122))[:100] == expected


def test_seeded_sampling_matches_dynamic(tiny_lm, decoder):
    model, _ = tiny_lm
    for prompt, n in REQUESTS[:2]:
        expected = dynamic(model, prompt, n, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(5))
        ours = list(run(decoder, prompt, n, temperature=1.0, top_p=0.9,
                                        generator=torch.Generator().manual_seed(5)))
        assert ours == expected
        assert ours != dynamic(model, prompt, n)  # it did sample


def test_eos_and_should_stop(tiny_lm, decoder):
    model, _ = tiny_lm
    prompt, n = REQUESTS[0]
    full = dynamic(model, prompt, n)
    eos = full[4]
    cut = full[: full.index(eos) + 1]
    assert list(run(decoder, prompt, n, eos_ids=[eos])) == cut == dynamic(model, prompt, n, eos_ids=[eos])

    calls = []

    def stop_after_5():
        calls.append(1)
        return len(calls) > 5

    assert list(run(decoder, prompt, n, should_stop=stop_after_5)) == full[:5]
    assert len(calls) == 6  # checked before every forward, the prefill included
    # A consumer that walks away mid-request (the engine on cancel): the next request starts clean.
    it = run(decoder, prompt, n)
    assert [next(it) for _ in range(3)] == full[:3]
    it.close()
    assert list(run(decoder, *REQUESTS[1])) == dynamic(model, *REQUESTS[1])


def test_newer_request_invalidates_older_generator(decoder):
    first = run(decoder, *REQUESTS[0])
    next(first)
    second = run(decoder, *REQUESTS[1])
    next(second)
    with pytest.raises(RuntimeError, match="one request at a time"):
        next(first)
    second.close()


def test_too_long_falls_back_to_dynamic(tiny_lm):
    model, _ = tiny_lm
    small = StaticDecoder(model, 24, min_bucket=16)
    prompt = list(range(3, 15))  # 12 + 13 - 1 = 24 entries: fits; 12 + 14 - 1 = 25: does not
    assert list(run(small, prompt, 13)) == dynamic(model, prompt, 13) and small.fallbacks == 0
    assert list(run(small, prompt, 14)) == dynamic(model, prompt, 14) and small.fallbacks == 1
    assert set(small._slots) == {16, 24}
    with pytest.raises(ValueError, match="empty"):
        next(run(small, [], 3))


def test_failed_capture_degrades_and_still_decodes(tiny_lm, monkeypatch, caplog):
    """The fallback bookkeeping (CPU stand-in: _capture_once is stubbed)."""
    model, _ = tiny_lm
    tried = []

    def capture_once(self, slot, compiled):
        tried.append(compiled)
        if compiled or len(tried) > 2:  # compiled capture fails; the eager one works once only
            raise RuntimeError("capture failed")

    monkeypatch.setattr(StaticDecoder, "_capture_once", capture_once)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    dec = StaticDecoder(model, 64, min_bucket=32)
    dec.cuda_graph = dec.compile = True  # as on a GPU
    prompt, n = REQUESTS[0]
    with caplog.at_level("WARNING", logger="gq_serve.static_decode"):
        assert list(run(dec, prompt, n)) == dynamic(model, prompt, n)  # bucket 32
        assert dec.slot_mode(len(prompt), n) == "static+cuda_graph" and tried == [True, False]
        assert list(run(dec, prompt, 40)) == dynamic(model, prompt, 40)  # grows into 64
        assert dec.slot_mode(len(prompt), 40) == "static" and tried == [True, False, True, False]
    assert "compiled CUDA graph capture of the 64-token bucket failed" in caplog.text


def test_quantized_checkpoint_matches_dynamic(quantized_dir):
    from gq_serve.quant_linear import GQLinear

    model = load_model(str(quantized_dir), "cpu", "float32")
    assert any(isinstance(m, GQLinear) for m in model.modules())
    dec = StaticDecoder(model, 64, min_bucket=32)
    for prompt, n in REQUESTS[:2]:
        assert list(run(dec, prompt, n)) == dynamic(model, prompt, n)


def test_cpu_compiled_step_matches_dynamic(quantized_dir):
    """compile=True on the CPU: the packed kernels' ops inside an Inductor-compiled step give the
    dynamic loop's tokens, across requests and a bucket change."""
    import torch._dynamo

    model = load_model(str(quantized_dir), "cpu", "float32")
    torch._dynamo.reset()
    try:
        dec = StaticDecoder(model, 64, min_bucket=32, compile=True)
        assert dec.mode == "static+compile"
        for prompt, n in REQUESTS[:2] + [([3, 4, 9, 10], 40)]:
            assert list(run(dec, prompt, n)) == dynamic(model, prompt, n), (prompt, n)
        assert dec.slot_mode(4, 40) == "static+compile"
        assert all(s.step is not None for s in dec._slots.values())
    finally:
        torch._dynamo.reset()


def test_step_traces_as_one_graph_for_every_position(tiny_lm):
    """CPU stand-in for the CUDA-graph precondition: the decode step traces with no graph break (no
    host sync) and without recompiling as the position advances (it lives on the device)."""
    import torch._dynamo

    model, _ = tiny_lm
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = torch.compile(_decode_step, fullgraph=True, dynamic=False, backend="aot_eager")
    prompt, n = REQUESTS[0]
    dec = StaticDecoder(model, 32)
    with torch.inference_mode():
        slot = dec._slot(32)
        slot.cache.reset()
        logits = dec._forward(slot, torch.tensor([prompt]))
        tokens = []
        for _ in range(n):
            tokens.append(int(torch.argmax(logits)))
            slot.input_ids.fill_(tokens[-1])
            logits = step(model, slot.input_ids, slot.cache)
    assert tokens == dynamic(model, prompt, n)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


# ---- the --decode option ----------------------------------------------------------------------


def test_resolve_decode_mode():
    assert resolve_decode_mode("auto", "cpu") == "lean"  # make_decoder: dynamic where lean does not apply
    assert resolve_decode_mode("auto", torch.device("cuda", 0)) == "static"
    assert resolve_decode_mode("static", "cpu") == "static"
    with pytest.raises(ValueError, match="auto, static, dynamic, lean"):
        resolve_decode_mode("graph", "cpu")


def test_engine_static_decode(tiny_lm):
    model, tokenizer = tiny_lm
    prompt = tokenizer("the cat sat on the mat").input_ids
    static = Engine(model, tokenizer, device="cpu", max_queue=4, decode="static")
    plain = Engine(model, tokenizer, device="cpu", max_queue=4, decode="dynamic")
    try:
        assert static.decode == "static" and static.static_decoder is not None
        assert plain.decode == "dynamic" and plain.static_decoder is None
        assert static.static_decoder.max_len == static.max_model_len == 128
        for n, kw in ((16, {}), (9, {}), (12, {"temperature": 1.0, "top_p": 0.8, "seed": 3})):
            ours = [e.token_id for e in static.generate(prompt, max_tokens=n, ignore_eos=True, **kw)]
            ref = [e.token_id for e in plain.generate(prompt, max_tokens=n, ignore_eos=True, **kw)]
            assert ours == ref and len(ours) == n
        assert static.static_decoder._request == 3  # the requests did go through the static decoder
        with pytest.raises(ContextTooLong, match="maximum context length is 128"):
            static.submit(list(range(3, 13)), max_tokens=119)
        # the longest admitted request still fits the static cache: no dynamic fallback
        assert len(list(static.generate(list(range(3, 13)), max_tokens=118, ignore_eos=True))) == 118
        assert static.static_decoder.fallbacks == 0
    finally:
        static.shutdown()
        plain.shutdown()


def test_bench_offline_static(tiny_lm):
    model, tokenizer = tiny_lm
    rows = bench_offline({"dyn": (model, tokenizer), "static": (model, tokenizer)}, new_tokens=6, runs=1)
    assert [r["decode"] for r in rows] == ["lean", "lean"]  # auto on the CPU, a Llama model
    rows = bench_offline({"static": (model, tokenizer)}, new_tokens=6, runs=1, decode="static")
    assert rows[0]["decode"] == "static" and rows[0]["tok_per_s"] > 0


def test_bench_cli_decode_flag(tiny_lm_dir, tmp_path, capsys):
    parser = build_parser()
    out = tmp_path / "offline.json"
    args = parser.parse_args(["bench", "offline", f"tiny={tiny_lm_dir}", "--new-tokens", "4", "--runs", "1",
                              "--dtype", "float32", "--decode", "static", "-o", str(out)])
    args.func(args)
    assert json.loads(out.read_text())["rows"][0]["decode"] == "static"
    assert "tok/s" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "offline", str(tiny_lm_dir), "--decode", "graph"])


def test_serve_decode_flag_reaches_engine(tiny_lm_dir, monkeypatch):
    import gq_serve.engine as engine_mod
    import gq_serve.lifecycle as lifecycle
    import gq_serve.server as server
    from gq_serve.cli import main

    made = {}

    class FakeEngine:
        def __init__(self, *args, **kwargs):
            made.update(kwargs)

        def shutdown(self):
            made["shutdown"] = True

    monkeypatch.setattr(engine_mod, "Engine", FakeEngine)
    monkeypatch.setattr(server, "create_app", lambda engine, name, **kw: None)
    monkeypatch.setattr(lifecycle, "run_server", lambda app, engine, *a, **kw: engine.shutdown())
    main(["serve", str(tiny_lm_dir), "--decode", "static"])
    assert made["decode"] == "static" and made["shutdown"]
    main(["serve", str(tiny_lm_dir)])
    assert made["decode"] == "auto"


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("compile_step", [False, True], ids=["graph", "graph+compile"])
def test_cuda_graph_matches_dynamic(tiny_lm_dir, compile_step, monkeypatch):
    model = load_model(str(tiny_lm_dir), "cuda", "float32")
    dec = StaticDecoder(model, 128, min_bucket=32, compile=compile_step)
    assert dec.cuda_graph
    for prompt, n in REQUESTS + REQUESTS[:1]:
        expected = dynamic(model, prompt, n)
        assert list(run(dec, prompt, n)) == expected, (prompt, n)
        # the graph really ran: a failed capture degrades to "static" and must not pass this test
        mode = "static+cuda_graph+compile" if compile_step else "static+cuda_graph"
        assert dec.slot_mode(len(prompt), n) == mode
    seeded = dict(temperature=1.0, top_p=0.9)
    ours = list(run(dec, REQUESTS[1][0], 16, generator=torch.Generator("cuda").manual_seed(1), **seeded))
    ref = dynamic(model, REQUESTS[1][0], 16, generator=torch.Generator("cuda").manual_seed(1), **seeded)
    assert ours == ref
    if compile_step:
        return
    # auto -> static on CUDA; one more compile would only cost time here
    engine = Engine(model, load_tokenizer(str(tiny_lm_dir)), device="cuda", compile=False)
    try:
        assert engine.decode == "static" and engine.static_decoder.mode == "static+cuda_graph"
        ours = [e.token_id for e in engine.generate(REQUESTS[0][0], max_tokens=20, ignore_eos=True)]
        assert ours == dynamic(model, REQUESTS[0][0], 20)
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_quantized_matches_dynamic(quantized_dir):
    """GQLinear's CUDA ops (decode GEMV, fp16) inside the captured graph."""
    model = load_model(str(quantized_dir), "cuda", "float16")
    dec = StaticDecoder(model, 64, min_bucket=32, compile=False)
    for prompt, n in REQUESTS[:2]:
        assert list(run(dec, prompt, n)) == dynamic(model, prompt, n), (prompt, n)
        assert dec.slot_mode(len(prompt), n) == "static+cuda_graph"
