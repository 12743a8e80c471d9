"""Tip-Adapter's cache model over a *trained* model's own features of its training images, added to
another head's scores (AdaRing's `training_cache` setting).

Why: at 4 shots the methods that led the accuracy suite build their classifier from the training images'
features (Tip-Adapter, the linear probe), while an adapter inside the encoders keeps the prompts'
cosine classifier. This head adds the first to the second after the adapter has trained.

- Keys: the trained model's features of each training image, un-augmented or the mean over
  `training_cache_views` augmented crops (Tip-Adapter averages 10; the mean of the cached views when
  the image tower is frozen), built once after the last step and after weight averaging.
  While training the cache is empty, so the loss is the method's own: a cache that holds the batch's
  own images would score them trivially.
- alpha, beta: Tip-Adapter's search (scale-aware units) on the validation images only. Leave-one-out
  scoring of training images is off: their trained features are not held out, and including them chose
  worse values on validation (docs/tuning.md). Without validation images the configured alpha and beta
  are kept (the training log says so).
- Class names: the values hold one column per trained class. Scoring other names (base-to-new,
  `predict --classes`), a trained name keeps its column and a new name gets none, so the method stays
  class-agnostic and new classes score exactly as without the cache.
- Cost: the file stores the cache, training images x embedding width numbers (160 x 512 floats at
  16 shots x 10 classes); nothing is added to the trainable parameters.
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch

from .base import Head, HeadOutput
from .tip_adapter import TipAdapterConfig, TipAdapterHead


class TrainingCacheHead(TipAdapterHead):
    fits_after_training: ClassVar[bool] = True

    def __init__(
        self, inner: Head, class_names: list[str], dim: int, *, views: int = 1, alpha: float = 1.0, beta: float = 5.5
    ):
        config = TipAdapterConfig(alpha=alpha, beta=beta, leave_one_out=False)
        super().__init__(len(class_names), dim, config)
        self.training_views = views
        self.inner = inner
        self.lr_scale = inner.lr_scale
        self.trained_class_names = list(class_names)
        self._columns: torch.Tensor | None = None  # trained column per scored name (-1: none); None: as trained

    def base_output(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        return self.inner(image_features, class_features, logit_scale)

    def score_classes(self, class_names: list[str]) -> None:
        if list(class_names) == self.trained_class_names:
            self._columns = None
            return
        index = {name: i for i, name in enumerate(self.trained_class_names)}
        self._columns = torch.tensor([index.get(name, -1) for name in class_names], dtype=torch.long)

    def scored_values(self) -> torch.Tensor:
        if self._columns is None:
            return self.cache_values
        padded = torch.cat([self.cache_values, self.cache_values.new_zeros(len(self.cache_values), 1)], dim=1)
        return padded[:, self._columns.to(padded.device)]  # -1 picks the appended column of zeros

    def with_classifier(self, classifier: Head) -> Head:
        """A copy with `classifier` in the inner head's place and the same cache (TTA's mask then weighs the
        image-class scores; the cache's scores are added unchanged)."""
        head = copy.deepcopy(self)
        head.inner = classifier
        return head

    def adapt_to_state(self, state: dict[str, torch.Tensor]) -> None:
        super().adapt_to_state(state)
        self.inner.adapt_to_state({k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")})
