"""The one place where quantization methods are registered: name -> (config class, handler).

Built-in methods are the modules listed below, imported on first use; each registers itself with
the :func:`register_method` decorator on its handler.
"""
from __future__ import annotations

import importlib
import threading
import typing
from dataclasses import dataclass

from gq_quantize.methods.base import NEEDS, HandlerFn, MethodConfig

_BUILTIN = ("gq_quantize.methods.rtn", "gq_quantize.methods.gptq", "gq_quantize.methods.squeezellm",
            "gq_quantize.methods.lnq", "gq_quantize.methods.qtip", "gq_quantize.methods.spinquant")


@dataclass(frozen=True)
class Method:
    config: type[MethodConfig]
    handler: HandlerFn

    @property
    def name(self) -> str:
        return self.config.name


_methods: dict[str, Method] = {}
_lock = threading.RLock()
_loaded = False


def _ensure_builtins() -> None:
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            for module in _BUILTIN:
                importlib.import_module(module)
            _loaded = True


def register_method(config: type[MethodConfig]):
    """Decorator for a handler: registers ``config.name`` -> (config, handler)."""
    unknown = set(config.needs) - NEEDS
    if unknown:
        raise ValueError(f"method {config.name!r} needs {sorted(unknown)}; known needs: {sorted(NEEDS)}")

    def deco(handler: HandlerFn) -> HandlerFn:
        with _lock:
            old = _methods.get(config.name)
            if old is not None and old.config is not config:
                raise ValueError(f"method {config.name!r} is already registered by {old.config.__module__}")
            _check_shared_fields(config)
            _methods[config.name] = Method(config, handler)
        return handler

    return deco


def _check_shared_fields(config: type[MethodConfig]) -> None:
    """A field name shared by two methods is one CLI flag: it must have one type."""
    for other in _methods.values():
        for name, f in config.model_fields.items():
            g = other.config.model_fields.get(name)
            if g is not None and g.annotation != f.annotation:
                raise ValueError(f"option {name!r} of method {config.name!r} is {f.annotation}, but "
                                 f"{other.name!r} declares it as {g.annotation}: rename one")


def method_names() -> list[str]:
    _ensure_builtins()
    return sorted(_methods)


def get_method(name: str) -> Method:
    """The registered method ``name``; a ValueError lists the registered ones."""
    _ensure_builtins()
    try:
        return _methods[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method {name!r}; registered methods: {method_names()}") from None


def methods() -> list[Method]:
    _ensure_builtins()
    return [_methods[n] for n in sorted(_methods)]


def option_fields() -> dict[str, list[Method]]:
    """Every method option (field name, bits included) -> the methods declaring it."""
    out: dict[str, list[Method]] = {}
    for m in methods():
        for name in m.config.model_fields:
            out.setdefault(name, []).append(m)
    return out


def field_type(annotation) -> type:
    """The plain Python type behind a field annotation (Optional[int] -> int)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if typing.get_origin(annotation) is typing.Union and len(args) == 1 else annotation
