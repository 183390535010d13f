"""Learn SpinQuant's R1 and per-layer R2 by Cayley SGD under W16A4KV4, and write rotated models.

The objective is next-token cross-entropy of the norm-fused, untied model with its weights frozen in
float and every decoder linear's input (and the KV cache) fake-quantized to 4 bits with a straight-
through estimator, so the rotations learn to make activations quantization-friendly. The rotations
are re-applied to the weights differentiably on every step (spec section 2).

:func:`write_rotated_model` is the entry point of ``gq rotate``: mode ``none`` (norms fused, lm_head
untied: the RTN baseline's starting point), ``hadamard`` (random Hadamard R1/R2, QuaRot-style) or
``learned``; it writes a plain HF model directory plus ``rotation.json`` and ``rotations.safetensors``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from gq_kernels.hadamard import hadamard_transform
from gq_kernels.w4a4.kvcache import QuantizedKVCache
from gq_kernels.w4a4.reference import check_kv_group, fake_quant_act, prepare_input
from gq_quantize.spinquant.cayley import cayley_step, orthonormalize
from gq_quantize.spinquant.rotate import (
    RotationError,
    apply_rotations,
    attention_shape,
    center_embeddings,
    decoder_layers,
    fuse_norms,
    random_hadamard,
    rotate_head_inputs,
    rotate_head_outputs,
    rotate_input,
    rotate_output,
)

MODES = ("none", "hadamard", "learned")
STATE_FILE = "rotation_train_state.pt"
LOSS_JSON = "rotation_loss.json"
LOSS_PNG = "rotation_loss.png"
# In a subfolder: every top-level *.safetensors of a model directory is a weight file to loaders
# and to the exporter, which would carry R1/R2 into the quantized checkpoint as stray tensors.
ROTATIONS_FILE = "rotation/rotations.safetensors"
ROTATION_JSON = "rotation.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                    "generation_config.json")


@dataclass
class TrainResult:
    """Learned rotations (float32): ``r1 [hidden, hidden]``, ``r2`` one ``[head_dim, head_dim]`` per
    layer; ``losses`` one float per step taken (all runs, resumed ones included)."""
    r1: torch.Tensor
    r2: list[torch.Tensor]
    losses: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------- init
def initial_rotations(model: nn.Module, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Seeded random Hadamard R1 ``[hidden, hidden]`` and per-layer R2 ``[head_dim, head_dim]``, float64
    (R1 drawn first, then R2 of layers 0, 1, ...)."""
    g = torch.Generator().manual_seed(int(seed))
    _, _, head_dim = attention_shape(model)
    r1 = random_hadamard(model.config.hidden_size, g, what="R1 (hidden_size)")
    r2 = [random_hadamard(head_dim, g, what=f"R2 (head_dim) of layer {i}")
          for i in range(len(decoder_layers(model)))]
    return r1, r2


def check_online_hadamards(model: nn.Module) -> None:
    """R3 (head_dim) and R4 (intermediate_size) are online Hadamards of the w4a4 format: refuse
    sizes without a construction before spending time on training."""
    _, _, head_dim = attention_shape(model)
    random_hadamard(head_dim, what="R3 (head_dim, the key-cache Hadamard)")
    random_hadamard(model.config.intermediate_size, what="R4 (intermediate_size, the down_proj input Hadamard)")


