"""What a method sees: `BuildContext` while it builds its parts, `StepContext` during a training step.

They live apart from the model (adaclip.model) and the building blocks (methods.base) so that methods
can name them without importing the model that uses the methods.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..backbone import Backbone
    from ..model import AdaptedCLIP


@dataclass
class BuildContext:
    """What a method may look at while building its parts."""

    backbone: Backbone
    class_names: list[str]
    templates: list[str]
    zero_shot_class_features: Callable[[], torch.Tensor]  # (K, D) normalised, frozen encoders

    @property
    def n_classes(self) -> int:
        return len(self.class_names)


@dataclass
class StepContext:
    """One training step's tensors, and lazy frozen references for consistency losses."""

    model: AdaptedCLIP
    pixels: torch.Tensor | None
    labels: torch.Tensor
    image_features: torch.Tensor
    class_features: torch.Tensor
    logits: torch.Tensor
    reference_image_features: torch.Tensor | None = None
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    def zero_shot_image_features(self) -> torch.Tensor:
        """Cached references when the loop has them; the features themselves when the image tower is
        frozen; otherwise one extra forward pass with every component bypassed."""
        if self.reference_image_features is None:
            if self.model.image_tower_frozen:
                self.reference_image_features = self.image_features.detach()
            elif self.pixels is None:
                raise ValueError("zero-shot image features need the step's pixels")
            else:
                self.reference_image_features = self.model.zero_shot_image_features(self.pixels)
        return self.reference_image_features

    def zero_shot_class_features(self) -> torch.Tensor:
        return self.model.zero_shot_class_features()

    def zero_shot_logits(self) -> torch.Tensor:
        scale = self.model.backbone.logit_scale
        return scale * self.zero_shot_image_features() @ self.zero_shot_class_features().t()
