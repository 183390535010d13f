"""The vLLM linear method of every GuidedQuant format.

Parameters are the format's checkpoint tensors (:meth:`gq_kernels.format.Format.tensors`), plain
``torch.nn.Parameter``s tagged with ``set_weight_attrs`` (``output_dim``, ``input_dim``,
``weight_loader``). That is the v1 loader protocol: vLLM hands v1 loaders to every linear method not
on its internal ``WEIGHT_LOADER_V2_SUPPORTED`` list, and it is the same in vLLM 0.26 and 0.32,
whereas the v2 parameter classes only load through layers that opted in. With it:
  * column-parallel / fused (qkv_proj, gate_up_proj) layers narrow ``output_dim`` to the shard's
    slot and the rank's rows: formats store output channels along a plain dimension, so that is a
    slice;
  * row-parallel layers narrow ``input_dim`` by the rank. That is only right when the rank's column
    range falls on the unit boundaries of every input-indexed tensor (32-column words, groups);
    otherwise no tensor gets ``input_dim`` (vLLM then loads them whole on every rank) and, after
    loading, the format cuts the rank's columns out (``Format.slice_columns``), or, when it cannot
    express them, the rank keeps a dense weight of its columns.
After loading, the layer's kernel is chosen once (``gq_kernels.registry.choose_kernel``, the same
choice ``GQLinear`` makes) and prepares what ``apply`` reads.

A format whose output rows are not independent (``Format.independent_rows`` False: a transform mixes
every row, e.g. ``trellis``) declares no ``output_dim``. Its tensors are then loaded whole, per fused
part (q/k/v, gate/up: each keeps its own tensors), by a loader of ours; after loading, a part the
rank holds entirely keeps its packed tensors and kernel, and a part split by tensor parallelism
(rows or columns) is dequantized and the rank keeps a dense weight of its rows and columns. ``apply``
concatenates the parts' outputs.

Formats that also quantize a linear's input (``Format.weight_only`` False, e.g. W4A4: integer
weights times integer activations) are served by their own kernel on every path, never by a dense
weight, since ``x @ W_hat^T`` is not their function:
  * a tensor shared by all rows (``out_dim`` None, e.g. a per-linear ``layout`` record) is loaded by
    :meth:`GuidedQuantLinearMethod.shared_loader`: vLLM's fused loaders would copy it whole for each
    part and keep the last; ours requires q/k/v (gate/up) to carry equal tensors and refuses the
    checkpoint otherwise, naming the layer and the parts, except for a ``differs_by_part`` tensor
    (W4A4's per-linear ``act_clip``): when the parts' values differ, each part keeps its rows and
    runs its own kernel, and the layer concatenates their outputs;
  * column-parallel and fused layers split output rows as above (the input is whole on every rank,
    so per-token activation quantization sees the same values);
  * a format with ``columns_split_by_spec`` False decides a row-parallel split from its loaded
    tensors: every column is loaded and ``Format.slice_columns`` cuts the rank's columns out only
    when that range is a linear of the format (W4A4: no input Hadamard, activation groups not crossing
    the range; o_proj with per-head groups splits at a head boundary). Otherwise (W4A4's down_proj:
    its input Hadamard and per-token ranges span every column) the layer is kept whole: each rank
    holds all columns of its share of the output rows, ``apply`` all-gathers the input columns
    across the tensor-parallel group, computes those rows with the format's kernel and leaves zeros
    in the others, and vLLM's all-reduce sums the ranks' outputs into exactly the unsplit result;
  * such a format whose rows are not independent is refused under a tensor-parallel split of a part
    (``--tensor-parallel-size 1``).
"""
from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.linear import LinearMethodBase
from vllm.model_executor.utils import set_weight_attrs

from gq_kernels.format import LinearSpec
from gq_kernels.kernel import DenseKernel
from gq_kernels.registry import choose_kernel, get_format

log = logging.getLogger(__name__)


