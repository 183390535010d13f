"""End-to-end fine-tuning of the quantized layers' continuous tensors (``gq quantize --finetune-steps``).

The layer-wise objectives (GuidedQuant's included) see one linear at a time. After every linear is
quantized, this step keeps each layer's integer part (its codes) and trains the float tensors its
result class lists as ``tunable`` (``lut``: the per-row codebooks; ``w4a4``: the weight scales) with
Adam, so that the quantized model's next-token distributions match the unquantized model's on the
calibration windows:

    loss = mean over tokens of KL(p_fp(. | prefix) || p_q(. | prefix))

The calibration windows are the only data it reads; the unquantized model is the teacher. The
student computes what the checkpoint will serve: each layer's ``train_forward`` (for ``w4a4`` its
input quantized at its own clip ratio, the rounding passing gradients straight through) and the
format's KV cache (``Format.kv_cache``, ``ste=True``) where it has one. The tuned tensors are
rounded back to their stored dtype (fp16 codebooks and scales) at the end. It holds a second
copy of the model (the student) and one batch of logits of both: a whole-model, in-memory step.

``precision="auto"`` runs both forwards and the backward under bfloat16 autocast where the hardware
has bfloat16 matrix units (CUDA, or a CPU whose oneDNN reports bf16 support), keeping the tuned
tensors, Adam's state and the loss in float32: the step is matmul-bound, and bf16 matmuls are several
times faster there (docs/results.md). Elsewhere bf16 would be emulated and slower, so it stays float32.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm import tqdm

from gq_kernels.format import QuantResult
from gq_kernels.registry import get_format
from gq_serve.util import atomic_write

SAVE_EVERY = 10  # steps between saved states (a kill loses at most this many)


class FinetuneConfig(BaseModel):
    """How long and how fast; ``steps = 0`` skips the step."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(0, ge=0)
    lr: float | None = Field(None, gt=0)  # None: the format's own (QuantResult.finetune_lr)
    batch: int = Field(2, ge=1)  # calibration windows per step
    # windows drawn from the calibration corpus for the fine-tune; 0: the Hessians' n_samples windows.
    # A few dozen windows revisited for hundreds of steps fit those windows rather than the corpus.
    windows: int = Field(0, ge=0)
    seed: int = 0
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    # also tune the normalisation gains (RMSNorm / LayerNorm weights), written into the checkpoint in
    # place of the source's: a per-input-channel scale the per-row codebooks cannot express
    norms: bool = False


