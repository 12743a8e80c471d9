"""Choosing images: few-shot samples, per-class hold-outs, validation sets, and the digest that
records exactly which files a run used. Works on `LabelledImage` lists, whatever the data's kind."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

from ..errors import InputError
from .records import ImageFolder, LabelledImage, TrainingData, record_name, relative_name


def few_shot_sample(images: Sequence[LabelledImage], shots: int, seed: int, n_classes: int) -> list[LabelledImage]:
    """Up to `shots` images per class, chosen by `seed` from the sorted file list; output sorted."""
    groups: list[list[LabelledImage]] = [[] for _ in range(n_classes)]
    for image in images:
        groups[image.label].append(image)
    rng = random.Random(seed)
    chosen: list[LabelledImage] = []
    for group in groups:
        group = sorted(group, key=lambda im: im.name)
        chosen.extend(group if len(group) <= shots else rng.sample(group, shots))
    return sorted(chosen, key=lambda im: (im.label, im.name))


def holdout_count(n: int, fraction: float) -> int:
    """How many of a class's n images a `fraction` hold-out takes: round(fraction * n), at least 1 when
    the class has 2+ images."""
    held = round(fraction * n)
    return 1 if fraction > 0 and held == 0 and n >= 2 else held


def stratified_holdout(
    images: Sequence[LabelledImage], fraction: float, seed: int, n_classes: int
) -> tuple[list[LabelledImage], list[LabelledImage]]:
    """Split each class: round(fraction * n) images (at least 1 if the class has 2+) are held out."""
    groups: list[list[LabelledImage]] = [[] for _ in range(n_classes)]
    for image in images:
        groups[image.label].append(image)
    rng = random.Random(seed + 7919)  # a different stream from few-shot sampling under the same seed
    keep: list[LabelledImage] = []
    held: list[LabelledImage] = []
    for group in groups:
        group = sorted(group, key=lambda im: im.name)
        n_held = holdout_count(len(group), fraction)
        held_set = set(rng.sample(range(len(group)), n_held)) if n_held else set()
        for i, image in enumerate(group):
            (held if i in held_set else keep).append(image)
    return keep, held


FEW_SHOT_VAL_PER_CLASS = 4


def few_shot_validation(rest: Sequence[LabelledImage], shots: int, seed: int, n_classes: int) -> list[LabelledImage]:
    """The validation images of a few-shot run (CoOp's convention): min(shots, 4) per class, chosen by
    `seed` from the training images that were not sampled as shots, so a K-shot run sees K + min(K, 4)
    labelled images per class and nothing from the test set. `prepare_training_data` applies it with
    `val_split="auto"`; benchmarks and `compare` use it through there."""
    per_class = min(shots, FEW_SHOT_VAL_PER_CLASS)
    # a stream of its own: the shots sampled under `seed` do not change
    return few_shot_sample(rest, per_class, seed + 104_729, n_classes)


def files_digest(images: Iterable[LabelledImage], root: Path) -> str:
    """sha256 over the sorted (relative path, label) pairs: identifies exactly which files were used."""
    digest = hashlib.sha256()
    for rel, label in sorted((relative_name(im.path, root), im.label) for im in images):
        digest.update(f"{label}\t{rel}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def check_val_split(val_split: float | str) -> float | Literal["auto"]:
    if val_split == "auto":
        return "auto"
    try:
        value = float(val_split)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value < 1:  # NaN fails too
        raise InputError(f"--val-split must be 'auto' or a fraction in [0, 1), got {val_split!r}")
    return value


def split_training_pool(
    train_folder: ImageFolder,
    pool: list[LabelledImage],
    val_images: list[LabelledImage] | None,
    *,
    shots: int | None,
    seed: int,
    val_split: float | Literal["auto"] = "auto",
    notes: list[str] | None = None,
) -> TrainingData:
    """Training and validation images from a training pool (`fit`'s rule, which `compare` shares).

    `pool` is the folder's training images (`compare` first removes its test hold-out); `val_images`
    those of a `val/` folder, if any, which then is the validation set.
    """
    val_split = check_val_split(val_split)
    notes = list(notes or [])
    n_classes = len(train_folder.folders)
    val: list[LabelledImage] = []
    val_source = "none"
    if val_images is not None:
        val, val_source = list(val_images), "val/ folder"
    elif val_split != "auto" and float(val_split) > 0:
        if not 0 < float(val_split) < 1:
            raise InputError(f"--val-split must be in [0, 1), got {val_split}")
        pool, val = stratified_holdout(pool, float(val_split), seed, n_classes)
        val_source = f"{float(val_split):.0%} held out per class"
    elif val_split == "auto" and shots is None:
        pool, val = stratified_holdout(pool, 0.1, seed, n_classes)
        val_source = "10% held out per class"

    train = few_shot_sample(pool, shots, seed, n_classes) if shots else sorted(pool, key=lambda im: (im.label, im.name))
    if val_split == "auto" and shots is not None and val_images is None:
        chosen = {im.name for im in train}
        val = few_shot_validation([im for im in pool if im.name not in chosen], shots, seed, n_classes)
        val_source = (
            f"min(shots, {FEW_SHOT_VAL_PER_CLASS}) per class not sampled as shots"
            if val
            else "none (every image was sampled as a shot)"
        )

    counts = [0] * n_classes
    for image in train:
        counts[image.label] += 1
    empty = [train_folder.folders[i] for i, c in enumerate(counts) if c == 0]
    if empty:
        notes.append(f"{len(empty)} class(es) have no training images: {', '.join(empty[:5])}")
    if shots:
        short = [train_folder.folders[i] for i, c in enumerate(counts) if 0 < c < shots]
        if short:
            notes.append(f"{len(short)} class(es) have fewer than {shots} images; all of theirs were used")
    return TrainingData(
        root=train_folder.root,
        folders=train_folder.folders,
        class_names=train_folder.class_names,
        train=train,
        val=val,
        shots=shots,
        seed=seed,
        val_source=val_source,
        sampled_files=[record_name(relative_name(im.path, train_folder.root)) for im in train] if shots else None,
        files_digest=files_digest(train, train_folder.root),
        notes=notes,
        source=train_folder.source,
    )
