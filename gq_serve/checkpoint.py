"""Read, validate and load checkpoints: quantized (``quant_method == "guidedquant"``) or plain HF.

The loader guesses nothing: ``quantization_config`` (:mod:`gq_kernels.schema`) names the format and
its parameters and the dense linears (``modules_to_not_convert``, exact module names); every other
``nn.Linear`` is a ``GQLinear`` whose tensors' shapes and dtypes follow from the format and the
layer. Any missing, unexpected, mis-shaped or mis-typed tensor is refused with a ValueError that
names it. Model loading for every entry point (engine, server, eval, bench) and the dtype rules
live here.

Integrity: a checkpoint's ``gq_manifest.json`` holds the sha256 of every file and of every tensor's
bytes. Loading checks each tensor's hash as it is read (the bytes are in memory anyway: about
0.1 s per 100 MB), every other listed file in full (config, tokenizer: small) and that config.json
agrees with the manifest; a mismatch is refused naming the file and the tensor
(:class:`CheckpointIntegrityError`). ``gq verify`` also hashes the weight files whole;
:func:`verify_files` does that with a cache keyed by path, size and mtime (the vLLM launcher).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from gq_kernels.schema import QuantizationConfig, parse_quantization_config
from gq_serve.quant_linear import GQLinear, install_kv_cache, select_kernels
from gq_serve.util import cache_root, sha256_file, tensor_sha256, write_json

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "gq_manifest.json"
_MAX_LISTED = 10  # problems listed in one error message

DTYPES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """'auto' means fp16 on a GPU and fp32 on the CPU (CPU fp16 matmuls are slow or unsupported)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if str(device).startswith("cuda") else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}: use one of auto, {', '.join(DTYPES)}") from None


def _config_json(ckpt_dir: Path) -> dict:
    path = Path(ckpt_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; point at a Hugging Face model directory")
    return json.loads(path.read_text())


def is_quantized_checkpoint(ckpt_dir: Path) -> bool:
    """True when config.json carries a ``quantization_config`` (of any method)."""
    return "quantization_config" in _config_json(ckpt_dir)


def read_quantization_config(ckpt_dir: Path) -> QuantizationConfig:
    """The validated ``quantization_config`` of a checkpoint (errors name the field)."""
    config = _config_json(ckpt_dir)
    if "quantization_config" not in config:
        raise ValueError(f"{ckpt_dir}/config.json has no quantization_config; it is not a quantized checkpoint")
    return parse_quantization_config(config["quantization_config"])


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


class CheckpointIntegrityError(ValueError):
    """The checkpoint's files do not match its manifest (corrupt, truncated, missing or edited)."""

    def __init__(self, ckpt_dir: Path, problems: list[str]) -> None:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        super().__init__(
            f"{ckpt_dir}: the checkpoint does not match its {MANIFEST_NAME} ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:_MAX_LISTED]) + more
            + "\nThe files are corrupt, truncated or edited: copy or export the checkpoint again "
              "(`gq verify` checks a checkpoint without loading it for serving)."
        )
        self.problems = problems


def read_manifest(ckpt_dir: Path) -> dict | None:
    """``gq_manifest.json`` (None when the directory has none); ValueError if it is unreadable."""
    path = Path(ckpt_dir) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointIntegrityError(Path(ckpt_dir), [f"{MANIFEST_NAME} is not valid JSON ({exc})"]) from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict) \
            or not isinstance(manifest.get("tensors", {}), dict):
        raise CheckpointIntegrityError(Path(ckpt_dir), [f"{MANIFEST_NAME} has no 'files' checksums"])
    return manifest


def config_manifest_problems(config: dict, manifest: dict) -> list[str]:
    """Where config.json's quantization_config disagrees with the manifest's record of the export."""
    qc, recorded = config.get("quantization_config") or {}, manifest.get("quantization") or {}
    problems = []
    for key in sorted(set(qc) & set(recorded) - {"quant_method"}):
        if qc[key] != recorded[key] and not isinstance(qc[key], (dict, list)):
            problems.append(f"config.json quantization_config.{key} is {qc[key]!r} but {MANIFEST_NAME} "
                            f"recorded {recorded[key]!r} (config.json was edited or belongs to another checkpoint)")
    return problems


