"""The `gq` command: prepare, quantize, rotate, eval, serve, bench, plan.

All command-line code lives here; each subcommand imports its machinery lazily, so `gq --help`
starts fast. The `gq quantize` options of the methods are generated from their config classes
(``gq_quantize.methods``): every field is a flag.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

# Short names for models that `gq prepare` puts in the cache.
MODEL_ALIASES = {"smollm2": "models/SmolLM2-135M-Instruct", "gemma3": "models/gemma-3-270m"}
DECODE_MODES = ("auto", "static", "dynamic", "lean")  # gq_serve.decode.DECODE_MODES, without importing torch


class CliError(Exception):
    """A problem with the command line the user can fix; printed without a traceback."""


def _cache_root(args) -> Path:
    from gq_serve.util import cache_root

    return Path(args.cache) if getattr(args, "cache", None) else cache_root()


def resolve_model_path(spec: str, cache: Path) -> Path:
    """A directory path, or an alias (``smollm2``) for a model prepared by `gq prepare`."""
    if spec in MODEL_ALIASES:
        path = cache / MODEL_ALIASES[spec]
        if not path.is_dir():
            raise CliError(f"model {spec!r} is not prepared in {cache}; run `gq prepare` first"
                           + (f" (`gq prepare --only {spec}`)" if spec != "smollm2" else ""))
        return path
    return Path(spec)


def _device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _print_json(obj, path: str | None = None) -> None:
    if path:
        from gq_serve.util import write_json

        write_json(Path(path), obj)
    print(json.dumps(obj, indent=2))


# --------------------------------------------------------------------------- prepare
def cmd_prepare(args) -> int:
    from gq_quantize.assets import prepare_assets

    from gq_quantize.assets import DEFAULT_ASSETS

    what = tuple(args.only.split(",")) if args.only else DEFAULT_ASSETS
    paths = prepare_assets(_cache_root(args), what=what, force=args.force)
    _print_json({k: str(v) for k, v in paths.items()})
    return 0


# --------------------------------------------------------------------------- quantize
def _method_options() -> dict[str, tuple[type, object, str]]:
    """Every method option except ``bits``: field name -> (type, field info, methods declaring it)."""
    from gq_quantize.methods.registry import field_type, option_fields

    out = {}
    for name, methods in sorted(option_fields().items()):
        if name != "bits":
            info = methods[0].config.model_fields[name]
            out[name] = (field_type(info.annotation), info, ", ".join(m.name for m in methods))
    return out


def _add_method_options(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("method options (each applies to the methods named in brackets)")
    for name, (typ, info, which) in _method_options().items():
        flag = "--" + name.replace("_", "-")
        help_ = f"{info.description or name} [{which}; default {info.default}]"
        if typ is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_)
        else:
            group.add_argument(flag, dest=name, type=typ, default=None, help=help_)


def _describe(err: dict, method: str) -> str:
    """One pydantic error as the CLI option it came from, e.g. '--method: Input should be ...'."""
    msg = err["msg"].removeprefix("Value error, ")
    loc = [str(x) for x in err.get("loc", ()) if x not in ("calibration", "options")]
    if not loc:
        return msg
    flag = "--" + loc[-1].replace("_", "-")
    if err.get("type") == "extra_forbidden":
        return f"{flag} does not apply to --method {method}"
    return f"{flag}: {msg}"


def cmd_quantize(args) -> int:
    from pydantic import ValidationError

    from gq_quantize.config import CalibrationConfig, QuantizeConfig
    from gq_quantize.finetune import FinetuneConfig
    from gq_quantize.pipeline import quantize_model

    options = {n: getattr(args, n) for n in _method_options() if getattr(args, n) is not None}
    try:
        finetune = FinetuneConfig(steps=args.finetune_steps, lr=args.finetune_lr, batch=args.finetune_batch,
                                  windows=args.finetune_windows, precision=args.finetune_precision,
                                  norms=args.finetune_norms)
    except ValidationError as e:
        raise CliError("; ".join(f"--finetune-{err['loc'][-1]}: {err['msg']}" for err in e.errors())) from None
    try:
        qconfig = QuantizeConfig(
            method=args.method, bits=args.bits, guided=args.guided, groups=args.groups,
            guided_shrink=args.guided_shrink, sequential=args.sequential, finetune=finetune,
            calibration=CalibrationConfig(data=args.calib, n_samples=args.n_samples, seq_len=args.seq_len,
                                          seed=args.seed),
            **options,
        )
    except ValidationError as e:
        raise CliError("; ".join(_describe(err, args.method) for err in e.errors())) from None
    cache = _cache_root(args)
    if args.max_device_memory is not None and args.max_device_memory <= 0:
        raise CliError(f"--max-device-memory must be a positive number of GiB, got {args.max_device_memory}")
    if args.dry_run:
        print(_memory_plan(args, qconfig, cache)[0])
        return 0
    if not args.out:
        raise CliError("--out is required (the output checkpoint directory); only --dry-run runs without it")
    model_dir = resolve_model_path(args.model, cache)
    streamed = args.streamed or args.offload_dir is not None
    if args.max_device_memory is not None and not streamed:
        text, mode = _memory_plan(args, qconfig, cache)
        if mode is None:
            raise CliError(text.rsplit("\n", 1)[-1])
        streamed = mode == "streamed"
        print(f"gq quantize: --max-device-memory {args.max_device_memory:g} GiB: "
              f"{'streamed (one decoder layer at a time)' if streamed else 'in memory'}", file=sys.stderr)
    from gq_quantize.calibration.distributed import init_from_env, rank_world

    # Under torchrun the processes split the calibration windows; process 0 quantizes and exports.
    device = init_from_env(_device(args.device))
    rank = rank_world()[0]
    try:
        summary = quantize_model(model_dir, qconfig, Path(args.out), cache, overwrite=args.overwrite,
                                 device=device, progress=not args.quiet and rank == 0,
                                 recalibrate=args.recalibrate, streamed=streamed,
                                 offload_dir=Path(args.offload_dir) if args.offload_dir else None)
    finally:
        if rank_world()[1] > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
        _print_json(summary)
    return 0


def _memory_plan(args, qconfig, cache: Path) -> tuple[str, str | None]:
    """(the dry-run table, the mode --max-device-memory picks or None if nothing fits) for the model
    and settings of a `gq quantize` command line; the model may also be a bundled name (llama-2-70b)."""
    from gq_quantize.memory import GIB, Settings, choose_mode, model_shape, needs, render

    spec = args.model
    if spec in MODEL_ALIASES or Path(spec).exists():
        spec = str(resolve_model_path(spec, cache))
    shape = model_shape(spec)
    qneeds = qconfig.needs()
    settings = Settings(n_samples=qconfig.calibration.n_samples, seq_len=qconfig.calibration.seq_len,
                        groups=qconfig.hessian_groups(), guided=qconfig.guided, fisher="fisher" in qneeds,
                        offload=args.offload_dir is not None, sequential=qconfig.sequential)
    plan = needs(shape, settings)
    if "hessian" not in qneeds:  # RTN / SqueezeLLM read no Hessians
        plan.pop("hessians")
    budget = None if args.max_device_memory is None else int(args.max_device_memory * GIB)
    try:
        mode = choose_mode(plan, budget)
    except ValueError:
        mode = None
    return render(shape.name, plan, settings, budget), mode


# --------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from transformers import AutoTokenizer

    from gq_quantize.data import eval_windows
    from gq_serve.checkpoint import load_model
    from gq_serve.evaluate import perplexity

    cache = _cache_root(args)
    ckpt = resolve_model_path(args.checkpoint, cache)
    if not (ckpt / "config.json").is_file():
        raise CliError(f"{ckpt} is not a model directory (no config.json)")
    model = load_model(ckpt, device=_device(args.device), dtype=args.dtype, kernel=args.kernel, head=args.head)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    rows = []
    for spec in args.data:
        windows = eval_windows(tokenizer, spec, args.ctx, args.max_tokens, cache)
        result = perplexity(model, windows, batch_size=args.batch_size, progress=not args.quiet)
        rows.append({"checkpoint": str(ckpt), "eval_data": spec, **result})
    _print_json(rows, args.json)
    return 0


# --------------------------------------------------------------------------- verify
def cmd_verify(args) -> int:
    """Every file's and tensor's sha256 against gq_manifest.json, config vs manifest, then the
    model built from config.json with every tensor checked; problems listed, exit 1."""
    from gq_serve.checkpoint import (
        CheckpointIntegrityError,
        load_quantized_model,
        read_manifest,
        verify_files,
    )

    ckpt = resolve_model_path(args.checkpoint, _cache_root(args))
    if not (ckpt / "config.json").is_file():
        raise CliError(f"{ckpt} is not a model directory (no config.json)")
    manifest = read_manifest(ckpt)
    if manifest is None:
        raise CliError(f"{ckpt} has no gq_manifest.json: nothing to verify against (only checkpoints "
                       f"written by `gq quantize` carry checksums)")
    problems = verify_files(ckpt, use_cache=False)
    if not problems:
        try:
            load_quantized_model(ckpt)  # structure + per-tensor hashes as the server loads it
        except CheckpointIntegrityError as exc:
            problems = exc.problems
        except ValueError as exc:  # the tensors do not fit the model config.json describes
            problems = [str(exc)]
    report = {"checkpoint": str(ckpt), "ok": not problems, "files": len(manifest["files"]),
              "tensors": len(manifest.get("tensors", {})), "problems": problems}
    if args.json:
        _print_json(report)
    elif problems:
        print(f"gq verify: {ckpt}: {len(problems)} problem(s):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
    else:
        print(f"gq verify: {ckpt}: OK ({report['files']} files, {report['tensors']} tensors match "
              f"gq_manifest.json; the model loads)")
    return 0 if not problems else 1


# --------------------------------------------------------------------------- serve
def serve_hf(args) -> None:
    """`gq serve --engine hf`: load the checkpoint and serve it with uvicorn until a signal, then
    drain (gq_serve.lifecycle) and exit 0."""
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.engine import Engine
    from gq_serve.lifecycle import run_server
    from gq_serve.server import create_app

    logging.basicConfig(level=args.log_level.upper())
    log = logging.getLogger("gq_serve")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    ckpt = args.ckpt
    if not os.path.isdir(ckpt):
        raise SystemExit(f"gq serve: checkpoint directory '{ckpt}' does not exist")
    name = args.served_model_name or os.path.basename(os.path.normpath(ckpt))
    log.info("loading %s on %s (%s)", ckpt, args.device, args.dtype)
    model = load_model(ckpt, device=args.device, dtype=args.dtype, kernel=args.kernel, head=args.head)
    if model.gq_kernels:
        log.info("kernels: %s", ", ".join(f"{k} ({n} layers)" for k, n in model.gq_kernels.items()))
    if model.gq_head != "model":
        log.info("lm_head: %s", model.gq_head)
    engine = Engine(model, load_tokenizer(ckpt), device=args.device, max_queue=args.max_queue,
                    max_model_len=args.max_model_len, decode=args.decode, compile=args.compile)
    app = create_app(engine, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes)
    run_server(app, engine, args.host, args.port, log_level=args.log_level, drain_timeout=args.drain_timeout)


def serve_vllm(args) -> None:
    """`gq serve --engine vllm`: exec vLLM's OpenAI server with our plugin and the same options."""
    from gq_serve.vllm_launch import VllmNotInstalledError, vllm_serve_main

    if args.head != "model":
        raise SystemExit(f"gq serve: error: --head {args.head} is for --engine hf on the CPU; vLLM keeps its own "
                         "lm_head: drop --head")
    # Same default model id as the hf engine: the checkpoint directory's name.
    extra = ["--served-model-name", args.served_model_name or Path(args.ckpt).resolve().name]
    if args.max_model_len:
        extra += ["--max-model-len", str(args.max_model_len)]
    if args.dtype != "auto":
        extra += ["--dtype", args.dtype]
    try:
        vllm_serve_main(args.ckpt, host=args.host, port=args.port, api_key=args.api_key,
                        extra_args=extra + list(args.vllm_arg), kernel=args.kernel)
    except VllmNotInstalledError as e:
        raise SystemExit(f"gq serve: error: {e}") from None


