"""`gq quantize --guided-shrink a`: GuidedQuant's Hessians pulled toward the trace-matched plain one."""
from __future__ import annotations

import json

import pytest
import torch

from gq_kernels.packing import unpack_bitplanes
from gq_quantize.calibration.hessians import shrink_to_plain
from gq_serve.checkpoint import load_quantized_model
from gq_serve.cli import main
from test_pipeline_cli import cache, quantize_args  # noqa: F401  (fixture)


def _spd(n: int, g: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(g, 3 * n, n, generator=gen)
    return x.transpose(1, 2) @ x


def test_shrink_interpolates_at_each_groups_trace():
    guided, plain = _spd(6, 3, 0), _spd(6, 1, 1)
    assert shrink_to_plain(guided, plain, 0.0) is guided
    trace = lambda h: torch.diagonal(h, dim1=-2, dim2=-1).sum(-1)  # noqa: E731
    full = shrink_to_plain(guided, plain, 1.0)
    for k in range(3):  # a = 1: the plain Hessian at group k's trace
        assert torch.allclose(full[k], plain[0] * trace(guided[k]) / trace(plain[0]))
    half = shrink_to_plain(guided, plain[0], 0.5)  # [in, in] plain accepted too
    assert torch.allclose(half, 0.5 * guided + 0.5 * full)
    assert torch.allclose(trace(half), trace(guided))
    with pytest.raises(ValueError, match=r"\[0, 1\], got 1.5"):
        shrink_to_plain(guided, plain, 1.5)


def _codes(ckpt) -> dict[str, torch.Tensor]:
    model = load_quantized_model(ckpt)
    return {n: unpack_bitplanes(m.qweight, m.in_features) for n, m in model.named_modules() if hasattr(m, "qweight")}


@pytest.mark.parametrize("sequential", [[], ["--sequential"]], ids=["cached", "sequential"])
def test_full_shrink_at_one_group_is_plain_gptq(tiny_lm_dir, corpus, cache, tmp_path, sequential):  # noqa: F811
    # a = 1, g = 1: the Hessian is the plain one times a scalar, and GPTQ does not depend on H's scale.
    plain, shrunk, half = tmp_path / "plain", tmp_path / "shrunk", tmp_path / "half"
    base = ["--method", "gptq", "--bits", "3", *sequential]
    assert main(quantize_args(cache, tiny_lm_dir, corpus, plain, *base)) == 0
    assert main(quantize_args(cache, tiny_lm_dir, corpus, shrunk, *base, "--guided", "--guided-shrink", "1")) == 0
    assert main(quantize_args(cache, tiny_lm_dir, corpus, half, *base, "--guided", "--guided-shrink", "0.5")) == 0
    a, b, c = _codes(plain), _codes(shrunk), _codes(half)
    same = sum(int((a[n] == b[n]).sum()) for n in a) / sum(a[n].numel() for n in a)
    assert same > 0.999, same  # equal up to float rounding of near ties
    assert any(not torch.equal(a[n], c[n]) for n in a)
    qc = json.loads((half / "config.json").read_text())["quantization_config"]
    assert qc["guided_shrink"] == 0.5 and "guided_shrink" not in json.loads(
        (plain / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("extra, needle", [
    (["--guided-shrink", "0.5"], "add --guided"),
    (["--guided", "--guided-shrink", "1.5"], "--guided-shrink: Input should be less than or equal to 1"),
])
def test_bad_shrink_is_refused(tiny_lm_dir, corpus, cache, tmp_path, capsys, extra, needle):  # noqa: F811
    assert main(quantize_args(cache, tiny_lm_dir, corpus, tmp_path / "o", "--method", "gptq", "--bits", "3",
                              *extra)) != 0
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
