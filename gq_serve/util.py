"""Small utilities shared by the quantizer, the loaders and the scripts: where the cache lives,
file hashes, the package version, and writes that never leave half a file.

Files are published with the permissions a plain ``open(..., "w")`` would give (0666 minus the
umask): some writers (safetensors, ``tempfile``) create 0600 files, which a container running as
another user could not read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

DISTRIBUTION = "gq-serve"


def import_file(name: str, path: Path):
    """Import a script that is not part of a package (``benchmarks/``, ``scripts/``) as module
    ``name``, registered in ``sys.modules`` (dataclasses look their module up while it loads)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def cache_root() -> Path:
    """The cache directory: ``$GQ_CACHE`` if set, else ``~/.cache/gq-serve``."""
    env = os.environ.get("GQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gq-serve"


def package_version() -> str:
    """The installed gq-serve version ("0+unknown" when running from a source tree)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensor_sha256(t) -> str:
    """Hex sha256 of a CPU tensor's raw little-endian bytes (hashes the buffer in place, no copy):
    the per-tensor checksum of ``gq_manifest.json``."""
    import torch

    return hashlib.sha256(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())).hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path, directory: bool = False) -> None:
    """chmod ``path`` to what a plain create would give: 0666 (0777 for a directory) minus the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def atomic_write(path: Path, content: str | bytes | Callable[[Path], Any], fsync: bool = True) -> Path:
    """Write ``path`` through a temporary name in the same directory, then rename it into place.

    ``content``: text, bytes, or a function that writes a given temporary path (e.g.
    ``lambda p: save_file(tensors, str(p))``). An interrupted write leaves the old file (or none),
    never half a file. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    try:
        if isinstance(content, str):
            tmp.write_text(content)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        publish_mode(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_json(path: Path, obj: Any, indent: int = 2) -> Path:
    """Atomically write ``obj`` as JSON (a trailing newline)."""
    return atomic_write(path, json.dumps(obj, indent=indent) + "\n")


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished directory ``tmp`` to ``dest`` by renames, replacing an existing ``dest``.

    ``dest`` is never half old, half new: the old one is renamed aside first and put back if the
    final rename fails.
    """
    tmp, dest = Path(tmp), Path(dest)
    publish_mode(tmp, directory=True)  # mkdtemp makes 0700 directories
    if not dest.exists():
        os.replace(tmp, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
