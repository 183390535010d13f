"""Read, validate and load checkpoints: quantized (``quant_method == "guidedquant"``) or plain fp16.

The loader guesses nothing: ``quantization_config`` names the format, bits, group size and the
dense linears (``modules_to_not_convert``, exact module names); every other ``nn.Linear`` is a
``GQLinear`` whose tensors' shapes and dtypes follow from the config and the layer. Any missing,
unexpected, mis-shaped or mis-typed tensor is refused with a ValueError that names it.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from gq_serve.quant_linear import FORMATS, GQLinear
from kernels.bcq.reference import SUPPORTED_BITS as BCQ_BITS
from kernels.lut.reference import SUPPORTED_BITS as LUT_BITS

QUANT_METHOD = "guidedquant"
FORMAT_VERSION = 1
INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "gq_manifest.json"
_FORMAT_BITS = {"lut": LUT_BITS, "bcq": BCQ_BITS}
_MAX_LISTED = 10  # problems listed in one error message


def _config_json(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; point at a Hugging Face model directory")
    return json.loads(path.read_text())


def is_quantized_checkpoint(ckpt_dir: Path) -> bool:
    """True when config.json carries a ``quantization_config`` (of any method)."""
    return "quantization_config" in _config_json(ckpt_dir)


def validate_quantization_config(qc: dict) -> dict:
    """Check a ``quantization_config`` block; return a normalised copy.

    Required: quant_method == "guidedquant", format in FORMATS, bits supported by the format,
    format_version == 1, group_size (-1 or >= 1), modules_to_not_convert (list of module names).
    """
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {type(qc).__name__}")
    method = qc.get("quant_method")
    if method != QUANT_METHOD:
        raise ValueError(f"quantization_config.quant_method is {method!r}; this loader reads {QUANT_METHOD!r} only")
    version = qc.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"quantization_config.format_version is {version!r}, this gq-serve reads version {FORMAT_VERSION}; "
            "re-export the checkpoint with this gq-serve version or upgrade gq-serve"
        )
    fmt = qc.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"quantization_config.format is {fmt!r}; expected one of {list(FORMATS)}")
    bits = qc.get("bits")
    # bool is an int subclass: refuse ``true`` explicitly.
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in _FORMAT_BITS[fmt]:
        raise ValueError(f"quantization_config.bits is {bits!r}; format {fmt!r} supports {list(_FORMAT_BITS[fmt])}")
    group_size = qc.get("group_size", -1)
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not (group_size == -1 or group_size >= 1):
        raise ValueError(f"quantization_config.group_size is {group_size!r}; expected -1 (per channel) or >= 1")
    if fmt == "lut" and group_size != -1:
        raise ValueError(f"format 'lut' has per-row codebooks; quantization_config.group_size must be -1, got {group_size}")
    skip = qc.get("modules_to_not_convert", [])
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ValueError("quantization_config.modules_to_not_convert must be a list of module names")
    out = dict(qc)
    out.update(group_size=group_size, modules_to_not_convert=list(skip))
    return out


def read_quantization_config(ckpt_dir: Path) -> dict:
    """The validated ``quantization_config`` of a checkpoint (see :func:`validate_quantization_config`)."""
    config = _config_json(ckpt_dir)
    if "quantization_config" not in config:
        raise ValueError(f"{ckpt_dir}/config.json has no quantization_config; it is not a quantized checkpoint")
    return validate_quantization_config(config["quantization_config"])


def weight_files(ckpt_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's files, or every ``*.safetensors``."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_NAME
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (ckpt_dir / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{INDEX_NAME} lists shard(s) missing from {ckpt_dir}: {missing}")
        return [ckpt_dir / n for n in names]
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{ckpt_dir} holds no *.safetensors files")
    return files


def verify_checkpoint_files(ckpt_dir: Path) -> None:
    """Compare every file's sha256 with gq_manifest.json; raise ValueError naming a corrupt file."""
    ckpt_dir = Path(ckpt_dir)
    manifest = json.loads((ckpt_dir / MANIFEST_NAME).read_text())
    for name, want in manifest["files"].items():
        h = hashlib.sha256()
        with open(ckpt_dir / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        if h.hexdigest() != want:
            raise ValueError(f"{ckpt_dir / name}: sha256 differs from {MANIFEST_NAME}; the file is corrupt or edited")


def quantize_linears(model: nn.Module, qc: dict, dtype: torch.dtype) -> dict[str, GQLinear]:
    """Replace every ``nn.Linear`` not in ``modules_to_not_convert`` by an empty ``GQLinear`` (in place)."""
    skip = set(qc["modules_to_not_convert"])
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    replaced = {}
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = GQLinear(
            lin.in_features, lin.out_features, qc["format"], qc["bits"], qc["group_size"],
            bias=lin.bias is not None, dtype=dtype,
        )
        setattr(parent, child, q)
        replaced[name] = q
    return replaced


def _alias_groups(model: nn.Module) -> dict[str, frozenset[str]]:
    """state_dict name -> all names sharing that tensor (tied embeddings appear under two names)."""
    by_id: dict[int, set[str]] = {}
    sd = model.state_dict(keep_vars=True)
    for name, t in sd.items():
        by_id.setdefault(id(t), set()).add(name)
    return {name: frozenset(by_id[id(t)]) for name, t in sd.items()}


def load_state_checked(model: nn.Module, files: list[Path]) -> None:
    """Copy every tensor of ``files`` into ``model`` after checking name, shape and dtype.

    Quantized buffers (int32 qweight, fp16 codebook/scales/offsets) must match dtype exactly; dense
    tensors must be floating point and are cast to the model's dtype. Raises ValueError listing
    every missing / unexpected / mismatched tensor with expected vs found.
    """
    targets = model.state_dict(keep_vars=True)
    quant_keys = {
        f"{mname}.{b}" for mname, m in model.named_modules() if isinstance(m, GQLinear) for b, _ in m.named_buffers()
    }
    aliases = _alias_groups(model)
    problems: list[str] = []
    loaded: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as fh:
            for name in fh.keys():
                if name not in targets:
                    problems.append(f"unexpected tensor {name!r} in {path.name}")
                    continue
                t = fh.get_tensor(name)
                dst = targets[name]
                if tuple(t.shape) != tuple(dst.shape):
                    problems.append(f"{name}: expected shape {list(dst.shape)}, found {list(t.shape)} in {path.name}")
                    continue
                if name in quant_keys and t.dtype != dst.dtype:
                    problems.append(f"{name}: expected dtype {dst.dtype}, found {t.dtype} in {path.name}")
                    continue
                if name not in quant_keys and not t.dtype.is_floating_point:
                    problems.append(f"{name}: expected a floating-point tensor, found {t.dtype} in {path.name}")
                    continue
                with torch.no_grad():
                    dst.copy_(t)
                loaded.add(name)
    missing = sorted(n for n in targets if not (aliases[n] & loaded))
    problems += [f"missing tensor {n!r} ({'packed' if n in quant_keys else 'dense'})" for n in missing]
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(
            f"checkpoint does not match the model its config describes ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:_MAX_LISTED]) + more
            + "\nRe-export the checkpoint, or check that config.json belongs to these weights."
        )


def load_quantized_model(ckpt_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Build the HF causal LM of ``ckpt_dir`` with ``GQLinear`` layers and load its tensors.

    A directory without ``quantization_config`` is loaded as a plain HF model (fp16 baselines).
    Returns the model in eval mode on ``device``; dense parameters in ``dtype``; the validated
    ``quantization_config`` is kept as ``model.gq_quantization_config`` (None for plain models).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt_dir = Path(ckpt_dir)
    if not is_quantized_checkpoint(ckpt_dir):
        model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype)
        model.gq_quantization_config = None
        return model.to(device).eval()

    qc = read_quantization_config(ckpt_dir)
    config = AutoConfig.from_pretrained(ckpt_dir)
    # transformers must not see our method: the layers are swapped here, not by its quantizer.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: random init only costs time
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():  # every tensor is overwritten by the checkpoint below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_weights (skipped above) is also what ties lm_head to the embeddings
    quantize_linears(model, qc, dtype)
    load_state_checked(model, weight_files(ckpt_dir))
    model.gq_quantization_config = qc
    return model.to(device).eval()