def cmd_serve(args) -> int:
    (serve_vllm if args.engine == "vllm" else serve_hf)(args)
    return 0


# --------------------------------------------------------------------------- bench
def _parse_model_arg(spec: str) -> tuple[str, str]:
    """'LABEL=PATH' or 'PATH' (label: the directory name)."""
    label, sep, path = spec.partition("=")
    if not sep:
        path, label = spec, Path(spec).name
    if not Path(path).is_dir():
        raise SystemExit(f"gq bench offline: model directory '{path}' does not exist")
    return label, path


def cmd_bench_offline(args) -> list[dict]:
    import torch

    from gq_serve.bench import bench_offline, format_offline
    from gq_serve.checkpoint import load_model, load_tokenizer
    from gq_serve.util import write_json

    if args.threads:
        torch.set_num_threads(args.threads)
    models = {}
    for spec in args.models:
        label, path = _parse_model_arg(spec)
        models[label] = (load_model(path, device=args.device, dtype=args.dtype, kernel=args.kernel, head=args.head),
                         load_tokenizer(path))
    rows = bench_offline(models, new_tokens=args.new_tokens, runs=args.runs, prompt=args.prompt,
                         decode=args.decode, compile=args.compile)
    print(format_offline(rows))
    if args.output:
        write_json(Path(args.output), {"protocol": "batch1-greedy-ignore-eos", "rows": rows})
        print(f"wrote {args.output}", file=sys.stderr)
    return rows


