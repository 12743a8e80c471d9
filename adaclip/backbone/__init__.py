"""Backbones: one factory turns a model name + pretrained tag (or checkpoint file) into a frozen CLIP.

`create_backbone("ViT-B-16", "openai")` wraps open_clip's own factory; `create_backbone("lite")` builds
the embedded offline backbone (adaclip.lite). Where things live:

    encoder.py   the Backbone object (frozen model, tokenizer, preprocessing, device, precision)
    registry.py  create_backbone and the registry that name families register their builders into
    openclip.py  open_clip model names and hf-hub:ORG/NAME repos
    lite.py      the lite backbone
    ../weights.py, ../transforms.py, ../device.py: weights, image transforms, device/precision policy
"""

from __future__ import annotations

from .encoder import Backbone, Towers
from .registry import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, create_backbone, register_backbone

__all__ = ["DEFAULT_BACKBONE", "DEFAULT_PRETRAINED", "Backbone", "Towers", "create_backbone", "register_backbone"]
