"""Models larger than memory: weights read per decoder layer, a layer-streamed gradient pass.

``StreamedModel`` is the model's module tree with every parameter on the ``meta`` device (no
memory), plus the safetensors files it came from, memory-mapped. ``resident(...)`` puts the
parameters of some modules on the compute device for the duration of a ``with`` block and drops
them after, so at any time only one decoder layer (or the embeddings and LM head) occupies memory.
Buffers (rotary frequencies) are small and stay real.

The layer-streamed gradient pass (:func:`streamed_saliency`) computes what
``saliency.saliency_for_windows`` computes on the whole model, layer by layer:

1. forward: layer l's inputs for every window are kept (host memory, or files in an offload
   directory), then layer l runs without autograd and its outputs feed layer l+1;
2. head: the final norm, LM head and loss run on the last outputs; dL/dh_L per window;
3. backward, l = L-1 .. 0: layer l is recomputed from its kept inputs with autograd, the gradient
   dL/dh_{l+1} is pushed through it, the tensor hooks on its linears' outputs record the saliency
   (and dL/dW for the Fisher), and dL/dh_l is handed to layer l-1.

By the chain rule this is the same gradient as one backward through the whole model; only the
order of floating-point operations inside autograd differs (fp32 round-off).
"""
from __future__ import annotations

import ctypes
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from gq_serve.util import atomic_write

from .hessians import (LayerCall, capture_layer_calls, decoder_layers, forwards_replaced, layer_linears,
                       layer_outputs)
from .saliency import check_groups, next_token_loss, quantizable_linears, saliency_hooks, take_saliency


class StreamingError(RuntimeError):
    """A model directory that cannot be streamed as is; the message names the problem and the fix."""


# ---------------------------------------------------------------- the skeleton
@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """While active, every parameter a module registers is moved to the meta device.

    Layers allocate their weights with ``torch.empty`` (untouched pages cost nothing) and then
    initialize them; moving each parameter to meta on registration makes the initialization a
    no-op, so building the skeleton of a 70B model takes seconds and no memory. Buffers are left
    alone: rotary frequencies are computed in ``__init__`` and are not in the checkpoint.
    """
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _libc() if sys.platform.startswith("linux") else None


def release_freed_memory() -> None:
    """Hand memory freed by the last layer back to the OS (glibc's ``malloc_trim``).

    glibc keeps freed blocks below its mmap threshold (which grows to 32 MiB as large blocks are
    freed) in the heap, so without this a streamed pass's resident memory creeps up to the sum of
    every layer's temporaries (measured on SmolLM2: 590 MB peak instead of about 280 MB).
    """
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)


