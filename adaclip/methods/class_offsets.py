"""A learned offset per trained class on its class features: the classifier side of a method, started at
the (adapted) prompts' features, free to move per class as a linear probe's weights do.

Offsets start at zero, so step 0 scores exactly as the method does without them. They belong to the
class names the adapter was trained on: when it scores other names (base-to-new, `predict --classes`),
a name it was trained on keeps its offset and a new name gets none, so the method stays class-agnostic.
Cost: classes x embedding width numbers (10 x 512 = 5,120 on ViT-B/16).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import Component


class ClassOffsets(Component):
    def __init__(self, class_names: list[str], width: int):
        super().__init__()
        self.trained_class_names = list(class_names)
        self.offsets = nn.Parameter(torch.zeros(len(class_names), width))
        self._rows: tuple[tuple[str, ...], torch.Tensor] | None = None

    def offset_class_features(self, features: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        if list(class_names) == self.trained_class_names:
            return features + self.offsets.to(features.dtype)
        return features + self._offsets_for(class_names).to(features.dtype)

    def _offsets_for(self, class_names: list[str]) -> torch.Tensor:
        """(K, D) offsets of these names: the trained row for a trained name, zeros for any other."""
        key = tuple(class_names)
        if self._rows is None or self._rows[0] != key:
            index = {name: i for i, name in enumerate(self.trained_class_names)}
            missing = len(self.trained_class_names)  # the row of zeros appended below
            rows = torch.tensor([index.get(name, missing) for name in class_names], dtype=torch.long)
            self._rows = (key, rows)
        padded = torch.cat([self.offsets, self.offsets.new_zeros(1, self.offsets.shape[1])])
        return padded[self._rows[1].to(padded.device)]
