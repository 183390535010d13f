"""Write a quantized checkpoint: an HF model directory with packed tensors, config and manifest.

Layout written into ``out_dir`` (see /work/shared/design.md, "Checkpoint contract"):
    config.json               source config + ``quantization_config`` (incl. ``modules_to_not_convert``)
    model.safetensors         or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    gq_manifest.json          provenance: method, bits, g, hashes, objectives, checksums
    tokenizer / generation_config / other non-weight files copied from the source

Rule the loader relies on: every ``nn.Linear`` of the model whose full name is not listed in
``modules_to_not_convert`` is quantized and stored as ``<name>.<suffix>`` for each tensor the
format declares (:meth:`gq_kernels.format.Format.tensors`).

The export is atomic: everything is built in a hidden temp dir beside ``out_dir`` and renamed at the
end; on any error the temp dir is removed and an existing ``out_dir`` is left untouched.
"""
from __future__ import annotations

import json
import math
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from gq_kernels.format import FormatParams, QuantResult
from gq_kernels.registry import get_format
from gq_kernels.schema import QuantizationConfig
from gq_quantize.config import QuantizeConfig
from gq_serve.util import (
    atomic_write,
    package_version,
    publish_mode,
    replace_dir,
    sha256_file,
    tensor_sha256,
    write_json,
)

MANIFEST_NAME = "gq_manifest.json"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Never copied from the source: weights (re-written here), configs we rewrite, other tools' metadata.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_SKIP_NAMES = {"config.json", INDEX_NAME, "pytorch_model.bin.index.json", MANIFEST_NAME, "gq_asset.json"}
_RESERVED_MANIFEST_KEYS = {"manifest_version", "package", "quantization", "layers", "files", "tensors"}


