"""Zero-shot CLIP: nothing to train. Its adapter file has no tensors, so predict/eval/tta work the same
with or without training (and tta can start from it, with RAda's mask at identity)."""

from __future__ import annotations

from typing import ClassVar

from .base import MethodConfig, Parts, TrainConfig
from .contexts import BuildContext
from .registry import register_method


@register_method
class ZeroShotConfig(MethodConfig):
    name: ClassVar[str] = "zeroshot"
    summary: ClassVar[str] = "zero-shot CLIP: class prompts vs image features, nothing trained"
    trainable: ClassVar[bool] = False
    masked_variant: ClassVar[str | None] = "rada"

    train: TrainConfig = TrainConfig(epochs=0)

    def build(self, ctx: BuildContext) -> Parts:
        return Parts()
