"""What DATA is, decided in one place, and the labelled sets every command reads from it.

DATA may be

- a folder of class folders, optionally split into train/ val/ test/ (`folders`);
- a manifest file, `.csv` or `.jsonl`, of paths and labels, optionally with a split column (`manifest`);
- a Hugging Face imagefolder: a folder with `metadata.csv` / `metadata.jsonl`, or whose train/ val/
  test/ folders each have one (`manifest`);
- WebDataset tar shards: `shards-{000000..000009}.tar`, or one `.tar` (`shards`).

Each becomes the same `ImageFolder` of `LabelledImage`s, so fit, eval, compare and tta need not know
which kind they were given. Options that only some kinds use (column names, `allow_absolute`) travel
with the `DataSource`, which is path-like, so code that only shows or compares DATA's path keeps
working.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..errors import InputError, UnreadableImageError
from ..images import DEFAULT_MAX_PIXELS, load_image
from .folders import _check_same_classes, _visible_subdirs, find_splits, list_images, read_image_folder
from .loading import ImageBytes
from .manifest import hf_metadata_file, iter_manifest_paths, read_manifest
from .records import SPLIT_NAMES, ImageFolder, LabelledImage, TrainingData
from .sampling import check_val_split, split_training_pool
from .shards import is_shard_spec, iter_shard_images, read_shards

Kind = Literal["folder", "manifest", "shards"]
MANIFEST_SUFFIXES = (".csv", ".jsonl")


@dataclass(frozen=True)
class DataSource:
    """DATA as the user named it, what kind it is, and how to read it."""

    spec: str
    kind: Kind
    path_column: str | None = None
    label_column: str | None = None
    allow_absolute: bool = False

    def __fspath__(self) -> str:
        return self.spec

    def __str__(self) -> str:
        return self.spec

    @property
    def stem(self) -> str:
        """A short name for files made from DATA (`fit`'s default adapter name): the folder's name, the
        manifest's name without its suffix, the shard pattern up to its first brace or number range."""
        path = Path(self.spec)
        if self.kind == "shards":
            name = Path(self.spec.split("::")[0]).name.split("{")[0].split("*")[0]
            for suffix in (".tar.gz", ".tgz", ".tar"):
                name = name.removesuffix(suffix)
            return name.rstrip("-_.") or "shards"
        if self.kind == "manifest" and not path.is_dir():
            return path.stem if path.name not in ("metadata.csv", "metadata.jsonl") else path.resolve().parent.name
        return path.resolve().name or "data"


def open_data(
    data: str | os.PathLike,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    allow_absolute: bool = False,
) -> DataSource:
    """Decide what `data` is (see the module docstring); nothing is read yet but the file system's
    answer to "is this a folder / a file"."""
    if isinstance(data, DataSource):
        return data
    spec = os.fspath(data)
    path = Path(spec)
    if path.is_dir():
        kind: Kind = "manifest" if _hf_metadata(path) else "folder"
    elif path.suffix.lower() in MANIFEST_SUFFIXES and (path.is_file() or not is_shard_spec(spec)):
        kind = "manifest"
    elif is_shard_spec(spec):
        kind = "shards"
    else:
        kind = "folder"  # read_image_folder says what is wrong with it
    return DataSource(spec, kind, path_column, label_column, allow_absolute)


def _hf_metadata(folder: Path) -> bool:
    if hf_metadata_file(folder) is not None:
        return True
    subdirs = [d for d in _visible_subdirs(folder) if d.name in SPLIT_NAMES]
    return bool(subdirs) and all(hf_metadata_file(d) is not None for d in subdirs)


@dataclass
class LabelledSets:
    """The labelled sets of one DATA: training images, and val/test when DATA holds them apart."""

    train: ImageFolder
    val: ImageFolder | None = None
    test: ImageFolder | None = None
    notes: list[str] = field(default_factory=list)
    split: bool = False  # DATA is split (folders or a split column), even if only train is present


def read_sets(data, classes_file: str | Path | None = None, *, test: bool = True) -> LabelledSets:
    """Index DATA's labelled sets (no image opened). With splits, train must be among them; val/test
    share train's classes. `test=False` leaves a test split unread (fit never looks at it)."""
    source = open_data(data)
    if source.kind == "shards":
        return LabelledSets(read_shards(source.spec, label_column=source.label_column, classes_file=classes_file))
    if source.kind == "manifest":
        return _manifest_sets(source, classes_file)
    root = Path(source.spec)
    splits = find_splits(root)
    if not splits:
        return LabelledSets(read_image_folder(root, classes_file))
    if "train" not in splits:
        raise InputError("split folders found but no train/", path=root, fix="add root/train/<class>/<image>")
    notes = []
    others = [d.name for d in _visible_subdirs(root) if d.name not in splits]
    if others:
        notes.append(f"not a split, not used for training: {', '.join(others[:5])}")
    train = read_image_folder(splits["train"], classes_file)
    sets = LabelledSets(train, notes=notes, split=True)
    for name in ("val", "test") if test else ("val",):
        if name in splits:
            other = read_image_folder(splits[name], classes_file)
            _check_same_classes(train, other)
            setattr(sets, name, other)
    return sets


def _manifest_sets(source: DataSource, classes_file) -> LabelledSets:
    options = {
        "path_column": source.path_column,
        "label_column": source.label_column,
        "allow_absolute": source.allow_absolute,
        "classes_file": classes_file,
    }
    path = Path(source.spec)
    if path.is_dir() and hf_metadata_file(path) is None:  # a Hugging Face imagefolder split per folder
        split_sets = {
            d.name: read_manifest(hf_metadata_file(d), **options).labelled_set(None)
            for d in _visible_subdirs(path)
            if d.name in SPLIT_NAMES
        }
        if "train" not in split_sets:
            raise InputError("split folders found but no train/", path=path, fix="add train/metadata.csv")
        for other in split_sets.values():
            _check_same_classes(split_sets["train"], other)
        return LabelledSets(split_sets["train"], split_sets.get("val"), split_sets.get("test"), split=True)
    manifest = read_manifest(hf_metadata_file(path) if path.is_dir() else path, **options)
    if None in manifest.by_split:  # no split column: one labelled set
        return LabelledSets(manifest.labelled_set(None))
    if not manifest.by_split.get("train"):
        raise InputError("manifest has a split column but no train rows", path=manifest.path)
    return LabelledSets(
        manifest.labelled_set("train"),
        manifest.labelled_set("val") if manifest.by_split.get("val") else None,
        manifest.labelled_set("test") if manifest.by_split.get("test") else None,
        split=True,
    )


def prepare_training_data(
    root,
    *,
    classes_file: str | Path | None = None,
    shots: int | None = None,
    seed: int = 0,
    val_split: float | Literal["auto"] = "auto",
) -> TrainingData:
    """Choose training and validation images for `fit`.

    Validation comes from a val split when DATA has one. Otherwise `val_split` decides: a fraction is
    held out per class before few-shot sampling; `auto` validates few-shot runs on min(shots, 4)
    images per class that were not sampled (`few_shot_validation`, CoOp's convention) and full-data
    runs on a 10% hold-out per class; 0 disables validation.
    """
    val_split = check_val_split(val_split)
    sets = read_sets(root, classes_file, test=False)
    train_folder = sets.train
    n_classes = len(train_folder.folders)
    if n_classes < 2:
        raise InputError(
            f"found only 1 class ({train_folder.folders[0]!r}); classification needs at least 2",
            path=train_folder.shown,
            fix="add a folder per class",
        )
    if shots is not None and shots < 1:
        raise InputError(f"--shots must be at least 1, got {shots}")
    val_images = list(sets.val.images) if sets.val is not None else None
    return split_training_pool(
        train_folder,
        list(train_folder.images),
        val_images,
        shots=shots,
        seed=seed,
        val_split=val_split,
        notes=sets.notes,
    )


def prepare_eval_data(root, classes_file: str | Path | None = None) -> ImageFolder:
    """The labelled set `eval` scores: the test split if DATA has splits (else val), or all of DATA."""
    source = open_data(root)
    if source.kind == "folder":
        splits = find_splits(Path(source.spec))
        for name in ("test", "val"):
            if name in splits:
                return read_image_folder(splits[name], classes_file)
        if splits:
            raise InputError("folder has only a train/ split; nothing held out to evaluate", path=source.spec)
        return read_image_folder(source.spec, classes_file)
    sets = read_sets(source, classes_file)
    if sets.test is not None or sets.val is not None:
        return sets.test or sets.val
    if sets.split:
        raise InputError("the data has only train rows; nothing held out to evaluate", path=source.spec)
    return sets.train


def check_classes_readable(data: TrainingData, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse, before any training, a class whose training images are all unreadable: it would train
    as a class without examples. Decodes images of each class only until one works (usually one)."""
    from .loading import _bytes_of

    groups: list[list[LabelledImage]] = [[] for _ in data.folders]
    for image in data.train:
        groups[image.label].append(image)
    for folder, images in zip(data.folders, groups, strict=True):
        reasons = []
        for image in images:
            try:
                item = image if image.span is not None else image.path
                load_image(image.path, max_pixels=max_pixels, data=_bytes_of(item))
                break
            except UnreadableImageError as exc:
                reasons.append(exc.reason)
        else:
            if images:
                raise InputError(
                    f"class {folder!r} has no readable training images (all {len(images)} are unreadable; "
                    f"first: {reasons[0]})",
                    path=data.source or data.root,
                    fix="replace or remove the broken files",
                )


def labelled_items(data) -> list[tuple[Path | LabelledImage, str]]:
    """Every image of a manifest or of shards with its class key, in DATA's order (for `tta`, which
    adapts on all of them and may score with their labels): a file's Path, or a shard member's record."""
    source = open_data(data)
    sets = read_sets(source, test=True)
    out = []
    for labelled in (sets.train, sets.val, sets.test):
        if labelled is not None:
            out.extend((im if im.span is not None else im.path, labelled.folders[im.label]) for im in labelled.images)
    return out


# --------------------------------------------------------------------------------------- prediction inputs


def iter_input_paths(
    specs: Sequence[str],
    stdin: Iterable[str] | None = None,
    *,
    path_column: str | None = None,
    allow_absolute: bool = False,
) -> Iterator[Path | ImageBytes]:
    """Expand predict arguments lazily: files, folders (recursive, sorted), globs, `-` (one path per
    line on stdin, streamed), manifests (their paths) and tar shards (their images, streamed).
    Missing paths raise InputError before anything is yielded for them."""
    for spec in specs:
        if spec == "-":
            for line in stdin if stdin is not None else sys.stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield Path(line)
            continue
        path = Path(spec)
        kind = open_data(spec).kind
        if kind == "manifest" and path.is_file():
            yield from iter_manifest_paths(path, path_column=path_column, allow_absolute=allow_absolute)
        elif kind == "shards" and not path.is_dir():
            yield from iter_shard_images(spec)
        elif path.is_dir():
            yield from list_images(path)
        elif path.exists() or path.is_symlink():
            yield path
        elif glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError("pattern matched no files", path=spec)
            for match in matches:
                match_path = Path(match)
                if match_path.is_dir():
                    yield from list_images(match_path)
                else:
                    yield match_path
        else:
            raise InputError("no such file or folder", path=spec)
