"""Running a model over many images: batched, skipping unreadable files, bounded memory.

Used by training (feature caches, validation), `predict`, `eval` and `tta`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import feature_store
from .data import Batch, ImageDataset, LabelledImage, SkippedImage, StreamingImageDataset, make_loader
from .distributed import SINGLE, DistContext
from .model import AdaptedCLIP
from .output import printable
from .ui import log, progress


@dataclass
class EncodedImages:
    """Features of the images that could be read, in dataset order, and the ones that could not."""

    features: torch.Tensor  # (N, D) normalised, on the model's device
    labels: torch.Tensor  # (N,) -1 where unknown
    indices: torch.Tensor  # (N,) positions in the input list
    skipped: list[SkippedImage] = field(default_factory=list)


def iterate_batches(
    images: Sequence[LabelledImage] | Sequence[Path],
    transform: Callable,
    *,
    batch_size: int,
    workers: int | None = None,
    seed: int | None = None,
    epoch: int = 0,
    pin_memory: bool = False,
    positions: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Batches in input order; with `seed`, random transforms are drawn per (seed, epoch, image).
    `positions`: only the images at these positions (batch indices and crops stay those of the full list)."""
    if images and isinstance(images[0], LabelledImage):
        dataset = ImageDataset.from_labelled(images, transform, seed=seed)  # type: ignore[arg-type]
    else:
        dataset = ImageDataset(list(images), None, transform, seed=seed)  # type: ignore[arg-type]
    dataset.epoch = epoch
    subset = dataset if positions is None else _At(dataset, positions)
    yield from make_loader(subset, batch_size=batch_size, workers=workers, pin_memory=pin_memory)


class _At(torch.utils.data.Dataset):
    """Some items of a dataset, which keep their positions in it."""

    def __init__(self, dataset: ImageDataset, positions: Sequence[int]):
        self.dataset = dataset
        self.positions = list(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        return self.dataset[self.positions[index]]


class SharedEncodings:
    """Features already computed through a frozen image tower, by (backbone, images, transform, seed,
    view): methods that keep the image tower frozen see identical features for an (image, view), so a
    comparison encodes each once. `reused_seconds` adds up what the reused encodings cost when they
    were computed, so a run's time can be stated as if it had encoded them itself."""

    def __init__(self) -> None:
        self.entries: dict[tuple, tuple[EncodedImages, float]] = {}
        self.reused_seconds = 0.0

    def key(self, model: AdaptedCLIP, images: Sequence, transform: Callable, seed: int | None, epoch: int) -> tuple:
        paths = tuple((str(im.path), im.label) if isinstance(im, LabelledImage) else str(im) for im in images)
        # torchvision transforms print their parameters; anything else prints its identity, so two
        # transforms can only share when they are the same object or print the same parameters.
        return (id(model.backbone), paths, repr(transform), seed, epoch if seed is not None else 0)


_shared: SharedEncodings | None = None


@contextlib.contextmanager
def sharing_frozen_encodings(shared: SharedEncodings | None = None) -> Iterator[SharedEncodings]:
    """Within the block, `encode_images` reuses frozen-tower features computed earlier in it."""
    global _shared
    outer = _shared
    _shared = shared or outer or SharedEncodings()
    try:
        yield _shared
    finally:
        _shared = outer


def encode_images(
    model: AdaptedCLIP,
    images: Sequence[LabelledImage] | Sequence[Path],
    transform: Callable,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    description: str = "encoding",
    seed: int | None = None,
    epoch: int = 0,
) -> EncodedImages:
    """Normalised image features through the (adapted) image tower, eval mode (reused inside
    `sharing_frozen_encodings` when the image tower is frozen)."""
    shared = _shared
    if shared is None or not model.image_tower_frozen:
        return _encode_images(model, images, transform, batch_size, workers, description, seed, epoch)
    key = shared.key(model, images, transform, seed, epoch)
    if key in shared.entries:
        encoded, seconds = shared.entries[key]
        shared.reused_seconds += seconds
        report_skipped(encoded.skipped)
        return encoded
    started = time.perf_counter()
    encoded = _encode_images(model, images, transform, batch_size, workers, description, seed, epoch)
    shared.entries[key] = (encoded, time.perf_counter() - started)
    return encoded


def _encode_images(
    model: AdaptedCLIP,
    images: Sequence[LabelledImage] | Sequence[Path],
    transform: Callable,
    batch_size: int,
    workers: int | None,
    description: str,
    seed: int | None,
    epoch: int,
) -> EncodedImages:
    """Through the feature cache (adaclip.feature_store) when the features are the frozen tower's."""
    cached = feature_store.lookup(model, images, transform, seed, epoch, batch_size)
    if cached is None:
        return _run_encoder(model, images, transform, batch_size, workers, description, seed, epoch)

    def run(positions: list[int]) -> EncodedImages:
        if not positions:
            none = torch.empty(0, dtype=torch.long)
            return EncodedImages(torch.empty(0, model.backbone.embed_dim, device=model.backbone.device), none, none)
        subset = None if len(positions) == len(images) else positions
        return _run_encoder(model, images, transform, batch_size, workers, description, seed, epoch, subset)

    encoded, rechecked = run(cached.missing), run(cached.recheck)
    features, indices = cached.complete((encoded.features, encoded.indices), (rechecked.features, rechecked.indices))
    labels = torch.tensor([im.label if isinstance(im, LabelledImage) else -1 for im in images], dtype=torch.long)
    skipped = sorted(encoded.skipped + rechecked.skipped, key=lambda item: item.index)
    return EncodedImages(features, labels[indices], indices, skipped)


@torch.no_grad()
def _run_encoder(
    model: AdaptedCLIP,
    images: Sequence[LabelledImage] | Sequence[Path],
    transform: Callable,
    batch_size: int,
    workers: int | None,
    description: str,
    seed: int | None,
    epoch: int,
    positions: Sequence[int] | None = None,
) -> EncodedImages:
    was_training = model.training
    model.eval()
    feats, labels, indices, skipped = [], [], [], []
    try:
        with progress(description, total=len(images) if positions is None else len(positions)) as advance:
            batches = iterate_batches(
                images,
                transform,
                batch_size=batch_size,
                workers=workers,
                seed=seed,
                epoch=epoch,
                pin_memory=model.backbone.device.type == "cuda",
                positions=positions,
            )
            for batch in batches:
                skipped.extend(batch.skipped)
                if len(batch.labels):
                    feats.append(model.image_features(batch.pixels))
                    labels.append(batch.labels)
                    indices.append(batch.indices)
                advance(len(batch.labels) + len(batch.skipped))
    finally:
        model.train(was_training)
    report_skipped(skipped)
    device = model.backbone.device
    if not feats:
        empty = torch.empty(0, model.backbone.embed_dim, device=device)
        return EncodedImages(empty, torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long), skipped)
    return EncodedImages(torch.cat(feats), torch.cat(labels), torch.cat(indices), skipped)


