"""--head int8: the int8 per-row kernel against its reference, and the head swapped at load."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gq_kernels.cpu import build, features
from gq_kernels.cpu.rowint8 import ISA_CODES, dequantize_rows, int8_matmul, quantize_rows

needs_ext = pytest.mark.skipif(not build.status()[0], reason=f"CPU extension unavailable: {build.status()[1]}")
RUNNABLE = [isa for isa in ISA_CODES if features.isa_support(isa)[0]]


def test_quantize_rows_rounds_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(7, 45, generator=g) * torch.rand(7, 1, generator=g)
    w[3] = 0  # a zero row: scale 1, codes 0, no division by zero
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (7,)
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    assert float(s[3]) == 1.0 and not q[3].any()
    assert bool(((dequantize_rows(q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all())
    q2, s2 = quantize_rows(w, chunk_bytes=3 * 45 * 4)  # three rows at a time: the same result
    assert torch.equal(q2, q) and torch.equal(s2, s)


@needs_ext
@pytest.mark.parametrize("isa", RUNNABLE)
@pytest.mark.parametrize("n,k", [(576, 1536), (1536, 576), (37, 100), (5, 17), (9, 1)])
def test_int8_matmul_matches_reference_every_row_count(isa, n, k):
    g = torch.Generator().manual_seed(n * 1000 + k)
    q, s = quantize_rows(torch.randn(n, k, generator=g))
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 9, 20):  # 1..8: the GEMV; 9, 20: the tiled at::mm path
        x = torch.randn(m, k, generator=g)
        ref = x @ dequantize_rows(q, s).T
        out = torch.full((m, n), float("nan"))  # poisoned: every element must be written
        torch.ops.gq_cpu.int8_matmul_out(x, q, s, ISA_CODES[isa], out)
        assert not out.isnan().any(), f"{isa} m={m}: outputs never written"
        bound = 1e-5 * max(float(ref.abs().max()), 1.0)
        assert float((out - ref).abs().max()) <= bound, f"{isa} {n}x{k} m={m}"


@needs_ext
def test_int8_matmul_keeps_dtype_and_shape():
    g = torch.Generator().manual_seed(1)
    q, s = quantize_rows(torch.randn(40, 24, generator=g))
    x = torch.randn(2, 3, 24, generator=g).bfloat16()
    y = int8_matmul(x, q, s, RUNNABLE[0])
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    ref = (x.float() @ dequantize_rows(q, s).T).bfloat16()
    torch.testing.assert_close(y, ref, rtol=1e-2, atol=1e-2)
    assert torch.equal(int8_matmul(x, q, s, None), torch.nn.functional.linear(x, dequantize_rows(q, s).bfloat16()))


@needs_ext
def test_int8_matmul_rejects_bad_tensors():
    q, s = quantize_rows(torch.randn(8, 16))
    with pytest.raises(RuntimeError, match="scale must be a contiguous CPU fp32 \\[N=8\\]"):
        int8_matmul(torch.randn(1, 16), q, s[:4], RUNNABLE[0])
    with pytest.raises(RuntimeError, match="qweight must be a contiguous CPU int8"):
        int8_matmul(torch.randn(1, 16), q.int(), s, RUNNABLE[0])
    with pytest.raises(RuntimeError, match=r"x must be \[\.\.\., 16\]"):
        int8_matmul(torch.randn(1, 15), q, s, RUNNABLE[0])


def test_load_model_head_int8_unties_and_matches_the_rounded_head(tiny_lm_dir):
    from gq_serve.checkpoint import load_model
    from gq_serve.head import Int8Head

    ref = load_model(str(tiny_lm_dir), "cpu", "float32")
    model = load_model(str(tiny_lm_dir), "cpu", "float32", head="int8")
    assert isinstance(model.lm_head, Int8Head) and model.gq_head.startswith("int8")
    assert ref.gq_head == "model"
    q, s = quantize_rows(ref.lm_head.weight.detach())
    assert torch.equal(model.lm_head.qweight, q) and torch.equal(model.lm_head.scale, s)
    ids = torch.tensor([[1, 5, 7, 9, 11, 4]])
    with torch.no_grad():
        hidden = ref.model(ids).last_hidden_state
        want = hidden @ dequantize_rows(q, s).T
        got = model(ids).logits
        dense = ref(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, dense, atol=1e-6)  # the head really is the rounded one
    torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight, rtol=0, atol=0)


def test_tied_head_is_untied_and_the_embedding_keeps_its_values():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gq_serve.head import apply_head

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         tie_word_embeddings=True)).eval()
    emb = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    apply_head(model, "int8")
    assert not model.config.tie_word_embeddings
    assert torch.equal(model.model.embed_tokens.weight, emb)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 50) and torch.isfinite(logits).all()


def test_an_untied_fp16_valued_embedding_is_stored_in_fp16_with_the_same_rows():
    from transformers import LlamaConfig, LlamaForCausalLM

    from gq_serve.head import Fp16Embedding, apply_head, shrink_embedding

    def tiny(tied: bool) -> LlamaForCausalLM:
        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            tie_word_embeddings=tied)).eval()

    model = tiny(tied=True)
    with torch.no_grad():  # a checkpoint saved in fp16, loaded in fp32: every value an fp16 number
        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight.half().float())
    emb = model.model.embed_tokens.weight.detach().clone()
    ids = torch.tensor([[1, 2, 3, 49]])
    with torch.no_grad():
        ref_hidden = model.model(ids).last_hidden_state
    assert not shrink_embedding(model)  # still tied to the head: nothing to gain
    assert apply_head(model, "int8").endswith(", embedding stored in fp16")
    assert isinstance(model.model.embed_tokens, Fp16Embedding)
    assert model.model.embed_tokens.weight16.dtype == torch.float16
    with torch.no_grad():
        rows = model.model.embed_tokens(ids)
        assert rows.dtype == torch.float32 and torch.equal(rows, emb[ids])
        assert torch.equal(model.model(ids).last_hidden_state, ref_hidden)
    # values that are not all fp16 numbers, or an embedding subclass (Gemma scales its rows): kept
    other = tiny(tied=False)
    assert not apply_head(other, "int8").endswith("fp16")
    assert type(other.model.embed_tokens) is torch.nn.Embedding

    class Scaled(torch.nn.Embedding):
        pass

    scaled = tiny(tied=False)
    with torch.no_grad():
        scaled.model.embed_tokens.weight.copy_(scaled.model.embed_tokens.weight.half().float())
    scaled.set_input_embeddings(Scaled.from_pretrained(scaled.model.embed_tokens.weight.detach().clone()))
    assert not shrink_embedding(scaled)


def test_bad_head_choices_are_refused_with_the_fix(tiny_lm_dir):
    from gq_serve.checkpoint import load_model
    from gq_serve.head import apply_head

    with pytest.raises(ValueError, match="unknown head 'int4'; expected one of model, int8"):
        load_model(str(tiny_lm_dir), "cpu", "float32", head="int4")

    class Wrapped(nn.Module):  # a head that is not a plain nn.Linear
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Identity()

        def get_output_embeddings(self):
            return self.lm_head

    with pytest.raises(ValueError, match="not a plain nn.Linear .*drop --head"):
        apply_head(Wrapped(), "int8")

    class OnMeta(Wrapped):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(4, 8, device="meta")

    with pytest.raises(ValueError, match="CPU kernel and the model is on meta; drop --head"):
        apply_head(OnMeta(), "int8")


def test_cli_bench_and_serve_take_head(tiny_lm_dir, tmp_path, capsys):
    from gq_serve.cli import main

    rc = main(["bench", "offline", f"int8head={tiny_lm_dir}", "--head", "int8", "--new-tokens", "4", "--runs", "1",
               "--threads", "1", "-o", str(tmp_path / "b.json")])
    assert rc == 0 and "int8head" in (tmp_path / "b.json").read_text()
    with pytest.raises(SystemExit, match="--head int8 is for --engine hf"):
        main(["serve", str(tiny_lm_dir), "--engine", "vllm", "--head", "int8"])


@needs_ext
def test_int8_matmul_compiles_as_one_op():
    """The static decoder's --compile traces the head: the op has a fake and nothing in the call breaks the graph."""
    from gq_kernels.cpu.rowint8 import best_isa

    g = torch.Generator().manual_seed(2)
    q, s = quantize_rows(torch.randn(64, 32, generator=g))
    isa = best_isa()[0]
    f = torch.compile(lambda x: int8_matmul(x, q, s, isa).relu(), fullgraph=True)
    x = torch.randn(2, 32, generator=g)
    torch.testing.assert_close(f(x), (x @ dequantize_rows(q, s).T).relu(), rtol=1e-5, atol=1e-5)


