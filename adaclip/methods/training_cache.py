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
- alpha, beta: Tip-Adapter's search (scale-aware units) on the validation images. Leave-one-out
  scoring of training images does not count: their trained features are not held out, and counting them
  chose worse values on validation (docs/tuning.md). With `ties="training"` (AdaRing's default) it only
  decides between points the validation images cannot tell apart. Without validation images the
  configured alpha and beta are kept (the training log says so).
- Class names: the values hold one column per trained class. Scoring a subset of the trained names
  keeps their columns; scoring any name not trained on (base-to-new, `predict --classes`) turns the
  cache off, so the method stays class-agnostic and scores exactly as without it. A per-name cache
  (trained names keep their column, new ones get none) pulls images of the new classes to the trained
  ones: on the accuracy suite's 10-class mix of base-to-new it cost AdaRing 9.6 points
  (docs/benchmarks.md).
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
        self,
        inner: Head,
        class_names: list[str],
        dim: int,
        *,
        views: int = 1,
        alpha: float = 1.0,
        beta: float = 5.5,
        ties: str = "first",
    ):
        config = TipAdapterConfig(alpha=alpha, beta=beta, leave_one_out=False, search_ties=ties)
        super().__init__(len(class_names), dim, config)
        self.training_views = views
        self.inner = inner
        self.lr_scale = inner.lr_scale
        self.trained_class_names = list(class_names)
        # None: the trained names, as trained; else the trained column of each scored name, or an empty
        # tensor when a scored name was not trained on (no cache)
        self._columns: torch.Tensor | None = None

    def base_output(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        return self.inner(image_features, class_features, logit_scale)

    def score_classes(self, class_names: list[str]) -> None:
        if list(class_names) == self.trained_class_names:
            self._columns = None
            return
        index = {name: i for i, name in enumerate(self.trained_class_names)}
        if all(name in index for name in class_names):
            self._columns = torch.tensor([index[name] for name in class_names], dtype=torch.long)
        else:
            self._columns = torch.zeros(0, dtype=torch.long)

    @property
    def active(self) -> bool:
        """Whether the cache scores the current class names (all of them trained on)."""
        return self._columns is None or len(self._columns) > 0

    def scored_values(self) -> torch.Tensor:
        return (
            self.cache_values
            if self._columns is None
            else self.cache_values[:, self._columns.to(self.cache_values.device)]
        )

    def forward(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        if not self.active:
            return self.base_output(image_features, class_features, logit_scale)
        return super().forward(image_features, class_features, logit_scale)

    def with_classifier(self, classifier: Head) -> Head:
        """A copy with `classifier` in the inner head's place and the same cache (TTA's mask then weighs the
        image-class scores; the cache's scores are added unchanged)."""
        head = copy.deepcopy(self)
        head.inner = classifier
        return head

    def adapt_to_state(self, state: dict[str, torch.Tensor]) -> None:
        super().adapt_to_state(state)
        self.inner.adapt_to_state({k[len("inner.") :]: v for k, v in state.items() if k.startswith("inner.")})