def encode_images_across(
    model: AdaptedCLIP,
    images: Sequence[LabelledImage] | Sequence[Path],
    transform: Callable,
    *,
    batch_size: int = 64,
    workers: int | None = None,
    description: str = "encoding",
    ctx: DistContext = SINGLE,
) -> EncodedImages:
    """`encode_images` split across torchrun's processes (adaclip.sharding): each rank encodes its
    batches, and every rank gets all features, in input order, as one process computes them."""
    if not ctx.enabled:
        return encode_images(model, images, transform, batch_size=batch_size, workers=workers, description=description)
    from .sharding import owned_indices

    mine = owned_indices(len(images), batch_size, ctx)
    with log.warnings_as_detail():  # the skipped images of all ranks are reported once, below
        local = encode_images(
            model, [images[i] for i in mine], transform, batch_size=batch_size, workers=workers, description=description
        )
    positions = torch.tensor(mine, dtype=torch.long)
    shipped = (
        local.features.cpu(),
        local.labels.cpu(),
        positions[local.indices],
        [SkippedImage(mine[s.index], s.path, s.reason) for s in local.skipped],
    )
    parts = ctx.all_gather_object(shipped)
    indices = torch.cat([p[2] for p in parts])
    order = indices.argsort()
    skipped = sorted((s for p in parts for s in p[3]), key=lambda s: s.index)
    report_skipped(skipped)
    features = torch.cat([p[0] for p in parts])[order].to(model.backbone.device)
    return EncodedImages(features, torch.cat([p[1] for p in parts])[order], indices[order], skipped)


def report_skipped(skipped: Sequence[SkippedImage], limit: int = 5) -> None:
    """One warning per unreadable image for the first few, then a count."""
    for item in skipped[:limit]:
        log.warning(f"skipped unreadable image {printable(item.path)}: {item.reason}")
    if len(skipped) > limit:
        log.warning(f"skipped {len(skipped) - limit} more unreadable images")


@torch.no_grad()
def logits_in_batches(model: AdaptedCLIP, features: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Head logits for cached features, in chunks (RAda's head grows with classes squared)."""
    was_training = model.training
    model.eval()
    try:
        chunks = [model.logits_from_features(features[i : i + batch_size]) for i in range(0, len(features), batch_size)]
    finally:
        model.train(was_training)
    if not chunks:
        return torch.empty(0, len(model.class_names), device=features.device)
    return torch.cat(chunks)


@dataclass
class StreamedPrediction:
    index: int
    path: str
    probabilities: torch.Tensor | None  # (K,) on cpu; None when skipped
    error: str | None = None


@torch.no_grad()
def stream_predictions(
    model: AdaptedCLIP,
    paths: Iterable[Path],
    transform: Callable,
    *,
    batch_size: int = 64,
    ctx: DistContext = SINGLE,
) -> Iterator[StreamedPrediction]:
    """Probabilities per image, in input order, holding one batch in memory at a time (under torchrun,
    one batch per process: see adaclip.sharding; every rank yields every prediction)."""
    if ctx.enabled:
        from .sharding import map_in_order

        def predict_part(part: list[tuple[int, Path]]) -> list[StreamedPrediction]:
            local = stream_predictions(model, [path for _, path in part], transform, batch_size=len(part))
            return [dataclasses.replace(p, index=part[p.index][0]) for p in local]

        for results in map_in_order(paths, batch_size, predict_part, ctx):
            yield from results
        return
    model.eval()
    dataset = StreamingImageDataset(paths, transform)
    for batch in make_loader(dataset, batch_size=batch_size, workers=0):
        results = [StreamedPrediction(s.index, s.path, None, s.reason) for s in batch.skipped]
        if len(batch.labels):
            probs = model(batch.pixels).float().softmax(dim=-1).cpu()
            results += [
                StreamedPrediction(index, path, probs[row])
                for row, (index, path) in enumerate(zip(batch.indices.tolist(), batch.paths, strict=True))
            ]
        yield from sorted(results, key=lambda r: r.index)