def small_file_problems(ckpt_dir: Path, manifest: dict) -> list[str]:
    """Missing listed files, and sha256 mismatches of the listed files that are not safetensors
    (config, tokenizer, index: small; weight files are checked per tensor as they load)."""
    problems = []
    for name, want in sorted(manifest["files"].items()):
        path = Path(ckpt_dir) / name
        if not path.is_file():
            problems.append(f"{name} is missing (listed in {MANIFEST_NAME})")
        elif not name.endswith(".safetensors") and sha256_file(path) != want:
            problems.append(f"{name}: sha256 differs from {MANIFEST_NAME}")
    return problems


_VERIFY_CACHE = "verified-files.json"


def verify_files(ckpt_dir: Path, use_cache: bool = True) -> list[str]:
    """sha256 of every file the manifest lists, compared whole; problems (empty: all match).

    ``use_cache``: a file whose (path, size, mtime) is recorded in ``$GQ_CACHE/verified-files.json``
    with the same hash is not read again, so restarts cost nothing. Directories without a manifest
    (plain HF models) have nothing to verify.
    """
    ckpt_dir = Path(ckpt_dir).resolve()
    manifest = read_manifest(ckpt_dir)
    if manifest is None:
        return []
    cache_path = cache_root() / _VERIFY_CACHE
    cache: dict = {}
    if use_cache:
        try:
            cache = json.loads(cache_path.read_text())
        except (OSError, ValueError):
            cache = {}
    problems, changed = [], False
    for name, want in sorted(manifest["files"].items()):
        path = ckpt_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing (listed in {MANIFEST_NAME})")
            continue
        st = path.stat()
        key, stamp = str(path), [st.st_size, st.st_mtime_ns, want]
        if use_cache and cache.get(key) == stamp:
            continue
        if sha256_file(path) != want:
            problems.append(f"{name}: sha256 differs from {MANIFEST_NAME}")
        elif use_cache:
            cache[key], changed = stamp, True
    problems += config_manifest_problems(_config_json(ckpt_dir), manifest)
    if changed:
        try:
            write_json(cache_path, cache)
        except OSError:  # a read-only cache only costs the next start a re-hash
            pass
    return problems


def quantize_linears(model: nn.Module, qc: QuantizationConfig, dtype: torch.dtype,
                     kernel: str | None = None) -> dict[str, GQLinear]:
    """Replace every ``nn.Linear`` not in ``modules_to_not_convert`` by an empty ``GQLinear`` (in place).

    ``kernel``: a kernel name every layer must use (default: ``qc.kernel``, else chosen per layer).
    """
    skip = set(qc.modules_to_not_convert)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip]
    replaced = {}
    for name, lin in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        q = GQLinear(lin.in_features, lin.out_features, qc.params, bias=lin.bias is not None, dtype=dtype,
                     kernel=kernel or qc.kernel)
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


def load_state_checked(model: nn.Module, files: list[Path], checksums: dict[str, str] | None = None) -> None:
    """Copy every tensor of ``files`` into ``model`` after checking name, shape and dtype.

    Quantized buffers (the format's tensors) must match dtype exactly; dense
    tensors must be floating point and are cast to the model's dtype. Raises ValueError listing
    every missing / unexpected / mismatched tensor with expected vs found.

    ``checksums`` (the manifest's per-tensor sha256): each tensor's bytes are hashed as read. A
    mismatch or an unreadable file raises :class:`CheckpointIntegrityError` naming file and tensor
    (with the other problems after it: they follow from it).
    """
    targets = model.state_dict(keep_vars=True)
    quant_keys = {
        f"{mname}.{b}" for mname, m in model.named_modules() if isinstance(m, GQLinear) for b, _ in m.named_buffers()
    }
    aliases = _alias_groups(model)
    problems: list[str] = []
    integrity: list[str] = []
    loaded: set[str] = set()
    for path in files:
        try:
            opened = safe_open(path, framework="pt")  # reads and parses the header
        except Exception as exc:  # noqa: BLE001 -- safetensors raises its own error type
            integrity.append(f"{path.name} cannot be read as safetensors ({exc}): truncated or corrupt")
            continue
        with opened as fh:
            for name in fh.keys():
                if name not in targets:
                    problems.append(f"unexpected tensor {name!r} in {path.name}")
                    continue
                try:
                    t = fh.get_tensor(name)
                except Exception as exc:  # noqa: BLE001 -- a header pointing past the end of the file
                    integrity.append(f"{path.name}: tensor {name} cannot be read ({exc}): truncated or corrupt")
                    continue
                if checksums is not None:
                    want = checksums.get(name)
                    if want is None:
                        integrity.append(f"{path.name}: tensor {name} is not in {MANIFEST_NAME}")
                    elif tensor_sha256(t) != want:
                        integrity.append(f"{path.name}: tensor {name}: sha256 differs from {MANIFEST_NAME}")
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
    if integrity:  # corrupt bytes explain whatever else went wrong: one error, those first
        raise CheckpointIntegrityError(Path(files[0]).parent, integrity + problems)
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ValueError(
            f"checkpoint does not match the model its config describes ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems[:_MAX_LISTED]) + more
            + "\nRe-export the checkpoint, or check that config.json belongs to these weights."
        )


