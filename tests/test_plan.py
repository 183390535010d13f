"""`gq plan` (gq_serve/plan.py, `gq plan` in gq_serve/cli.py): every expected value below is
worked out by hand from the models' config.json values and the formats' layouts, not by the code."""
from __future__ import annotations

import json
import math

import pytest

from gq_kernels.registry import format_names, get_format
from gq_serve import plan
from gq_serve.cli import main

GIB = 2**30
L2 = plan.BUNDLED_MODELS["Llama-2-7B"]

# Llama-2-7B: 32 layers x (q, k, v, o 4096x4096 + gate, up 11008x4096 + down 4096x11008),
# embed_tokens + untied lm_head 32000x4096, 2 RMSNorms per layer + the final one.
L2_LINEAR_PARAMS = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
L2_DENSE_PARAMS = 2 * 32000 * 4096 + 65 * 4096
L2_PARAMS = L2_LINEAR_PARAMS + L2_DENSE_PARAMS
L2_FP16_BYTES = 2 * L2_PARAMS
L2_KV = 2 * 32 * 32 * 128 * 2  # K and V, layers, KV heads, head dim, fp16


def row(rows, label):
    (r,) = [r for r in rows if r["label"] == label]
    return r


# --------------------------------------------------------------------------------- model arithmetic
def test_llama2_7b_fp16_weights_by_hand():
    assert L2_PARAMS == 6_738_415_616  # the published parameter count of Llama-2-7B
    assert plan.parameter_count(L2) == L2_PARAMS
    w = plan.weight_bytes(L2, plan.Variant("fp16", 16))
    assert w["total"] == L2_FP16_BYTES == 13_476_831_232
    assert w["linears"] == 2 * L2_LINEAR_PARAMS and w["embed_tokens"] == 2 * 32000 * 4096


def test_bundled_configs_match_published_parameter_counts():
    published = {"Llama-2-7B": 6_738_415_616, "Llama-2-13B": 13_015_864_320, "Llama-3-8B": 8_030_261_248,
                 "Qwen2.5-7B": 7_615_616_512, "Qwen2.5-14B": 14_770_033_664, "Qwen2.5-32B": 32_763_876_352}
    assert {n: plan.parameter_count(m) for n, m in plan.BUNDLED_MODELS.items()} == published


def test_kv_cache_per_token():
    assert plan.kv_bytes_per_token(L2) == L2_KV == 524_288
    # GQA: Qwen2.5-7B has 4 KV heads of 128 over 28 layers, Qwen2.5-14B 8 over 48, Llama-3-8B 8 over 32.
    assert plan.kv_bytes_per_token(plan.BUNDLED_MODELS["Qwen2.5-7B"]) == 2 * 28 * 4 * 128 * 2 == 57_344
    assert plan.kv_bytes_per_token(plan.BUNDLED_MODELS["Qwen2.5-14B"]) == 2 * 48 * 8 * 128 * 2 == 196_608
    assert plan.kv_bytes_per_token(plan.BUNDLED_MODELS["Llama-3-8B"]) == 2 * 32 * 8 * 128 * 2 == 131_072


def test_qwen2_counts_qkv_bias():
    q7 = plan.BUNDLED_MODELS["Qwen2.5-7B"]
    assert plan.dense_parts(q7) == {"embed_tokens": 152064 * 3584, "lm_head": 152064 * 3584,
                                    "norms": 57 * 3584, "biases": 28 * (3584 + 512 + 512)}
    assert plan.dense_parts(L2)["biases"] == 0


