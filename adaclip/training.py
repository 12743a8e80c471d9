"""The one training loop every method shares.

Methods only build parts; this loop decides how images reach them. When no part adapts the image
tower, image features are computed once (or once per cached augmented view) and every later epoch
costs only the trainable parts. Otherwise images are decoded, augmented and encoded each step, and
backward stops at the first adapted block because nothing before it requires grad.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .adapter_file import TrainingRecord
from .data import LabelledImage, SkippedImage, TrainingData
from .inference import EncodedImages, encode_images, iterate_batches, logits_in_batches, report_skipped
from .methods import FeatureSet, TrainConfig
from .model import AdaptedCLIP
from .ui import log, progress


@dataclass
class TrainingOutcome:
    record: TrainingRecord
    seconds: float
    epoch_seconds: list[float] = field(default_factory=list)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """Weight decay on matrices only: decaying gates, biases and norms towards 0 is rarely wanted."""
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        group
        for group in (
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        )
        if group["params"]
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero (or constant)."""
    warmup = min(total_steps - 1, round(cfg.warmup_epochs * steps_per_epoch)) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class FeatureCache:
    """Image features of the training set for frozen image towers: one view per epoch modulo `views`."""

    def __init__(self, model: AdaptedCLIP, images: list[LabelledImage], cfg: TrainConfig, seed: int, workers):
        self.model = model
        self.images = images
        self.augmented = cfg.augment and cfg.feature_cache == "augmented"
        self.views = cfg.cache_views if self.augmented else 1
        self.min_scale = cfg.min_crop_scale
        self.seed = seed
        self.workers = workers
        self.batch_size = max(64, cfg.batch_size)
        self._views: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.skipped: list[SkippedImage] = []

    def view(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(features, labels, dataset positions) of the view used in `epoch`."""
        index = epoch % self.views
        if index not in self._views:
            backbone = self.model.backbone
            transform = backbone.train_transform(self.min_scale) if self.augmented else backbone.eval_transform()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed * 1009 + index)  # the view's crops depend on seed and view only
                encoded = encode_images(
                    self.model,
                    self.images,
                    transform,
                    batch_size=self.batch_size,
                    workers=self.workers,
                    description=f"caching features (view {index + 1}/{self.views})",
                )
            if index == 0:
                self.skipped = encoded.skipped
            self._views[index] = (encoded.features, encoded.labels.to(encoded.features.device), encoded.indices)
        return self._views[index]


def train(
    model: AdaptedCLIP,
    data: TrainingData,
    *,
    seed: int = 0,
    workers: int | None = None,
) -> TrainingOutcome:
    """Train the model's parts in place; return what happened (recorded in the adapter file)."""
    cfg = model.config.train
    start = time.perf_counter()
    backbone = model.backbone
    val = _Validator(model, data.val, workers)
    cache = FeatureCache(model, data.train, cfg, seed, workers) if _use_cache(model, cfg) else None
    if model.head.uses_training_features:
        model.head.fit_training_features(_training_features(model, data, cache, workers))
    params = model.trainable_parameters()
    if not model.config.trainable or cfg.epochs == 0 or not params:
        _calibrate(model, val)
        val_acc = val.accuracy()
        record = TrainingRecord(
            epochs=0,
            steps=0,
            final_loss=None,
            val_accuracy=val_acc,
            device=str(backbone.device),
            precision=backbone.precision,
            skipped_images=len(val.skipped) + (len(cache.skipped) if cache is not None else 0),
        )
        return TrainingOutcome(record, time.perf_counter() - start)

    torch.manual_seed(seed)
    references = _reference_features(model, data.train, cfg, workers)
    steps_per_epoch = math.ceil(len(data.train) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch, total_steps)
    order = torch.Generator().manual_seed(seed)
    history: list[dict] = []
    epoch_seconds: list[float] = []
    skipped: dict[str, SkippedImage] = {}
    steps = 0
    last_loss = None
    log.detail(
        f"training {model.n_trainable():,} parameters for {cfg.epochs} epochs x {steps_per_epoch} steps"
        f" ({'cached features' if cache else 'images through the encoder'})"
    )
    with progress("training", total=total_steps) as advance:
        for epoch in range(cfg.epochs):
            epoch_start = time.perf_counter()
            model.train()
            loss_sum, correct, seen = 0.0, 0, 0
            batches = _epoch_batches(model, data, cfg, cache, epoch, order, workers, skipped)
            for labels, pixels, features, indices in batches:
                reference = references[indices.to(references.device)] if references is not None else None
                loss, ctx = model.training_loss(
                    labels, pixels=pixels, image_features=features, reference_image_features=reference
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                if not model.text_tower_frozen:
                    model.invalidate_class_cache()  # cached (eval) text features are stale now
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
                steps += 1
                n = len(labels)
                loss_sum += loss.item() * n
                correct += int((ctx.logits.argmax(dim=-1) == ctx.labels).sum())
                seen += n
                advance(1, epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{loss.item():.3f}")
            last_loss = loss_sum / max(1, seen)
            val_acc = val.accuracy()
            entry = {
                "epoch": epoch + 1,
                "loss": round(last_loss, 6),
                "train_accuracy": round(correct / max(1, seen), 6),
                "val_accuracy": None if val_acc is None else round(val_acc, 6),
                "lr": scheduler.get_last_lr()[0],
            }
            history.append(entry)
            epoch_seconds.append(time.perf_counter() - epoch_start)
            log.info(
                f"epoch {epoch + 1}/{cfg.epochs}: loss {last_loss:.4f}, train acc {entry['train_accuracy']:.3f}"
                + (f", val acc {val_acc:.3f}" if val_acc is not None else "")
                + f" ({epoch_seconds[-1]:.1f}s)"
            )
    if cache is not None:
        skipped.update({s.path: s for s in cache.skipped})
    model.eval()
    final_val_accuracy = history[-1]["val_accuracy"] if history else None
    if _calibrate(model, val):
        final_val_accuracy = val.accuracy()  # after the head's settings were tuned on it
    record = TrainingRecord(
        epochs=cfg.epochs,
        steps=steps,
        final_loss=last_loss,
        val_accuracy=final_val_accuracy,
        history=history,
        skipped_images=len(skipped) + len(val.skipped),
        device=str(backbone.device),
        precision=backbone.precision,
    )
    return TrainingOutcome(record, time.perf_counter() - start, epoch_seconds)


def _use_cache(model: AdaptedCLIP, cfg: TrainConfig) -> bool:
    return model.image_tower_frozen and cfg.feature_cache != "off"


def _training_features(model: AdaptedCLIP, data: TrainingData, cache: FeatureCache | None, workers) -> FeatureSet:
    """Every training image's features for heads built from them: the mean over the cached views when
    the loop caches (augmented) features, else one un-augmented pass."""
    if cache is not None:
        views = [cache.view(index) for index in range(cache.views)]
        features, labels, positions = views[0]
        if any(not torch.equal(positions, other[2]) for other in views[1:]):
            raise RuntimeError("cached feature views disagree on which training images they hold")
        mean = torch.stack([view[0] for view in views]).mean(dim=0)
        return FeatureSet(F.normalize(mean, dim=-1), labels)
    encoded = encode_images(
        model, data.train, model.backbone.eval_transform(), workers=workers, description="encoding training images"
    )
    return FeatureSet(encoded.features, encoded.labels.to(encoded.features.device))


def _calibrate(model: AdaptedCLIP, val: _Validator) -> bool:
    """Let a head tune its settings on the validation features; True when it changed something."""
    if not model.head.uses_validation_features:
        return False
    encoded = val.encoded()
    if encoded is None or len(encoded.labels) == 0:
        log.info("no validation images: the head keeps its configured settings")
        return False
    with torch.no_grad():
        class_features = model.class_features()
        chosen = model.head.calibrate(
            FeatureSet(encoded.features, encoded.labels.to(encoded.features.device)),
            class_features,
            model.backbone.logit_scale,
        )
    if not chosen:
        return False
    log.info("tuned on the validation set: " + ", ".join(f"{k} {v:.4g}" for k, v in chosen.items()))
    return True


def _reference_features(model: AdaptedCLIP, images: list[LabelledImage], cfg: TrainConfig, workers):
    """Frozen zero-shot features of every training image (un-augmented view), by dataset position, when
    a component's consistency loss needs them: one pass up front instead of one extra pass per step."""
    wanted = any(c.uses_image_reference for c in model.components)
    if not wanted or model.image_tower_frozen or cfg.reference_features != "cached":
        return None
    with model.components_disabled():
        encoded = encode_images(
            model, images, model.backbone.eval_transform(), workers=workers, description="zero-shot references"
        )
    references = torch.zeros(len(images), model.backbone.embed_dim, device=encoded.features.device)
    references[encoded.indices.to(references.device)] = encoded.features
    return references


def _epoch_batches(model, data, cfg: TrainConfig, cache: FeatureCache | None, epoch, order, workers, skipped):
    """Yield (labels, pixels | None, features | None, dataset indices) for one epoch in a seeded order."""
    if cache is not None:
        features, labels, positions = cache.view(epoch)
        permutation = torch.randperm(len(labels), generator=order)
        for i in range(0, len(labels), cfg.batch_size):
            index = permutation[i : i + cfg.batch_size].to(features.device)
            yield labels[index], None, features[index], positions[index.cpu()]
        return
    backbone = model.backbone
    transform = backbone.train_transform(cfg.min_crop_scale) if cfg.augment else backbone.eval_transform()
    epoch_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=order))
    for batch in iterate_batches(
        data.train, transform, batch_size=cfg.batch_size, workers=workers, shuffle=True, seed=epoch_seed
    ):
        for item in batch.skipped:
            if item.path not in skipped:
                skipped[item.path] = item
                report_skipped([item])
        if len(batch.labels):
            yield batch.labels.to(backbone.device), batch.pixels.to(backbone.device), None, batch.indices


class _Validator:
    """Validation accuracy per epoch; features are encoded once when the image tower is frozen."""

    def __init__(self, model: AdaptedCLIP, images: list[LabelledImage], workers):
        self.model = model
        self.images = images
        self.workers = workers
        self.skipped: list[SkippedImage] = []
        self._frozen_features = None

    def encoded(self) -> EncodedImages | None:
        """Validation features through the current image tower (encoded once when it is frozen)."""
        if not self.images:
            return None
        model = self.model
        if model.image_tower_frozen and self._frozen_features is not None:
            return self._frozen_features
        encoded = encode_images(
            model,
            self.images,
            model.backbone.eval_transform(),
            workers=self.workers,
            description="validating",
        )
        self.skipped = encoded.skipped
        if model.image_tower_frozen:
            self._frozen_features = encoded
        return encoded

    def accuracy(self) -> float | None:
        encoded = self.encoded()
        if encoded is None or len(encoded.labels) == 0:
            return None
        predictions = logits_in_batches(self.model, encoded.features).argmax(dim=-1).cpu()
        return float((predictions == encoded.labels.cpu()).float().mean())
