"""Methods: `--method NAME` -> a pydantic config class whose `build()` makes the method's parts.

- `base`: the building blocks (MethodConfig, Component, Head, Parts) and the capabilities a method declares;
- `contexts`: what a method sees while building (BuildContext) and during a training step (StepContext);
- `registry`: names -> config classes;
- one module per method.

Adding a method: write `adaclip/methods/<name>.py` (or a package, like `lora/`) with a `MethodConfig`
subclass decorated with `@register_method`, and list the module in `adaclip.method_catalog.BUILTIN_MODULES`.
"""

from __future__ import annotations

from .base import Component, CosineHead, FeatureSet, Head, HeadOutput, MethodConfig, Parts, TrainConfig
from .contexts import BuildContext, StepContext
from .registry import (
    deep_merge,
    list_methods,
    make_method_config,
    method_config_class,
    method_registry,
    recorded_method_config,
    register_method,
)

__all__ = [
    "BuildContext",
    "Component",
    "CosineHead",
    "FeatureSet",
    "Head",
    "HeadOutput",
    "MethodConfig",
    "Parts",
    "StepContext",
    "TrainConfig",
    "deep_merge",
    "list_methods",
    "make_method_config",
    "recorded_method_config",
    "method_config_class",
    "method_registry",
    "register_method",
]
