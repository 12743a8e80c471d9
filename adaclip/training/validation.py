"""Validation during training: accuracy on the validation images (from the training data only) after
an epoch, and the calibration pass in which a head tunes its own settings on those images."""

from __future__ import annotations

import torch

from ..data import LabelledImage, SkippedImage
from ..distributed import DistContext
from ..inference import EncodedImages, encode_images, logits_in_batches
from ..methods import FeatureSet
from ..model import AdaptedCLIP
from ..ui import log


class Validator:
    """Validation accuracy per epoch, on this rank's share of the images, summed across ranks.
    Features are encoded once when the image tower is frozen."""

    def __init__(self, model: AdaptedCLIP, images: list[LabelledImage], workers, dist_ctx: DistContext):
        self.model = model
        self.all_images = images
        self.images = images[dist_ctx.rank :: dist_ctx.world]
        self.workers = workers
        self.dist_ctx = dist_ctx
        self.skipped: list[SkippedImage] = []
        self._frozen: dict[bool, EncodedImages] = {}

    def _encode(self, everything: bool) -> EncodedImages:
        model = self.model
        if model.image_tower_frozen and everything in self._frozen:
            return self._frozen[everything]
        encoded = encode_images(
            model,
            self.all_images if everything else self.images,
            model.backbone.eval_transform(),
            workers=self.workers,
            description="validating",
        )
        if not everything:
            self.skipped = encoded.skipped
        if model.image_tower_frozen:
            self._frozen[everything] = encoded
        return encoded

    def encoded_all(self) -> EncodedImages | None:
        """Features of the whole validation set through the current image tower."""
        return self._encode(everything=True) if self.all_images else None

    def accuracy(self) -> float | None:
        if not self.all_images:
            return None
        encoded = self._encode(everything=False)
        counts = torch.zeros(2)
        if len(encoded.labels):
            predictions = logits_in_batches(self.model, encoded.features).argmax(dim=-1).cpu()
            counts += torch.tensor([float((predictions == encoded.labels.cpu()).sum()), float(len(predictions))])
        self.dist_ctx.all_reduce_sum(counts)
        return None if counts[1] == 0 else float(counts[0] / counts[1])


def calibrate(model: AdaptedCLIP, validator: Validator) -> bool:
    """Let a head tune its settings on the validation features; True when it changed something.
    Every rank calibrates on the whole validation set, so all ranks choose the same settings."""
    if not model.head.uses_validation_features:
        return False
    encoded = validator.encoded_all()
    val = None
    if encoded is not None and len(encoded.labels):
        val = FeatureSet(encoded.features, encoded.labels.to(encoded.features.device))
    elif not model.head.calibrates_without_validation:
        log.info("no validation images: the head keeps its configured settings")
        return False
    with torch.no_grad():
        chosen = model.head.calibrate(val, model.class_features(), model.backbone.logit_scale)
    if not chosen:
        return False
    where = "the validation set" if val is not None else "the training images (no validation set)"
    log.info(f"tuned on {where}: " + ", ".join(f"{k} {v:.4g}" for k, v in chosen.items()))
    return True