def load_quantized_model(ckpt_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         kernel: str | None = None):
    """Build the HF causal LM of ``ckpt_dir`` with ``GQLinear`` layers and load its tensors.

    A directory without ``quantization_config`` is loaded as a plain HF model (fp16 baselines).
    Returns the model in eval mode on ``device``, dense parameters in ``dtype``, every quantized
    layer's kernel chosen (``kernel`` forces one by name); the validated ``quantization_config`` is
    kept as ``model.gq_quantization_config`` (None for plain models) and the kernels in use as
    ``model.gq_kernels`` (name -> layers).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt_dir = Path(ckpt_dir)
    if not is_quantized_checkpoint(ckpt_dir):
        model = AutoModelForCausalLM.from_pretrained(ckpt_dir, dtype=dtype)
        model.gq_quantization_config, model.gq_kernels = None, {}
        return model.to(device).eval()

    manifest = read_manifest(ckpt_dir)
    qc = read_quantization_config(ckpt_dir)
    integrity = []
    if manifest is not None:
        integrity += small_file_problems(ckpt_dir, manifest)
        integrity += config_manifest_problems(_config_json(ckpt_dir), manifest)
        if integrity:  # before building anything: a missing or edited file explains what would fail
            raise CheckpointIntegrityError(ckpt_dir, integrity)
    else:
        log.warning("%s has no %s: its files cannot be verified", ckpt_dir, MANIFEST_NAME)
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
    quantize_linears(model, qc, dtype, kernel=kernel)
    checksums = manifest.get("tensors") if manifest is not None else None
    load_state_checked(model, weight_files(ckpt_dir), checksums or None)
    model = model.to(device).eval()
    model.gq_quantization_config = qc
    model.gq_kernels = select_kernels(model, device, dtype)
    install_kv_cache(model, qc.params)
    return model


def load_model(path: str | Path, device: str = "cpu", dtype: str | torch.dtype | None = "auto",
               kernel: str | None = None, head: str = "model"):
    """A quantized checkpoint or a plain HF directory as an eval-mode causal LM; ``dtype`` as in
    :func:`resolve_dtype` ("auto": fp16 on a GPU, fp32 on the CPU); ``head`` as in
    :func:`gq_serve.head.apply_head` (kept as ``model.gq_head``)."""
    from gq_serve.head import HEADS, apply_head

    if head not in HEADS:  # before the load: a typo should not cost one
        raise ValueError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    model = load_quantized_model(Path(path), device=device, dtype=resolve_dtype(dtype, device), kernel=kernel)
    model.gq_head = apply_head(model, head)
    return model


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def verify_checkpoint_files(ckpt_dir: Path) -> None:
    """Every listed file's sha256, read whole now (no cache); raise CheckpointIntegrityError."""
    problems = verify_files(ckpt_dir, use_cache=False)
    if read_manifest(ckpt_dir) is None:
        problems = [f"no {MANIFEST_NAME}: nothing to verify against"]
    if problems:
        raise CheckpointIntegrityError(Path(ckpt_dir), problems)
