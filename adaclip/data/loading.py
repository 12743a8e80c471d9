"""From image records to batches: datasets that decode one image per item (skipping, not raising on,
unreadable ones), the collate that gathers them, and the DataLoader every command uses.

An item is a file path, a `LabelledImage` (whose bytes may lie in a tar shard), or an `ImageBytes`
(a shard member read while streaming); all decode the same way.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..errors import UnreadableImageError
from ..images import DEFAULT_MAX_PIXELS, load_image
from .records import LabelledImage


@dataclass(frozen=True, slots=True)
class ImageBytes:
    """An image already read into memory (a shard member met while streaming), named by `path`."""

    path: Path
    data: bytes


ImageItem = Path | LabelledImage | ImageBytes


class SkippedImage(NamedTuple):
    index: int
    path: str
    reason: str


@dataclass
class Batch:
    pixels: torch.Tensor  # (B, 3, H, W); B may be 0 when every image of the batch was unreadable
    labels: torch.Tensor  # (B,), -1 where unknown
    indices: torch.Tensor  # (B,) positions in the dataset, for mapping results back
    paths: list[str]  # (B,) the decoded images' paths
    skipped: list[SkippedImage]  # unreadable images in this batch


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A well-mixed 63-bit seed for one image in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class ImageDataset(Dataset):
    """Decodes one image per item; an unreadable file yields a skip record instead of raising.

    With `seed` set, each image's random augmentation depends only on (seed, epoch, index): not on
    batch order, worker processes or how batches are split across ranks, so resumed and multi-process
    runs see exactly the crops a single uninterrupted run sees. Set `epoch` before iterating.
    """

    def __init__(
        self,
        paths: Sequence[ImageItem],
        labels: Sequence[int] | None,
        transform: Callable,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        seed: int | None = None,
    ):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else None
        self.transform = transform
        self.max_pixels = max_pixels
        self.seed = seed
        self.epoch = 0

    @classmethod
    def from_labelled(cls, images: Sequence[LabelledImage], transform: Callable, **kw) -> ImageDataset:
        # an image whose bytes lie in a shard keeps its record, which says where to read them
        items = [im if im.span is not None else im.path for im in images]
        return cls(items, [im.label for im in images], transform, **kw)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        label = self.labels[index] if self.labels is not None else -1
        transform = self.transform
        if self.seed is not None:
            transform = _seeded(self.transform, sample_seed(self.seed, self.epoch, index))
        return _decode(self.paths[index], index, label, transform, self.max_pixels)


def _seeded(transform: Callable, seed: int) -> Callable:
    def apply(image):
        with torch.random.fork_rng(devices=[]):  # leave the caller's random stream untouched
            torch.manual_seed(seed)
            return transform(image)

    return apply


class StreamingImageDataset(IterableDataset):
    """Images from an iterator of paths (e.g. stdin), decoded in order; for single-process loading."""

    def __init__(self, paths: Iterable[ImageItem], transform: Callable, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = paths
        self.transform = transform
        self.max_pixels = max_pixels

    def __iter__(self):
        for index, path in enumerate(self.paths):
            yield _decode(path, index, -1, self.transform, self.max_pixels)


def _decode(item: ImageItem, index: int, label: int, transform: Callable, max_pixels: int):
    path = item if isinstance(item, Path) else item.path
    try:
        image = load_image(path, max_pixels=max_pixels, data=_bytes_of(item))
        return transform(image), label, index, str(path), None
    except UnreadableImageError as exc:
        return None, label, index, str(path), exc.reason
    except Exception as exc:  # a transform failing on one odd image must not end the run either
        return None, label, index, str(path), f"{type(exc).__name__}: {exc}"


def open_item(item: ImageItem, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The decoded RGB image of one item (raises UnreadableImageError as `load_image` does)."""
    return load_image(item if isinstance(item, Path) else item.path, max_pixels=max_pixels, data=_bytes_of(item))


def _bytes_of(item: ImageItem) -> io.BytesIO | None:
    """The in-memory bytes of a shard member (None for a file, which `load_image` opens itself)."""
    if isinstance(item, ImageBytes):
        return io.BytesIO(item.data)
    if isinstance(item, LabelledImage) and item.span is not None:
        try:
            return io.BytesIO(item.span.read())
        except OSError as exc:
            raise UnreadableImageError(item.path, f"cannot read from its shard ({exc.strerror or exc})") from None
    return None


def collate(items) -> Batch:
    good = [it for it in items if it[0] is not None]
    return Batch(
        pixels=torch.stack([it[0] for it in good]) if good else torch.empty(0),
        labels=torch.tensor([it[1] for it in good], dtype=torch.long),
        indices=torch.tensor([it[2] for it in good], dtype=torch.long),
        paths=[it[3] for it in good],
        skipped=[SkippedImage(it[2], it[3], it[4]) for it in items if it[0] is None],
    )


def default_workers() -> int:
    """Decoding workers: leave one core for the model; none on a 1-2 core machine, where the extra
    process costs more than it saves for small batches."""
    cpus = os.cpu_count() or 1
    return 0 if cpus <= 2 else min(8, cpus - 1)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int = 1,
    shuffle: bool = False,
    seed: int = 0,
    workers: int | None = None,
    pin_memory: bool = False,
    batch_sampler=None,
) -> DataLoader:
    """A DataLoader whose order depends only on `seed`, or on an explicit `batch_sampler` (lists of
    dataset indices)."""
    workers = default_workers() if workers is None else workers
    if isinstance(dataset, IterableDataset):
        workers = 0  # a path stream has one reader; several would duplicate it
    generator = torch.Generator()
    generator.manual_seed(seed)
    if batch_sampler is not None:
        return DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=workers, collate_fn=collate, pin_memory=pin_memory
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        collate_fn=collate,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
    )
