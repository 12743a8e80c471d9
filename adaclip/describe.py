"""What `adaclip info` says: an adapter file's header, or a method's trainable parameters on a backbone
(built, since counting parameters needs the model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def describe_adapter_file(path: str | Path) -> dict[str, Any]:
    """An adapter file's metadata and size, read from its header alone (no torch)."""
    from .adapter_file import read_adapter_header

    document = read_adapter_header(path).model_dump(mode="json")
    document["file_bytes"] = Path(path).stat().st_size
    return document


def describe_method(
    method: str,
    backbone_name: str,
    pretrained: str,
    num_classes: int,
    settings: dict[str, Any],
    device: str = "cpu",
) -> dict[str, Any]:
    """`method` built on a backbone with `num_classes` placeholder classes: its summary, configuration
    and trainable parameters per part."""
    from .backbone import create_backbone
    from .methods import make_method_config
    from .model import AdaptedCLIP

    config = make_method_config(method, settings)
    backbone = create_backbone(backbone_name, pretrained, device=device)
    model = AdaptedCLIP(backbone, config, [f"class {i}" for i in range(num_classes)], ["a photo of a {}."])
    breakdown = model.parameter_breakdown()
    return {
        "method": method,
        "summary": type(config).summary,
        "backbone": backbone.identity.describe(),
        "trainable_params": sum(breakdown.values()),
        "parameter_breakdown": breakdown,
        "class_agnostic": type(config).class_agnostic,
        "config": config.model_dump(mode="json"),
    }