def test_load_model_head_q8_matches_its_specification(tiny_lm_dir, monkeypatch):
    from gq_kernels.cpu.q8 import dense_q8, dense_q8_reference
    from gq_serve.checkpoint import load_model
    from gq_serve.head import Q8Head

    ok, why = features.isa_support("avx512vnni")
    if not ok:
        with pytest.raises(ValueError, match="--head q8 needs the int8-activation CPU kernel.*use --head int8"):
            load_model(str(tiny_lm_dir), "cpu", "float32", head="q8")
        return
    ref = load_model(str(tiny_lm_dir), "cpu", "float32")
    model = load_model(str(tiny_lm_dir), "cpu", "float32", head="q8")
    assert isinstance(model.lm_head, Q8Head) and model.gq_head.startswith("q8 (int8 activations)")
    q, s = quantize_rows(ref.lm_head.weight.detach())
    u, tscale, tmin = dense_q8(q, s)
    assert torch.equal(model.lm_head.weight_u8, u)
    k = q.shape[1]
    with torch.no_grad():
        hidden = ref.model(torch.tensor([[1, 5, 7, 9, 11, 4]])).last_hidden_state[0]
        for rows in (1, 3, 8):  # the int8-activation GEMV, against its specification
            got = model.lm_head(hidden[:rows])
            want = dense_q8_reference(hidden[:rows], u, tscale, tmin, k)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            exact = hidden[:rows] @ dequantize_rows(q, s).T
            assert ((got - exact).norm() / exact.norm()) < 0.02
        long = torch.cat([hidden] * 2)  # 12 rows: exact, as --head int8 computes
        torch.testing.assert_close(model.lm_head(long), long @ dequantize_rows(q, s).T, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(features, "cpu_flags", lambda: features._cpuinfo()[0] - {"avx512_vnni"})
    with pytest.raises(ValueError, match="lacks avx512_vnni.*use --head int8"):
        load_model(str(tiny_lm_dir), "cpu", "float32", head="q8")
