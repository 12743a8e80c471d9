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

import torch
from torch import nn

from ..adapter_file import DIVERGED, TrainingRecord, check_finite
from ..checkpoint import TrainingPosition
from ..data import ImageDataset, SkippedImage, TrainingData, make_loader
from ..distributed import SINGLE, DistContext, shard_of_batch
from ..errors import AdaclipError
from ..inference import report_skipped
from ..methods import TrainConfig
from ..model import AdaptedCLIP
from ..ui import log, progress
from .averaging import WeightAverage
from .checkpointing import CheckpointPolicy, restore_training_state, save_training_state
from .features import FeatureCache, ReferenceViews, training_features, use_feature_cache
from .schedule import epoch_order, make_optimizer, make_scheduler, training_budget, validates_after
from .validation import Validator, calibrate


class TrainingInterrupted(AdaclipError):
    """Ctrl-C during fit: the last checkpoint is intact and the message says how to resume."""

    exit_code = 130


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
    validator = Validator(model, data.val, workers, dist_ctx)
    cache = FeatureCache(model, data.train, cfg, seed, workers) if use_feature_cache(model, cfg) else None
    if model.head.uses_training_features and not model.head.fits_after_training:
        model.head.fit_training_features(training_features(model, data, cache, workers))
    if model.head.calibrates_before_training:
        calibrate(model, validator)  # e.g. Tip-Adapter-F trains at searched alpha, beta (scale-aware)
    params = model.trainable_parameters()
    budget = cfg.epochs or cfg.epochs_by_shots or cfg.iterations_per_shot
    if not model.config.trainable or not budget or not params:
        _fit_trained_features(model, data, cache, workers, seed)
        calibrate(model, validator)
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
    averaging = WeightAverage(params, cfg, epochs) if cfg.weight_averaging == "gaussian" else None
    resumed = checkpoint is not None and checkpoint.resume
    if resumed:
        position = restore_training_state(checkpoint, model, optimizer, scheduler, averaging)
    else:
        position = TrainingPosition()

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
                        save_training_state(checkpoint, model, optimizer, scheduler, position, dist_ctx, averaging)
                images_seen = position.epoch_sums[2]
                validate = validates_after(epoch, epochs)
                if averaging is not None:
                    averaging.add_epoch(epoch)  # before validation and the checkpoint, which see the raw weights
                entry = _finish_epoch(model, position, scheduler, validator if validate else None, epoch)
                epoch_seconds.append(time.perf_counter() - epoch_start)
                if validate:
                    log.info(_epoch_line(entry, epochs, epoch_seconds[-1]))
                if checkpoint is not None:
                    save_training_state(checkpoint, model, optimizer, scheduler, position, dist_ctx, averaging)
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
    if averaging is not None:
        averaging.apply()
        model.invalidate_class_cache()
    if cache is not None:
        skipped.update({s.path: s for s in cache.skipped})
    check_finite(
        model.adapter_state(), "training produced non-finite values (NaN or inf) in {name}", None, fix=DIVERGED
    )
    model.eval()
    _fit_trained_features(model, data, cache, workers, seed)
    history = position.history
    final_val_accuracy = history[-1]["val_accuracy"] if history else None  # the last epoch always validates
    calibrated = calibrate(model, validator)
    # of what the adapter keeps: the averaged weights, the head's settings tuned on these images
    if calibrated or (averaging is not None and final_val_accuracy is not None):
        final_val_accuracy = validator.accuracy()
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


def _fit_trained_features(model: AdaptedCLIP, data: TrainingData, cache: FeatureCache | None, workers, seed) -> None:
    """A head built from the trained model's own features of the training images gets them now."""
    head = model.head
    if head.uses_training_features and head.fits_after_training:
        views, min_crop_scale = head.training_views, model.config.train.min_crop_scale
        head.fit_training_features(
            training_features(model, data, cache, workers, views=views, seed=seed, min_crop_scale=min_crop_scale)
        )


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