def cmd_bench_online(args) -> dict:
    from gq_serve.bench_online import bench_online, format_online, plot_online
    from gq_serve.util import write_json

    try:
        levels = [int(x) for x in str(args.concurrency).split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"gq bench online: --concurrency must be comma-separated integers (got {args.concurrency!r})")
    result = bench_online(args.base_url, args.model, api_key=args.api_key, concurrency=levels,
                          requests_per_level=args.requests, max_tokens=args.max_tokens, prompt=args.prompt,
                          endpoint=args.endpoint, ignore_eos=args.ignore_eos, timeout=args.timeout,
                          level_time_limit=args.level_time_limit, progress=not args.no_progress)
    out = Path(args.output)
    if not args.no_plot:
        result["plot"] = str(plot_online(result, out.with_suffix(".png")))
    write_json(out, result)
    print(format_online(result))
    print(f"wrote {out}" + (f" and {result['plot']}" if "plot" in result else ""), file=sys.stderr)
    return result


# --------------------------------------------------------------------------- rotate
def cmd_rotate(args) -> int:
    from gq_quantize.spinquant.train import write_rotated_model

    cache = _cache_root(args)
    model = resolve_model_path(args.model, cache)
    record = write_rotated_model(model, Path(args.out), args.rotation, seed=args.seed, steps=args.steps,
                                 lr=args.lr, seq_len=args.seq_len, data=args.data, batch=args.batch_size,
                                 rotation_file=args.rotation_file, cache=cache, dtype=args.dtype,
                                 overwrite=args.overwrite, progress=not args.quiet,
                                 center=args.center_embeddings, act_clip=args.act_clip, kv_clip=args.kv_clip,
                                 act_group=args.act_group, kv_group=args.kv_group)
    _print_json(record)
    return 0


