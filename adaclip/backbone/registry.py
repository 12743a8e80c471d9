"""The backbone registry: each family of backbone names registers the function that builds it, and
`create_backbone` looks the name up.

Built in: `lite` (an exact name, adaclip.backbone.lite), `hf-hub:ORG/NAME` (a prefix) and every other
name, read as an open_clip model name (adaclip.backbone.openclip). Adding a family: a module with a
builder decorated by `@register_backbone(...)`, listed in BUILTIN_MODULES.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import torch

from ..defaults import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from ..device import resolve_precision, select_device
from .encoder import Backbone

# Modules whose builders register themselves on import; loaded on first look-up (as methods are).
BUILTIN_MODULES = ("lite", "openclip")


class BackboneBuilder(Protocol):
    def __call__(
        self, name: str, pretrained: str | None, *, device: torch.device, precision: str, cache_dir: str | None
    ) -> Backbone: ...


_BY_NAME: dict[str, BackboneBuilder] = {}
_BY_PREFIX: dict[str, BackboneBuilder] = {}
_OTHER_NAMES: list[BackboneBuilder] = []


def register_backbone(
    *, name: str | None = None, prefix: str | None = None, other_names: bool = False
) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Decorator: the builder of one exact `name`, of every name starting with `prefix`, or of all
    `other_names` (the names no exact name or prefix claims)."""
    if [name is not None, prefix is not None, other_names].count(True) != 1:
        raise ValueError("register a backbone builder for exactly one of name, prefix or other_names")

    def register(builder: BackboneBuilder) -> BackboneBuilder:
        if other_names:
            if _OTHER_NAMES and _OTHER_NAMES[0] is not builder:
                raise ValueError("a builder for other backbone names is registered twice")
            _OTHER_NAMES[:] = [builder]
            return builder
        table, key = (_BY_NAME, name) if name is not None else (_BY_PREFIX, prefix)
        if table.get(key, builder) is not builder:
            raise ValueError(f"backbone {key!r} is registered twice")
        table[key] = builder
        return builder

    return register


_loaded = False


def backbone_builder(name: str) -> BackboneBuilder:
    """The builder that claims `name`: its exact name, else its prefix, else the one for other names."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{module}")
    if name in _BY_NAME:
        return _BY_NAME[name]
    for prefix, builder in _BY_PREFIX.items():
        if name.startswith(prefix):
            return builder
    return _OTHER_NAMES[0]


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    pretrained: str | None = DEFAULT_PRETRAINED,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    cache_dir: str | None = None,
) -> Backbone:
    """Build a frozen backbone.

    name:       any open_clip model name (`open_clip.list_models()`), `hf-hub:org/name` (an open_clip
                model repo on the Hugging Face Hub), or `lite` (embedded, offline).
    pretrained: an open_clip pretrained tag, a local checkpoint file, or `none` (random weights, for
                timing and tests); for `hf-hub:` names, a revision of the repo (default main) or `none`.
                Weights that are not cached fail within seconds when the hub is unreachable, with a
                message saying how to get them.
    """
    torch_device = device if isinstance(device, torch.device) else select_device(device)
    precision = resolve_precision(precision, torch_device)
    build = backbone_builder(name)
    return build(name, pretrained, device=torch_device, precision=precision, cache_dir=cache_dir)
