"""The adapters a server answers with, loaded from files named on the command line, never from a request.

Adapters trained on the same backbone (same `BackboneIdentity`: name, weights, sizes) share one copy of
it: each backbone is built once and every adapter of that identity is loaded onto it. Adapters whose
image tower is frozen (zeroshot, linear-probe, tip-adapter, coop, rada, ...) also share its image
features, so one encoding answers all of them (`adapter=all`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..adapter import Adapter
from ..adapter_file import SUFFIX, read_adapter_header
from ..api import load, weights_source
from ..backbone import Backbone, BackboneIdentity
from ..errors import UsageError
from ..methods import method_config_class
from ..predictions import Prediction

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ALL = "all"  # the one reserved name: every frozen-tower adapter


@dataclass(frozen=True)
class AdapterSpec:
    """`NAME=PATH` or `PATH` from the command line (the name defaults to the file name less `.adaclip`)."""

    name: str
    path: Path


def parse_adapter_specs(items: Iterable[str]) -> list[AdapterSpec]:
    """Check names and files before anything is loaded: unique valid names, existing files."""
    specs: list[AdapterSpec] = []
    for item in items:
        name, _, rest = item.partition("=")
        if rest and NAME_PATTERN.fullmatch(name) and not Path(item).is_file():
            path = Path(rest)
        else:
            path = Path(item)
            name = path.name.removesuffix(SUFFIX)
        if not path.is_file():
            raise UsageError("adapter file not found", path=path, fix="give an .adaclip file, or NAME=PATH")
        if not NAME_PATTERN.fullmatch(name) or name == ALL:
            raise UsageError(
                f"cannot serve an adapter named {name!r}",
                path=path,
                fix="name it with NAME=PATH: letters, digits, '.', '_', '-', not 'all'",
            )
        if any(spec.name == name for spec in specs):
            raise UsageError(f"two adapters are named {name!r}", path=path, fix="name one of them with NAME=PATH")
        specs.append(AdapterSpec(name, path))
    if not specs:
        raise UsageError("no adapter to serve", fix="adaclip serve pets.adaclip [more.adaclip ...]")
    return specs


def backbone_key(identity: BackboneIdentity) -> str:
    # Where a checkpoint file was is a hint, not its identity (its sha256 is): adapters trained on the
    # same weights at different paths share one copy.
    return identity.model_dump_json(exclude={"checkpoint_hint"})


@dataclass
class ServedAdapter:
    """One named adapter and what the server needs to know about it."""

    name: str
    adapter: Adapter
    file_name: str
    file_bytes: int
    backbone_key: str

    @property
    def frozen_image_tower(self) -> bool:
        return self.adapter.model.image_tower_frozen

    @property
    def class_agnostic(self) -> bool:
        return method_config_class(self.adapter.method).class_agnostic

    @property
    def encoder_key(self) -> tuple[str, ...]:
        """Requests with the same key can share one image encoding."""
        if self.frozen_image_tower:
            return ("backbone", self.backbone_key)
        return ("adapter", self.name, str(id(self.adapter)))

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised image features, exactly as `Adapter.predict` computes them."""
        with torch.inference_mode():
            return self.adapter.model.image_features(pixels.to(self.adapter.backbone.device))

    def predict_features(
        self, features: torch.Tensor, top_k: list[int], class_names: list[str] | None
    ) -> list[Prediction]:
        with torch.inference_mode(), self.adapter.classes(class_names):
            return self.adapter.predict_features(features, top_k=top_k)

    def describe(self) -> dict[str, Any]:
        """What `adaclip info` shows for the file (less the training file list), plus serving facts."""
        document = self.adapter.metadata.model_dump(mode="json")
        if document.get("data") and document["data"].get("files") is not None:
            document["data"]["files"] = len(document["data"]["files"])  # a count: lists can be 10,000 long
        return {
            "name": self.name,
            "file_name": self.file_name,
            "file_bytes": self.file_bytes,
            "frozen_image_tower": self.frozen_image_tower,
            "class_agnostic": self.class_agnostic,
            **document,
        }


@dataclass
class AdapterSet:
    """An immutable snapshot: a reload builds a new set and swaps it in whole."""

    adapters: dict[str, ServedAdapter]
    backbones: dict[str, Backbone] = field(default_factory=dict)
    generation: int = 0

    def get(self, name: str) -> ServedAdapter | None:
        return self.adapters.get(name)

    def frozen(self) -> list[ServedAdapter]:
        return [a for a in self.adapters.values() if a.frozen_image_tower]

    def unfrozen(self) -> list[ServedAdapter]:
        return [a for a in self.adapters.values() if not a.frozen_image_tower]

    def describe(self) -> list[dict[str, Any]]:
        groups = list(self.backbones)
        return [{**a.describe(), "backbone_copy": groups.index(a.backbone_key)} for a in self.adapters.values()]


def load_adapter_set(
    specs: list[AdapterSpec],
    *,
    backbones: Iterable[Backbone] = (),
    pretrained: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    cache_dir: str | None = None,
    generation: int = 0,
) -> AdapterSet:
    """Load every adapter, building each distinct backbone once; `backbones` are reused when they match.

    `pretrained` is a local checkpoint file for the adapters trained on one (as `load`'s; its sha256
    must match theirs); without it they find their checkpoint where they were trained. Every header is
    read and checked before the first backbone is built, so a broken file fails fast.
    """
    headers = [read_adapter_header(spec.path) for spec in specs]
    sources: list[str | None] = []
    for spec, header in zip(specs, headers, strict=True):
        method_config_class(header.method)  # an unknown method fails here, before any backbone is built
        # A local checkpoint: `pretrained`, else the file where the adapter was trained (a missing one
        # fails here); load() checks its sha256. Open_clip tags and lite need nothing.
        local = header.backbone.checkpoint_sha256 is not None
        sources.append(weights_source(header, spec.path, pretrained) if local else None)
    available = {backbone_key(b.identity): b for b in backbones}
    used: dict[str, Backbone] = {}
    served: dict[str, ServedAdapter] = {}
    for spec, header, source in zip(specs, headers, sources, strict=True):
        key = backbone_key(header.backbone)
        backbone = used.get(key) or available.get(key)
        if backbone is None:
            adapter = load(spec.path, pretrained=source, device=device, precision=precision, cache_dir=cache_dir)
            backbone = adapter.backbone
        else:
            adapter = load(spec.path, backbone=backbone)
        used[key] = backbone
        served[spec.name] = ServedAdapter(spec.name, adapter, spec.path.name, spec.path.stat().st_size, key)
    return AdapterSet(served, used, generation)
