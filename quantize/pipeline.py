"""One `gq quantize` run: calibrate (cached), quantize every linear (resumable), export.

Thin orchestration over the pure quantizers in ``quantize.methods`` and the calibration cache.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from gq_kernels.format import QuantResult
from gq_kernels.registry import get_format
from gq_quantize.config import QuantizeConfig
from gq_quantize.methods.guided import guided_quantize
from gq_quantize.methods.objective import quadratic_objective
from gq_quantize.methods.registry import get_method
from gq_serve.util import atomic_write


class QuantizeError(Exception):
    """A user-facing problem with the inputs of a quantization run (bad directory, bad option)."""


def validate_model_dir(model_dir: Path) -> dict:
    """Check ``model_dir`` is a Hugging Face causal-LM directory; return its config.json."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise QuantizeError(
            f"model directory {model_dir} does not exist; pass a Hugging Face model directory "
            "(run `gq prepare` for the offline SmolLM2 model)"
        )
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise QuantizeError(f"{model_dir} is not a Hugging Face model directory: it has no config.json")
    config = json.loads(config_path.read_text())
    if config.get("quantization_config"):
        raise QuantizeError(
            f"{model_dir} is already quantized ({config['quantization_config'].get('quant_method')}); "
            "quantize the original fp16/bf16/fp32 model instead"
        )
    archs = config.get("architectures") or []
    if not any(a.endswith("ForCausalLM") for a in archs):
        raise QuantizeError(
            f"{model_dir} is not a causal language model (architectures={archs}); "
            "gq quantizes *ForCausalLM models"
        )
    return config


def check_groups(linears: dict[str, torch.nn.Linear], groups: int) -> None:
    """GuidedQuant splits output channels into ``groups`` equal blocks: each layer's size must divide."""
    for name, lin in linears.items():
        if lin.out_features % groups:
            raise QuantizeError(
                f"--groups {groups} does not divide the {lin.out_features} output channels of {name}; "
                "choose a divisor (1, 2, 4, ... )"
            )


def _run_dir(out_dir: Path, qconfig: QuantizeConfig, model_hash: str, data_hash: str) -> Path:
    """Where per-layer results of an unfinished run live, keyed by everything that decides them."""
    # The fine-tune runs after every layer is done: its settings do not decide the layers.
    # guided_shrink joined the config later: left out at its default, older runs keep their key.
    exclude = {"finetune"} | (set() if qconfig.guided_shrink else {"guided_shrink"})
    key = json.dumps([qconfig.model_dump(exclude=exclude), model_hash, data_hash], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return out_dir.parent / f".{out_dir.name}.partial-{digest}"


def _save_result(path: Path, result: QuantResult, objective: float | None) -> None:
    """One finished layer of an unfinished run: the result's tensors, its scalar fields, objective."""
    meta = {"format": result.format, "scalars": json.dumps(result.scalars()), "objective": json.dumps(objective)}
    tensors = {k: v.contiguous() for k, v in result.tensors().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), fsync=False)


def _load_result(path: Path) -> tuple[QuantResult, float | None]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    result_cls = get_format(meta["format"]).Result
    return result_cls(**load_file(str(path)), **json.loads(meta["scalars"])), json.loads(meta["objective"])


def quantize_layer(w: torch.Tensor, qconfig: QuantizeConfig, hessian: torch.Tensor | None,
                   fisher: torch.Tensor | None, name: str = "", model_config=None) -> QuantResult:
    """Quantize one weight matrix with the configured method.

    Args:
        w: float32 [out, in].
        hessian: float32 [g, in, in] (g = qconfig.hessian_groups()), or None for methods that need
            none. A Hessian-based method runs once per output-channel group (GuidedQuant's
            Algorithm 1; g = 1 is the plain method).
        fisher: float32 [out, in] diagonal weight Fisher, or None.
        name, model_config: the linear's module name and the model's HF config, for methods whose
            options depend on the layer (``MethodConfig.for_layer``).
    """
    method = get_method(qconfig.method)
    options = qconfig.options.for_layer(name, model_config)
    if "hessian" in qconfig.needs():
        return guided_quantize(method.handler, w, hessian, fisher=fisher, cfg=options)
    return method.handler(w, None, fisher, options)