def bf16_is_fast(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 matrices in hardware (CUDA; a CPU with AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The compute dtype of the forwards and backward: ``auto`` is bfloat16 where it is fast."""
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    return getattr(torch, precision)


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student); logits [..., vocab] -> scalar (float32)."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


class _Tuned(nn.Module):
    """A quantized linear whose tunable tensors are parameters: y = the result's ``train_forward``
    (x W_hat^T + b for weight-only formats), differentiable in those tensors. Fields the result
    lists in ``tunable_log`` are held as their logarithm, so a step changes them by a fraction."""

    def __init__(self, result: QuantResult, bias: torch.Tensor | None):
        super().__init__()
        self.result = result
        self.logs = set(type(result).tunable_log)
        self.tuned = nn.ParameterDict({n: nn.Parameter(self._to_param(n, getattr(result, n).float()))
                                       for n in type(result).tunable})
        self.bias = None if bias is None else bias.detach()

    def _to_param(self, name: str, value: torch.Tensor) -> torch.Tensor:
        # 1e-30: a scale of zero (an all-zero group) stays zero once rounded back to fp16.
        return value.clamp_min(1e-30).log() if name in self.logs else value

    def values(self) -> dict[str, torch.Tensor]:
        return {n: p.exp() if n in self.logs else p for n, p in self.tuned.items()}

    def current(self) -> QuantResult:
        return dataclasses.replace(self.result, **self.values(), stats={})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.current().train_forward(x, self.bias)

    def tuned_result(self) -> QuantResult:
        values = {n: v.detach().to(getattr(self.result, n).dtype) for n, v in self.values().items()}
        return dataclasses.replace(self.result, **values)


def check_tunable(results: dict[str, QuantResult]) -> None:
    """Refuse results with nothing to tune, naming the format and what to do."""
    fixed = sorted({type(r).format for r in results.values() if not type(r).tunable})
    if fixed:
        raise ValueError(f"--finetune-steps tunes the float tensors of each quantized layer, and the "
                         f"{', '.join(fixed)} format has none that may change; use a method that writes "
                         f"lut (lnq, squeezellm), bcq (gptq, rtn) or w4a4 (spinquant), or drop --finetune-steps")


def norm_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The gains of every normalisation module (a class named ``*Norm``: RMSNorm, LayerNorm, Gemma's),
    by state-dict name (``model.layers.0.input_layernorm.weight``)."""
    return {f"{name}.weight": mod.weight for name, mod in model.named_modules()
            if type(mod).__name__.endswith("Norm") and isinstance(getattr(mod, "weight", None), nn.Parameter)}


def finetune_results(model: nn.Module, results: dict[str, QuantResult], windows: torch.Tensor, cfg: FinetuneConfig,
                     progress: bool = True, state_path: Path | None = None,
                     ) -> tuple[dict[str, QuantResult], dict[str, torch.Tensor], dict]:
    """Tune ``results`` (linear name -> result of ``model``'s linear of that name) against ``model``
    (the unquantized teacher, left unchanged) on ``windows`` (LongTensor [n, seq]).

    ``state_path``: where the tuned tensors, Adam's state and the sampler are saved every
    :data:`SAVE_EVERY` steps; a run that finds a state of the same settings, layers and windows
    there continues from it, to the same result as a run never stopped.

    Returns the tuned results; the tuned norm gains (state-dict name -> float32 tensor; empty unless
    ``cfg.norms``); stats: steps, lr, batch, windows, the compute dtype, the KL of the first and
    last ten steps (means), seconds (of this call; ``resumed_at``: the step it continued from)."""
    check_tunable(results)
    t0 = time.perf_counter()
    student = copy.deepcopy(model)
    student.requires_grad_(False)
    tuned: dict[str, _Tuned] = {}
    for name, result in results.items():
        parent_name, _, child = name.rpartition(".")
        parent = student.get_submodule(parent_name)
        lin = getattr(parent, child)
        device = lin.weight.device
        tuned[name] = _Tuned(result.to(device), lin.bias)
        setattr(parent, child, tuned[name])
    params = [p for t in tuned.values() for p in t.tuned.values()]
    norms = norm_weights(student) if cfg.norms else {}
    for p in norms.values():
        p.requires_grad_(True)
    params += list(norms.values())
    first = next(iter(results.values()))
    fmt, fmt_params = get_format(type(first).format), first.params()
    lr = cfg.lr or type(first).finetune_lr
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    dtype = resolve_precision(cfg.precision, device)

    def compute():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    named = {f"{n}/{f}": p for n, t in tuned.items() for f, p in t.tuned.items()} | norms
    key = json.dumps({"config": cfg.model_dump(mode="json"), "lr": lr, "dtype": str(dtype), "tensors": sorted(named),
                      "windows": [list(windows.shape), int(windows.sum())]})
    losses: list[float] = []
    start = 0
    if state_path is not None and Path(state_path).exists():
        state = torch.load(state_path, weights_only=True)
        if state["key"] == key:
            with torch.no_grad():
                for n, p in named.items():
                    p.copy_(state["tensors"][n])
            opt.load_state_dict(state["opt"])
            gen.set_state(state["gen"])
            losses, start = state["losses"].tolist(), int(state["step"])

    def save(step: int) -> None:
        state = {"key": key, "step": step, "tensors": {n: p.detach().cpu() for n, p in named.items()},
                 "opt": opt.state_dict(), "gen": gen.get_state(), "losses": torch.tensor(losses, dtype=torch.float64)}
        atomic_write(Path(state_path), lambda tmp: torch.save(state, tmp), fsync=False)

    bar = tqdm(range(start, cfg.steps), desc="finetune", unit="step", disable=not progress, file=sys.stderr,
               initial=start, total=cfg.steps)
    for step in bar:
        batch = windows[torch.randint(0, windows.shape[0], (cfg.batch,), generator=gen)].to(device)
        with torch.no_grad(), compute():
            teacher = model(batch).logits
        kv = fmt.kv_cache(fmt_params, model.config, store=False, ste=True)  # keeps nothing: one per forward
        with compute():
            logits = student(batch, **({} if kv is None else {"past_key_values": kv, "use_cache": True})).logits
        loss = token_kl(logits, teacher)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(kl=f"{losses[-1]:.4f}")
        if state_path is not None and (step + 1) % SAVE_EVERY == 0 and step + 1 < cfg.steps:
            save(step + 1)
    out = {name: t.tuned_result().to("cpu") for name, t in tuned.items()}
    gains = {name: p.detach().float().cpu() for name, p in norms.items()}
    stats = {"steps": cfg.steps, "lr": lr, "batch": cfg.batch, "windows": int(windows.shape[0]),
             "dtype": str(dtype).removeprefix("torch."),
             "kl_first10": sum(losses[:10]) / max(1, len(losses[:10])),
             "kl_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
             "seconds": round(time.perf_counter() - t0, 1)}
    if cfg.norms:
        stats["norms"] = len(gains)
    if start:
        stats["resumed_at"] = start
    return out, gains, stats
