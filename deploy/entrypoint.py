#!/usr/bin/env python3
"""Container entrypoint of gq-serve: turn GQ_* environment variables into `gq serve ...` and exec it.

Standard library only, so the image needs nothing beyond the project itself. The logic lives in
`render(env)`, which returns the command line and the child's environment without touching the
process; `main()` calls it and replaces this process with `gq` (os.execvpe), so signals from
Docker or the kubelet reach the server directly.

The API key never goes on the command line (anyone on the host could read it in `ps`): the content
of the file named by GQ_API_KEY_FILE is put into the child's environment as GQ_API_KEY, which
`gq serve` reads as the default of --api-key.

Variables (an empty value counts as unset):

    GQ_ENGINE         hf | vllm                               (default: vllm)
    GQ_MODEL_DIR      checkpoint directory                    (default: /model)
    GQ_HOST           listen address                          (default: 0.0.0.0)
    GQ_PORT           listen port, 1-65535                    (default: 8000)
    GQ_API_KEY_FILE   file holding the API key (a mounted secret); without it and without
                      GQ_API_KEY the server runs without authentication
    GQ_API_KEY        the key itself; passed through unchanged. Set at most one of the two.
    GQ_MAX_MODEL_LEN  context limit in tokens, a positive integer (default: the model's)
    GQ_DEVICE         --engine hf only: cpu, cuda or cuda:N   (default: cuda)
    GQ_DTYPE          auto | float16 | bfloat16 | float32     (default: gq serve's, auto)
    GQ_EXTRA_ARGS     more `gq serve` arguments, split like a shell would (shlex)

Arguments given to the container (`docker run IMAGE ARGS...`) are appended after GQ_EXTRA_ARGS.
A bad value prints one line naming the variable and exits with status 2.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping, Sequence

ENGINES = ("hf", "vllm")
DTYPES = ("auto", "float16", "bfloat16", "float32")
DEFAULTS = {
    "GQ_ENGINE": "vllm",
    "GQ_MODEL_DIR": "/model",
    "GQ_HOST": "0.0.0.0",
    "GQ_PORT": "8000",
    "GQ_DEVICE": "cuda",
}
EXIT_CONFIG = 2
EXIT_NOT_FOUND = 127
_DEVICE_RE = re.compile(r"^(cpu|cuda(:[0-9]+)?)$")
_DIGITS_RE = re.compile(r"^[0-9]+$")


class ConfigError(ValueError):
    """A GQ_* variable has a value the entrypoint cannot use; the message names the variable."""


def _get(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value of ``name``, or its default; None when unset (or empty) without one."""
    value = env.get(name, "").strip()
    return value or DEFAULTS.get(name)


def _positive_int(env: Mapping[str, str], name: str, upper: int | None = None) -> int | None:
    raw = _get(env, name)
    if raw is None:
        return None
    if _DIGITS_RE.match(raw) and 1 <= int(raw) <= (upper or int(raw)):
        return int(raw)
    expected = f"an integer in 1-{upper}" if upper else "a positive integer"
    raise ConfigError(f"{name}={raw!r} is not a valid value: expected {expected}")


def read_api_key(path: str) -> str:
    """The key stored in the secret file ``path``, surrounding whitespace removed."""
    where = f"GQ_API_KEY_FILE={path}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{where}: the file does not exist (mount the API key secret there, "
                          "or unset GQ_API_KEY_FILE to serve without authentication)") from None
    except IsADirectoryError:
        raise ConfigError(f"{where}: is a directory, expected the file holding the API key") from None
    except PermissionError:
        raise ConfigError(f"{where}: permission denied for uid {os.getuid()} "
                          "(make the secret readable, e.g. defaultMode 0440 plus fsGroup)") from None
    except OSError as e:
        raise ConfigError(f"{where}: cannot read the file: {e.strerror}") from None
    try:
        key = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: the file is not UTF-8 text") from None
    if not key:
        raise ConfigError(f"{where}: the file is empty; put the API key in it")
    if any(ch.isspace() or not ch.isprintable() for ch in key):
        raise ConfigError(f"{where}: the key contains whitespace or control characters "
                          "(expected one line with one token)")
    return key