# ----------------------------------------------------------------------------------- objective
@contextlib.contextmanager
def activation_quantizers(model: nn.Module, bits: int = 4, clip: float = 1.0, group: int = 0):
    """Forward pre-hooks fake-quantizing (STE) every decoder linear's input, as the w4a4 format does:
    q/k/v and gate/up per token; o_proj per (token, head); down_proj per token after the R4
    Hadamard (its weight must then carry ``W R4``, see :func:`rotated_parameters`). ``group`` > 0:
    ranges per ``group`` input channels instead of per token (o_proj: per head unless ``group`` is
    smaller), as ``--act-group`` quantizes. Removed on exit."""
    _, _, head_dim = attention_shape(model)
    head_group = group if group and group < head_dim else head_dim

    def per_token(module, args):
        return (fake_quant_act(args[0], bits, group, clip, ste=True),) + args[1:]

    def per_head(module, args):
        return (fake_quant_act(args[0], bits, head_group, clip, ste=True),) + args[1:]

    def hadamard_token(module, args):
        return (fake_quant_act(prepare_input(args[0], True), bits, group, clip, ste=True),) + args[1:]

    handles = []
    try:
        for layer in decoder_layers(model):
            attn, mlp = layer.self_attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                handles.append(lin.register_forward_pre_hook(per_token))
            handles.append(attn.o_proj.register_forward_pre_hook(per_head))
            handles.append(mlp.down_proj.register_forward_pre_hook(hadamard_token))
        yield model
    finally:
        for h in handles:
            h.remove()