def _stages(layer: torch.nn.Module, prefix: str, inputs: torch.Tensor, call, device) -> list[list[str]]:
    """The layer's linears in groups that run on one input, in execution order (see
    ``calibration.hessians.linear_stages``)."""
    from gq_quantize.calibration.hessians import linear_stages

    return linear_stages(layer, prefix, inputs, call, device)


def apply_quantized(lin: torch.nn.Linear, result: QuantResult) -> None:
    """Replace the weights of ``lin`` by the quantizer's W_hat (what a loaded checkpoint computes)."""
    with torch.no_grad():
        lin.weight.copy_(result.dequantize().to(lin.weight.device, lin.weight.dtype))


def _coarse_saliency(cache, name: str, groups: int) -> torch.Tensor:
    """The cached token saliency [N, G] of ``name`` averaged to ``groups`` groups: [N, groups]."""
    s = cache.saliency(name)
    return s.reshape(s.shape[0], groups, s.shape[1] // groups).mean(dim=-1)


def quantize_sequential(model, qconfig: QuantizeConfig, cache, windows: torch.Tensor, run_dir: Path,
                        results: dict[str, QuantResult], objectives: dict[str, float | None], device: str,
                        progress: bool, streamed=None) -> int:
    """Quantize every decoder linear in order, each from Hessians of the already quantized model.

    Layer by layer, the calibration windows run through the model; inside a layer, the linears go
    in groups (:func:`_stages`): a group's Hessians are taken from a forward pass of the layer in
    which every earlier group already holds its quantized weights W_hat, the group is quantized,
    and its weights are replaced by W_hat. The layer's outputs with all of its weights quantized
    are the next layer's inputs. GuidedQuant's saliency and the Fisher stay those of the
    unquantized model (from ``cache``). Resumable: finished linears are files in ``run_dir`` and
    the next layer's inputs are saved after every layer. Fills ``results`` / ``objectives``
    (objective: the quadratic objective under the Hessian the quantizer used); returns the
    number of linears loaded from an earlier run. ``streamed`` (a ``StreamedModel`` whose ``model``
    is ``model``): each decoder layer's weights are read when the layer's turn comes and dropped
    after it (its quantized weights live on in ``results``).
    """
    from contextlib import nullcontext

    from gq_quantize.calibration.hessians import (capture_layer_calls, decoder_layers, layer_linears,
                                                   layer_outputs, run_layer, shrink_to_plain)

    def resident(idx: int | None):
        if streamed is None:
            return nullcontext()
        return streamed.embeddings() if idx is None else streamed.layer(idx)

    needs = qconfig.needs()
    layers, prefix = decoder_layers(model)
    with resident(None):
        first, calls = capture_layer_calls(model, windows, device)
    state_path = run_dir / "sequential.json"
    start = json.loads(state_path.read_text())["next_layer"] if state_path.exists() else 0
    inputs = first if start == 0 else load_file(str(run_dir / f"inputs_layer_{start:02d}.safetensors"))["hidden"]
    del first
    resumed = 0
    bar = tqdm(range(len(layers)), desc=f"quantize {qconfig.method} {qconfig.bits}-bit (sequential)",
               unit="layer", disable=not progress, file=sys.stderr)
    for idx in bar:
        layer, lp = layers[idx], f"{prefix}.{idx}"
        lins = layer_linears(layer, lp)
        if idx < start:  # quantized by an earlier run; its outputs are already in ``inputs``
            for name in lins:
                results[name], objectives[name] = _load_result(run_dir / f"{name}.safetensors")
                resumed += 1
            continue
        with resident(idx):
            for stage in _stages(layer, lp, inputs, calls[idx][0], device):
                todo = [n for n in stage if not (run_dir / f"{n}.safetensors").exists()]
                for name in stage:
                    if name not in todo:
                        results[name], objectives[name] = _load_result(run_dir / f"{name}.safetensors")
                        resumed += 1
                if todo:
                    sal = ({n: _coarse_saliency(cache, n, qconfig.groups) for n in todo} if qconfig.guided else None)
                    hess, _ = run_layer(layer, lp, inputs, calls[idx], sal, device, only=set(todo), outputs=False)
                    del sal
                    for name in todo:
                        if qconfig.guided:
                            hessian = shrink_to_plain(hess.guided[name], hess.plain[hess.plain_owner[name]],
                                                      qconfig.guided_shrink)
                        else:
                            hessian = hess.plain[hess.plain_owner[name]].unsqueeze(0)
                        w = lins[name].weight.detach().float().cpu()
                        fisher = cache.weight_fisher(name) if "fisher" in needs else None
                        result = quantize_layer(w.to(device), qconfig, hessian.to(device),
                                                None if fisher is None else fisher.to(device), name,
                                                model.config).to("cpu")
                        objective = quadratic_objective(w, result.dequantize(), hessian)
                        _save_result(run_dir / f"{name}.safetensors", result, objective)
                        results[name], objectives[name] = result, objective
                    del hess
                for name in stage:  # later groups and layers see the quantized weights
                    apply_quantized(lins[name], results[name])
            inputs = layer_outputs(layer, inputs, calls[idx], device)
        if idx + 1 < len(layers):
            nxt = run_dir / f"inputs_layer_{idx + 1:02d}.safetensors"
            atomic_write(nxt, lambda tmp, t=inputs: save_file({"hidden": t.contiguous()}, str(tmp)), fsync=False)
            atomic_write(state_path, json.dumps({"next_layer": idx + 1}), fsync=False)
            (run_dir / f"inputs_layer_{idx:02d}.safetensors").unlink(missing_ok=True)
    return resumed


def quantize_model(model_dir: Path, qconfig: QuantizeConfig, out_dir: Path, cache_root: Path,
                   overwrite: bool = False, device: str = "cpu", progress: bool = True,
                   recalibrate: bool = False, streamed: bool = False, offload_dir: Path | None = None) -> dict:
    """Quantize every decoder linear of the model in ``model_dir`` and export a checkpoint to ``out_dir``.

    Per-layer results are kept in a hidden directory beside ``out_dir`` until the export finishes,
    so a killed run resumes where it stopped. Returns a summary: out_dir, wall time per stage
    (seconds), the number of layers resumed from a previous run, and the summed layer objective.

    streamed: never hold the whole model: the calibration passes and the quantization read one
    decoder layer's weights at a time from the safetensors files (same results, same caches;
    ``docs/internals.md``, "Models larger than memory"). offload_dir: where the streamed gradient
    pass keeps each layer's inputs (default: host memory).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gq_quantize.calibration import CalibrationCache, model_hash, quantizable_linears
    from gq_quantize.calibration.hessians import shrink_to_plain
    from gq_quantize.data import calibration_windows, data_hash
    from gq_quantize.export import export_checkpoint

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise QuantizeError(f"output directory {out_dir} already exists; pass --overwrite to replace it")
    if qconfig.finetune.steps and streamed:
        raise QuantizeError("--finetune-steps trains the whole quantized model against the unquantized one in "
                            "memory; it cannot run with --streamed (drop one of them)")
    after = qconfig.options.after_quantize()
    if after is not None and streamed:
        raise QuantizeError(f"--method {qconfig.method} ends with a pass over the whole quantized model in memory, "
                            f"which --streamed cannot hold: pass {type(qconfig.options).after_quantize_off} or drop "
                            "--streamed")
    validate_model_dir(model_dir)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    lazy = None
    if streamed:
        from gq_quantize.calibration.streamed import StreamedModel

        lazy = StreamedModel(model_dir, device=device)
        model = lazy.model
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        model.eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    linears = quantizable_linears(model)
    if not linears:
        raise QuantizeError(f"found no linear layers under model.layers in {model_dir}")
    if qconfig.guided:
        check_groups(linears, qconfig.groups)
    timings["load_model_s"] = time.perf_counter() - t0

    calib = qconfig.calibration
    t0 = time.perf_counter()
    cache, windows_hash = None, "none"  # RTN reads no calibration data
    needs = qconfig.needs()
    if needs or qconfig.finetune.steps or after is not None:
        windows = calibration_windows(tokenizer, calib.data, calib.n_samples, calib.seq_len, calib.seed,
                                      cache_root)
        windows_hash = data_hash(windows)
    # Sequential GPTQ without GuidedQuant takes nothing from the cache (its Hessians are its own).
    if needs and not (qconfig.sequential and not qconfig.guided and needs == {"hessian"}):
        # Sequential calibration computes its own Hessians; it needs the cache only for the
        # saliency (GuidedQuant) and the Fisher, both from the unquantized model.
        cache = CalibrationCache.open_or_build(
            cache_root, model, model_dir, windows, groups=qconfig.hessian_groups(),
            need_guided=qconfig.guided, need_fisher="fisher" in needs, device=device,
            progress=progress, need_hessians="hessian" in needs and not qconfig.sequential,
            recalibrate=recalibrate, streamed=lazy, offload_dir=offload_dir)
    timings["calibration_s"] = time.perf_counter() - t0
    from gq_quantize.calibration.distributed import rank_world

    rank, world = rank_world()
    if rank != 0:  # several processes share the calibration passes; process 0 quantizes and exports
        return {"rank": rank, "world_size": world, "calibration_s": round(timings["calibration_s"], 2)}
    # The cache already fingerprinted the model; hash it here only when no cache was needed.
    model_id = (cache.manifest["model_hash"] if cache is not None
                else model_hash(model_dir, linears, None if lazy is None else lazy.get_weight))

    run_dir = _run_dir(out_dir, qconfig, model_id, windows_hash)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / "quantize_config.json", qconfig.model_dump_json(indent=2))

    results: dict[str, QuantResult] = {}
    objectives: dict[str, float | None] = {}
    resumed = 0
    t0 = time.perf_counter()
    if qconfig.sequential:
        resumed = quantize_sequential(model, qconfig, cache, windows, run_dir, results, objectives, device,
                                      progress, streamed=lazy)
    bar = tqdm(linears.items() if not qconfig.sequential else [],
               desc=f"quantize {qconfig.method} {qconfig.bits}-bit", unit="layer",
               disable=not progress or qconfig.sequential, file=sys.stderr)
    for name, lin in bar:
        part = run_dir / f"{name}.safetensors"
        if part.exists():
            results[name], objectives[name] = _load_result(part)
            resumed += 1
            continue
        w = lin.weight.detach().float() if lazy is None else lazy.weight(name)
        hessian = cache.hessian(name, guided=qconfig.guided, groups=qconfig.groups) if "hessian" in needs else None
        if hessian is not None and qconfig.guided_shrink:
            hessian = shrink_to_plain(hessian, cache.hessian(name, guided=False), qconfig.guided_shrink)
        fisher = cache.weight_fisher(name) if "fisher" in needs else None
        result = quantize_layer(w.to(device), qconfig, None if hessian is None else hessian.to(device),
                                None if fisher is None else fisher.to(device), name, model.config)
        result = result.to("cpu")
        objective = None
        if hessian is not None:
            objective = quadratic_objective(w, result.dequantize(), hessian)
        _save_result(part, result, objective)
        results[name], objectives[name] = result, objective
    timings["quantize_s"] = time.perf_counter() - t0

    # The method's own last pass (w4a4: each linear's activation clip ratio) comes before the
    # fine-tune, so that the fine-tune trains the model as it will be served.
    if after is not None:
        t0 = time.perf_counter()
        results = after(model, results, windows.to(device), progress)
        timings["after_quantize_s"] = time.perf_counter() - t0
    finetuned, tuned_tensors = None, {}
    if qconfig.finetune.steps:
        from gq_quantize.finetune import finetune_results

        t0 = time.perf_counter()
        try:
            ft_windows = windows
            if qconfig.finetune.windows:
                ft_windows = calibration_windows(tokenizer, calib.data, qconfig.finetune.windows, calib.seq_len,
                                                 calib.seed, cache_root)
            results, tuned_tensors, finetuned = finetune_results(model, results, ft_windows, qconfig.finetune,
                                                                 progress, state_path=run_dir / "finetune_state.pt")
        except ValueError as e:
            raise QuantizeError(str(e)) from None
        timings["finetune_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    del model
    extra = {
        "calibration": {"data": calib.data, "n_samples": calib.n_samples, "seq_len": calib.seq_len,
                        "seed": calib.seed, "data_hash": windows_hash, "model_hash": model_id,
                        "sequential": qconfig.sequential},
        "objectives": objectives,
        "timings": timings,
    }
    if finetuned is not None:
        extra["finetune"] = finetuned
    export_checkpoint(model_dir, results, qconfig, out_dir, manifest_extra=extra, overwrite=overwrite,
                      tuned=tuned_tensors)
    timings["export_s"] = time.perf_counter() - t0
    shutil.rmtree(run_dir, ignore_errors=True)
    known = [v for v in objectives.values() if v is not None]
    return {"out_dir": str(out_dir), "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "layers": len(results), "layers_resumed": resumed,
            "objective_sum": sum(known) if known else None}