# --------------------------------------------------------------------------- plan
def cmd_plan(args) -> int:
    from gq_serve.plan import plan_rows, render_table
    from gq_serve.util import write_json

    rows = plan_rows(args.model, cards=args.card, formats=[args.format] if args.format else None,
                     bits=[args.bits] if args.bits is not None else None, context=args.context,
                     reserve_gib=args.reserve_gib)
    print(render_table(rows), end="")
    if args.json:
        write_json(Path(args.json), rows)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- parser
def _add_kernel_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kernel", default=None,
                   help="run every quantized layer with this kernel (default: chosen per layer; names: "
                        "see docs/internals.md, e.g. dense, reference, lut-triton)")


def _add_head_arg(p: argparse.ArgumentParser) -> None:
    from gq_serve.head import HEADS

    p.add_argument("--head", choices=HEADS, default="model",
                   help="lm_head precision on the CPU: model (as loaded), int8 (rounded per row at load, "
                        "multiplied by the int8 CPU kernel: a quarter of the fp32 head's bytes per token)")


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve a checkpoint behind an OpenAI-compatible API")
    p.add_argument("ckpt", help="quantized checkpoint or plain Hugging Face model directory")
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                   help="hf: embedded transformers engine (CPU or one GPU); vllm: vLLM with our plugin")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("GQ_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $GQ_API_KEY, else no auth)")
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: dir name)")
    p.add_argument("--max-queue", type=int, default=16,
                   help="--engine hf: requests waiting behind the running one; more are answered 429 "
                        "with Retry-After (default: %(default)s)")
    p.add_argument("--max-body-bytes", type=int, default=2 * 1024 * 1024,
                   help="--engine hf: larger request bodies are answered 413 (default: %(default)s)")
    p.add_argument("--drain-timeout", type=float, default=25.0,
                   help="--engine hf: on SIGTERM/SIGINT, seconds to finish queued and running requests "
                        "(new ones get 503) before cancelling them; then exit 0 (default: %(default)s)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context limit (default: config max_position_embeddings)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float16, bfloat16, float32")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; lower it on a shared machine)")
    p.add_argument("--decode", choices=DECODE_MODES, default="auto",
                   help="--engine hf: auto (static on CUDA; on the CPU lean, or dynamic for a model lean does "
                        "not serve), static (static KV cache; on a GPU the decode step replays as a CUDA "
                        "graph), dynamic (DynamicCache), lean (Llama-layout models: fused projections, "
                        "KV cache written in place, few ops per layer)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="--engine hf, static decode on a GPU: torch.compile the step before its CUDA graph "
                        "capture (default: on)")
    _add_kernel_arg(p)
    _add_head_arg(p)
    p.add_argument("--log-level", default="info")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="--engine vllm: one more argument for vLLM's server (repeatable), e.g. "
                        "--vllm-arg=--enforce-eager")
    p.set_defaults(func=cmd_serve)