def rotated_parameters(model: nn.Module, r1: torch.Tensor, r2: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder linears' weights (and biases) with R1, R2 and R4 applied, differentiable in r1/r2:
    names relative to ``model.model`` for :func:`torch.func.functional_call`. Embeddings and lm_head
    are left out: the loss rotates the looked-up rows and un-rotates the final hidden state instead
    (the same math without a ``[vocab, hidden]`` product per step)."""
    heads, kv_heads, _ = attention_shape(model)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(decoder_layers(model)):
        p = f"layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        for n in ("q_proj", "k_proj"):
            out[p + f"self_attn.{n}.weight"] = rotate_input(getattr(attn, n).weight, r1)
        out[p + "self_attn.v_proj.weight"] = rotate_head_outputs(rotate_input(attn.v_proj.weight, r1), r2[i], kv_heads)
        if attn.v_proj.bias is not None:
            out[p + "self_attn.v_proj.bias"] = (attn.v_proj.bias.reshape(kv_heads, -1) @ r2[i]).reshape(-1)
        out[p + "self_attn.o_proj.weight"] = rotate_output(rotate_head_inputs(attn.o_proj.weight, r2[i], heads), r1)
        for n in ("gate_proj", "up_proj"):
            out[p + f"mlp.{n}.weight"] = rotate_input(getattr(mlp, n).weight, r1)
        # W_down R4: the hook feeds it x R4, so (x R4)(W R4)^T = x W^T before quantization.
        out[p + "mlp.down_proj.weight"] = hadamard_transform(rotate_output(mlp.down_proj.weight, r1))
        for lin, n in ((attn.o_proj, "self_attn.o_proj"), (mlp.down_proj, "mlp.down_proj")):
            if lin.bias is not None:
                out[p + f"{n}.bias"] = lin.bias @ r1
    return out


def quantized_loss(model: nn.Module, input_ids: torch.Tensor, r1: torch.Tensor, r2: list[torch.Tensor],
                   kv_bits: int = 4, kv_clip: float = 1.0, kv_group: int = 0) -> torch.Tensor:
    """Mean next-token cross-entropy of ``input_ids [B, T]`` through the rotated W16A4KV``kv_bits`` model
    (call inside :func:`activation_quantizers`; KV ranges per ``kv_group`` channels of a head, 0: per
    head); a scalar differentiable in r1, r2."""
    params = rotated_parameters(model, r1, r2)
    emb = model.model.embed_tokens(input_ids) @ r1
    cache = QuantizedKVCache(len(decoder_layers(model)), bits=kv_bits, clip=kv_clip, store=False, ste=True,
                             group_size=kv_group)
    out = torch.func.functional_call(
        model.model, params, args=(),
        kwargs={"inputs_embeds": emb, "past_key_values": cache, "use_cache": True})
    logits = model.lm_head(out.last_hidden_state @ r1.t())
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), input_ids[:, 1:].reshape(-1))


def cosine_lr(lr: float, step: int, total: int) -> float:
    """HF's cosine schedule without warm-up: ``lr`` at step 0, decaying to 0 at ``total``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


# ----------------------------------------------------------------------------------- state
def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a kill leaves the previous state or the new one, never half a file


def _fingerprint_diff(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def write_loss_curve(out_dir: Path, losses: list[float], meta: dict | None = None) -> None:
    """``rotation_loss.json`` (the losses per step) and ``rotation_loss.png`` in ``out_dir``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gq_serve.util import atomic_write, write_json

    out_dir = Path(out_dir)
    write_json(out_dir / LOSS_JSON, {**(meta or {}), "losses": [float(x) for x in losses]})
    fig = Figure(figsize=(6, 3.5))
    FigureCanvasAgg(fig)  # Agg without pyplot: no global backend switch in the caller's process
    ax = fig.add_subplot()
    ax.plot(range(1, len(losses) + 1), losses, marker="." if len(losses) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (W16A4KV4)")
    ax.set_title("SpinQuant rotation training")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out_dir / LOSS_PNG, lambda p: fig.savefig(p, format="png", dpi=100), fsync=False)


def train(model: nn.Module, windows: torch.Tensor, *, steps: int = 100, batch: int = 1, lr: float = 1.5,
          seed: int = 0, state_dir: str | Path | None = None, save_every: int = 10, fingerprint: dict | None = None,
          overwrite: bool = False, progress: bool = True, stop_after: int | None = None,
          kv_bits: int = 4, act_clip: float = 1.0, kv_clip: float = 1.0, act_group: int = 0,
          kv_group: int = 0) -> TrainResult:
    """Learn R1 and the per-layer R2 of a norm-fused, untied Llama-like ``model`` (see :func:`fuse_norms`;
    its weights are frozen here) by Cayley SGD on windows ``[N, T]`` (LongTensor; step s uses rows
    ``s*batch .. s*batch + batch - 1``, modulo N).

    Starts from seeded random Hadamards; lr follows a cosine to 0 over ``steps``. With ``state_dir``,
    every ``save_every`` steps (and at the end) the state is saved atomically there, and a call with the
    same settings (``fingerprint`` plus steps, batch, lr, seed, the windows and the model's shape)
    resumes from it; different settings raise :class:`RotationError` unless ``overwrite``. A finished run
    returns its rotations re-orthonormalised (sign-fixed QR). The loss curve is written there at the end
    (:func:`write_loss_curve`). ``stop_after``: return after that many steps in total, as if killed (for
    tests and time-boxed runs; the state is saved first). ``act_clip``, ``kv_clip``, ``act_group``, ``kv_group``:
    the fake quantizers' range clip ratios and activation / KV groups (1.0, 1.0, 0, 0: SpinQuant's
    published unclipped per-token objective; pass the values the model will be quantized with)."""
    from gq_quantize.data import data_hash

    decoder_layers(model)
    check_online_hadamards(model)
    if windows.dim() != 2 or windows.shape[0] < 1:
        raise RotationError(f"calibration windows must be [N, T] token ids, got shape {list(windows.shape)}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    fp = {**(fingerprint or {}), "steps": int(steps), "batch": int(batch), "lr": float(lr), "seed": int(seed),
          "windows": data_hash(windows), "kv_bits": int(kv_bits),
          **({} if (act_clip, kv_clip, act_group) == (1.0, 1.0, 0)
             else {"act_clip": float(act_clip), "kv_clip": float(kv_clip), "act_group": int(act_group)}),
          # only when set, so that runs started before KV groups existed still resume
          **({"kv_group": int(kv_group)} if kv_group else {}),
          "model_shape": [model.config.hidden_size, len(model.model.layers), model.config.intermediate_size]}

    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    state = None
    if state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True)
        diff = _fingerprint_diff(state["fingerprint"], fp)
        if diff and not overwrite:
            raise RotationError(
                f"{state_path} holds a rotation training run with different settings ({'; '.join(diff)}): "
                "rerun with the same model and arguments to resume it, or pass --overwrite to start over")
        if diff:
            state = None
    dtype = torch.float32
    gen = torch.Generator().manual_seed(int(seed) + 1)
    if state is not None:
        start, losses = int(state["step"]), list(state["losses"])
        r1 = state["r1"].to(dtype)
        r2 = [r.to(dtype) for r in state["r2"]]
        gen.set_state(state["rng"])
    else:
        start, losses = 0, []
        r1d, r2d = initial_rotations(model, seed)
        r1, r2 = r1d.to(dtype), [r.to(dtype) for r in r2d]

    def snapshot(step: int) -> None:
        if state_path is not None:
            state_path.parent.mkdir(parents=True, exist_ok=True)
            _save_state(state_path, {"fingerprint": fp, "step": step, "losses": losses, "r1": r1,
                                     "r2": list(r2), "rng": gen.get_state()})

    end = steps if stop_after is None else min(steps, int(stop_after))
    from tqdm.auto import tqdm

    bar = tqdm(total=steps, initial=start, desc="rotations", file=sys.stderr, disable=not progress,
               dynamic_ncols=True)
    n = windows.shape[0]
    try:
        with activation_quantizers(model, clip=act_clip, group=act_group):
            for step in range(start, end):
                rows = torch.arange(step * batch, step * batch + batch) % n
                ids = windows[rows]
                r1p = r1.clone().requires_grad_(True)
                r2p = [r.clone().requires_grad_(True) for r in r2]
                loss = quantized_loss(model, ids, r1p, r2p, kv_bits, kv_clip, kv_group)
                grads = torch.autograd.grad(loss, [r1p, *r2p])
                lr_t = cosine_lr(lr, step, steps)
                r1 = cayley_step(r1, grads[0], lr_t, gen)
                r2 = [cayley_step(r, g, lr_t, gen) for r, g in zip(r2, grads[1:])]
                losses.append(float(loss.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr_t:.3g}")
                if (step + 1) % max(1, save_every) == 0 or step + 1 == end:
                    snapshot(step + 1)
    finally:
        bar.close()
    if end == steps:
        # The truncated fixed point drifts off orthogonality (~1e-4 over a few steps at lr 1.5); the
        # fused model must reproduce the float logits exactly, so hand back the nearest orthogonal Q.
        r1 = orthonormalize(r1.double()).to(dtype)
        r2 = [orthonormalize(r.double()).to(dtype) for r in r2]
    if end == steps and state_dir is not None:
        write_loss_curve(Path(state_dir), losses, {"steps": steps, "lr": lr, "batch": batch, "seed": seed,
                                                   "act_clip": act_clip, "kv_clip": kv_clip, "act_group": act_group,
                                                   "kv_group": kv_group})
    return TrainResult(r1, r2, losses)


# ----------------------------------------------------------------------------------- files
def source_weights_hash(model_dir: Path) -> str:
    """sha256 over the model directory's weight files (names and bytes, sorted by name)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(model_dir).iterdir()
                   if p.is_file() and (p.suffix in (".safetensors", ".bin", ".pt") or p.name.endswith(".gguf")))
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def load_rotation_file(path: str | Path, model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """R1 and the per-layer R2 from a ``rotations.safetensors`` written by :func:`write_rotated_model`;
    raises :class:`RotationError` naming the tensor, the expected and the found shape when it does not
    fit ``model``."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"rotation file {path} does not exist")
    tensors = load_file(str(path))
    hidden = model.config.hidden_size
    _, _, head_dim = attention_shape(model)
    n_layers = len(decoder_layers(model))
    expected = {"R1": (hidden, hidden), **{f"R2.{i}": (head_dim, head_dim) for i in range(n_layers)}}
    for name, shape in expected.items():
        if name not in tensors:
            raise RotationError(f"rotation file {path} has no tensor {name} (expected shape {list(shape)} for "
                                f"this model: {n_layers} layers, hidden {hidden}, head_dim {head_dim})")
        if tuple(tensors[name].shape) != shape:
            raise RotationError(f"rotation file {path}: tensor {name} has shape {list(tensors[name].shape)}, "
                                f"expected {list(shape)} for this model")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise RotationError(f"rotation file {path} has tensors this model does not expect: {', '.join(extra[:5])} "
                            f"(the model has {n_layers} layers); it was written for another model")
    for name in expected:
        r = tensors[name].double()
        err = float((r @ r.t() - torch.eye(r.shape[0], dtype=torch.float64)).abs().max())
        if err > 1e-3:
            raise RotationError(f"rotation file {path}: tensor {name} is not orthogonal (max |R R^T - I| = {err:.3g})")
    return tensors["R1"].double(), [tensors[f"R2.{i}"].double() for i in range(n_layers)]


def training_quantizers(act_clip: float | None, kv_clip: float | None, act_group: int | None,
                        kv_group: int | None = None) -> tuple[float, float, int, int]:
    """(act_clip, kv_clip, act_group, kv_group) with each None replaced by the spinquant method's
    default, checked as the method checks them (clip ratios in (0, 1], groups >= 0)."""
    from gq_quantize.methods.spinquant import SpinQuantConfig

    given = {k: v for k, v in (("act_clip", act_clip), ("kv_clip", kv_clip), ("act_group", act_group),
                               ("kv_group", kv_group)) if v is not None}
    try:
        cfg = SpinQuantConfig(**given)
    except ValueError as e:
        raise RotationError(f"invalid quantizer settings for rotation training: {e}") from None
    return float(cfg.act_clip), float(cfg.kv_clip), int(cfg.act_group), int(cfg.kv_group)


def _partial_dir(out_dir: Path) -> Path:
    # Fixed name next to out_dir (same filesystem, so the final rename is atomic); learned runs keep
    # their resumable state in it, so a rerun finds it.
    return out_dir.with_name(f".{out_dir.name}.partial")


def write_rotated_model(model_dir: str | Path, out_dir: str | Path, mode: str, *, seed: int = 0, steps: int = 100,
                        lr: float = 1.5, seq_len: int = 512, data: str = "sotu:train", batch: int = 8,
                        rotation_file: str | Path | None = None, windows: torch.Tensor | None = None,
                        cache: Path | None = None, dtype: str = "source", overwrite: bool = False,
                        progress: bool = True, save_every: int = 10, center: bool = False,
                        act_clip: float | None = None, kv_clip: float | None = None,
                        act_group: int | None = None, kv_group: int | None = None) -> dict:
    """Write ``model_dir`` (a Llama-like HF model) with fused norms, untied lm_head and rotations fused
    to ``out_dir``; returns the ``rotation.json`` record.

    ``mode``: ``none`` (identity rotations), ``hadamard`` (seeded random Hadamards) or ``learned``
    (:func:`train` on ``steps * batch`` calibration windows of ``seq_len`` tokens from corpus ``data``,
    or on ``windows [N, T]`` when given). ``rotation_file``: reuse R1/R2 from an earlier
    ``rotations.safetensors`` instead (no training). ``dtype``: ``source`` (the model's own) or a
    torch dtype name for the saved weights. ``center``: subtract each embedding row's mean first
    (:func:`center_embeddings`; not an identity under RMSNorm). ``act_clip``, ``kv_clip``, ``act_group``,
    ``kv_group``: the quantizers learned rotations train under (None: ``gq quantize --method spinquant``'s defaults,
    so the rotations are learned for the ranges they will be served with). Everything is assembled in a folder
    next to out_dir and renamed at the end; a killed learned run resumes from its state there when
    rerun with the same arguments."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gq_serve.util import replace_dir, write_json

    if mode not in MODES:
        raise RotationError(f"unknown rotation mode {mode!r}: choose one of {', '.join(MODES)}")
    act_clip, kv_clip, act_group, kv_group = training_quantizers(act_clip, kv_clip, act_group, kv_group)
    if rotation_file is not None and mode == "none":
        raise RotationError("--rotation-file needs --rotation hadamard or learned (mode none uses identities)")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face model directory (no config.json)")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {out_dir} exists; pass --overwrite to replace it")
    started = time.time()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # The dtype the checkpoint was saved in (the loaded config now says float32).
    cfg_json = json.loads((model_dir / "config.json").read_text())
    source_dtype = str(cfg_json.get("dtype") or cfg_json.get("torch_dtype") or "float32").replace("torch.", "")
    save_dtype = source_dtype if dtype == "source" else dtype
    if not isinstance(getattr(torch, save_dtype, None), torch.dtype):
        raise RotationError(f"unknown dtype {dtype!r}: use source, float32, float16 or bfloat16")
    model.eval()
    decoder_layers(model)
    fuse_norms(model)
    if center:
        center_embeddings(model)
    hidden, n_layers = model.config.hidden_size, len(model.model.layers)
    _, _, head_dim = attention_shape(model)
    try:
        check_kv_group(kv_group, head_dim)
    except ValueError as e:
        raise RotationError(str(e)) from None
    weights_hash = source_weights_hash(model_dir)

    partial = _partial_dir(out_dir)
    if partial.exists() and (overwrite or mode != "learned" or rotation_file is not None):
        shutil.rmtree(partial)  # nothing to resume there
    partial.mkdir(parents=True, exist_ok=True)

    record: dict = {"mode": mode, "seed": int(seed), "source_model": str(model_dir.resolve()),
                    "source_weights_sha256": weights_hash, "rotation_file": None, "steps": None, "lr": None,
                    "batch": None, "seq_len": None, "calibration": None, "final_loss": None,
                    "dtype": save_dtype, "center_embeddings": bool(center)}
    if rotation_file is not None:
        r1, r2 = load_rotation_file(rotation_file, model)
        record["rotation_file"] = str(Path(rotation_file).resolve())
    elif mode == "none":
        r1 = torch.eye(hidden, dtype=torch.float64)
        r2 = [torch.eye(head_dim, dtype=torch.float64) for _ in range(n_layers)]
    elif mode == "hadamard":
        r1, r2 = initial_rotations(model, seed)
    else:
        if windows is None:
            from gq_quantize.data import calibration_windows

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            windows = calibration_windows(tokenizer, data, steps * batch, seq_len, seed, cache)
            calib = data
        else:
            calib = f"windows[{windows.shape[0]}x{windows.shape[1]}]"
        fp = {"source_weights_sha256": weights_hash, "calibration": calib, "seq_len": int(windows.shape[1]),
              **({"center_embeddings": True} if center else {})}
        result = train(model, windows, steps=steps, batch=batch, lr=lr, seed=seed, state_dir=partial,
                       save_every=save_every, fingerprint=fp, overwrite=overwrite, progress=progress,
                       act_clip=act_clip, kv_clip=kv_clip, act_group=act_group, kv_group=kv_group)
        r1, r2 = result.r1.double(), [r.double() for r in result.r2]
        record.update(steps=int(steps), lr=float(lr), batch=int(batch), seq_len=int(windows.shape[1]),
                      calibration=calib, final_loss=result.losses[-1] if result.losses else None,
                      train_act_clip=act_clip, train_kv_clip=kv_clip, train_act_group=act_group,
                      train_kv_group=kv_group)
    apply_rotations(model, r1, r2)

    from safetensors.torch import save_file

    model.to(getattr(torch, save_dtype)).save_pretrained(partial)
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, partial / name)
    (partial / ROTATIONS_FILE).parent.mkdir(exist_ok=True)
    save_file({"R1": r1.contiguous(), **{f"R2.{i}": r.contiguous() for i, r in enumerate(r2)}},
              str(partial / ROTATIONS_FILE), metadata={"format": "gq-spinquant-rotations", "mode": mode})
    record["seconds"] = round(time.time() - started, 1)
    write_json(partial / ROTATION_JSON, record)
    (partial / STATE_FILE).unlink(missing_ok=True)  # only now: a kill above still resumes the training
    replace_dir(partial, out_dir)
    return record


__all__ = [
    "MODES", "TrainResult", "initial_rotations", "check_online_hadamards", "activation_quantizers",
    "rotated_parameters", "quantized_loss", "cosine_lr", "train", "write_loss_curve", "source_weights_hash",
    "training_quantizers",
    "load_rotation_file", "write_rotated_model",
]
