"""The method registry: a name (`--method NAME`, an adapter file's `method`) -> its config class.

Built-in methods register when first looked up (their modules import torch, so not before);
`adaclip.method_catalog` lists them without importing them.
"""

from __future__ import annotations

import importlib
from typing import Any

from pydantic import ValidationError

from ..errors import UsageError
from ..method_catalog import BUILTIN_MODULES
from .base import MethodConfig, TrainConfig

_REGISTRY: dict[str, type[MethodConfig]] = {}
_loaded = False


def register_method(config_class: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a method available by its `name` (CLI `--method`, adapter files)."""
    name = config_class.name
    if not name:
        raise ValueError(f"{config_class.__name__} needs a `name`")
    if name in _REGISTRY and _REGISTRY[name] is not config_class:
        raise ValueError(f"method {name!r} is registered twice")
    _REGISTRY[name] = config_class
    return config_class


def _load_builtin_methods() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")


def method_registry() -> dict[str, type[MethodConfig]]:
    _load_builtin_methods()
    return dict(_REGISTRY)


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


def recorded_method_config(name: str, recorded: dict[str, Any]) -> MethodConfig:
    """The config an adapter file recorded. Its `train` holds every TrainConfig field of the adaclip that
    wrote it, so a field it lacks is newer than the file and takes TrainConfig's own default (the
    behaviour before that field existed), not today's method recipe (e.g. AdaRing files written before
    weight averaging did not average). Likewise a method setting it lacks that the method lists in
    `settings_before_they_existed` (AdaRing's training cache) takes the value listed there."""
    train = recorded.get("train")
    if isinstance(train, dict):
        recorded = {**recorded, "train": deep_merge(TrainConfig().model_dump(mode="json"), train)}
    if name in method_registry():
        recorded = {**method_config_class(name).settings_before_they_existed, **recorded}
    return make_method_config(name, recorded)
