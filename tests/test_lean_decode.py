"""The lean CPU decoder (gq_serve/lean_decode.py): the same logits and tokens as transformers' forward
and the dynamic loop, for the dense tiny Llama and its packed 3-bit checkpoint; what it refuses."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from gq_serve.checkpoint import load_model
from gq_serve.decode import DynamicDecoder, make_decoder
from gq_serve.engine import Engine
from gq_serve.lean_decode import KVCache, LeanDecoder, LeanLlama, can_implement
from gq_serve.sampling import SamplingParams

REQUESTS = [([1, 5, 6, 7, 8, 9], 20), ([3, 4], 17), ([3, 4, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18], 40)]


def tokens(decoder, prompt, n, **kw):
    sampling = {k: kw.pop(k) for k in ("temperature", "top_p", "prompt_logprobs") if k in kw}
    return list(decoder.iter_tokens(prompt, SamplingParams(max_tokens=n, **sampling), **kw))


def check_logits(model):
    """Prompt logits, then three decode steps, against transformers with a DynamicCache."""
    lean = LeanLlama(model)
    ids = torch.tensor([1, 5, 6, 7, 8, 9, 10])
    with torch.inference_mode():
        cache, ref_cache = lean.new_cache(4, "cpu"), DynamicCache(config=model.config)  # grows to 10
        ref = model(input_ids=ids[None], past_key_values=ref_cache, use_cache=True).logits[0]
        got = lean.forward(ids, cache, all_logits=True)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        for tok in (3, 11, 4):
            ref = model(input_ids=torch.tensor([[tok]]), past_key_values=ref_cache, use_cache=True).logits[0]
            torch.testing.assert_close(lean.forward(torch.tensor([tok]), cache), ref, rtol=1e-4, atol=1e-4)
        assert cache.length == 10 and cache.k.shape[2] == 16  # doubled 4 -> 8 -> 16


def test_logits_match_transformers(tiny_lm):
    check_logits(tiny_lm[0])


def test_logits_match_transformers_quantized(quantized_dir):
    check_logits(load_model(str(quantized_dir), "cpu", "float32"))


@pytest.mark.parametrize("head", ["model", "int8"])
def test_tokens_match_the_dynamic_loop(quantized_dir, head):
    model = load_model(str(quantized_dir), "cpu", "float32", head=head)
    lean, ref = LeanDecoder(model), DynamicDecoder(model)
    for prompt, n in REQUESTS:
        assert tokens(lean, prompt, n) == tokens(ref, prompt, n), (prompt, n)
    kw = dict(temperature=1.0, top_p=0.9)
    sampled = tokens(lean, [3, 4], 17, generator=torch.Generator().manual_seed(5), **kw)
    assert sampled == tokens(ref, [3, 4], 17, generator=torch.Generator().manual_seed(5), **kw)
    # prompt log-probabilities (echo) come from the prefill's logits of every position
    a = tokens(lean, [1, 5, 6, 7], 3, prompt_logprobs=2)
    b = tokens(ref, [1, 5, 6, 7], 3, prompt_logprobs=2)
    assert a == b and a[0].prompt is not None and len(a[0].prompt) == 3
    for x, y in zip(a[0].prompt, b[0].prompt):
        assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-4


def test_a_long_request_grows_its_cache(tiny_lm, monkeypatch):
    import gq_serve.lean_decode as lean_mod

    model, _ = tiny_lm
    monkeypatch.setattr(lean_mod, "INITIAL_NEW_POSITIONS", 4)  # prompt 6 + 4: grows 10 -> 20 -> 40 -> 80
    assert tokens(LeanDecoder(model), [1, 5, 6, 7, 8, 9], 70) == tokens(DynamicDecoder(model), [1, 5, 6, 7, 8, 9], 70)
    assert LeanDecoder(model)._start(6, 1000).k.shape[2] == 10


def test_eos_and_should_stop(tiny_lm):
    model, _ = tiny_lm
    lean = LeanDecoder(model)
    full = tokens(lean, [1, 5, 6], 20)
    eos = full[4]
    assert tokens(lean, [1, 5, 6], 20, eos_ids=[eos]) == full[: full.index(eos) + 1]
    calls = []
    assert len(tokens(lean, [1, 5, 6], 20, should_stop=lambda: calls.append(1) or len(calls) > 5)) == 5
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        tokens(lean, [], 3)


def test_projections_take_one_kernel_call(quantized_dir):
    from torch.profiler import ProfilerActivity, profile

    model = load_model(str(quantized_dir), "cpu", "float32")
    lean = LeanLlama(model)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        lean.forward(torch.tensor([5]), lean.new_cache(2, "cpu"))
    calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("gq_cpu::") and "matmul" in e.key}
    layers = model.config.num_hidden_layers
    # q/k/v, o, gate/up, down: one call each, straight into the extension
    assert calls == {"gq_cpu::bitplane_matmul_multi": 4 * layers}


def small_llama(**cfg) -> LlamaForCausalLM:
    torch.manual_seed(0)
    base = dict(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**{**base, **cfg})).eval()


def test_refuses_what_it_would_compute_wrongly():
    assert can_implement(small_llama()) == (True, None)
    ok, why = can_implement(small_llama(attention_bias=True))
    assert not ok and "bias" in why
    hooked = small_llama()
    hooked.model.layers[0].self_attn.register_forward_pre_hook(lambda m, a: None)
    ok, why = can_implement(hooked)
    assert not ok and "model.layers.0.self_attn" in why
    patched = small_llama()
    patched.forward = lambda *a, **k: None  # e.g. a test's gate around the forward
    ok, why = can_implement(patched)
    assert not ok and "replaced forward on model" in why
    other = small_llama()
    other.config.model_type = "gemma3"
    ok, why = can_implement(other)
    assert not ok and "gemma3" in why
    # --decode lean says why and names the fix; auto takes the dynamic loop instead
    with pytest.raises(ValueError, match="--decode lean cannot run this model: .*use --decode dynamic"):
        make_decoder(other, "lean")
    assert isinstance(make_decoder(other, "auto"), DynamicDecoder)
    assert isinstance(make_decoder(small_llama(), "auto"), LeanDecoder)
    with pytest.raises(ValueError, match="prefills only into an empty cache"):
        lean = LeanLlama(small_llama())
        cache = lean.new_cache(8, "cpu")
        lean.forward(torch.tensor([1, 2]), cache)
        lean.forward(torch.tensor([3, 4]), cache)


def test_kv_cache_keeps_its_prefix_when_it_grows():
    cache = KVCache(2, 1, 4, 3, torch.float32, "cpu")
    cache.k[:, :, :3] = torch.arange(24.0).view(2, 1, 3, 4)
    cache.length = 3
    before = cache.k[:, :, :3].clone()
    cache.reserve(7)
    assert cache.k.shape == (2, 1, 12, 4) and torch.equal(cache.k[:, :, :3], before)
    cache.reserve(5)  # fits: no reallocation
    assert cache.k.shape[2] == 12


def test_engine_decodes_lean_on_the_cpu_by_default(tiny_lm):
    model, tokenizer = tiny_lm
    prompt = tokenizer("the cat sat on the mat").input_ids
    auto = Engine(model, tokenizer, device="cpu", max_queue=4)
    plain = Engine(model, tokenizer, device="cpu", max_queue=4, decode="dynamic")
    try:
        assert auto.decode == "lean" and auto.static_decoder is None and plain.decode == "dynamic"
        for n, kw in ((16, {}), (12, {"temperature": 1.0, "top_p": 0.8, "seed": 3})):
            ours = [e.token_id for e in auto.generate(prompt, max_tokens=n, ignore_eos=True, **kw)]
            ref = [e.token_id for e in plain.generate(prompt, max_tokens=n, ignore_eos=True, **kw)]
            assert ours == ref and len(ours) == n
    finally:
        auto.shutdown()
        plain.shutdown()


def test_int8_activation_kernel_takes_one_call_and_matches_the_dynamic_loop(quantized_dir):
    from torch.profiler import ProfilerActivity, profile

    from gq_kernels.cpu import features

    ok, why = features.isa_support("avx512vnni")
    if not ok:
        pytest.skip(why)
    model = load_model(str(quantized_dir), "cpu", "float32", kernel="lut-cpu-q8")
    assert set(model.gq_kernels) == {"lut-cpu-q8"}
    lean, ref = LeanDecoder(model), DynamicDecoder(model)
    for prompt, n in REQUESTS:
        assert tokens(lean, prompt, n) == tokens(ref, prompt, n), (prompt, n)
    layer = LeanLlama(model)
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        layer.forward(torch.tensor([5]), layer.new_cache(2, "cpu"))
    calls = {e.key: e.count for e in prof.key_averages() if e.key.startswith("gq_cpu::") and "matmul" in e.key}
    assert calls == {"gq_cpu::bitplane_q8_matmul_multi": 4 * model.config.num_hidden_layers}


def test_fused_step_ops_equal_the_pytorch_expressions():
    from gq_serve.lean_decode import attention, rms_norm, rotate, silu_mul

    g = torch.Generator().manual_seed(0)
    norm = torch.nn.Module()
    norm.weight, norm.variance_epsilon = torch.nn.Parameter(torch.randn(40, generator=g)), 1e-5
    for t in (1, 3):
        x = torch.randn(t, 40, generator=g) * 3
        torch.testing.assert_close(rms_norm(x, norm, fused=True), rms_norm(x, norm), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(rms_norm(x[-1:], norm, fused=True), rms_norm(x[-1:], norm), rtol=1e-6, atol=1e-6)
        qkv = torch.randn(t, 5 * 8 + 3, generator=g)  # a q slice of a wider row, as in the step
        q = qkv[:, : 5 * 8].view(t, 5, 8)
        cos, sin = torch.randn(t, 1, 8, generator=g), torch.randn(t, 1, 8, generator=g)
        torch.testing.assert_close(rotate(q, cos, sin, fused=True), rotate(q, cos, sin), rtol=1e-6, atol=1e-6)
        gate_up = torch.randn(t, 2 * 24, generator=g) * 4
        torch.testing.assert_close(silu_mul(gate_up, fused=True), silu_mul(gate_up), rtol=1e-5, atol=1e-6)
    for nq, nkv, s in ((6, 2, 1), (6, 3, 37), (4, 4, 300)):
        cache_k, cache_v = torch.randn(nkv, 400, 16, generator=g), torch.randn(nkv, 400, 16, generator=g)
        q = torch.randn(1, nq, 16, generator=g)
        keys, values = cache_k[:, :s], cache_v[:, :s]  # the cache's views: rows contiguous, heads strided
        got = attention(q, keys, values, 0.25, causal=False, fused=True)
        torch.testing.assert_close(got, attention(q, keys, values, 0.25, causal=False), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="H a multiple of KV"):
        torch.ops.gq_cpu.decode_attention(torch.randn(5, 16), keys, values, 0.25)


def test_fused_and_pytorch_steps_agree(quantized_dir, monkeypatch):
    import gq_serve.lean_decode as lean_mod

    model = load_model(str(quantized_dir), "cpu", "float32")
    assert lean_mod.fused_ok(torch.zeros(1))
    fused = tokens(LeanDecoder(model), [1, 5, 6, 7], 30)
    monkeypatch.setattr(lean_mod, "fused_ok", lambda h: False)
    assert tokens(LeanDecoder(model), [1, 5, 6, 7], 30) == fused