def _add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="speed benchmarks (offline decode, online load test)")
    bsub = bench.add_subparsers(dest="bench_command", required=True)

    off = bsub.add_parser("offline", help="batch-1 decode tok/s of one or more models, same process")
    off.add_argument("models", nargs="+", metavar="[LABEL=]DIR",
                     help="model directories; the first is the baseline of the speedup column")
    off.add_argument("--new-tokens", type=int, default=100)
    off.add_argument("--runs", type=int, default=3, help="measured runs (median reported), after 1 warm-up")
    off.add_argument("--prompt", default="The capital of France is")
    off.add_argument("--device", default="cpu")
    off.add_argument("--dtype", default="auto", help="auto (fp16 on GPU, fp32 on CPU), float16, bfloat16, float32")
    off.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    off.add_argument("--decode", choices=DECODE_MODES, default="auto",
                     help="decode loop, as `gq serve --decode`: auto (static on CUDA, lean or dynamic on "
                          "the CPU), static (static KV cache, CUDA graph on a GPU), dynamic (DynamicCache), "
                          "lean (Llama-layout models)")
    off.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="with static decode: torch.compile each bucket's step (default: on a GPU only)")
    _add_kernel_arg(off)
    _add_head_arg(off)
    off.add_argument("--output", "-o", default=None, help="write rows as JSON here")
    off.set_defaults(func=cmd_bench_offline)

    on = bsub.add_parser("online", help="load test any OpenAI-compatible endpoint")
    on.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000 (with or without /v1)")
    on.add_argument("--model", required=True, help="model id as the endpoint lists it in /v1/models")
    on.add_argument("--api-key", default=None)
    on.add_argument("--concurrency", default="1,2,4,8", help="comma-separated levels")
    on.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    on.add_argument("--max-tokens", type=int, default=64)
    on.add_argument("--prompt", default="The capital of France is")
    on.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    on.add_argument("--ignore-eos", action="store_true", help="fixed output length (vLLM / gq serve only)")
    on.add_argument("--timeout", type=float, default=120.0, help="per-request timeout (s)")
    on.add_argument("--level-time-limit", type=float, default=300.0, help="stop issuing after this (s)")
    on.add_argument("--output", "-o", default="bench_online.json", help="JSON results; the plot goes next to it")
    on.add_argument("--no-plot", action="store_true")
    on.add_argument("--no-progress", action="store_true")
    on.set_defaults(func=cmd_bench_online)