class GuidedQuantLinearMethod(LinearMethodBase):
    def __init__(self, quant_config) -> None:
        self.quant_config = quant_config

    # Helpers ----------------------------------------------------------------------------------
    @staticmethod
    def checked_loader(layer, name: str, dtype: torch.dtype, fixed_dims: dict[int, int], inner):
        """Wrap vLLM's loader so a wrong tensor is refused with its name, not a bare shape assert.

        ``fixed_dims`` maps a dim to the size every on-disk tensor must have there (dims vLLM never
        slices, e.g. the bit planes or the codebook width).
        """

        def load(param, loaded_weight, *args, **kwargs):
            full = f"{layer.prefix}.{name}" if getattr(layer, "prefix", "") else name
            if loaded_weight.dtype != dtype:
                raise ValueError(f"guidedquant: {full} must be {dtype}, the checkpoint has {loaded_weight.dtype}")
            bad = {d: n for d, n in fixed_dims.items() if loaded_weight.dim() <= d or loaded_weight.shape[d] != n}
            if loaded_weight.dim() != param.dim() or bad:
                raise ValueError(
                    f"guidedquant: {full} has shape {tuple(loaded_weight.shape)}; expected {param.dim()} dims with "
                    + ", ".join(f"dim {d} == {n}" for d, n in fixed_dims.items())
                )
            return inner(param, loaded_weight, *args, **kwargs)

        return load

    @staticmethod
    def add_param(layer, name: str, data: torch.Tensor, attrs: dict) -> None:
        p = torch.nn.Parameter(data, requires_grad=False)
        set_weight_attrs(p, attrs)
        layer.register_parameter(name, p)

    # vLLM API ---------------------------------------------------------------------------------
    def create_weights(
        self,
        layer: torch.nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: list[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs,
    ) -> None:
        loader = extra_weight_attrs.pop("weight_loader")
        fmt, params = get_format(self.quant_config.format), self.quant_config.params
        if not fmt.independent_rows:
            self._create_whole_parts(layer, input_size_per_partition, output_partition_sizes, input_size,
                                     output_size, params_dtype, extra_weight_attrs)
            return
        out_pp = sum(output_partition_sizes)
        in_pp = input_size_per_partition
        row_parallel = in_pp != input_size
        # LinearBase sets tp_rank before create_weights runs (0 for replicated / disable_tp layers).
        in_start = getattr(layer, "tp_rank", 0) * in_pp if row_parallel else 0
        on_disk = fmt.tensors(params, out_pp, input_size)  # this layer's rows, every column
        shard = row_parallel and fmt.columns_split_by_spec and all(
            s.in_dim is None or (in_start % s.in_unit == 0 and in_pp % s.in_unit == 0) for s in on_disk.values())
        stored = fmt.tensors(params, out_pp, in_pp) if shard else on_disk
        layer.gq_shared = {}  # name -> {shard id: tensor} of the tensors every fused part carries
        for name, spec in stored.items():
            attrs = dict(extra_weight_attrs)
            if spec.out_dim is None and spec.in_dim is None:
                attrs["weight_loader"] = self.shared_loader(layer, name, spec.dtype, on_disk[name].shape,
                                                            spec.differs_by_part)
                self.add_param(layer, name, torch.empty(spec.shape, dtype=spec.dtype), attrs)
                continue
            sliced = set()
            if spec.out_dim is not None:
                attrs["output_dim"] = spec.out_dim
                sliced.add(spec.out_dim)
            if shard and spec.in_dim is not None:
                attrs["input_dim"] = spec.in_dim
                sliced.add(spec.in_dim)
            fixed = {d: n for d, n in enumerate(on_disk[name].shape) if d not in sliced}
            attrs["weight_loader"] = self.checked_loader(layer, name, spec.dtype, fixed, loader)
            self.add_param(layer, name, torch.empty(spec.shape, dtype=spec.dtype), attrs)
        # What process_weights_after_loading needs; a plain attribute, not state vLLM would try to load.
        layer.gq_partition = {
            "in_start": in_start,  # first input column of this rank in the full matrix
            "in_pp": in_pp,
            "input_size": input_size,
            "out_pp": out_pp,
            "loaded_whole": row_parallel and not shard,  # every column loaded: cut this rank's out
            "names": tuple(stored),
            "params_dtype": params_dtype,
            "n_parts": len(output_partition_sizes),
            "part_sizes": tuple(output_partition_sizes),
        }

    @staticmethod
    def shared_loader(layer, name: str, dtype: torch.dtype, shape: tuple[int, ...], differs_by_part: bool = False):
        """Loader of a tensor shared by all rows (``out_dim`` None, e.g. a layout record).

        vLLM's fused loaders copy such a parameter whole for every part, so the last part would win
        silently; here each part's tensor is kept (``layer.gq_shared[name][shard_id]``) and must equal
        the others' (one fused layer runs one kernel configuration), else the load fails naming the
        layer and the parts; a ``differs_by_part`` tensor may differ (each part then gets its own
        kernel, :meth:`process_weights_after_loading`)."""

        def load(param, loaded_weight, shard_id=None):
            full = f"{layer.prefix}.{name}" if getattr(layer, "prefix", "") else name
            if loaded_weight.dtype != dtype:
                raise ValueError(f"guidedquant: {full} must be {dtype}, the checkpoint has {loaded_weight.dtype}")
            if tuple(loaded_weight.shape) != tuple(shape):
                raise ValueError(f"guidedquant: {full} has shape {tuple(loaded_weight.shape)}; expected {tuple(shape)}")
            seen = layer.gq_shared.setdefault(name, {})
            for other, t in seen.items():
                if not differs_by_part and not torch.equal(t, loaded_weight.cpu()):
                    raise ValueError(
                        f"guidedquant: {full}: vLLM fuses the checkpoint's modules into one layer, but part "
                        f"{shard_id!r} has {name} {loaded_weight.tolist()} and part {other!r} has {t.tolist()}; "
                        f"every fused part must carry the same {name} (re-export the checkpoint)")
            seen[shard_id] = loaded_weight.detach().cpu().clone()
            param.data.copy_(loaded_weight)

        return load

    # Formats whose rows are not independent: every fused part loaded whole -------------------
    @staticmethod
    def _part_index(shard_id) -> int:
        if shard_id is None:
            return 0
        if isinstance(shard_id, str):
            return "qkv".index(shard_id)
        return int(shard_id)

    def _create_whole_parts(self, layer, in_pp, output_partition_sizes, input_size, output_size, params_dtype,
                            attrs) -> None:
        fmt, params = get_format(self.quant_config.format), self.quant_config.params
        names = tuple(fmt.tensors(params, 16 * 16, 16 * 16))  # the suffixes (shapes come from the file)
        layer.gq_parts = {}

        def make_loader(name: str, dtype: torch.dtype):
            def load(param, loaded_weight, shard_id=None):
                full = f"{layer.prefix}.{name}" if getattr(layer, "prefix", "") else name
                if loaded_weight.dtype != dtype:
                    raise ValueError(f"guidedquant: {full} must be {dtype}, the checkpoint has {loaded_weight.dtype}")
                i = self._part_index(shard_id)
                layer.gq_parts.setdefault(i, {})[name] = loaded_weight.to(param.device).contiguous()

            return load

        specs = fmt.tensors(params, 16 * 16, 16 * 16)
        for name in names:
            extra = {k: v for k, v in attrs.items() if k not in ("output_dim", "input_dim")}
            extra["weight_loader"] = make_loader(name, specs[name].dtype)
            self.add_param(layer, name, torch.empty(0, dtype=specs[name].dtype), extra)
        # Column-parallel layers split their rows by rank; row-parallel (and replicated) ones do not.
        tp_rank = getattr(layer, "tp_rank", 0) if sum(output_partition_sizes) != output_size else 0
        # QKVParallelLinear replicates k/v heads when tp_size exceeds their number.
        replicas = getattr(layer, "num_kv_head_replicas", None)
        layer.gq_partition = {
            "whole_parts": True,
            "names": names,
            "in_start": getattr(layer, "tp_rank", 0) * in_pp if in_pp != input_size else 0,
            "in_pp": in_pp,
            "input_size": input_size,
            # rows of part i on this rank: [rank_i * size_i, (rank_i + 1) * size_i) of the part
            "parts": [(size, tp_rank // replicas if (replicas and i > 0) else tp_rank)
                      for i, size in enumerate(output_partition_sizes)],
            "params_dtype": params_dtype,
        }

    def _process_whole_parts(self, layer) -> None:
        part = layer.gq_partition
        fmt, qc = get_format(self.quant_config.format), self.quant_config
        dtype = part["params_dtype"]
        prefix = getattr(layer, "prefix", "")
        kernels, runtimes = [], []
        for i, (size, rank) in enumerate(part["parts"]):
            tensors = layer.gq_parts.get(i, {})
            missing = [n for n in part["names"] if n not in tensors]
            if missing:
                raise ValueError(f"guidedquant: {prefix} (part {i}) is missing tensor(s) {missing} in the checkpoint")
            device = next(iter(tensors.values())).device
            out_full = fmt.infer_out_features(tensors, qc.params, part["input_size"])
            fmt.check_tensors(tensors, qc.params, out_full, part["input_size"], prefix=f"{prefix}.")
            whole = size == out_full and part["in_pp"] == part["input_size"]
            if not whole and not fmt.weight_only:
                raise ValueError(f"guidedquant: {prefix} (part {i}) is split by tensor parallelism, and a "
                                 f"{fmt.name} linear quantizes its input, so a dense weight of the rank's share "
                                 "would compute another function; serve with --tensor-parallel-size 1")
            if whole:
                spec = LinearSpec(qc.params, out_full, part["input_size"])
                kernel = choose_kernel(spec, device, dtype, prefer=qc.checkpoint.kernel)
                runtime = kernel.prepare(tensors)
            else:
                r0, c0 = rank * size, part["in_start"]
                w = fmt.dequantize(tensors, qc.params, part["input_size"])[r0:r0 + size, c0:c0 + part["in_pp"]]
                kernel = DenseKernel(LinearSpec(qc.params, size, part["in_pp"]), device, dtype)
                runtime = {"weight": w.to(device=device, dtype=dtype)}
                log.info("guidedquant: %s part %d keeps a dense weight (rows %d.., columns %d..)", prefix, i, r0, c0)
            kernels.append(kernel)
            runtimes.append(runtime)
        for name in part["names"]:
            delattr(layer, name)
        del layer.gq_parts
        if len(kernels) == 1:  # not fused: the layer looks like any other
            for name, t in runtimes[0].items():
                layer.register_parameter(name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
            layer.gq_kernel, layer.gq_runtime = kernels[0], tuple(runtimes[0])
            return
        self._install_parts(layer, kernels, runtimes)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        if layer.gq_partition.get("whole_parts"):
            self._process_whole_parts(layer)
            return
        part = layer.gq_partition
        fmt, qc = get_format(self.quant_config.format), self.quant_config
        tensors = {name: getattr(layer, name).data for name in part["names"]}
        device = next(iter(tensors.values())).device
        dtype = part["params_dtype"]
        prefix = getattr(layer, "prefix", "")
        for name, parts in layer.gq_shared.items():
            if part["n_parts"] > 1 and len(parts) != part["n_parts"]:
                raise ValueError(f"guidedquant: {prefix}.{name}: the checkpoint gives it for fused part(s) "
                                 f"{sorted(map(str, parts))} only; every one of the {part['n_parts']} parts needs it")
        shared = layer.gq_shared
        del layer.gq_shared
        if self._split_parts(layer, fmt, tensors, shared, device, dtype):
            return
        spec = LinearSpec(qc.params, part["out_pp"], part["in_pp"])
        local = tensors
        if part["loaded_whole"]:
            local = fmt.slice_columns(tensors, qc.params, part["input_size"], part["in_start"], part["in_pp"])
        if local is None and not fmt.weight_only:
            self._keep_whole(layer, fmt, tensors, device, dtype)
            return
        if local is None:
            # The format has no packed form of this rank's columns: keep their dense weight.
            lo = part["in_start"]
            w = fmt.dequantize(tensors, qc.params, part["input_size"])[:, lo:lo + part["in_pp"]]
            kernel = DenseKernel(spec, device, dtype)
            # device= explicitly: a tensor made without it lands on the CPU and only fails on a GPU.
            runtime = {"weight": w.to(device=device, dtype=dtype)}
            log.info("guidedquant: %s keeps a dense weight (columns %d.. of a %s split)", getattr(layer, "prefix", ""),
                     lo, fmt.name)
        else:
            kernel = choose_kernel(spec, device, dtype, prefer=qc.checkpoint.kernel)
            runtime = kernel.prepare(local)
        # The loaded tensors go; what apply reads is registered in their place.
        for name in part["names"]:
            delattr(layer, name)
        for name, t in runtime.items():
            layer.register_parameter(name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
        layer.gq_kernel, layer.gq_runtime = kernel, tuple(runtime)

    def _split_parts(self, layer, fmt, tensors, shared, device, dtype) -> bool:
        """A fused layer whose parts hold different ``differs_by_part`` tensors (e.g. W4A4's per-linear
        ``act_clip``): give each part its rows, its own shared tensors and its own kernel. Returns
        whether it did (False: one kernel serves the layer)."""
        part, qc = layer.gq_partition, self.quant_config
        specs = fmt.tensors(qc.params, part["out_pp"], part["in_pp"])
        differ = [n for n, s in specs.items() if s.differs_by_part and n in shared
                  and len({tuple(t.flatten().tolist()) for t in shared[n].values()}) > 1]
        if part["n_parts"] < 2 or not differ:
            return False
        by_part = {n: {self._part_index(k): t for k, t in v.items()} for n, v in shared.items()}
        kernels, runtimes, r0 = [], [], 0
        for i, size in enumerate(part["part_sizes"]):
            own = {n: by_part[n][i].to(device) if s.out_dim is None else tensors[n].narrow(s.out_dim, r0, size).contiguous()
                   for n, s in specs.items()}
            kernel = choose_kernel(LinearSpec(qc.params, size, part["in_pp"]), device, dtype, prefer=qc.checkpoint.kernel)
            kernels.append(kernel)
            runtimes.append(kernel.prepare(own))
            r0 += size
        for name in part["names"]:
            delattr(layer, name)
        self._install_parts(layer, kernels, runtimes)
        log.info("guidedquant: %s runs its %d fused parts with their own kernels (their %s differ)",
                 getattr(layer, "prefix", ""), len(kernels), ", ".join(differ))
        return True

    @staticmethod
    def _install_parts(layer, kernels, runtimes) -> None:
        """Register each part's prepared tensors (``gq_p{i}_{name}``) and serve the layer with ``_Parts``."""
        names = []
        for i, runtime in enumerate(runtimes):
            keys = []
            for name, t in runtime.items():
                pname = f"gq_p{i}_{name}"
                layer.register_parameter(pname, torch.nn.Parameter(t.contiguous(), requires_grad=False))
                keys.append((name, pname))
            names.append(tuple(keys))
        layer.gq_kernel, layer.gq_runtime = _Parts(kernels), tuple(names)

    def _keep_whole(self, layer, fmt, tensors, device, dtype) -> None:
        """A row-parallel layer no column range of which is a linear of its format (it quantizes its
        input over every column, or rotates it first): each rank keeps every column of its share of
        the output rows, gathers the full input in ``apply`` and fills in those rows; the other rows
        are zeros, so vLLM's all-reduce (a sum) assembles the exact output."""
        part, qc = layer.gq_partition, self.quant_config
        out, tp_rank, tp_size = part["out_pp"], int(getattr(layer, "tp_rank", 0)), int(getattr(layer, "tp_size", 1))
        r0, r1 = out * tp_rank // tp_size, out * (tp_rank + 1) // tp_size
        specs = fmt.tensors(qc.params, out, part["input_size"])
        rows = {n: t if specs[n].out_dim is None else t.narrow(specs[n].out_dim, r0, r1 - r0).contiguous()
                for n, t in tensors.items()}
        kernel = choose_kernel(LinearSpec(qc.params, r1 - r0, part["input_size"]), device, dtype,
                               prefer=qc.checkpoint.kernel)
        runtime = kernel.prepare(rows)
        for name in part["names"]:
            delattr(layer, name)
        for name, t in runtime.items():
            layer.register_parameter(name, torch.nn.Parameter(t.contiguous(), requires_grad=False))
        layer.gq_kernel, layer.gq_runtime = _GatheredRows(kernel, r0, r1, out), tuple(runtime)
        log.info("guidedquant: %s keeps all %d input columns on every rank (a %s linear that cannot be split "
                 "by column); rank %d computes output rows %d..%d", getattr(layer, "prefix", ""),
                 part["input_size"], fmt.name, tp_rank, r0, r1)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(layer.gq_kernel, (_Parts, _GatheredRows)):
            return layer.gq_kernel.apply(layer, x, bias)
        return layer.gq_kernel.apply({name: getattr(layer, name) for name in layer.gq_runtime}, x, bias)


class _Parts:
    """The kernels of a layer's fused parts (formats whose rows are not independent, or parts whose
    ``differs_by_part`` tensors differ): each part's output, concatenated in order, plus the bias."""

    def __init__(self, kernels) -> None:
        self.kernels = kernels
        self.name = "+".join(k.name for k in kernels)

    def apply(self, layer, x, bias=None):
        outs = [k.apply({name: getattr(layer, pname) for name, pname in keys}, x)
                for k, keys in zip(self.kernels, layer.gq_runtime)]
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return y if bias is None else y + bias.to(y.dtype)


class _GatheredRows:
    """A row-parallel layer kept whole on every rank (``_keep_whole``): gather the input's columns
    from all ranks, compute this rank's output rows [r0, r1) with the format's kernel, zeros elsewhere."""

    def __init__(self, kernel, r0: int, r1: int, out_features: int) -> None:
        self.kernel, self.r0, self.r1, self.out_features = kernel, r0, r1, out_features
        self.name = kernel.name

    def apply(self, layer, x, bias=None):
        from vllm.distributed import tensor_model_parallel_all_gather

        full = tensor_model_parallel_all_gather(x.contiguous(), dim=-1) if getattr(layer, "tp_size", 1) > 1 else x
        rows = self.kernel.apply({name: getattr(layer, name) for name in layer.gq_runtime}, full)
        if self.r0 == 0 and self.r1 == self.out_features:
            y = rows
        else:
            y = rows.new_zeros(*rows.shape[:-1], self.out_features)
            y[..., self.r0:self.r1] = rows
        return y if bias is None else y + bias.to(y.dtype)  # vLLM passes the bias to rank 0 only
