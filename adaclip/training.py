"""The one training loop every method shares.

Methods only build parts; this loop decides how images reach them. When no part adapts the image
tower, image features are computed once (or once per cached augmented view) and every later epoch
costs only the trainable parts. Otherwise images are decoded, augmented and encoded each step, and
backward stops at the first adapted block because nothing before it requires grad.

Reproducibility is structural: epoch e visits the images in an order drawn from (seed, e), each
image's augmentation is drawn from (seed, e, image), and a *global* batch is the same whether one
process takes it or N processes split it (adaclip.distributed). A checkpoint therefore only needs the
position (epoch, step) next to the trainable and optimizer state to resume bit-exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_file import DIVERGED, TrainingRecord, check_finite
from .checkpoint import TrainingPosition, checkpoint_does_not_fit, load_checkpoint, restore_rng, save_checkpoint
from .data import ImageDataset, LabelledImage, SkippedImage, TrainingData, make_loader
from .distributed import SINGLE, DistContext, shard_of_batch
from .errors import AdaclipError
from .feature_store import ReferenceStore
from .inference import EncodedImages, encode_images, logits_in_batches, report_skipped
from .methods import FeatureSet, TrainConfig
from .model import AdaptedCLIP
from .ui import log, progress


class TrainingInterrupted(AdaclipError):
    """Ctrl-C during fit: the last checkpoint is intact and the message says how to resume."""

    exit_code = 130


@dataclass
class CheckpointPolicy:
    """Where and how often `fit` saves resumable state."""

    path: Path
    every_steps: int | None = None  # also every N optimisation steps (always at each epoch's end)
    resume: bool = False
    fingerprint: dict = field(default_factory=dict)


@dataclass
class TrainingOutcome:
    record: TrainingRecord
    seconds: float
    epoch_seconds: list[float] = field(default_factory=list)


# Called after each epoch with (epoch, record): the history entry (epoch, loss, train_accuracy,
# val_accuracy, lr) plus step (global), seconds and images_per_second.
EpochCallback = Callable[[int, dict], None]
# Called after each optimisation step with its record: epoch, step (global, from 1), loss and
# train_accuracy over the step's batch (all processes), images, the lr the step used, seconds since the
# previous step ended (data loading included) and images_per_second.
StepCallback = Callable[[dict], None]


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, lr_scales: dict[int, float] | None = None
) -> torch.optim.Optimizer:
    """Weight decay on matrices only: decaying gates, biases and norms towards 0 is rarely wanted.
    `lr_scales` (id(param) -> multiplier) gives a part its own learning rate (e.g. a head beside towers)."""
    lr_scales = lr_scales or {}
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for p in params:
        grouped.setdefault((lr_scales.get(id(p), 1.0), p.ndim >= 2), []).append(p)
    groups = [
        {"params": members, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (scale, decay), members in sorted(grouped.items(), key=lambda item: (item[0][0], not item[0][1]))
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


def training_budget(
    cfg: TrainConfig, n_images: int, shots: int | None, n_classes: int, steps_per_epoch: int
) -> tuple[int, int]:
    """(epochs, optimiser steps). Shots = the few-shot count, else training images per class (rounded).
    `iterations_per_shot` fixes the step count (iterations x shots; the last epoch stops early);
    `epochs_by_shots` picks the epoch count by shots; otherwise `epochs`."""
    per_class = shots or max(1, round(n_images / max(1, n_classes)))
    if cfg.iterations_per_shot:
        total = cfg.iterations_per_shot * per_class
        return math.ceil(total / steps_per_epoch), total
    epochs = cfg.epochs
    if cfg.epochs_by_shots:
        fitting = [least for least in cfg.epochs_by_shots if least <= per_class]
        epochs = cfg.epochs_by_shots[max(fitting) if fitting else min(cfg.epochs_by_shots)]
    return epochs, epochs * steps_per_epoch


def validates_after(epoch: int, epochs: int) -> bool:
    """Whether epoch `epoch` (0-based) ends with a validation pass: every epoch of short runs, about 50
    times over long ones (an iteration budget can mean thousands of short epochs), always the last."""
    every = max(1, math.ceil(epochs / 50))
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)


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


class _StepModule(nn.Module):
    """One training step's loss as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, model: AdaptedCLIP):
        super().__init__()
        self.model = model

    def forward(self, labels, pixels, features, references):
        return self.model.training_loss(
            labels, pixels=pixels, image_features=features, reference_image_features=references
        )