def test_lut_3bit_weights_by_hand():
    # lut 3-bit, one [out, in] linear: qweight int32 [3, out, ceil(in/32)] + codebook fp16 [out, 8].
    qkvo = 3 * 4096 * (4096 // 32) * 4 + 4096 * 8 * 2  # 6_356_992 bytes each
    gate_up = 3 * 11008 * (4096 // 32) * 4 + 11008 * 8 * 2  # 17_084_416 each
    down = 3 * 4096 * math.ceil(11008 / 32) * 4 + 4096 * 8 * 2  # 16_973_824
    layer = 4 * qkvo + 2 * gate_up + down
    assert layer == 76_570_624
    variant = plan.Variant("lut", 3, plan.format_params("lut", 3))
    assert plan.linear_bytes(variant, 4096, 11008) == down
    w = plan.weight_bytes(L2, variant)
    assert w["linears"] == 32 * layer
    assert w["total"] == 32 * layer + 2 * L2_DENSE_PARAMS == 2_975_080_448
    rows = plan.plan_rows("llama-2-7b", cards=["RTX 4090"], formats=["lut"], bits=[3])
    assert [r["label"] for r in rows] == ["lut 3-bit"] and rows[0]["weights_bytes"] == 2_975_080_448


def test_grouped_format_uses_group_size_128():
    # bcq takes a group size: scales and offsets fp16 [out, ceil(in/128)] next to the bit planes.
    v = plan.Variant("bcq", 3, plan.format_params("bcq", 3))
    assert v.group_size == 128 and v.label == "bcq 3-bit g128"
    assert plan.linear_bytes(v, 4096, 4096) == 3 * 4096 * 128 * 4 + 2 * 4096 * 32 * 2


def test_variants_follow_the_registry():
    variants = plan.format_variants()
    want = [("fp16", 16)] + [(f, b) for f in format_names()
                             for b in sorted(get_format(f).Params.supported_bits, reverse=True)]
    assert [(v.format, v.bits) for v in variants] == want
    three = plan.format_variants(bits=[3])
    assert [(v.format, v.bits) for v in three] == [(f, b) for f, b in want if b == 3]
    with pytest.raises(ValueError, match="unknown format 'nope'; formats: fp16"):
        plan.format_variants(formats=["nope"])
    with pytest.raises(ValueError, match=r"supported bits: lut: \[2, 3, 4, 8\]"):
        plan.format_variants(formats=["lut"], bits=[5])


# ----------------------------------------------------------------------------------- fit and bound
def test_fit_on_rtx_4090_by_hand():
    r = row(plan.plan_rows("Llama-2-7B", cards=["RTX 4090"], formats=["fp16"]), "fp16")
    free = 24 * GIB - int(1.5 * GIB) - L2_FP16_BYTES  # 10_682_359_808 bytes
    tokens = free // L2_KV
    assert tokens == 20_374
    assert r["fits"] and r["max_kv_tokens"] == tokens
    assert r["max_context_batch1"] == 4096  # capped at max_position_embeddings
    assert r["context"] == 4096 and r["max_batch_at_context"] == tokens // 4096 == 4
    assert r["free_gib"] == pytest.approx(free / GIB)


def test_decode_bound_by_hand():
    r = row(plan.plan_rows("llama-2-7b", cards=["rtx4090"], formats=["fp16"]), "fp16")
    # read per token: every weight but the input embedding table, plus the KV cache of 4096 tokens.
    read = L2_FP16_BYTES - 2 * 32000 * 4096 + L2_KV * 4096
    assert r["decode_bytes_per_token"] == read == 15_362_170_880
    assert r["decode_tok_s_bound"] == pytest.approx(1008e9 / read)
    assert 65 < r["decode_tok_s_bound"] < 66
    r = row(plan.plan_rows("llama-2-7b", cards=["4090"], formats=["fp16"], context=2048), "fp16")
    assert r["context"] == 2048 and r["decode_tok_s_bound"] == pytest.approx(1008e9 / (read - L2_KV * 2048))


def test_reserve_context_cap_and_does_not_fit():
    # RTX 4060 Ti 16GB, fp16 Llama-2-7B: 3990 tokens fit, so no full 4096 context and no bound.
    r = row(plan.plan_rows("llama-2-7b", cards=["RTX 4060 Ti 16GB"], formats=["fp16"]), "fp16")
    assert r["max_kv_tokens"] == (16 * GIB - int(1.5 * GIB) - L2_FP16_BYTES) // L2_KV == 3990
    assert r["fits"] and r["max_batch_at_context"] == 0 and r["decode_tok_s_bound"] is None
    # A larger reserve shrinks it by reserve / kv_per_token tokens.
    r2 = row(plan.plan_rows("llama-2-7b", cards=["RTX 4060 Ti 16GB"], formats=["fp16"], reserve_gib=2), "fp16")
    assert r2["max_kv_tokens"] == 3990 - GIB // 2 // L2_KV
    # Qwen2.5-32B in fp16 (61 GiB) fits on none of the cards.
    rows = plan.plan_rows("qwen2.5-32b", formats=["fp16"])
    assert len(rows) == 4 and not any(r["fits"] for r in rows)
    assert all(r["max_context_batch1"] == 0 and r["decode_tok_s_bound"] is None for r in rows)
    assert "does not fit" in plan.render_table(rows)
    # Long-context models: capped at max_position_embeddings (Qwen2.5-7B fp16 on an RTX 5090: ~305k
    # tokens of KV cache) or limited by memory (Qwen2.5-14B lut 4-bit on an RTX 4090).
    q = row(plan.plan_rows("qwen2.5-7b", cards=["RTX 5090"], formats=["fp16"]), "fp16")
    free = 32 * GIB - int(1.5 * GIB) - 2 * plan.parameter_count(plan.BUNDLED_MODELS["Qwen2.5-7B"])
    assert q["max_kv_tokens"] == free // 57_344 > 131072 and q["max_context_batch1"] == 131072
    q = row(plan.plan_rows("qwen2.5-14b", cards=["RTX 4090"], formats=["lut"], bits=[4]), "lut 4-bit")
    assert q["max_context_batch1"] == q["max_kv_tokens"] < 131072
    assert q["max_batch_at_context"] == q["max_kv_tokens"] // 4096


def test_bad_arguments():
    with pytest.raises(ValueError, match="Llama-2-7B, Llama-2-13B, Llama-3-8B, Qwen2.5-7B, Qwen2.5-14B, Qwen2.5-32B"):
        plan.resolve_model("gpt-5")
    with pytest.raises(ValueError, match="bundled cards: RTX 3090, RTX 4090, RTX 5090, RTX 4060 Ti 16GB"):
        plan.resolve_card("RTX 3080")
    with pytest.raises(ValueError, match="context must be >= 1"):
        plan.plan_rows("llama-2-7b", context=0)
    with pytest.raises(ValueError, match="reserve"):
        plan.plan_rows("llama-2-7b", reserve_gib=-1)


# ----------------------------------------------------------------------------------- config.json
def test_hf_config_path(tmp_path):
    cfg = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000, "head_dim": None,
           "tie_word_embeddings": False, "max_position_embeddings": 4096, "attention_bias": False}
    d = tmp_path / "my-llama"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    for spec in (str(d), str(d / "config.json")):
        m = plan.resolve_model(spec)
        assert m.name == "my-llama"
        assert plan.parameter_count(m) == L2_PARAMS and plan.kv_bytes_per_token(m) == L2_KV
    # Qwen2 has q/k/v biases without saying so; an explicit head_dim wins over hidden / heads.
    qwen = {**cfg, "model_type": "qwen2", "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True}
    del qwen["attention_bias"]
    (tmp_path / "q.json").write_text(json.dumps(qwen))
    m = plan.resolve_model(str(tmp_path / "q.json"))
    assert m.biases == ("q_proj", "k_proj", "v_proj") and m.head_size == 64
    assert {n: (o, i) for n, o, i in plan.decoder_linears(m)}["k_proj"] == (8 * 64, 4096)
    assert plan.kv_bytes_per_token(m) == 2 * 32 * 8 * 64 * 2
    assert plan.dense_parts(m)["lm_head"] == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        plan.resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="mixture-of-experts"):
        plan.model_from_hf_config({**cfg, "num_local_experts": 8}, "moe")


# ------------------------------------------------------------------------------------------ CLI
def test_cli_plan_table(capsys):
    assert main(["plan", "llama-2-7b", "--card", "RTX 4090"]) == 0
    out = capsys.readouterr().out
    assert "**Llama-2-7B**" in out and "RTX 4090 (datasheet: 24 GiB, 1008 GB/s)" in out
    assert "| format | weights GiB |" in out
    assert "| fp16 | 12.55 | 16.00 | 4096 (max) | 4 | ≤ 65 |" in out
    assert "| lut 3-bit | 2.77 |" in out and "bcq 3-bit g128" in out
    assert "Computed, not measured" in out and "upper bound" in out


def test_cli_plan_all_cards_json_and_config(tmp_path, capsys):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                               "num_attention_heads": 4, "vocab_size": 100, "tie_word_embeddings": True}))
    out_json = tmp_path / "rows.json"
    assert main(["plan", str(cfg), "--format", "lut", "--bits", "4", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    for card in plan.BUNDLED_CARDS:
        assert card in out
    rows = json.loads(out_json.read_text())
    assert [r["card"] for r in rows] == list(plan.BUNDLED_CARDS)
    assert {r["label"] for r in rows} == {"lut 4-bit"} and all(r["card_source"] == "datasheet" for r in rows)


def test_cli_plan_errors_exit_2(capsys):
    assert main(["plan", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err
    for name in plan.BUNDLED_MODELS:
        assert name in err
    assert main(["plan", "llama-2-7b", "--card", "RTX 2080"]) == 2
    err = capsys.readouterr().err
    assert "unknown card 'RTX 2080'" in err and "RTX 4060 Ti 16GB" in err
    assert main(["plan", "llama-2-7b", "--format", "int4"]) == 2
    assert "unknown format 'int4'" in capsys.readouterr().err


def test_cards_by_loose_name_once_each():
    rows = plan.plan_rows("llama-2-7b", cards=["4090", "rtx-4090", "RTX 4060 Ti 16 GB"], formats=["fp16"])
    assert [r["card"] for r in rows] == ["RTX 4090", "RTX 4060 Ti 16GB"]
