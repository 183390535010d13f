"""The `gq` command: prepare, quantize, eval, serve, bench.

Each subcommand imports its machinery lazily, so `gq --help` and `gq serve` start fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Short names for models that `gq prepare` puts in the cache.
MODEL_ALIASES = {"smollm2": "models/SmolLM2-135M-Instruct"}


class CliError(Exception):
    """A problem with the command line the user can fix; printed without a traceback."""


def _cache_root(args) -> Path:
    from quantize.assets import cache_root

    return Path(args.cache) if getattr(args, "cache", None) else cache_root()


def resolve_model_path(spec: str, cache: Path) -> Path:
    """A directory path, or an alias (``smollm2``) for a model prepared by `gq prepare`."""
    if spec in MODEL_ALIASES:
        path = cache / MODEL_ALIASES[spec]
        if not path.is_dir():
            raise CliError(f"model {spec!r} is not prepared in {cache}; run `gq prepare` first")
        return path
    return Path(spec)


def _device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; anything else as given."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _write_json(obj, path: str | None) -> None:
    text = json.dumps(obj, indent=2)
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    print(text)


# --------------------------------------------------------------------------- prepare
def cmd_prepare(args) -> int:
    from quantize.assets import prepare_assets

    what = tuple(args.only.split(",")) if args.only else ("model", "sotu", "brown")
    paths = prepare_assets(_cache_root(args), what=what, force=args.force)
    _write_json({k: str(v) for k, v in paths.items()}, None)
    return 0


# --------------------------------------------------------------------------- quantize
def _describe(err: dict) -> str:
    """One pydantic error as the CLI option it came from, e.g. '--method: Input should be ...'."""
    msg = err["msg"].removeprefix("Value error, ")
    loc = [str(x) for x in err.get("loc", ()) if x != "calibration"]
    return f"--{loc[-1].replace('_', '-')}: {msg}" if loc else msg


def cmd_quantize(args) -> int:
    from pydantic import ValidationError

    from quantize.config import CalibrationConfig, QuantizeConfig
    from quantize.pipeline import quantize_model

    try:
        qconfig = QuantizeConfig(
            method=args.method, bits=args.bits, guided=args.guided, groups=args.groups,
            group_size=args.group_size, sym=args.sym, lnq_iters=args.lnq_iters,
            lnq_cd_sweeps=args.lnq_cd_sweeps, lnq_lambda=args.lnq_lambda,
            calibration=CalibrationConfig(data=args.calib, n_samples=args.n_samples,
                                          seq_len=args.seq_len, seed=args.seed),
        )
    except ValidationError as e:
        raise CliError("; ".join(_describe(err) for err in e.errors())) from None
    cache = _cache_root(args)
    model_dir = resolve_model_path(args.model, cache)
    summary = quantize_model(model_dir, qconfig, Path(args.out), cache, overwrite=args.overwrite,
                             device=_device(args.device), progress=not args.quiet,
                             recalibrate=args.recalibrate)
    _write_json(summary, None)
    return 0


# --------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    import torch

    from gq_serve.checkpoint import load_quantized_model
    from gq_serve.evaluate import perplexity
    from quantize.data import eval_windows
    from transformers import AutoTokenizer

    cache = _cache_root(args)
    ckpt = resolve_model_path(args.checkpoint, cache)
    if not (ckpt / "config.json").is_file():
        raise CliError(f"{ckpt} is not a model directory (no config.json)")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.dtype]
    model = load_quantized_model(ckpt, device=_device(args.device), dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    rows = []
    for spec in args.data:
        windows = eval_windows(tokenizer, spec, args.ctx, args.max_tokens, cache)
        result = perplexity(model, windows, batch_size=args.batch_size, progress=not args.quiet)
        rows.append({"checkpoint": str(ckpt), "eval_data": spec, **result})
    _write_json(rows, args.json)
    return 0


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gq", description="GuidedQuant: quantize, evaluate and serve LLMs.")
    p.add_argument("--cache", help="cache directory (default: $GQ_CACHE or ~/.cache/gq-serve)")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("prepare", help="fetch SmolLM2-135M-Instruct (fp16) and the SOTU / Brown corpora")
    sp.add_argument("--only", help="comma list of: model,sotu,brown")
    sp.add_argument("--force", action="store_true", help="rebuild even if present")
    sp.set_defaults(func=cmd_prepare)

    sq = sub.add_parser("quantize", help="quantize a Hugging Face causal LM")
    sq.add_argument("model", help="model directory, or `smollm2` for the prepared offline model")
    sq.add_argument("--method", required=True, help="rtn | gptq | squeezellm | lnq")
    sq.add_argument("--bits", type=int, required=True)
    sq.add_argument("--guided", action="store_true", help="GuidedQuant: end-loss-weighted Hessians")
    sq.add_argument("--groups", type=int, default=1, help="GuidedQuant output-channel groups g")
    sq.add_argument("--group-size", type=int, default=-1, help="uniform methods: inputs per scale (-1: per channel)")
    sq.add_argument("--sym", action="store_true", help="uniform methods: symmetric grid")
    sq.add_argument("--lnq-iters", type=int, default=2, help="LNQ T")
    sq.add_argument("--lnq-cd-sweeps", type=int, default=4, help="LNQ K")
    sq.add_argument("--lnq-lambda", type=float, default=1e-7)
    sq.add_argument("--calib", default="sotu", help="calibration corpus (sotu, brown:calib, a path, hf:NAME...)")
    sq.add_argument("--n-samples", type=int, default=32)
    sq.add_argument("--seq-len", type=int, default=512)
    sq.add_argument("--seed", type=int, default=0)
    sq.add_argument("--out", required=True, help="output checkpoint directory")
    sq.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    sq.add_argument("--recalibrate", action="store_true",
                    help="delete and rebuild the calibration cache (gradients, Hessians) of this model and data")
    sq.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    sq.add_argument("--quiet", action="store_true")
    sq.set_defaults(func=cmd_quantize)

    se = sub.add_parser("eval", help="perplexity of a (quantized) checkpoint on held-out text")
    se.add_argument("checkpoint")
    se.add_argument("--data", nargs="+", default=["sotu:heldout"], help="corpus specs")
    se.add_argument("--ctx", type=int, default=512)
    se.add_argument("--max-tokens", type=int, default=8192, help="evaluate the last N tokens of each text")
    se.add_argument("--batch-size", type=int, default=4)
    se.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    se.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    se.add_argument("--json", help="also write the rows to this file")
    se.add_argument("--quiet", action="store_true")
    se.set_defaults(func=cmd_eval)

    from gq_serve.bench import add_bench_args
    from gq_serve.server import add_serve_args

    add_serve_args(sub)
    add_bench_args(sub)
    return p


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe a problem with the user's input: print the message, exit 2."""
    from quantize.assets import AssetError
    from quantize.calibration.cache import CalibrationCacheError
    from quantize.pipeline import QuantizeError

    return (CliError, QuantizeError, AssetError, CalibrationCacheError, ValueError, FileNotFoundError,
            FileExistsError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
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