def train(
    model: AdaptedCLIP,
    data: TrainingData,
    *,
    seed: int = 0,
    workers: int | None = None,
    dist_ctx: DistContext = SINGLE,
    checkpoint: CheckpointPolicy | None = None,
    on_epoch_end: EpochCallback | None = None,
    on_step_end: StepCallback | None = None,
) -> TrainingOutcome:
    """Train the model's parts in place; return what happened (recorded in the adapter file)."""
    cfg = model.config.train
    start = time.perf_counter()
    backbone = model.backbone
    validator = _Validator(model, data.val, workers, dist_ctx)
    cache = FeatureCache(model, data.train, cfg, seed, workers) if _use_cache(model, cfg) else None
    if model.head.uses_training_features:
        model.head.fit_training_features(_training_features(model, data, cache, workers))
    if model.head.calibrates_before_training:
        _calibrate(model, validator)  # e.g. Tip-Adapter-F trains at searched alpha, beta (scale-aware)
    params = model.trainable_parameters()
    budget = cfg.epochs or cfg.epochs_by_shots or cfg.iterations_per_shot
    if not model.config.trainable or not budget or not params:
        _calibrate(model, validator)
        record = TrainingRecord(
            epochs=0,
            steps=0,
            final_loss=None,
            val_accuracy=validator.accuracy(),
            device=str(backbone.device),
            precision=backbone.precision,
            skipped_images=len(validator.skipped) + (len(cache.skipped) if cache is not None else 0),
        )
        return TrainingOutcome(record, time.perf_counter() - start)

    torch.manual_seed(seed)
    n = len(data.train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    epochs, total_steps = training_budget(cfg, n, data.shots, len(data.class_names), steps_per_epoch)
    optimizer = make_optimizer(params, cfg, model.lr_scales())
    scheduler = make_scheduler(optimizer, cfg, steps_per_epoch, total_steps)
    position = TrainingPosition()
    resumed = False
    if checkpoint is not None and checkpoint.resume:
        loaded = load_checkpoint(checkpoint.path, checkpoint.fingerprint)
        try:
            model.load_state_dict(loaded.model_state, strict=True)
            optimizer.load_state_dict(loaded.optimizer_state)
            scheduler.load_state_dict(loaded.scheduler_state)
            restore_rng(loaded.rng)
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
            raise checkpoint_does_not_fit(checkpoint.path, exc) from None
        position = loaded.position
        resumed = True
        log.info(f"resuming from {checkpoint.path} at epoch {position.epoch + 1}, step {position.step_in_epoch}")

    wanted = ReferenceViews.wanted(model)
    references = ReferenceViews(model, data.train, cfg, workers, seed, dist_ctx.world) if wanted else None
    step_module: nn.Module = _StepModule(model)
    if dist_ctx.enabled:
        device_ids = [backbone.device.index] if backbone.device.type == "cuda" else None
        step_module = nn.parallel.DistributedDataParallel(step_module, device_ids=device_ids)
    skipped: dict[str, SkippedImage] = {}
    epoch_seconds: list[float] = []
    log.detail(
        f"training {model.n_trainable():,} parameters for {total_steps} steps ({epochs} epochs x {steps_per_epoch})"
        f" ({'cached features' if cache else 'images through the encoder'}, {dist_ctx.world} process(es))"
    )
    try:
        with progress("training", total=total_steps) as advance:
            advance(position.global_step)
            for epoch in range(position.epoch, epochs):
                epoch_start = time.perf_counter()
                model.train()
                order = epoch_order(n, seed, epoch)
                crop_epoch = references.crop_epoch(epoch) if references is not None else epoch
                batches = _epoch_batches(
                    model,
                    data,
                    cfg,
                    cache,
                    epoch,
                    order,
                    position.step_in_epoch,
                    seed,
                    workers,
                    dist_ctx,
                    skipped,
                    crop_epoch,
                )
                step_start = time.perf_counter()
                for global_n, labels, pixels, features, indices, weight in batches:
                    if position.global_step >= total_steps:
                        break  # an iteration budget ends inside its last epoch
                    refs = references.lookup(epoch, indices) if references is not None else None
                    loss, ctx = step_module(labels, pixels, features, refs)
                    if references is not None and refs is None and weight > 0:
                        references.store(epoch, indices, ctx.reference_image_features)
                    # Each rank's mean is rescaled so that DDP's average equals the mean over the global batch.
                    scaled = loss * (weight * len(labels) * dist_ctx.world / global_n)
                    optimizer.zero_grad(set_to_none=True)
                    scaled.backward()
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    step_lr = scheduler.get_last_lr()[0]
                    optimizer.step()
                    scheduler.step()
                    if not model.text_tower_frozen:
                        model.invalidate_class_cache()  # cached (eval) text features are stale now
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss became {loss.item()} at epoch {epoch + 1}; lower --lr")
                    sums = weight * torch.tensor(
                        [
                            loss.detach().item() * len(labels),
                            float((ctx.logits.argmax(-1) == ctx.labels).sum()),
                            float(len(labels)),
                        ]
                    )
                    dist_ctx.all_reduce_sum(sums)
                    position.epoch_sums = [a + b for a, b in zip(position.epoch_sums, sums.tolist(), strict=True)]
                    position.step_in_epoch += 1
                    position.global_step += 1
                    advance(1, epoch=f"{epoch + 1}/{epochs}", loss=f"{loss.item():.3f}")
                    if on_step_end is not None:
                        step_start = _report_step(on_step_end, sums.tolist(), epoch, position, step_lr, step_start)
                    if (
                        checkpoint is not None
                        and checkpoint.every_steps
                        and position.global_step % checkpoint.every_steps == 0
                        and position.step_in_epoch < steps_per_epoch
                    ):
                        _save(checkpoint, model, optimizer, scheduler, position, dist_ctx)
                images_seen = position.epoch_sums[2]
                validate = validates_after(epoch, epochs)
                entry = _finish_epoch(model, position, scheduler, validator if validate else None, epoch)
                epoch_seconds.append(time.perf_counter() - epoch_start)
                if validate:
                    log.info(_epoch_line(entry, epochs, epoch_seconds[-1]))
                if checkpoint is not None:
                    _save(checkpoint, model, optimizer, scheduler, position, dist_ctx)
                if on_epoch_end is not None:
                    seconds = epoch_seconds[-1]
                    on_epoch_end(
                        epoch + 1,
                        {
                            **entry,
                            "step": position.global_step,
                            "seconds": round(seconds, 4),
                            "images_per_second": round(images_seen / seconds, 2) if seconds > 0 else None,
                        },
                    )
    except KeyboardInterrupt:
        where = f"epoch {position.epoch + 1}, step {position.step_in_epoch}"
        if checkpoint is not None and checkpoint.path.exists():
            raise TrainingInterrupted(
                f"interrupted at {where}; the last checkpoint is intact",
                path=checkpoint.path,
                fix="run the same command with --resume to continue",
            ) from None
        raise TrainingInterrupted(f"interrupted at {where}; nothing was saved") from None

    if references is not None:
        references.flush()
    if cache is not None:
        skipped.update({s.path: s for s in cache.skipped})
    check_finite(
        model.adapter_state(), "training produced non-finite values (NaN or inf) in {name}", None, fix=DIVERGED
    )
    model.eval()
    history = position.history
    final_val_accuracy = history[-1]["val_accuracy"] if history else None  # the last epoch always validates
    if _calibrate(model, validator):
        final_val_accuracy = validator.accuracy()  # after the head's settings were tuned on it
    record = TrainingRecord(
        epochs=epochs,
        steps=position.global_step,
        final_loss=history[-1]["loss"] if history else None,
        val_accuracy=final_val_accuracy,
        history=history,
        skipped_images=len(skipped) + len(validator.skipped),
        device=str(backbone.device),
        precision=backbone.precision,
        resumed=resumed,
    )
    return TrainingOutcome(record, time.perf_counter() - start, epoch_seconds)


def _report_step(callback: StepCallback, sums: list[float], epoch: int, position, lr: float, start: float) -> float:
    """Hand one step's record to `callback`; returns when the step ended (the next step's start)."""
    loss_sum, correct, seen = sums
    end = time.perf_counter()
    seconds = end - start
    callback(
        {
            "epoch": epoch + 1,
            "step": position.global_step,
            "loss": round(loss_sum / max(1.0, seen), 6),
            "train_accuracy": round(correct / max(1.0, seen), 6),
            "images": int(seen),
            "lr": lr,
            "seconds": round(seconds, 4),
            "images_per_second": round(seen / seconds, 2) if seconds > 0 else None,
        }
    )
    return time.perf_counter()  # the callback's own time is not the next step's


def _finish_epoch(model, position: TrainingPosition, scheduler, validator, epoch: int) -> dict:
    loss_sum, correct, seen = position.epoch_sums
    val_acc = validator.accuracy() if validator is not None else None
    entry = {
        "epoch": epoch + 1,
        "loss": round(loss_sum / max(1.0, seen), 6),
        "train_accuracy": round(correct / max(1.0, seen), 6),
        "val_accuracy": None if val_acc is None else round(val_acc, 6),
        "lr": scheduler.get_last_lr()[0],
    }
    position.history.append(entry)
    position.epoch += 1
    position.step_in_epoch = 0
    position.epoch_sums = [0.0, 0.0, 0.0]
    return entry


def _epoch_line(entry: dict, epochs: int, seconds: float) -> str:
    line = f"epoch {entry['epoch']}/{epochs}: loss {entry['loss']:.4f}, train acc {entry['train_accuracy']:.3f}"
    if entry["val_accuracy"] is not None:
        line += f", val acc {entry['val_accuracy']:.3f}"
    return line + f" ({seconds:.1f}s)"


def _save(policy: CheckpointPolicy, model, optimizer, scheduler, position, dist_ctx: DistContext) -> None:
    if dist_ctx.is_main:
        save_checkpoint(
            policy.path,
            model_state=model.adapter_state(),
            optimizer=optimizer,
            scheduler=scheduler,
            position=position,
            fingerprint=policy.fingerprint,
        )
    dist_ctx.barrier()


def _use_cache(model: AdaptedCLIP, cfg: TrainConfig) -> bool:
    return model.image_tower_frozen and cfg.feature_cache != "off"


def _training_features(model: AdaptedCLIP, data: TrainingData, cache: FeatureCache | None, workers) -> FeatureSet:
    """Every readable training image's features, for heads built from them: the mean over the cached
    views when the loop caches (augmented) features, else one un-augmented pass."""
    if cache is not None:
        mean = torch.stack([cache.view(index) for index in range(cache.views)]).mean(dim=0)
        readable = torch.ones(len(data.train), dtype=torch.bool)
        for item in cache.skipped:
            readable[item.index] = False
        labels = torch.tensor([im.label for im in data.train])[readable]
        return FeatureSet(F.normalize(mean[readable.to(mean.device)], dim=-1), labels.to(mean.device))
    encoded = encode_images(
        model, data.train, model.backbone.eval_transform(), workers=workers, description="encoding training images"
    )
    return FeatureSet(encoded.features, encoded.labels.to(encoded.features.device))


def _calibrate(model: AdaptedCLIP, validator: _Validator) -> bool:
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


def _epoch_batches(
    model: AdaptedCLIP,
    data: TrainingData,
    cfg: TrainConfig,
    cache: FeatureCache | None,
    epoch: int,
    order: torch.Tensor,
    start_step: int,
    seed: int,
    workers,
    dist_ctx: DistContext,
    skipped: dict[str, SkippedImage],
    crop_epoch: int,
) -> Iterator[tuple]:
    """Yield (global readable count, labels, pixels | None, features | None, dataset positions, weight)
    for this rank, from global batch `start_step` of the epoch on; augmented crops are those of `crop_epoch`."""
    global_batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)][start_step:]
    shards = [shard_of_batch(batch, dist_ctx, cfg.batch_size) for batch in global_batches]
    device = model.backbone.device
    if cache is not None:
        features = cache.view(epoch)
        labels_all = torch.tensor([im.label for im in data.train])
        readable = torch.ones(len(data.train), dtype=torch.bool)
        for item in cache.skipped:
            readable[item.index] = False
        for shard in shards:
            shard = shard[readable[shard]]
            yield _step_inputs(labels_all[shard], None, features[shard.to(features.device)], shard, dist_ctx, model)
        return
    backbone = model.backbone
    transform = backbone.train_transform(cfg.min_crop_scale) if cfg.augment else backbone.eval_transform()
    dataset = ImageDataset.from_labelled(data.train, transform, seed=seed if cfg.augment else None)
    dataset.epoch = crop_epoch
    loader = make_loader(
        dataset, batch_sampler=[s.tolist() for s in shards], workers=workers, pin_memory=device.type == "cuda"
    )
    for batch in loader:
        fresh = [item for item in batch.skipped if item.path not in skipped]
        for item in fresh:
            skipped[item.path] = item
        report_skipped(fresh)
        yield _step_inputs(batch.labels, batch.pixels, None, batch.indices, dist_ctx, model)


def _step_inputs(labels, pixels, features, positions, dist_ctx: DistContext, model: AdaptedCLIP):
    """Count the global batch's readable images across ranks, and give a rank whose share is empty a
    zero-weight placeholder so it still joins the collective gradient average."""
    device = model.backbone.device
    global_n = int(dist_ctx.all_reduce_sum(torch.tensor([float(len(labels))])).item())
    if len(labels) == 0:
        labels = torch.zeros(1, dtype=torch.long)
        positions = torch.zeros(1, dtype=torch.long)
        if features is not None:
            features = torch.zeros(1, model.backbone.embed_dim, device=device)
        else:
            pixels = model.backbone.sample_image()
        return max(1, global_n), labels.to(device), pixels, features, positions, 0.0
    if pixels is not None:
        pixels = pixels.to(device, non_blocking=True)
    return max(1, global_n), labels.to(device), pixels, features, positions, 1.0


class _Validator:
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