class _Checkpoint:
    """Tensor name -> memory-mapped safetensors file of a Hugging Face model directory."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = {name: model_dir / f for name, f in weight_map.items()}
        else:
            files = {}
            for path in sorted(model_dir.glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    files.update({k: path for k in f.keys()})
        if not files:
            raise StreamingError(f"{model_dir} has no *.safetensors weights; streaming reads safetensors only "
                                 "(convert the checkpoint, e.g. save_pretrained(..., safe_serialization=True))")
        self.files = files

    def get(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Copies of the named tensors. Each file is mapped only for the call: pages of a mapping
        kept open would stay in the process's resident memory after the layer is gone."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, keys in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in keys})
        return out


class StreamedModel:
    """A causal LM whose parameters are read from its safetensors files only when needed.

    model_dir: a Hugging Face ``*ForCausalLM`` directory whose tensor names are the module's
    parameter names (true of checkpoints written by ``save_pretrained``).
    device / dtype: where and in which dtype resident parameters live (fp32 by default, as the
    in-memory calibration: exact gradients and Hessians).
    """

    def __init__(self, model_dir: Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.model_dir = Path(model_dir)
        self.device, self.dtype = torch.device(device), dtype
        config = AutoConfig.from_pretrained(self.model_dir)
        with _parameters_on_meta():
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        for mod in self.model.modules():  # rotary frequencies etc. go where the layers compute
            for name, buf in list(mod._buffers.items()):
                if buf is not None:
                    mod._buffers[name] = buf.to(self.device)
        self.checkpoint = _Checkpoint(self.model_dir)
        # A parameter shared by several modules (tied embeddings / LM head) is stored under one of
        # its names: every name of each parameter object, to find the stored one and set them all.
        self._names: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            self._names.setdefault(id(p), []).append(name)
        missing = [ns[0] for ns in self._names.values() if not any(n in self.checkpoint.files for n in ns)]
        if missing:
            raise StreamingError(
                f"{self.model_dir}: parameter {missing[0]} ({len(missing)} in all) has no tensor of that name "
                f"in the safetensors files; streaming needs a checkpoint saved with the model's own "
                f"parameter names (load it in memory and save_pretrained it, or calibrate without streaming)")
        _, self.layers_prefix = decoder_layers(self.model)

    # ---- weights ----------------------------------------------------------------
    def _stored_name(self, names: list[str]) -> str:
        return next(n for n in names if n in self.checkpoint.files)

    def weight(self, linear_name: str) -> torch.Tensor:
        """The weight of one linear (``model.layers.0.mlp.up_proj``) read from disk: float32 [out, in], CPU."""
        key = f"{linear_name}.weight"
        return self.checkpoint.get([key])[key].to(torch.float32)

    def get_weight(self, linear_name: str, _lin: nn.Module | None = None) -> torch.Tensor:
        """``weight`` with the signature of ``cache.model_fingerprint``'s getter."""
        return self.weight(linear_name)

    @contextmanager
    def resident(self, *prefixes: str, exclude: str | None = None) -> Iterator[None]:
        """Parameters whose name starts with one of ``prefixes`` (and not with ``exclude``) are
        loaded onto the device for the block, then returned to meta (their memory freed)."""
        owners = dict(self.model.named_modules(remove_duplicate=False))
        chosen: dict[int, list[str]] = {}
        for pid, names in self._names.items():
            if any(n.startswith(prefixes) and not (exclude and n.startswith(exclude)) for n in names):
                chosen[pid] = names
        loaded: list[tuple[nn.Module, str, torch.Size]] = []
        stored = self.checkpoint.get([self._stored_name(names) for names in chosen.values()])
        try:
            for names in chosen.values():
                t = stored.pop(self._stored_name(names)).to(device=self.device, dtype=self.dtype)
                p = nn.Parameter(t, requires_grad=False)
                for n in names:  # every owner gets the same object: ties survive
                    mod_name, _, attr = n.rpartition(".")
                    owners[mod_name]._parameters[attr] = p
                    loaded.append((owners[mod_name], attr, t.shape))
            yield
        finally:
            for mod, attr, shape in loaded:
                mod._parameters[attr] = nn.Parameter(torch.empty(shape, device="meta", dtype=self.dtype),
                                                     requires_grad=False)
            del stored
            release_freed_memory()

    def layer(self, idx: int):
        """Context: decoder layer ``idx`` resident."""
        return self.resident(f"{self.layers_prefix}.{idx}.")

    def embeddings(self):
        """Context: everything but the decoder layers resident (embeddings, final norm, LM head)."""
        return self.resident("", exclude=f"{self.layers_prefix}.")


# ---------------------------------------------------------------- activations
class ActivationStore:
    """Each layer's inputs for the windows of one pass: in host memory, or one safetensors file
    per layer under ``offload_dir`` (host memory then holds one layer's inputs at a time)."""

    def __init__(self, offload_dir: Path | None = None):
        self.dir = None if offload_dir is None else Path(offload_dir)
        self._mem: dict[int, torch.Tensor] = {}
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, idx: int) -> Path:
        return self.dir / f"layer_input_{idx:03d}.safetensors"

    def put(self, idx: int, hidden: torch.Tensor) -> None:
        if self.dir is None:
            self._mem[idx] = hidden
        else:
            atomic_write(self._path(idx), lambda tmp: save_file({"hidden": hidden.contiguous()}, str(tmp)),
                         fsync=False)

    def pop(self, idx: int) -> torch.Tensor:
        if self.dir is None:
            return self._mem.pop(idx)
        hidden = self.get(idx)
        self._path(idx).unlink()
        return hidden

    def get(self, idx: int) -> torch.Tensor:
        """A layer's inputs, left in the store (offloaded stores only: a resumed pass rereads them)."""
        with safe_open(str(self._path(idx)), framework="pt") as f:
            return f.get_tensor("hidden")


# ---------------------------------------------------------------- the gradient pass
@contextmanager
def _layers_stubbed(layers: nn.ModuleList, first_output: torch.Tensor) -> Iterator[None]:
    """Every decoder layer replaced by the identity, except layer 0, which returns ``first_output``:
    the model's own forward then applies just the final norm, LM head (and soft-capping, if the
    model has it) to ``first_output``."""
    def identity(*args, **kwargs):
        return args[0] if args else kwargs["hidden_states"]

    with forwards_replaced(layers, lambda idx: (lambda *a, **k: first_output) if idx == 0 else identity):
        yield


