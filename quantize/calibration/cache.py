"""On-disk calibration cache: saliency, weight Fisher and Hessians with a manifest, resumable.

Layout (``<cache_root>/calibration/<model_hash16>-<data_hash16>/``)::

    manifest.json                          identity, progress, sha256 of every file
    saliency/windows_AAAA_BBBB.safetensors  name -> float32 [(BBBB-AAAA)*seq_len, G]
    saliency/fisher.safetensors             name -> float32 [out, in], sum over all windows
    saliency/fisher_partial_KKKK.safetensors  running Fisher sum after KKKK windows (resume only)
    hessians/layer_XX.safetensors           "<owner>.plain" [in,in], "<name>.guided" [G,in,in]
    activations/input_layer_XX.safetensors  "hidden" [n, seq_len, hidden] (resume only)

Every file is written under a temporary name and ``os.replace``d into place, then the manifest is
rewritten the same way; a file not (yet) listed in the manifest is never read. A killed run resumes
at the next saliency chunk / decoder layer. Anything that does not match (identity, checksum,
unreadable file) raises ``CalibrationCacheError`` naming the file and the fix.

Model hash: sha256 of the model directory's config.json bytes, the safetensors index bytes and the
(name, size) of every ``*.safetensors`` file (cheap: no weight read), plus a fingerprint of the
in-memory model (shape, float64 sum and first row of every quantizable weight), so a model edited in
memory (e.g. rotated) never reuses the unedited model's cache. Data hash: sha256 of the int64 window
tokens and their shape.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

try:  # POSIX advisory lock: two builders of one directory would interleave their progress
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None

from .hessians import LayerHessians, coarsen_groups, hessian_pass
from .saliency import GRAD_SCALE, check_groups, quantizable_linears, saliency_for_windows
from .distributed import all_reduce_sum, barrier, my_windows, rank_world, spread_rows
from .streamed import streamed_saliency
from gq_serve.util import atomic_write, package_version, sha256_file
from gq_quantize.data import data_hash

FORMAT_VERSION = 1
DEFAULT_CHUNK_WINDOWS = 16  # saliency resume granularity; each chunk rewrites the Fisher sum
FIX_HINT = "delete {dir} (or pass --recalibrate) and run again"


class CalibrationCacheError(RuntimeError):
    """A cache directory that cannot be used as is; the message names the file and the fix."""


# ---------------------------------------------------------------- hashing
def model_fingerprint(linears: dict[str, nn.Linear], get_weight=None) -> str:
    """sha256 over (name, shape, float64 sum, first row as float32) of each quantizable weight.

    get_weight(name, linear) -> the weight tensor (default: the module's own); a streamed model
    reads it from disk, so an in-memory and a streamed run of one model share the cache.
    """
    h = hashlib.sha256()
    with torch.no_grad():
        for name, lin in linears.items():
            w = lin.weight if get_weight is None else get_weight(name, lin)
            h.update(f"{name}:{tuple(w.shape)}:{w.double().sum().item():.17g}".encode())
            h.update(w[0].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def model_hash(model_dir: Path | None, linears: dict[str, nn.Linear], get_weight=None) -> str:
    """Cheap model identity: config/index bytes + safetensors names and sizes + in-memory fingerprint."""
    h = hashlib.sha256()
    if model_dir is not None:
        model_dir = Path(model_dir)
        for fname in ("config.json", "model.safetensors.index.json"):
            p = model_dir / fname
            if p.exists():
                h.update(fname.encode() + b"\0" + p.read_bytes())
        for p in sorted(model_dir.glob("*.safetensors")):
            h.update(f"{p.name}:{p.stat().st_size}".encode())
    h.update(model_fingerprint(linears, get_weight).encode())
    return h.hexdigest()


# ---------------------------------------------------------------- device / dtype
@contextmanager
def model_on_device(model: nn.Module, device, dtype: torch.dtype = torch.float32):
    """Temporarily move the model to ``device`` in ``dtype`` (fp32: exact gradients and Hessians);
    restores the original device and dtype (fp16 -> fp32 -> fp16 is lossless) and train/eval mode."""
    p = next(model.parameters())
    orig_device, orig_dtype, was_training = p.device, p.dtype, model.training
    model.to(device=device, dtype=dtype)
    model.eval()  # no dropout: the saliency must be a deterministic function of the weights
    try:
        yield
    finally:
        model.to(device=orig_device, dtype=orig_dtype)
        model.train(was_training)


# ---------------------------------------------------------------- the cache
class CalibrationCache:
    """Handle on one calibration cache directory (see module docstring for the layout)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self._manifest = manifest
        self._verified: set[str] = set()
        self._streamed = None  # a streamed.StreamedModel while building from one
        self._offload_dir: Path | None = None

    # ---- public -------------------------------------------------------------
    @property
    def manifest(self) -> dict:
        return json.loads(json.dumps(self._manifest))  # a copy: callers cannot corrupt ours

    @classmethod
    def open_or_build(
        cls,
        cache_root: Path,
        model: nn.Module,
        model_dir: Path | None,
        windows: torch.Tensor,
        groups: int,
        need_guided: bool,
        need_fisher: bool,
        device: str = "cpu",
        progress: bool = True,
        *,
        need_hessians: bool = True,
        chunk_windows: int = DEFAULT_CHUNK_WINDOWS,
        on_event=None,
        recalibrate: bool = False,
        streamed=None,
        offload_dir: Path | None = None,
    ) -> "CalibrationCache":
        """Open the cache for (model, windows), building or completing whatever is missing.

        windows: LongTensor [n, seq_len]. groups: g for guided Hessians (saliency is cached at g;
        any divisor of it can be served later). need_hessians=False skips the Hessian pass (e.g.
        SqueezeLLM needs only the Fisher). on_event(stage, index) is called after each saved
        saliency chunk ("saliency", windows_done) and Hessian layer ("hessians", layer_idx).
        A cache that has less than asked (no Fisher, fewer groups) is completed in place: only the
        affected stages are recomputed. recalibrate=True deletes this (model, data) cache first.
        streamed: a ``streamed.StreamedModel`` (then ``model`` is its ``model``, whose parameters are
        on the meta device): both passes hold one decoder layer at a time; the cache is the same
        as the in-memory one's (same identity, same files). offload_dir: where the streamed
        gradient pass keeps each layer's inputs (default: host memory).
        """
        if streamed is not None and model is not streamed.model:
            raise ValueError("with streamed=..., pass model=streamed.model")
        if windows.dim() != 2:
            raise ValueError(f"windows must be [n, seq_len], got shape {tuple(windows.shape)}")
        linears = quantizable_linears(model)
        if need_guided:
            check_groups(linears, groups)
        n, seq_len = map(int, windows.shape)
        ident = {
            "model_hash": model_hash(model_dir, linears, None if streamed is None else streamed.get_weight),
            "data_hash": data_hash(windows, length=64),
            "n": n,
            "seq_len": seq_len,
        }
        path = Path(cache_root) / "calibration" / f"{ident['model_hash'][:16]}-{ident['data_hash'][:16]}"
        manifest_path = path / "manifest.json"
        rank, world = rank_world()
        if world > n:
            raise ValueError(f"{world} processes for {n} calibration windows: every process needs at least one; "
                             f"run fewer processes or pass a larger --n-samples")
        if rank == 0:  # process 0 alone creates (or deletes) the directory; the others read it after
            if recalibrate and path.exists():
                shutil.rmtree(path)
            if manifest_path.exists():
                cache = cls(path, cls._read_manifest(manifest_path))
                cache._check_identity(ident)
            else:
                path.mkdir(parents=True, exist_ok=True)
                cache = cls(path, cls._new_manifest(ident, linears, len(model.model.layers)))
                cache._write_manifest()
        barrier()
        if rank != 0:
            cache = cls(path, cls._read_manifest(manifest_path))
            cache._check_identity(ident)
        if cache._complete_for(groups, need_guided, need_fisher, need_hessians):
            # Everything asked for is already there: read it, even while another process adds
            # parts this run does not need (e.g. the Hessians, for a sequential run).
            cache._check_files_present()
            return cache
        cache._streamed, cache._offload_dir = streamed, offload_dir
        with cache._build_lock() if rank == 0 else nullcontext():
            cache._check_files_present()
            cache._build(model, windows, groups, need_guided, need_fisher, need_hessians, device, progress,
                         chunk_windows, on_event)
        cache._sync()
        return cache

    def _complete_for(self, groups: int, need_guided: bool, need_fisher: bool, need_hessians: bool) -> bool:
        """Whether the manifest already lists everything :meth:`_build` would make for this request."""
        sal, hs = self._manifest["saliency"], self._manifest["hessians"]
        want_g = groups if need_guided else 0
        if want_g or need_fisher:
            if not sal["complete"] or (need_fisher and not sal["fisher"]):
                return False
            if want_g and not (sal["groups"] and sal["groups"] % want_g == 0):
                return False
        if need_hessians:
            if not hs["complete"] or (want_g and not (hs["guided_groups"] and hs["guided_groups"] % want_g == 0)):
                return False
        return True

    def hessian(self, linear_name: str, guided: bool, groups: int = 1) -> torch.Tensor:
        """float32 [groups, in, in] (plain: [1, in, in]), normalized by N = n * seq_len tokens."""
        hs = self._manifest["hessians"]
        layer = self._layer_of(linear_name)
        if layer not in hs["layers_done"]:
            raise CalibrationCacheError(f"Hessians of layer {layer} are not in {self.path} (pass incomplete)")
        rel = f"hessians/layer_{layer:02d}.safetensors"
        if not guided:
            if groups != 1:
                raise ValueError("a plain Hessian has exactly one group")
            owner = self._read_metadata(rel)["plain_owner"]
            owner = json.loads(owner)[linear_name]
            return self._read_tensor(rel, f"{owner}.plain").unsqueeze(0)
        cached = hs["guided_groups"]
        if not cached:
            raise CalibrationCacheError(f"{self.path} holds no guided Hessians; reopen with need_guided=True")
        if cached % groups:
            raise CalibrationCacheError(
                f"guided Hessians in {self.path} have g={cached}; g={groups} does not divide it. "
                f"Reopen with groups={groups} (or a multiple) to rebuild them"
            )
        return coarsen_groups(self._read_tensor(rel, f"{linear_name}.guided"), groups)

    def weight_fisher(self, linear_name: str) -> torch.Tensor:
        """float32 [out, in]: sum over windows of (dL_w/dW)^2, L_w the window's mean token loss."""
        sal = self._manifest["saliency"]
        if not (sal["fisher"] and sal["complete"]):
            raise CalibrationCacheError(f"{self.path} holds no weight Fisher; reopen with need_fisher=True")
        return self._read_tensor("saliency/fisher.safetensors", linear_name)

    def saliency(self, linear_name: str) -> torch.Tensor:
        """float32 [n * seq_len, G] token saliency (window-major) at the cached group count G."""
        sal = self._manifest["saliency"]
        if not sal["complete"]:
            raise CalibrationCacheError(f"saliency pass of {self.path} is incomplete")
        return torch.cat([self._read_tensor(rel, linear_name) for rel in sal["chunks"]], dim=0)

    # ---- manifest -------------------------------------------------------------
    @staticmethod
    def _new_manifest(ident: dict, linears: dict[str, nn.Linear], num_layers: int) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "package_version": package_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **ident,
            "dtype": "float32",
            "grad_scale": GRAD_SCALE,
            "normalization": "H = X^T Diag(s) X / (n*seq_len); s from per-window mean-token loss; "
                             "Fisher = sum over windows of (dL_w/dW)^2",
            "num_layers": num_layers,
            "linears": {n: [m.out_features, m.in_features] for n, m in linears.items()},
            "g": 0,  # guided groups of the Hessians (0: plain only)
            "saliency": {"groups": 0, "fisher": False, "chunk_windows": 0, "windows_done": 0,
                         "chunks": [], "fisher_partial": None, "complete": False},
            "hessians": {"guided_groups": 0, "layers_done": [], "activations": None, "complete": False},
            "files": {},
        }

    @staticmethod
    def _read_manifest(path: Path) -> dict:
        try:
            m = json.loads(path.read_text())
            if m.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {m.get('format_version')} != {FORMAT_VERSION}")
            return m
        except (ValueError, OSError) as e:
            raise CalibrationCacheError(
                f"calibration manifest {path} is unreadable ({e}); {FIX_HINT.format(dir=path.parent)}"
            ) from e

    def _check_identity(self, ident: dict) -> None:
        for key, want in ident.items():
            have = self._manifest.get(key)
            if have != want:
                raise CalibrationCacheError(
                    f"calibration manifest {self.path / 'manifest.json'} does not match this run: "
                    f"{key} is {have!r} in the cache but {want!r} now; refusing to mix caches. "
                    f"{FIX_HINT.format(dir=self.path)}"
                )

    def _write_manifest(self) -> None:
        if rank_world()[0] != 0:  # process 0 writes; the others reread it in _sync
            return
        atomic_write(self.path / "manifest.json", json.dumps(self._manifest, indent=1, sort_keys=True))

    # ---- files ----------------------------------------------------------------
    def _save(self, rel: str, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> None:
        """Atomically write a safetensors file and record its checksum (manifest saved by caller)."""
        if rank_world()[0] != 0:
            return
        path = self.path / rel
        tensors = {k: v.detach().to(torch.float32).cpu().contiguous() for k, v in tensors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        self._manifest["files"][rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        self._verified.add(rel)

    def _drop(self, rel: str | None) -> None:
        """Forget and delete a file (after the manifest no longer needs it)."""
        if rel is None:
            return
        self._manifest["files"].pop(rel, None)
        self._verified.discard(rel)
        if rank_world()[0] == 0:
            (self.path / rel).unlink(missing_ok=True)

    def _sync(self) -> None:
        """With several processes: wait until process 0 has written its files and manifest, then
        every other process takes that manifest as its own."""
        rank, world = rank_world()
        if world == 1:
            return
        barrier()
        if rank != 0:
            self._manifest = self._read_manifest(self.path / "manifest.json")
            self._verified.clear()

    def _check_files_present(self) -> None:
        for rel, info in self._manifest["files"].items():
            p = self.path / rel
            if not p.exists() or p.stat().st_size != info["bytes"]:
                raise CalibrationCacheError(
                    f"calibration file {p} is missing or truncated; {FIX_HINT.format(dir=self.path)}"
                )

    def _verify(self, rel: str) -> Path:
        p = self.path / rel
        info = self._manifest["files"].get(rel)
        if info is None:
            raise CalibrationCacheError(f"{p} is not recorded in the manifest; {FIX_HINT.format(dir=self.path)}")
        if rel not in self._verified:
            if not p.exists() or sha256_file(p) != info["sha256"]:
                raise CalibrationCacheError(
                    f"calibration file {p} is corrupt (checksum mismatch); {FIX_HINT.format(dir=self.path)}"
                )
            self._verified.add(rel)
        return p

    def _read_tensor(self, rel: str, key: str) -> torch.Tensor:
        p = self._verify(rel)
        try:
            with safe_open(str(p), framework="pt") as f:
                if key not in f.keys():
                    raise CalibrationCacheError(f"{p} has no tensor {key!r}")
                return f.get_tensor(key)
        except CalibrationCacheError:
            raise
        except Exception as e:  # safetensors raises its own error types on a damaged header
            raise CalibrationCacheError(f"cannot read {p} ({e}); {FIX_HINT.format(dir=self.path)}") from e

    def _read_metadata(self, rel: str) -> dict[str, str]:
        p = self._verify(rel)
        with safe_open(str(p), framework="pt") as f:
            return f.metadata() or {}

    def _layer_of(self, linear_name: str) -> int:
        if linear_name not in self._manifest["linears"]:
            raise KeyError(f"{linear_name!r} is not a quantizable linear of this cache's model")
        # names look like model.layers.<idx>.<...>
        return int(linear_name.split(".layers.", 1)[1].split(".", 1)[0])

    # ---- building -------------------------------------------------------------
    @contextmanager
    def _build_lock(self):
        """Exclusive lock on ``<dir>/.lock`` for the build; a second builder fails fast."""
        if fcntl is None:
            yield
            return
        with open(self.path / ".lock", "w") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise CalibrationCacheError(
                    f"{self.path} is being built by another process; wait for it to finish"
                ) from e
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _build(self, model, windows, groups, need_guided, need_fisher, need_hessians, device, progress,
               chunk_windows, on_event) -> None:
        sal = self._manifest["saliency"]
        want_g = groups if need_guided else 0
        if want_g or need_fisher:
            have_g, have_f = sal["groups"], sal["fisher"]
            g_ok = not want_g or (have_g and have_g % want_g == 0)
            if not (g_ok and (have_f or not need_fisher)):
                new_g = have_g if (have_g and g_ok) else (want_g or 1)
                if have_g and want_g and not g_ok:
                    # Prefer a G that still serves the old g too, when it divides every layer.
                    both = math.lcm(have_g, want_g)
                    if all(out % both == 0 for out, _ in self._manifest["linears"].values()):
                        new_g = both
                if sal["windows_done"]:
                    self._reset_saliency()  # upgrade: recompute with more groups / the Fisher
                    sal = self._manifest["saliency"]
                sal["groups"], sal["fisher"] = new_g, have_f or need_fisher
            if not sal["complete"]:
                sal["chunk_windows"] = sal["chunk_windows"] or max(1, int(chunk_windows))
                self._write_manifest()
                self._run_saliency(model, windows, device, progress, on_event)
        if not need_hessians:
            return
        hs = self._manifest["hessians"]
        if hs["complete"] and (not want_g or (hs["guided_groups"] and hs["guided_groups"] % want_g == 0)):
            return
        # Guided Hessians are built at the cached saliency's G (serves every divisor of it).
        target_g = sal["groups"] if want_g else hs["guided_groups"]
        if hs["guided_groups"] != target_g:
            self._reset_hessians()
            hs = self._manifest["hessians"]
            hs["guided_groups"] = self._manifest["g"] = target_g
            self._write_manifest()
        if target_g and not sal["complete"]:
            raise CalibrationCacheError(f"saliency of {self.path} is incomplete; cannot build guided Hessians")
        self._run_hessians(model, windows, device, progress, on_event)

    def _reset_saliency(self) -> None:
        sal = self._manifest["saliency"]
        for rel in list(sal["chunks"]) + [sal["fisher_partial"]]:
            self._drop(rel)
        self._drop("saliency/fisher.safetensors")
        self._manifest["saliency"] = {"groups": 0, "fisher": False, "chunk_windows": 0, "windows_done": 0,
                                      "chunks": [], "fisher_partial": None, "complete": False}
        self._write_manifest()

    def _reset_hessians(self) -> None:
        hs = self._manifest["hessians"]
        for layer in hs["layers_done"]:
            self._drop(f"hessians/layer_{layer:02d}.safetensors")
        self._drop(hs["activations"])
        self._manifest["hessians"] = {"guided_groups": 0, "layers_done": [], "activations": None,
                                      "complete": False}
        self._write_manifest()

    def _run_saliency(self, model, windows, device, progress, on_event) -> None:
        sal = self._manifest["saliency"]
        n, step = windows.shape[0], sal["chunk_windows"]
        fisher = None
        if sal["fisher"] and sal["windows_done"]:
            rel = sal["fisher_partial"]
            fisher = {name: self._read_tensor(rel, name) for name in self._manifest["linears"]}
        bar = tqdm(total=n, initial=sal["windows_done"], desc="saliency (windows)", file=sys.stderr,
                   disable=not progress)
        try:
            with self._on_device(model, device):
                for start in range(sal["windows_done"], n, step):
                    stop = min(n, start + step)
                    s, f = self._saliency_chunk(model, windows, start, stop, device, bar)
                    rel = f"saliency/windows_{start:04d}_{stop:04d}.safetensors"
                    self._save(rel, s)
                    old_partial = sal["fisher_partial"]
                    if f is not None:
                        fisher = f if fisher is None else {k: fisher[k].add_(v) for k, v in f.items()}
                        if stop < n:  # a running sum to resume from; the final one gets its own name
                            sal["fisher_partial"] = f"saliency/fisher_partial_{stop:04d}.safetensors"
                        else:
                            sal["fisher_partial"] = "saliency/fisher.safetensors"
                        self._save(sal["fisher_partial"], fisher, {"windows_done": str(stop)})
                    sal["chunks"].append(rel)
                    sal["windows_done"] = stop
                    if stop == n:
                        sal["complete"] = True
                        sal["fisher_partial"] = None
                    self._write_manifest()
                    # Only after the manifest points at the new running sum may the old one go.
                    if old_partial is not None and old_partial != sal["fisher_partial"]:
                        self._drop(old_partial)
                        self._write_manifest()
                    self._sync()
                    if self._offload_dir is not None:  # the chunk is stored: its work files can go
                        shutil.rmtree(Path(self._offload_dir) / self.path.name / f"windows_{start:04d}_{stop:04d}",
                                      ignore_errors=True)
                    if on_event is not None:
                        on_event("saliency", stop)
        finally:
            bar.close()

    def _saliency_chunk(self, model, windows, start, stop, device, bar):
        """Saliency rows [(stop-start)*seq_len, G] and Fisher sums of windows [start, stop); with
        several processes each computes its share and the results are summed (distributed.py)."""
        sal = self._manifest["saliency"]
        rank, world = rank_world()
        mine = my_windows(start, stop, rank, world)
        if mine:
            local = windows[mine]
            if self._streamed is not None:
                work = None
                if self._offload_dir is not None:
                    # On disk the pass can resume at the layer it reached: one directory per cache,
                    # chunk and process (its state file names the windows and settings it is for).
                    work = Path(self._offload_dir) / self.path.name / f"windows_{start:04d}_{stop:04d}"
                    if world > 1:
                        work = work / f"rank{rank}"
                s, f = streamed_saliency(self._streamed, local, sal["groups"], sal["fisher"], None, bar,
                                         resume_dir=work)
            else:
                s, f = saliency_for_windows(model, local, sal["groups"], sal["fisher"], device, bar)
        else:  # more processes than windows in this (last) chunk
            s = {k: torch.zeros(0, sal["groups"]) for k in self._manifest["linears"]}
            f = ({k: torch.zeros(shape) for k, shape in self._manifest["linears"].items()} if sal["fisher"]
                 else None)
        if world == 1:
            return s, f
        seq_len = windows.shape[1]
        positions = [w - start for w in mine]
        # Every process must reduce the same tensors in the same order: sorted names.
        s = {k: all_reduce_sum(spread_rows(s[k], positions, stop - start, seq_len)) for k in sorted(s)}
        if f is not None:
            f = {k: all_reduce_sum(f[k].contiguous()) for k in sorted(f)}
        return s, f

    def _on_device(self, model, device):
        """The whole model on the device, unless streamed (its layers come and go one by one)."""
        return nullcontext() if self._streamed is not None else model_on_device(model, device)

    def _saliency_for_layer(self, layer_idx: int, names: list[str]) -> dict[str, torch.Tensor]:
        return {name: self.saliency(name) for name in names}

    def _run_hessians(self, model, windows, device, progress, on_event) -> None:
        hs = self._manifest["hessians"]
        start = len(hs["layers_done"])
        num_layers = self._manifest["num_layers"]
        rank, world = rank_world()
        n_all, seq_len = map(int, windows.shape)
        mine = my_windows(0, n_all, rank, world)
        if start < num_layers:
            start_inputs = None
            if start > 0:
                start_inputs = self._read_tensor(hs["activations"], "hidden")[mine]
            guided = hs["guided_groups"] > 0

            def saliency_for_layer(layer_idx: int, names: list[str]) -> dict[str, torch.Tensor]:
                sal = self._saliency_for_layer(layer_idx, names)
                if world == 1:
                    return sal
                return {k: v.reshape(n_all, seq_len, -1)[mine].reshape(len(mine) * seq_len, -1)
                        for k, v in sal.items()}

            def reduced(idx: int, hess: LayerHessians, outputs: torch.Tensor) -> None:
                if world > 1:  # per-process means -> sums -> the mean over every window
                    local, total = float(len(mine) * seq_len), float(n_all * seq_len)
                    for part in (hess.plain, hess.guided):
                        for k in sorted(part):
                            part[k] = all_reduce_sum(part[k] * local) / total
                    outputs = all_reduce_sum(spread_rows(outputs, mine, n_all, 1))
                on_layer_done(idx, hess, outputs)
                self._sync()

            def on_layer_done(idx: int, hess: LayerHessians, outputs: torch.Tensor) -> None:
                tensors = {f"{k}.plain": v for k, v in hess.plain.items()}
                if guided:
                    tensors.update({f"{k}.guided": v for k, v in hess.guided.items()})
                self._save(f"hessians/layer_{idx:02d}.safetensors", tensors,
                           {"plain_owner": json.dumps(hess.plain_owner)})
                old_act = hs["activations"]
                if idx + 1 < num_layers:  # the next layer's inputs, for a mid-pass resume
                    hs["activations"] = f"activations/input_layer_{idx + 1:02d}.safetensors"
                    self._save(hs["activations"], {"hidden": outputs})
                else:
                    hs["activations"] = None
                hs["layers_done"].append(idx)
                hs["complete"] = idx + 1 == num_layers
                self._write_manifest()
                if old_act is not None:
                    self._drop(old_act)
                    self._write_manifest()
                if on_event is not None:
                    on_event("hessians", idx)

            n = len(mine)  # this process's windows
            bar = tqdm(total=num_layers * n, initial=start * n, desc="hessians (layer x window)",
                       file=sys.stderr, disable=not progress)
            try:
                with self._on_device(model, device):
                    hessian_pass(model, windows[mine], saliency_for_layer if guided else None, device,
                                 reduced, start, start_inputs, bar, streamed=self._streamed,
                                 stagewise=self._streamed is not None)
            finally:
                bar.close()
        if rank == 0 and (self.path / "activations").exists() and not any((self.path / "activations").iterdir()):
            shutil.rmtree(self.path / "activations", ignore_errors=True)