def render(env: Mapping[str, str], args: Sequence[str] = ()) -> tuple[list[str], dict[str, str]]:
    """``(argv, child_env)`` of the `gq serve` process for the variables in ``env``.

    ``args`` (the container's command arguments) go last. Raises ConfigError on a bad value.
    Looks at the disk only to check GQ_MODEL_DIR/config.json and to read GQ_API_KEY_FILE.
    """
    engine = _get(env, "GQ_ENGINE").lower()
    if engine not in ENGINES:
        raise ConfigError(f"GQ_ENGINE={engine!r} is not a valid value: expected one of {', '.join(ENGINES)}")
    model = _get(env, "GQ_MODEL_DIR")
    host = _get(env, "GQ_HOST")
    port = _positive_int(env, "GQ_PORT", upper=65535)
    max_model_len = _positive_int(env, "GQ_MAX_MODEL_LEN")

    argv = ["gq", "serve", model, "--engine", engine, "--host", host, "--port", str(port)]
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]

    if engine == "hf":
        device = _get(env, "GQ_DEVICE")
        if not _DEVICE_RE.match(device):
            raise ConfigError(f"GQ_DEVICE={device!r} is not a valid value: expected cpu, cuda or cuda:N")
        argv += ["--device", device]
    elif env.get("GQ_DEVICE", "").strip():
        raise ConfigError("GQ_DEVICE applies to GQ_ENGINE=hf only; with vllm choose the GPU with "
                          "CUDA_VISIBLE_DEVICES (or the container's GPU reservation) and unset GQ_DEVICE")

    dtype = _get(env, "GQ_DTYPE")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"GQ_DTYPE={dtype!r} is not a valid value: "
                              f"expected one of {', '.join(DTYPES)}")
        argv += ["--dtype", dtype]

    extra = env.get("GQ_EXTRA_ARGS", "")
    try:
        argv += shlex.split(extra)
    except ValueError as e:
        raise ConfigError(f"GQ_EXTRA_ARGS={extra!r} cannot be split into arguments: {e}") from None
    argv += list(args)

    # Syntax first, then what is (not) mounted.
    if not os.path.isfile(os.path.join(model, "config.json")):
        raise ConfigError(f"GQ_MODEL_DIR={model}: no config.json there; mount the checkpoint directory "
                          "(read-only) at that path")
    child_env = dict(env)
    key_file = env.get("GQ_API_KEY_FILE", "").strip()
    if key_file:
        if env.get("GQ_API_KEY", "").strip():
            raise ConfigError("both GQ_API_KEY and GQ_API_KEY_FILE are set: set only one "
                              "(GQ_API_KEY_FILE is preferred: the key stays out of the container spec)")
        child_env["GQ_API_KEY"] = read_api_key(key_file)
    return argv, child_env


def main(args: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Render the command and exec it. Returns only on failure: 2 for a bad variable, 127 when
    `gq` cannot be executed."""
    args = sys.argv[1:] if args is None else list(args)
    env = os.environ if env is None else env
    try:
        argv, child_env = render(env, args)
    except ConfigError as e:
        print(f"gq-entrypoint: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if not child_env.get("GQ_API_KEY"):
        print("gq-entrypoint: warning: no API key (GQ_API_KEY_FILE unset): /v1/* is open to anyone "
              "who can reach the port", file=sys.stderr)
    print(f"gq-entrypoint: exec {shlex.join(argv)}", file=sys.stderr)
    sys.stderr.flush()
    sys.stdout.flush()
    try:
        os.execvpe(argv[0], argv, child_env)
    except OSError as e:
        print(f"gq-entrypoint: error: cannot run {argv[0]!r}: {e.strerror} (is gq-serve installed "
              "and on PATH?)", file=sys.stderr)
        return EXIT_NOT_FOUND
    return 0  # not reached: execvpe replaced this process


if __name__ == "__main__":
    sys.exit(main())