def _add_plan_parser(sub) -> None:
    from gq_serve.plan import BUNDLED_CARDS, BUNDLED_MODELS, DEFAULT_CONTEXT, DEFAULT_RESERVE_GIB

    p = sub.add_parser("plan", help="what fits on a card: weights, KV cache, context x batch, decode bound "
                                    "(computed from the config and datasheets, nothing measured)")
    p.add_argument("model", help=f"a bundled model ({', '.join(BUNDLED_MODELS)}; any case) "
                                 "or a path to a config.json or model directory")
    p.add_argument("--card", action="extend", nargs="+", default=None, metavar="NAME",
                   help=f"one or more cards (default: all): {', '.join(BUNDLED_CARDS)}")
    p.add_argument("--format", default=None, help="only this format: fp16 or a registered quantization format")
    p.add_argument("--bits", type=int, default=None, help="only this bit width (fp16 counts as 16)")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help="context (tokens) of the max-batch column and of the decode bound; capped at the "
                        "model's max (default: %(default)s)")
    p.add_argument("--reserve-gib", type=float, default=DEFAULT_RESERVE_GIB,
                   help="GiB kept free for the CUDA context and activations (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the rows (bytes, GiB, tok/s) here")
    p.set_defaults(func=cmd_plan)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gq", description="GuidedQuant: quantize, evaluate and serve LLMs.")
    p.add_argument("--cache", help="cache directory (default: $GQ_CACHE or ~/.cache/gq-serve)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("prepare", help="fetch SmolLM2-135M-Instruct (fp16) and the SOTU / Brown corpora")
    sp.add_argument("--only", help="comma list of: model,sotu,brown (the default), gemma3 (Gemma 3 270M, "
                                   "a second architecture)")
    sp.add_argument("--force", action="store_true", help="rebuild even if present")
    sp.set_defaults(func=cmd_prepare)

    from gq_quantize.methods.registry import method_names

    sq = sub.add_parser("quantize", help="quantize a Hugging Face causal LM")
    sq.add_argument("model", help="model directory, or `smollm2` for the prepared offline model")
    sq.add_argument("--method", required=True, help=" | ".join(method_names()))
    sq.add_argument("--bits", type=int, required=True)
    sq.add_argument("--guided", action="store_true", help="GuidedQuant: end-loss-weighted Hessians")
    sq.add_argument("--groups", type=int, default=1, help="GuidedQuant output-channel groups g")
    sq.add_argument("--guided-shrink", type=float, default=0.0,
                    help="pull each GuidedQuant Hessian this far (0..1) toward the plain Hessian scaled to its "
                         "trace: (1-a) H_k + a tr(H_k)/tr(H) H, i.e. every token's saliency toward the mean "
                         "(0: the paper's Hessians)")
    sq.add_argument("--sequential", action="store_true",
                    help="sequential calibration: each layer's Hessians from the already quantized layers "
                         "before it, as GPTQ does (Hessian methods; the saliency stays the unquantized model's)")
    sq.add_argument("--finetune-steps", type=int, default=0,
                    help="after the layers: tune the codebooks / scales (codes fixed) for this many Adam steps so "
                         "the quantized model's next-token distributions match the unquantized model's on the "
                         "calibration windows (lut, bcq and w4a4 methods: lnq, squeezellm, gptq, rtn, spinquant; 0: off)")
    sq.add_argument("--finetune-lr", type=float, default=None,
                    help="Adam learning rate of --finetune-steps (default: the format's, 3e-4 for lut and bcq; "
                         "w4a4 tunes its scales as logarithms, a relative step, default 1e-3)")
    sq.add_argument("--finetune-batch", type=int, default=2, help="calibration windows per --finetune-steps step")
    sq.add_argument("--finetune-windows", type=int, default=0,
                    help="windows of --seq-len drawn from --calib for the fine-tune (0: the --n-samples windows "
                         "of the Hessians); more windows let more steps help beyond the calibration text")
    sq.add_argument("--finetune-norms", action="store_true",
                    help="also tune the RMSNorm / LayerNorm gains (written into the checkpoint in place of the "
                         "source's)")
    sq.add_argument("--finetune-precision", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="compute dtype of the fine-tune's forwards and backward (auto: bfloat16 where the GPU or "
                         "CPU multiplies it in hardware, else float32); the tuned tensors stay float32")
    sq.add_argument("--calib", default="sotu", help="calibration corpus (sotu, brown:calib, a path, hf:NAME...)")
    sq.add_argument("--n-samples", type=int, default=32)
    sq.add_argument("--seq-len", type=int, default=512)
    sq.add_argument("--seed", type=int, default=0)
    sq.add_argument("--out", default=None, help="output checkpoint directory (required unless --dry-run)")
    sq.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sq.add_argument("--recalibrate", action="store_true",
                    help="delete and rebuild the calibration cache (gradients, Hessians) of this model and data")
    sq.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    sq.add_argument("--quiet", action="store_true")
    big = sq.add_argument_group("models larger than memory (docs/internals.md, \"Models larger than memory\")")
    big.add_argument("--streamed", action="store_true",
                     help="hold one decoder layer at a time: every pass reads each layer's weights from the "
                          "safetensors files when its turn comes (same results, slower)")
    big.add_argument("--max-device-memory", type=float, default=None, metavar="GIB",
                     help="stream when the in-memory passes would need more than this (computed, see --dry-run); "
                          "refuse when even streaming would")
    big.add_argument("--offload-dir", default=None, metavar="DIR",
                     help="streamed gradient pass: keep each layer's inputs in files here instead of host "
                          "memory (implies --streamed)")
    big.add_argument("--dry-run", action="store_true",
                     help="print each pass's memory need for this model and these settings, then exit; MODEL "
                          "may also be a bundled shape (llama-2-7b, llama-2-13b, llama-2-70b, ...)")
    _add_method_options(sq)
    sq.set_defaults(func=cmd_quantize)

    sr = sub.add_parser("rotate", help="fuse norms and SpinQuant rotations (R1, R2) into a Llama-like model")
    sr.add_argument("model", help="model directory, or `smollm2` for the prepared offline model")
    sr.add_argument("out", help="output model directory (written atomically)")
    sr.add_argument("--rotation", required=True, choices=["none", "hadamard", "learned"],
                    help="none: fused norms, untied lm_head only; hadamard: random Hadamards (QuaRot-style); "
                         "learned: Cayley SGD under W16A4KV4 (resumes after a kill: rerun the same command)")
    sr.add_argument("--steps", type=int, default=100, help="learned: training steps")
    sr.add_argument("--lr", type=float, default=1.5, help="learned: Cayley SGD learning rate (cosine to 0)")
    sr.add_argument("--batch-size", type=int, default=8, help="learned: windows per step (SpinQuant's 8)")
    sr.add_argument("--seq-len", type=int, default=512, help="learned: tokens per calibration window")
    sr.add_argument("--data", default="sotu:train", help="learned: calibration corpus (sotu:train, a path, hf:NAME...)")
    sr.add_argument("--seed", type=int, default=0, help="random Hadamard signs and calibration windows")
    sr.add_argument("--rotation-file", default=None, help="reuse R1/R2 from an earlier rotations.safetensors")
    sr.add_argument("--dtype", default="source", choices=["source", "float32", "float16", "bfloat16"],
                    help="dtype of the saved weights (source: the model's own)")
    sr.add_argument("--center-embeddings", action="store_true",
                    help="subtract each embedding row's mean first, as QuaRot's and SpinQuant's code do "
                         "(not an identity under RMSNorm: docs/w4a4.md)")
    sr.add_argument("--act-clip", type=float, default=None,
                    help="learned: activation clip ratio the rotations train under (default: gq quantize "
                         "--method spinquant's, 0.8; 1.0: SpinQuant's published unclipped objective)")
    sr.add_argument("--kv-clip", type=float, default=None,
                    help="learned: KV cache clip ratio the rotations train under (default: the spinquant method's, 0.95)")
    sr.add_argument("--act-group", type=int, default=None,
                    help="learned: activation groups the rotations train under (default 0: per token); "
                         "pass the --act-group you will quantize with")
    sr.add_argument("--kv-group", type=int, default=None,
                    help="learned: KV groups (channels of a head) the rotations train under (default 0: one "
                         "range per head); pass the --kv-group you will quantize with")
    sr.add_argument("--overwrite", action="store_true", help="replace OUT and discard a saved training state")
    sr.add_argument("--quiet", action="store_true")
    sr.set_defaults(func=cmd_rotate)

    se = sub.add_parser("eval", help="perplexity of a (quantized) checkpoint on held-out text")
    se.add_argument("checkpoint")
    se.add_argument("--data", nargs="+", default=["sotu:heldout"], help="corpus specs")
    se.add_argument("--ctx", type=int, default=512)
    se.add_argument("--max-tokens", type=int, default=8192, help="evaluate the last N tokens of each text")
    se.add_argument("--batch-size", type=int, default=4)
    se.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    se.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    _add_kernel_arg(se)
    _add_head_arg(se)
    se.add_argument("--json", help="also write the rows to this file")
    se.add_argument("--quiet", action="store_true")
    se.set_defaults(func=cmd_eval)

    sv = sub.add_parser("verify", help="check a checkpoint's files and tensors against its gq_manifest.json")
    sv.add_argument("checkpoint", help="checkpoint directory (or a prepared model alias)")
    sv.add_argument("--json", action="store_true", help="print the report as JSON")
    sv.set_defaults(func=cmd_verify)

    _add_serve_parser(sub)
    _add_bench_parser(sub)
    _add_plan_parser(sub)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a problem with the user's input: print the message, exit 2."""
    from gq_quantize.assets import AssetError
    from gq_quantize.calibration.cache import CalibrationCacheError
    from gq_quantize.pipeline import QuantizeError

    return (CliError, QuantizeError, AssetError, CalibrationCacheError, ValueError, FileNotFoundError,
            FileExistsError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rc = args.func(args)
        return rc if isinstance(rc, int) else 0
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 -- user-facing errors are printed, not traced
        if isinstance(e, _user_errors()):
            print(f"gq {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