# ----------------------------------------------------------------------------- source reading
def source_weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single-file or index-sharded HF directory."""
    index = model_dir / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / fname for name, fname in weight_map.items()}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{model_dir} holds no *.safetensors weights; re-save the model with "
            "`model.save_pretrained(dir)` (safetensors is the default) and export from that directory"
        )
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            out.update({name: f for name in fh.keys()})
    return out


def linear_shapes(config_dict: dict) -> dict[str, tuple[int, int, bool]]:
    """Every ``nn.Linear`` of the architecture: name -> (out_features, in_features, has_bias).

    Built on the meta device, so no memory or time is spent on weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return {
        name: (m.out_features, m.in_features, m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


# ----------------------------------------------------------------------------- validation
def _check_layer(name: str, q: QuantResult, params: FormatParams, shape: tuple[int, int]) -> None:
    """Refuse a quantizer result that does not match the config or the layer it replaces."""
    want_type = get_format(params.format).Result
    if not isinstance(q, want_type):
        raise TypeError(f"{name}: format {params.format!r} needs a {want_type.__name__}, got {type(q).__name__}")
    q.check(name, params, *shape)


# ----------------------------------------------------------------------------- writing
def _tensor_stream(
    weight_map: dict[str, Path], quantized: dict[str, QuantResult], params: FormatParams,
    shapes: dict[str, tuple[int, ...]], tuned: dict[str, torch.Tensor],
) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(name, loader) for every output tensor, in sorted name order; loaders read lazily. A name in
    ``tuned`` is written with that value in the source tensor's dtype."""
    replaced = {f"{m}.weight" for m in quantized}
    items: dict[str, Callable[[], torch.Tensor]] = {}
    for name, path in weight_map.items():
        if name in replaced:
            continue

        def load(name=name, path=path) -> torch.Tensor:
            with safe_open(path, framework="pt") as fh:
                source = fh.get_tensor(name)
            if name not in tuned:
                return source
            return tuned[name].detach().to("cpu", source.dtype).contiguous()

        items[name] = load
    fmt = get_format(params.format)
    for module, q in quantized.items():
        memo: dict[str, torch.Tensor] = {}  # one pack per module, shared by its tensors

        def load_packed(suffix: str, q=q, memo=memo) -> torch.Tensor:
            if not memo:
                memo.update(fmt.pack(q))
            return memo.pop(suffix)  # pop: each tensor is written once, then freed

        for suffix in fmt.tensors(params, *shapes[module][:2]):
            items[f"{module}.{suffix}"] = lambda s=suffix, f=load_packed: f(s)
    for name in sorted(items):
        yield name, items[name]


def _write_shards(tmp: Path, stream, max_shard_bytes: int) -> tuple[dict[str, str], dict[str, str]]:
    """Write tensors into shards of at most ``max_shard_bytes`` (a bigger single tensor gets its own).

    Returns (weight_map name -> file name, per-tensor sha256).
    """
    shards: list[list[str]] = []
    checksums: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal current, size
        if current:
            path = tmp / f"shard-{len(shards):05d}.tmp"
            save_file(current, str(path), metadata={"format": "pt"})
            publish_mode(path)
            shards.append(list(current))
            current, size = {}, 0

    for name, load in stream:
        t = load().contiguous()
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            flush()
        checksums[name] = tensor_sha256(t)
        current[name] = t
        size += nbytes
    flush()

    weight_map: dict[str, str] = {}
    n = len(shards)
    for i, names in enumerate(shards):
        fname = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (tmp / f"shard-{i:05d}.tmp").rename(tmp / fname)
        weight_map.update({name: fname for name in names})
    return weight_map, checksums


def _jsonable(x):
    """Stats and extras may hold tensors / numpy scalars; the manifest wants plain JSON."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if hasattr(x, "item") and callable(x.item):  # numpy scalar
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


def _build(
    source: Path,
    quantized: dict[str, QuantResult],
    qconfig: QuantizeConfig,
    tmp: Path,
    manifest_extra: dict,
    max_shard_bytes: int,
    tuned: dict[str, torch.Tensor],
) -> None:
    """Fill ``tmp`` with the complete checkpoint."""
    params = qconfig.format_params()
    config = json.loads((source / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{source} is already quantized (config.json has quantization_config); export from fp16")
    linears = linear_shapes(config)
    weight_map = source_weight_map(source)
    for name, q in quantized.items():
        if name not in linears:
            raise ValueError(
                f"quantized module {name!r} is not an nn.Linear of this model; keys must be HF module names "
                f"such as 'model.layers.0.self_attn.q_proj' (no '.weight' suffix)"
            )
        if f"{name}.weight" not in weight_map:
            raise ValueError(f"{name}.weight is not in the source checkpoint {source}; is the config the right one?")
        _check_layer(name, q, params, linears[name][:2])
    quantized_weights = {f"{m}.weight" for m in quantized}
    for name, value in tuned.items():
        if name not in weight_map or name in quantized_weights:
            raise ValueError(f"tuned tensor {name!r} is not a non-quantized tensor of {source}; tuned tensors "
                             f"replace source tensors of the same name (e.g. 'model.norm.weight')")
        with safe_open(weight_map[name], framework="pt") as fh:
            shape = tuple(fh.get_slice(name).get_shape())
        if tuple(value.shape) != shape:
            raise ValueError(f"tuned tensor {name!r} has shape {tuple(value.shape)}, the source's is {shape}")

    qc = QuantizationConfig.for_export(params, sorted(set(linears) - set(quantized)), provenance=qconfig.flat())
    config["quantization_config"] = qc.to_dict()

    st_map, tensor_sums = _write_shards(tmp, _tensor_stream(weight_map, quantized, params, linears, tuned),
                                     max_shard_bytes)
    files = sorted(set(st_map.values()))
    if len(files) > 1:
        total = sum((tmp / f).stat().st_size for f in files)
        write_json(tmp / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": dict(sorted(st_map.items()))})
    atomic_write(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in sorted(source.iterdir()):
        if f.is_file() and f.name not in _SKIP_NAMES and not f.name.endswith(_SKIP_SUFFIXES):
            shutil.copy2(f, tmp / f.name)
            publish_mode(tmp / f.name)

    manifest = {
        "manifest_version": 1,
        "package": {"name": "gq-serve", "version": package_version()},
        "quantization": {
            "method": qconfig.method,
            "format": qconfig.format,
            **params.model_dump(),
            "g": qconfig.groups,
            "guided": qconfig.guided,
        },
        "layers": {name: _jsonable(q.stats) for name, q in sorted(quantized.items())},
        **_jsonable(manifest_extra),
        # sha256 of every file except this manifest, and of every tensor's raw bytes.
        "files": {f.name: sha256_file(f) for f in sorted(tmp.iterdir()) if f.is_file()},
        "tensors": tensor_sums,
    }
    write_json(tmp / MANIFEST_NAME, manifest)


def export_checkpoint(
    source_model_dir: Path,
    quantized: dict[str, QuantResult],
    qconfig: QuantizeConfig,
    out_dir: Path,
    manifest_extra: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    tuned: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a quantized HF checkpoint to ``out_dir`` atomically and return ``out_dir``.

    Args:
        source_model_dir: the fp16 HF directory the layers were quantized from (config.json,
            safetensors, tokenizer files). Non-quantized tensors are copied verbatim.
        quantized: HF module name (e.g. ``model.layers.0.mlp.up_proj``) -> quantizer result of the
            format and parameters ``qconfig`` describes. Linears not listed stay dense and are named in
            ``quantization_config["modules_to_not_convert"]``.
        qconfig: the run's config; its format parameters and options become ``quantization_config``.
        manifest_extra: provenance merged into gq_manifest.json, e.g.
            ``{"calibration": {"data_hash": ..., "model_hash": ...}, "objectives": {layer: value}}``.
        overwrite: replace an existing ``out_dir`` (only once the new checkpoint is complete).
        max_shard_bytes: safetensors shard size limit; above it shards + an index are written.
        tuned: source tensor name -> a new value of the same shape (the norms ``--finetune-norms``
            trained), written in the source's dtype instead of the source tensor.
    Raises:
        FileExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ValueError / TypeError: a quantized layer does not fit the model or the config.
    """
    source, out_dir = Path(source_model_dir).resolve(), Path(out_dir).resolve()
    manifest_extra = dict(manifest_extra or {})
    clash = _RESERVED_MANIFEST_KEYS & set(manifest_extra)
    if clash:
        raise ValueError(f"manifest_extra may not set reserved keys {sorted(clash)}; rename them")
    if out_dir == source:
        raise ValueError(f"out_dir {out_dir} is the source model directory; choose another output directory")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory; remove it or choose another path")
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{source} has no config.json; point source_model_dir at an HF model directory")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build(source, quantized, qconfig, tmp, manifest_extra, max_shard_bytes, dict(tuned or {}))
        if out_dir.exists() and not overwrite:  # appeared while we were writing
            raise FileExistsError(f"{out_dir} already exists; pass --overwrite (overwrite=True) to replace it")
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
