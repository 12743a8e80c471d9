"""The comparison protocol: which images every method of one comparison trains, validates and is
tested on (the rules are in adaclip.comparison's docstring), and the check that a folder has enough."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..data import (
    FEW_SHOT_VAL_PER_CLASS,
    ImageFolder,
    LabelledImage,
    TrainingData,
    check_val_split,
    holdout_count,
    read_sets,
    split_training_pool,
    stratified_holdout,
)
from ..errors import InputError, UsageError

TEST_FRACTION = 0.2  # without test/: held out per class for testing
TEST_SPLIT_SEED = 20_240_601  # the test hold-out does not move with the run seeds


@dataclass
class Protocol:
    """The images every method of one comparison trains, validates and is tested on."""

    root: Path
    folders: list[str]  # every class folder (base classes first under base-to-new)
    class_names: list[str]
    pool: list[LabelledImage]  # training pool, less the test hold-out (labels index `folders`)
    val_folder: list[LabelledImage] | None  # from val/, when present
    test: list[LabelledImage]
    test_source: str
    shots: int | None
    val_split: float | str = "auto"
    n_base: int = 0  # classes trained on: all, or the base classes under base-to-new
    base_to_new: bool = False
    _training: dict[int, TrainingData] = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "data": str(self.root),
            "classes": len(self.folders),
            "base_classes": self.folders[: self.n_base] if self.base_to_new else None,
            "shots": self.shots,
            "training_pool": len(self.pool),
            "validation": self.val_source,
            "test": self.test_source,
            "test_images": len(self.test),
            "base_to_new": self.base_to_new,
        }

    @property
    def val_source(self) -> str:
        return self.training_data(0).val_source  # the rule's own words; the same for every seed

    def training_data(self, seed: int) -> TrainingData:
        """Training and validation images for one seed (base classes only under base-to-new), chosen by
        the product's split rule, so `compare` and `fit --shots K --seed s` train on the same images."""
        if seed not in self._training:
            n = self.n_base
            folder = ImageFolder(self.root, self.folders[:n], self.class_names[:n], [])
            pool = [im for im in self.pool if im.label < n]
            val = None if self.val_folder is None else [im for im in self.val_folder if im.label < n]
            self._training[seed] = split_training_pool(
                folder, pool, val, shots=self.shots, seed=seed, val_split=self.val_split
            )
        return self._training[seed]


def _sorted(images: Sequence[LabelledImage]) -> list[LabelledImage]:
    return sorted(images, key=lambda im: (im.label, str(im.path)))


def make_protocol(
    data: str | Path,
    *,
    shots: int | None = None,
    classes: str | Path | None = None,
    base_to_new: bool | Sequence[str] = False,
    val_split: float | str = "auto",
    test_fraction: float = TEST_FRACTION,
) -> Protocol:
    """Index the folder and fix the splits; too few images per class is an error naming how many."""
    if shots is not None and shots < 1:
        raise InputError(f"--shots must be at least 1, got {shots}")
    val_split = check_val_split(val_split)
    if not 0 < test_fraction < 1:
        raise UsageError(f"test_fraction must be in (0, 1), got {test_fraction}")
    sets = read_sets(data, classes)
    train_folder = sets.train
    n_classes = len(train_folder.folders)
    if n_classes < 2 or (base_to_new and n_classes < 4):
        need = 4 if base_to_new else 2
        raise InputError(
            f"found {n_classes} class(es); {'base-to-new ' if base_to_new else ''}compare needs at least {need}",
            path=train_folder.root,
        )
    val_folder = list(sets.val.images) if sets.val is not None else None
    test_folder = list(sets.test.images) if sets.test is not None else None
    _check_enough_images(train_folder, shots, val_split, has_val=val_folder is not None, carved_test=not test_folder)
    pool = list(train_folder.images)
    if test_folder is not None:
        test, test_source = test_folder, "test/ folder"
    else:
        pool, test = stratified_holdout(pool, test_fraction, TEST_SPLIT_SEED, n_classes)
        test_source = f"{test_fraction:.0%} of each class held out, the same for every seed and method"
    folders, names = train_folder.folders, train_folder.class_names
    n_base = n_classes
    if base_to_new:
        base = list(folders[: math.ceil(n_classes / 2)]) if base_to_new is True else list(base_to_new)
        unknown = [f for f in base if f not in folders]
        if unknown or not 0 < len(set(base)) < n_classes:
            raise UsageError(
                f"base classes must be some, not all, of the class folders (unknown: {unknown[:5]})",
                fix=f"e.g. {list(folders[: n_classes // 2])}",
            )
        # base classes first: a label below n_base is a base class
        order = [folders.index(f) for f in base] + [i for i, f in enumerate(folders) if f not in base]
        new_label = {old: new for new, old in enumerate(order)}
        folders, names = [folders[i] for i in order], [names[i] for i in order]
        pool, test = _relabel(pool, new_label), _relabel(test, new_label)
        val_folder = None if val_folder is None else _relabel(val_folder, new_label)
        n_base = len(base)
    return Protocol(
        root=train_folder.root,
        folders=list(folders),
        class_names=list(names),
        pool=pool,
        val_folder=val_folder,
        test=_sorted(test),
        test_source=test_source,
        shots=shots,
        val_split=val_split,
        n_base=n_base,
        base_to_new=bool(base_to_new),
    )


def _relabel(images: list[LabelledImage], new_label: dict[int, int]) -> list[LabelledImage]:
    return [replace(im, label=new_label[im.label]) for im in images]


def images_needed(shots: int | None, val_split: float | str, *, has_val: bool, carved_test: bool) -> tuple[int, str]:
    """(images per class the training folder needs, how they add up): shots (or 1) to train, validation
    images (CoOp's min(shots, 4) with shots, else 1) unless val/ exists or validation is off, and with
    no test/ enough that the fixed hold-out takes at least one."""
    parts = [f"{shots} to train" if shots else "1 to train"]
    n_val = 0
    if not has_val and val_split != 0:
        n_val = min(shots, FEW_SHOT_VAL_PER_CLASS) if shots and val_split == "auto" else 1
        parts.append(f"{n_val} for validation")
    need = (shots or 1) + n_val
    if not carved_test:
        return need, " + ".join(parts)
    total = need + 1
    while total - _held_out(total) < need:  # the smallest folder that leaves `need` after the hold-out
        total += 1
    parts.append(f"{_held_out(total)} held out for testing (no test/ folder)")
    return total, " + ".join(parts)


def _held_out(n: int) -> int:
    """How many of a class's n images the test hold-out (stratified_holdout at TEST_FRACTION) takes."""
    return holdout_count(n, TEST_FRACTION)


def _check_enough_images(folder: ImageFolder, shots, val_split, *, has_val: bool, carved_test: bool) -> None:
    need, how = images_needed(shots, val_split, has_val=has_val, carved_test=carved_test)
    counts = [len(group) for group in folder.per_class()]
    short = [(f, c) for f, c in zip(folder.folders, counts, strict=True) if c < need]
    if short:
        listed = ", ".join(f"{f!r} has {c}" for f, c in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise InputError(
            f"too few images per class: compare needs {need} per class ({how}); {listed}{more}",
            path=folder.root,
            fix="add images" + (" or lower --shots" if shots else "") + ("" if carved_test else " to train/"),
        )
