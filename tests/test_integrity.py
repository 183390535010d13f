"""Checkpoint integrity (issue 13): loading checks gq_manifest.json's checksums and refuses a
mismatch naming file and tensor; `gq verify`; corrupt, truncated or missing files and
config/manifest mismatches end in a clear error, never a traceback."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gq_serve import checkpoint as ckpt_mod
from gq_serve.checkpoint import CheckpointIntegrityError, load_model, verify_files
from gq_serve.cli import main


@pytest.fixture
def ckpt(quantized_dir, tmp_path) -> Path:
    """A private copy of the tiny quantized checkpoint to damage."""
    return Path(shutil.copytree(quantized_dir, tmp_path / "ckpt"))


def _flip(path: Path, at: float, n: int = 64) -> None:
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    for i in range(start, start + n):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _header_len(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _refused(ckpt: Path, *patterns: str) -> str:
    with pytest.raises(CheckpointIntegrityError) as exc:
        load_model(ckpt, "cpu", "float32")
    message = str(exc.value)
    for p in patterns:
        assert p in message, message
    return message


def test_intact_checkpoint_loads_and_verifies(ckpt, capsys):
    load_model(ckpt, "cpu", "float32")
    assert verify_files(ckpt, use_cache=False) == []
    assert main(["verify", str(ckpt)]) == 0
    assert "OK" in capsys.readouterr().out


def test_flipped_bytes_are_refused_naming_file_and_tensor(ckpt):
    weights = ckpt / "model.safetensors"
    _flip(weights, 0.6)  # in the tensor data: the file still parses, one tensor's bytes differ
    message = _refused(ckpt, "model.safetensors: tensor model.", "sha256 differs from gq_manifest.json")
    assert "Traceback" not in message
    assert any("model.safetensors" in p for p in verify_files(ckpt, use_cache=False))


def test_truncated_and_broken_header_are_refused(ckpt):
    weights = ckpt / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    _refused(ckpt, "model.safetensors", "truncated or corrupt")
    weights.write_bytes(data)
    _flip(weights, 0.0, n=8)  # the header length: nonsense
    _refused(ckpt, "model.safetensors cannot be read as safetensors")
    weights.write_bytes(data[: _header_len(data) // 2])  # cut inside the header
    _refused(ckpt, "model.safetensors cannot be read as safetensors")


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "generation_config.json"])
def test_missing_file_is_named(ckpt, name):
    (ckpt / name).unlink()
    if name == "model.safetensors":
        with pytest.raises((CheckpointIntegrityError, FileNotFoundError), match="model.safetensors"):
            load_model(ckpt, "cpu", "float32")
    else:
        _refused(ckpt, f"{name} is missing")


def test_config_edited_against_manifest(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"]["bits"] = 4
    (ckpt / "config.json").write_text(json.dumps(config))
    _refused(ckpt, "config.json: sha256 differs", "quantization_config.bits is 4 but gq_manifest.json recorded 3")


def test_corrupt_manifest_is_named(ckpt):
    (ckpt / "gq_manifest.json").write_text('{"files": {"config.json": ')
    _refused(ckpt, "gq_manifest.json is not valid JSON")


def test_verify_cli_lists_problems_and_exits_1(ckpt, capsys):
    _flip(ckpt / "model.safetensors", 0.6)
    (ckpt / "tokenizer.json").unlink()
    assert main(["verify", str(ckpt)]) == 1
    err = capsys.readouterr().err
    assert "model.safetensors: sha256 differs" in err and "tokenizer.json is missing" in err
    assert main(["verify", str(ckpt), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["ok"] is False


def test_cli_errors_are_one_line_not_tracebacks(ckpt, tmp_path, capsys):
    """gq verify / serve / eval on a damaged checkpoint: a message and a non-zero exit, no traceback
    (main() lets unexpected exceptions through, so an in-process run that returns proves it)."""
    _flip(ckpt / "model.safetensors", 0.6)
    for cmd, args, code in (("serve", [str(ckpt), "--port", "1"], 2), ("eval", [str(ckpt), "--data", "x"], 2)):
        assert main([cmd, *args]) == code
        err = capsys.readouterr().err
        assert err.startswith(f"gq {cmd}: error: ") and "model.safetensors: tensor" in err, err
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert main(["verify", str(plain)]) == 2 and "no gq_manifest.json" in capsys.readouterr().err
    # and once as a real process
    r = subprocess.run([sys.executable, "-m", "gq_serve.cli", "verify", str(ckpt)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "sha256 differs" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_verify_cache_rehashes_only_changed_files(ckpt, monkeypatch, tmp_path):
    monkeypatch.setenv("GQ_CACHE", str(tmp_path / "cache"))
    hashed = []
    real = ckpt_mod.sha256_file
    monkeypatch.setattr(ckpt_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    assert verify_files(ckpt) == [] and "model.safetensors" in hashed
    hashed.clear()
    assert verify_files(ckpt) == [] and hashed == []  # same size and mtime: from the cache
    _flip(ckpt / "model.safetensors", 0.6)  # rewritten: new mtime
    assert verify_files(ckpt) == ["model.safetensors: sha256 differs from gq_manifest.json"]
    assert hashed == ["model.safetensors"]


def test_vllm_launcher_refuses_a_corrupt_checkpoint(ckpt, monkeypatch, tmp_path):
    from gq_serve import vllm_launch

    monkeypatch.setenv("GQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vllm_launch, "check_vllm_installed", lambda: None)
    monkeypatch.setattr(vllm_launch.os, "execve", lambda *a: pytest.fail("exec'd a corrupt checkpoint"))
    _flip(ckpt / "model.safetensors", 0.6)
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors: sha256 differs"):
        vllm_launch.vllm_serve_main(ckpt)


def test_perplexity_of_a_broken_model_is_inf_not_an_error():
    from gq_serve.evaluate import perplexity

    class Broken(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, use_cache=False):
            logits = torch.full((*input_ids.shape, 8), -1e4)
            logits[..., 0] = 1e4  # every target but 0 gets a log-probability of -2e4
            return type("Out", (), {"logits": logits})()

    result = perplexity(Broken(), torch.full((2, 8), 3), progress=False)
    assert result["ppl"] == math.inf and result["nll"] > 709


def test_from_pretrained_refuses_a_corrupt_checkpoint(ckpt, monkeypatch, tmp_path):
    """`AutoModelForCausalLM.from_pretrained` (after `import gq_serve`) checks the files too."""
    import gq_serve  # noqa: F401  (registers the quantizer)
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("GQ_CACHE", str(tmp_path / "cache"))
    AutoModelForCausalLM.from_pretrained(ckpt)  # intact: loads (and is remembered as verified)
    _flip(ckpt / "model.safetensors", 0.6)
    with pytest.raises(CheckpointIntegrityError, match="model.safetensors: sha256 differs"):
        AutoModelForCausalLM.from_pretrained(ckpt)
