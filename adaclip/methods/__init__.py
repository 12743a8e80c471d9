"""Method registry: `--method NAME` -> a pydantic config class whose `build()` makes the method's parts.

Adding a method: write `adaclip/methods/<name>.py` (or a package, like `lora/`) with a `MethodConfig`
subclass decorated with `@register_method`, and list the module in `adaclip.method_catalog.BUILTIN_MODULES`.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from ..errors import UsageError
from ..method_catalog import BUILTIN_MODULES
from .base import (
    BuildContext,
    Component,
    CosineHead,
    FeatureSet,
    Head,
    HeadOutput,
    MethodConfig,
    Parts,
    TrainConfig,
    method_registry,
    register_method,
)

_loaded = False


def _load_builtin_methods() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"{__name__}.{module}")


def list_methods() -> list[str]:
    return sorted(method_registry())


def method_config_class(name: str) -> type[MethodConfig]:
    registry = method_registry()
    if name not in registry:
        raise UsageError(f"unknown method {name!r}", fix=f"choose one of: {', '.join(sorted(registry))}")
    return registry[name]


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_method_config(name: str, overrides: dict[str, Any] | None = None) -> MethodConfig:
    """Validate `overrides` (nested dicts allowed, e.g. {"train": {"lr": 1e-3}}) against the method's config."""
    config_class = method_config_class(name)
    try:
        return config_class.model_validate(overrides or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise UsageError(f"invalid {name} settings: {problems}") from None


__all__ = [
    "BuildContext",
    "Component",
    "CosineHead",
    "FeatureSet",
    "Head",
    "HeadOutput",
    "MethodConfig",
    "Parts",
    "TrainConfig",
    "deep_merge",
    "list_methods",
    "make_method_config",
    "method_config_class",
    "register_method",
]