def head_gradients(model: nn.Module, hidden: torch.Tensor, windows: torch.Tensor, device) -> torch.Tensor:
    """dL/dh of the last decoder layer's outputs, window by window.

    hidden: float [n, seq_len, hidden] (the last layer's outputs); windows: long [n, seq_len].
    The model's non-layer parameters must be resident. Returns float32 [n, seq_len, hidden] on the
    CPU, L being each window's mean next-token loss (as in the in-memory pass).
    """
    layers, _ = decoder_layers(model)
    grads = torch.empty(hidden.shape, dtype=torch.float32)
    with torch.enable_grad():
        for w in range(hidden.shape[0]):
            ids = windows[w : w + 1].to(device)
            h = hidden[w : w + 1].to(device).requires_grad_(True)
            with _layers_stubbed(layers, h):
                logits = model(input_ids=ids, use_cache=False).logits
            (g,) = torch.autograd.grad(next_token_loss(logits, ids), [h])
            grads[w] = g[0].float().cpu()
    return grads


def layer_backward(layer: nn.Module, prefix: str, inputs: torch.Tensor, grad_out: torch.Tensor,
                   calls: list[LayerCall], groups: int, need_fisher: bool, device,
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """Recompute one decoder layer with autograd and push the output gradient through it.

    inputs:   float [n, seq_len, hidden]: the layer's inputs per window.
    grad_out: float32 [n, seq_len, hidden]: dL/d(outputs) per window.
    Returns (grad_in float32 [n, seq_len, hidden] on the CPU = dL/d(inputs),
             saliency: linear name -> float32 [n * seq_len, groups] (window-major),
             fisher:   linear name -> float32 [out, in] summed over the n windows, or None).
    """
    linears = layer_linears(layer, prefix)
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    current: dict[str, torch.Tensor] = {}
    fisher = ({n: torch.zeros(m.weight.shape, dtype=torch.float32, device=device) for n, m in linears.items()}
              if need_fisher else None)
    handles = saliency_hooks(linears, groups, current)
    weights = [m.weight for m in linears.values()]
    grad_in = torch.empty(inputs.shape, dtype=torch.float32)
    try:
        if need_fisher:
            for w in weights:
                w.requires_grad_(True)
        with torch.enable_grad():
            for w in range(inputs.shape[0]):
                x = inputs[w : w + 1].to(device=device, dtype=calls[w].dtype).requires_grad_(True)
                out = layer(x, **calls[w].kwargs)
                out = out[0] if isinstance(out, tuple) else out
                g = grad_out[w : w + 1].to(device=device, dtype=out.dtype)
                grads = torch.autograd.grad(out, [x, *weights] if need_fisher else [x], grad_outputs=g)
                grad_in[w] = grads[0][0].float().cpu()
                if fisher is not None:
                    for name, gw in zip(linears, grads[1:]):
                        fisher[name].add_(gw.float().square())
                take_saliency(linears, current, rows)
    finally:
        for h in handles:
            h.remove()
        for w in weights:
            w.requires_grad_(False)
    saliency = {n: torch.cat(r, dim=0) for n, r in rows.items()}
    return grad_in, saliency, None if fisher is None else {n: f.cpu() for n, f in fisher.items()}


def streamed_saliency(
    streamed: StreamedModel,
    windows: torch.Tensor,
    groups: int,
    need_fisher: bool,
    offload_dir: Path | None = None,
    progress_bar=None,
    resume_dir: Path | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """The gradient pass of ``saliency.saliency_for_windows`` with one decoder layer resident at a time.

    resume_dir: keep everything on disk there (layer inputs, the gradient in flight, finished
    layers' saliency) with a state file written after every layer, so a killed pass over these
    windows resumes at the layer it reached (:func:`_resumable_saliency`); replaces offload_dir.

    windows: long [n, seq_len]. Same return values: saliency name -> float32 [n * seq_len, groups]
    (window-major), fisher name -> float32 [out, in] (sum over windows) or None. Host memory holds
    every layer's inputs ([num_layers, n, seq_len, hidden] float32) unless ``offload_dir`` is given,
    then one layer's. ``progress_bar`` advances by n when done (same unit as the in-memory pass).
    """
    model, device = streamed.model, streamed.device
    check_groups(quantizable_linears(model), groups)
    if resume_dir is not None:
        return _resumable_saliency(streamed, windows, groups, need_fisher, Path(resume_dir), progress_bar)
    layers, prefix = decoder_layers(model)
    store = ActivationStore(offload_dir)
    with streamed.embeddings():
        hidden, calls = capture_layer_calls(model, windows, device)
    for idx in range(len(layers)):
        store.put(idx, hidden)
        with streamed.layer(idx):
            hidden = layer_outputs(layers[idx], hidden, calls[idx], device)
    with streamed.embeddings():
        grad = head_gradients(model, hidden, windows, device)
    del hidden
    saliency: dict[str, torch.Tensor] = {}
    fisher: dict[str, torch.Tensor] | None = {} if need_fisher else None
    for idx in reversed(range(len(layers))):
        inputs = store.pop(idx)
        with streamed.layer(idx):
            grad, sal, fis = layer_backward(layers[idx], f"{prefix}.{idx}", inputs, grad, calls[idx], groups,
                                            need_fisher, device)
        saliency.update(sal)
        if fisher is not None:
            fisher.update(fis)
    if progress_bar is not None:
        progress_bar.update(windows.shape[0])
    order = list(quantizable_linears(model))  # the in-memory pass's order: layer by layer, forward
    return ({n: saliency[n] for n in order},
            None if fisher is None else {n: fisher[n] for n in order})


def _resumable_saliency(streamed: StreamedModel, windows: torch.Tensor, groups: int, need_fisher: bool,
                        work: Path, progress_bar=None):
    """:func:`streamed_saliency` with its state in ``work`` after every layer.

    ``work/state.json`` says what is done: {"phase": "forward", "next": k} (layer k's inputs are
    ``layer_input_k``), then {"phase": "backward", "next": k} (``grad_k`` is dL/d(outputs of layer
    k), ``rows_j`` hold the saliency / Fisher of every layer j > k). It also records the windows and
    settings; a state for anything else is discarded. Every file is written under a temporary name
    and renamed before the state that points at it, so a kill at any instant leaves a consistent
    directory. The caller deletes ``work`` once it has stored the result.
    """
    import hashlib
    import shutil

    from safetensors.torch import load_file

    model, device = streamed.model, streamed.device
    layers, prefix = decoder_layers(model)
    num = len(layers)
    ident = {"windows": hashlib.sha256(windows.numpy().tobytes()).hexdigest(), "shape": list(windows.shape),
             "groups": groups, "fisher": need_fisher, "layers": num}
    state_path = work / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else None
    if state is None or state.get("ident") != ident:
        shutil.rmtree(work, ignore_errors=True)
        state = {"ident": ident, "phase": "forward", "next": 0}
    store = ActivationStore(work)

    def save(rel: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(work / rel, lambda tmp: save_file(tensors, str(tmp)), fsync=False)

    def advance(phase: str, nxt: int) -> None:
        state.update(phase=phase, next=nxt)
        atomic_write(state_path, json.dumps(state), fsync=False)

    with streamed.embeddings():
        first, calls = capture_layer_calls(model, windows, device)
    if state["phase"] == "forward":
        if state["next"] == 0:
            store.put(0, first)
        del first
        for idx in range(state["next"], num):
            hidden = store.get(idx)
            with streamed.layer(idx):
                hidden = layer_outputs(layers[idx], hidden, calls[idx], device)
            store.put(idx + 1, hidden)  # layer num's "inputs" are the last outputs, for the head
            advance("forward", idx + 1)
        with streamed.embeddings():
            grad = head_gradients(model, store.get(num), windows, device)
        save(f"grad_{num - 1:03d}.safetensors", {"grad": grad})
        advance("backward", num - 1)
        store._path(num).unlink()
    grad = load_file(str(work / f"grad_{state['next']:03d}.safetensors"))["grad"]
    for idx in range(state["next"], -1, -1):
        with streamed.layer(idx):
            grad, sal, fis = layer_backward(layers[idx], f"{prefix}.{idx}", store.get(idx), grad, calls[idx],
                                            groups, need_fisher, device)
        rows = {f"saliency/{k}": v for k, v in sal.items()}
        rows.update({f"fisher/{k}": v for k, v in (fis or {}).items()})
        save(f"rows_{idx:03d}.safetensors", rows)
        if idx > 0:
            save(f"grad_{idx - 1:03d}.safetensors", {"grad": grad})  # dL/d(outputs of layer idx-1)
        advance("backward", idx - 1)
        # Only once the state no longer points at them: this layer's inputs and output gradient.
        store._path(idx).unlink()
        (work / f"grad_{idx:03d}.safetensors").unlink()
    saliency: dict[str, torch.Tensor] = {}
    fisher: dict[str, torch.Tensor] | None = {} if need_fisher else None
    for idx in range(num):
        for key, t in load_file(str(work / f"rows_{idx:03d}.safetensors")).items():
            kind, name = key.split("/", 1)
            (saliency if kind == "saliency" else fisher)[name] = t
    if progress_bar is not None:
        progress_bar.update(windows.shape[0])
    order = list(quantizable_linears(model))
    return ({n: saliency[n] for n in order},
            None if fisher is None else {n: fisher[n] for n in order})
