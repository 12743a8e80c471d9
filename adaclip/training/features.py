"""Image features the loop computes once instead of every step: the training set's features when the
image tower is frozen (FeatureCache, one table per cached augmented view), the mean of those views for
heads built from training features, and the frozen zero-shot references of the crops an adapted image
tower trains on (ReferenceViews)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data import LabelledImage, SkippedImage, TrainingData
from ..feature_store import ReferenceStore
from ..inference import encode_images
from ..methods import FeatureSet, TrainConfig
from ..model import AdaptedCLIP


class FeatureCache:
    """Image features of the training set for frozen image towers: view `epoch % views` per epoch."""

    def __init__(self, model: AdaptedCLIP, images: list[LabelledImage], cfg: TrainConfig, seed: int, workers):
        self.model = model
        self.images = images
        self.augmented = cfg.augment and cfg.feature_cache == "augmented"
        self.views = cfg.cache_views if self.augmented else 1
        self.min_scale = cfg.min_crop_scale
        self.seed = seed
        self.workers = workers
        self.batch_size = max(64, cfg.batch_size)
        self._views: dict[int, torch.Tensor] = {}
        self.skipped: list[SkippedImage] = []

    def view(self, epoch: int) -> torch.Tensor:
        """(N, D) features by dataset position (zeros for unreadable images, which are never sampled)."""
        index = epoch % self.views
        if index not in self._views:
            backbone = self.model.backbone
            transform = backbone.train_transform(self.min_scale) if self.augmented else backbone.eval_transform()
            encoded = encode_images(
                self.model,
                self.images,
                transform,
                batch_size=self.batch_size,
                workers=self.workers,
                description=f"caching features (view {index + 1}/{self.views})",
                seed=self.seed if self.augmented else None,
                epoch=index,
            )
            if index == 0:
                self.skipped = encoded.skipped
            self._views[index] = _by_position(encoded, len(self.images), self.model.backbone.embed_dim)
        return self._views[index]


def _by_position(encoded, n: int, dim: int) -> torch.Tensor:
    table = torch.zeros(n, dim, device=encoded.features.device)
    if len(encoded.indices):
        table[encoded.indices.to(table.device)] = encoded.features
    return table


def use_feature_cache(model: AdaptedCLIP, cfg: TrainConfig) -> bool:
    return model.image_tower_frozen and cfg.feature_cache != "off"


def training_features(
    model: AdaptedCLIP,
    data: TrainingData,
    cache: FeatureCache | None,
    workers,
    *,
    views: int = 1,
    seed: int = 0,
    min_crop_scale: float = 0.5,
) -> FeatureSet:
    """Every readable training image's features, for heads built from them: the mean over the cached
    views when the loop caches (augmented) features, else the mean over `views` augmented passes (crops
    drawn from the seed), renormalised, or one un-augmented pass (views=1)."""
    if cache is not None:
        mean = torch.stack([cache.view(index) for index in range(cache.views)]).mean(dim=0)
        readable = torch.ones(len(data.train), dtype=torch.bool)
        for item in cache.skipped:
            readable[item.index] = False
        labels = torch.tensor([im.label for im in data.train])[readable]
        return FeatureSet(F.normalize(mean[readable.to(mean.device)], dim=-1), labels.to(mean.device))
    if views > 1:
        crops = model.backbone.train_transform(min_crop_scale)
        passes = [
            encode_images(
                model,
                data.train,
                crops,
                workers=workers,
                seed=seed,
                epoch=view,
                description=f"encoding training images (view {view + 1}/{views})",
            )
            for view in range(views)
        ]
        mean = torch.stack([encoded.features for encoded in passes]).mean(dim=0)
        return FeatureSet(F.normalize(mean, dim=-1), passes[0].labels.to(mean.device))
    encoded = encode_images(
        model, data.train, model.backbone.eval_transform(), workers=workers, description="encoding training images"
    )
    return FeatureSet(encoded.features, encoded.labels.to(encoded.features.device))


class ReferenceViews:
    """Frozen zero-shot image features of the exact crops the adapted image tower trains on, for
    consistency losses (PromptSRC compares the frozen and adapted model on the same augmented image).

    With reference_features='views' each image cycles through `views` fixed augmented crops (epoch e shows
    crop e % views) and a crop's frozen features are kept the first time a step computes them, so the
    extra frozen forward is paid in the first `views` epochs only. 'bypass' keeps fresh crops every epoch
    and lets every step recompute; 'unaugmented' is the old reference (un-augmented image, one pass up
    front), which does not match the augmented crop."""

    def __init__(
        self, model: AdaptedCLIP, images: list[LabelledImage], cfg: TrainConfig, workers, seed: int = 0, world: int = 1
    ):
        self.mode = cfg.reference_features
        self.views = cfg.cache_views if cfg.augment else 1
        n, dim, device = len(images), model.backbone.embed_dim, model.backbone.device
        self._unaugmented: torch.Tensor | None = None
        self._table: torch.Tensor | None = None
        self._filled: torch.Tensor | None = None
        self._stored: ReferenceStore | None = None
        if self.mode == "unaugmented":
            with model.components_disabled():
                encoded = encode_images(
                    model, images, model.backbone.eval_transform(), workers=workers, description="zero-shot references"
                )
            self._unaugmented = _by_position(encoded, n, dim)
        elif self.mode == "views":
            self._table = torch.zeros(self.views, n, dim, device=device)
            self._filled = torch.zeros(self.views, n, dtype=torch.bool)
            backbone = model.backbone
            crops = backbone.train_transform(cfg.min_crop_scale) if cfg.augment else backbone.eval_transform()
            run = f"seed {seed}, batch {cfg.batch_size}, {world} process(es)"
            self._stored = ReferenceStore(model, images, crops, seed if cfg.augment else None, self.views, run)
            self._stored.prefill(self._table, self._filled)  # crops an earlier run computed (feature cache)

    @classmethod
    def wanted(cls, model: AdaptedCLIP) -> bool:
        return not model.image_tower_frozen and any(c.uses_image_reference for c in model.components)

    def crop_epoch(self, epoch: int) -> int:
        """The augmentation epoch of training epoch `epoch` (cycles through the views in 'views' mode)."""
        return epoch % self.views if self.mode == "views" else epoch

    def lookup(self, epoch: int, indices: torch.Tensor) -> torch.Tensor | None:
        """The batch's references, or None: the step then computes them (StepContext) and `store` keeps them."""
        if self._unaugmented is not None:
            return self._unaugmented[indices.to(self._unaugmented.device)]
        if self._table is None:
            return None
        view = self.crop_epoch(epoch)
        if not bool(self._filled[view, indices.cpu()].all()):
            return None
        return self._table[view, indices.to(self._table.device)]

    def store(self, epoch: int, indices: torch.Tensor, features: torch.Tensor | None) -> None:
        if self._table is None or features is None:
            return
        view = self.crop_epoch(epoch)
        self._table[view, indices.to(self._table.device)] = features.detach().to(self._table.dtype)
        self._filled[view, indices.cpu()] = True
        self._stored.keep(view, indices, features)

    def flush(self) -> None:
        """Write the crops' features computed so far to the feature cache."""
        if self._stored is not None:
            self._stored.flush()
