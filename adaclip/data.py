"""Image folders: finding images and classes, splits, few-shot sampling, and batching.

Layout (the torchvision ImageFolder convention)::

    root/<class_folder>/<image>                       one labelled set
    root/{train,val,test}/<class_folder>/<image>      explicit splits (any subset of the three)

Classes are the sorted class-folder names; their display names turn `_` and `-` into spaces unless a
class file says otherwise. Folders are indexed by listing directories only: no image is opened until it
is batched, so a 100,000-image folder indexes in seconds, and unreadable files are skipped (and counted)
where they are decoded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from .checks import class_name_problem
from .errors import InputError, UnreadableImageError
from .files import IMAGE_EXTENSIONS, is_image_file, read_text_file
from .images import DEFAULT_MAX_PIXELS, load_image

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int


@dataclass
class ImageFolder:
    """The classes and images found under one folder (no image decoded yet)."""

    root: Path
    folders: list[str]
    class_names: list[str]
    images: list[LabelledImage]

    def per_class(self) -> list[list[LabelledImage]]:
        groups: list[list[LabelledImage]] = [[] for _ in self.folders]
        for image in self.images:
            groups[image.label].append(image)
        return groups


@dataclass
class TrainingData:
    """What `fit` trains and validates on, and how it was chosen (recorded in the adapter file)."""

    root: Path
    folders: list[str]
    class_names: list[str]
    train: list[LabelledImage]
    val: list[LabelledImage]
    shots: int | None
    seed: int
    val_source: str
    sampled_files: list[str] | None = None
    files_digest: str = ""
    notes: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        return {
            "root_name": record_name(self.root.name),
            "n_classes": len(self.folders),
            "n_train": len(self.train),
            "n_val": len(self.val),
            "shots": self.shots,
            "val_source": self.val_source,
            "files_digest": self.files_digest,
            "files": self.sampled_files,
        }


# --------------------------------------------------------------------------------------- class folders


def class_name_from_folder(folder: str) -> str:
    """`golden_retriever` -> `golden retriever`; `t-shirt` -> `t shirt`. Bytes that are not UTF-8 show as
    `\\xNN` (a display name need not round-trip; the recorded folder name does)."""
    shown = folder.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return " ".join(shown.replace("_", " ").replace("-", " ").split())


def record_name(name: str) -> str:
    """A file or folder name as adaclip records it (adapter files are UTF-8 JSON): unchanged when it is
    valid UTF-8 without backslashes; otherwise each byte that is not UTF-8 (a surrogateescape
    character) becomes `\\xNN` and a backslash `\\\\`, so the record always encodes and maps back to
    exactly one name (`name_from_record`)."""
    if "\\" not in name and not _has_surrogates(name):
        return name
    return "".join(
        "\\\\" if c == "\\" else f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c for c in name
    )


def name_from_record(recorded: str) -> str:
    """The inverse of `record_name`: the name as the file system gives it (surrogateescape)."""
    if "\\" not in recorded:
        return recorded
    out, i = [], 0
    while i < len(recorded):
        if recorded.startswith("\\\\", i):
            out.append("\\")
            i += 2
        elif recorded.startswith("\\x", i) and i + 4 <= len(recorded):
            out.append(chr(0xDC00 + int(recorded[i + 2 : i + 4], 16)))
            i += 4
        else:
            out.append(recorded[i])
            i += 1
    return "".join(out)


def path_from_record(root: str | Path, recorded: str) -> Path:
    """The file a recorded relative path (e.g. from an adapter's `data.files`) names under `root`."""
    return Path(root, name_from_record(recorded))


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _visible_subdirs(path: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        raise InputError(f"cannot list folder ({exc.strerror or exc})", path=path) from None
    return [Path(e.path) for e in entries if not e.name.startswith(".") and _is_dir(e)]


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symlinks to directories
    except OSError:
        return False


def list_images(folder: Path) -> list[Path]:
    """All visible image files under `folder`, recursively, sorted; symlink loops cannot recurse forever."""
    return _walk_images([Path(folder)])[0]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _walk_images(roots: list[Path], dataset_root: Path | None = None) -> list[list[Path]]:
    """Image files under each of `roots` (the class folders of one dataset), as one guarded walk.

    Per dataset, by real path: a directory symlink to a folder of the dataset (another class, or a
    parent: a loop) is not followed, since that content is walked where it really is; one to a folder
    outside is followed once. An image reached twice (a file symlink, two links to one folder) is
    listed once, under the class folder it really lies in, by the path it has there when possible.
    Files that are not regular (FIFOs, devices) are listed and then refused unopened by the decoder,
    so they are skipped and counted like any unreadable image.
    """
    real_roots = [os.path.realpath(r) for r in roots]
    territory = real_roots + ([os.path.realpath(dataset_root)] if dataset_root is not None else [])
    found: dict[str, tuple[Path, int, bool]] = {}  # real path -> (path as reached, root index, reached natively)
    visited: set[str] = set()
    visited_ids: set[tuple[int, int]] = set()

    def owner(real: str, default: int) -> int:
        inside = [(len(r), i) for i, r in enumerate(real_roots) if _within(real, r)]
        return max(inside)[1] if inside else default

    def add(real: str, path: Path, index: int, native: bool) -> None:
        if real not in found or (native and not found[real][2]):
            found[real] = (path, owner(real, index), native)

    def walk(directory: Path, real_dir: str, index: int) -> None:
        try:
            info = os.stat(directory)
        except OSError:
            return
        if real_dir in visited or (info.st_dev, info.st_ino) in visited_ids:
            return
        visited.add(real_dir)
        visited_ids.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                link = entry.is_symlink()
            except OSError:
                continue
            if link:
                real = os.path.realpath(entry.path)
                if _is_dir(entry):
                    if not any(_within(t, real) or _within(real, t) for t in territory):
                        walk(path, real, index)  # outside the dataset: followed (once)
                elif is_image_file(path):
                    add(real, path, index, native=False)
            elif _is_dir(entry):
                walk(path, os.path.join(real_dir, entry.name), index)
            elif is_image_file(path):
                add(os.path.join(real_dir, entry.name), path, index, native=True)

    for index, (root, real_root) in enumerate(zip(roots, real_roots, strict=True)):
        walk(root, real_root, index)
    groups: list[list[Path]] = [[] for _ in roots]
    for path, index, _ in found.values():
        groups[index].append(path)
    return groups


def read_class_file(path: str | Path, folders: Sequence[str]) -> list[str]:
    """Display names for `folders` from a file: one name per line (folder order), a JSON list (folder
    order), or a JSON object {folder: name}."""
    path = Path(path)
    text = read_text_file(path, "class file")
    stripped = text.strip()
    names: list[str]
    if stripped.startswith(("[", "{")):
        try:
            parsed = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise InputError(f"class file is not valid JSON ({exc.msg}, line {exc.lineno})", path=path) from None
        if isinstance(parsed, dict):
            unknown = sorted(set(parsed) - set(folders))
            if unknown:
                raise InputError(
                    f"class file names folders that do not exist: {', '.join(map(repr, unknown[:5]))}",
                    path=path,
                    fix=f"keys must be class folder names, e.g. {folders[0]!r}",
                )
            names = [parsed.get(folder, class_name_from_folder(folder)) for folder in folders]
        elif isinstance(parsed, list):
            names = parsed
        else:
            raise InputError("class file JSON must be a list or an object", path=path)
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != len(folders):
        raise InputError(
            f"class file has {len(names)} names but the data has {len(folders)} class folders",
            path=path,
            fix="give one name per class folder, in sorted folder order, or a JSON {folder: name} object",
        )
    return check_class_names(names, path)


def check_class_names(names: list, source: str | Path, fix: str | None = None) -> list[str]:
    """`names` when they can label predictions; InputError naming `source` otherwise."""
    problem = class_name_problem(names)
    if problem:
        raise InputError(problem, path=source, fix=fix or "give each class one distinct, non-empty name")
    try:
        for name in names:
            name.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("a class name is not valid UTF-8 text (an undecodable byte)", path=source) from None
    return names


def read_name_list(path: Path) -> list[str]:
    """Class names from a file: one per line, or a JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read class file ({getattr(exc, 'strerror', None) or exc})", path=path) from None
    if text.lstrip().startswith("["):
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"class file is not valid JSON ({exc.msg})", path=path) from None
        if not isinstance(names, list):
            raise InputError("class file JSON must be a list of names", path=path)
        return check_class_names(names, path)
    return check_class_names([line.strip() for line in text.splitlines() if line.strip()], path)


def read_image_folder(root: str | Path, classes_file: str | Path | None = None) -> ImageFolder:
    """Index `root/<class>/<image>` without opening any image."""
    root = Path(root)
    if not root.exists():
        raise InputError("data folder not found", path=root)
    if not root.is_dir():
        raise InputError(
            "data path is not a folder", path=root, fix="point at a folder laid out as root/<class>/<image>"
        )
    class_dirs = _visible_subdirs(root)
    if not class_dirs:
        loose = [p for p in root.iterdir() if is_image_file(p)]
        fix = (
            "images must sit in one sub-folder per class: root/<class>/<image>"
            if loose
            else "expected root/<class>/<image>"
        )
        raise InputError("no class folders found", path=root, fix=fix)
    folders = [record_name(d.name) for d in class_dirs]
    images: list[LabelledImage] = []
    for label, paths in enumerate(_walk_images(class_dirs, root)):
        images.extend(LabelledImage(path, label) for path in paths)
    if not images:
        raise InputError(
            "no images found", path=root, fix=f"supported extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    if classes_file:
        names = read_class_file(classes_file, folders)
    else:
        names = check_class_names(
            [class_name_from_folder(d.name) for d in class_dirs],
            root,
            fix="rename the class folders, or give display names with --classes",
        )
    return ImageFolder(root=root, folders=folders, class_names=names, images=images)


def find_splits(root: str | Path) -> dict[str, Path]:
    """{split: path} for the sub-folders train/, val/, test/ of `root` that hold class sub-folders.

    A split holds folders; a class folder holds images. So `root/train/cat/x.jpg` is a split while
    `root/train/x.jpg` is a class called "train". Other sub-folders next to the splits (e.g. an
    unlabeled `shifted/` for tta) are not part of any split.
    """
    root = Path(root)
    if not root.is_dir():
        return {}
    splits = {}
    for sub in _visible_subdirs(root):
        if sub.name in SPLIT_NAMES and _visible_subdirs(sub):
            splits[sub.name] = sub
    return splits


def _check_same_classes(reference: ImageFolder, other: ImageFolder) -> None:
    if other.folders != reference.folders:
        missing = sorted(set(reference.folders) - set(other.folders))
        extra = sorted(set(other.folders) - set(reference.folders))
        raise InputError(
            f"class folders differ between splits (missing: {missing[:5]}, extra: {extra[:5]})",
            path=other.root,
            fix="every split must have the same class folders",
        )


# --------------------------------------------------------------------------------------- sampling


def few_shot_sample(images: Sequence[LabelledImage], shots: int, seed: int, n_classes: int) -> list[LabelledImage]:
    """Up to `shots` images per class, chosen by `seed` from the sorted file list; output sorted."""
    groups: list[list[LabelledImage]] = [[] for _ in range(n_classes)]
    for image in images:
        groups[image.label].append(image)
    rng = random.Random(seed)
    chosen: list[LabelledImage] = []
    for group in groups:
        group = sorted(group, key=lambda im: str(im.path))
        chosen.extend(group if len(group) <= shots else rng.sample(group, shots))
    return sorted(chosen, key=lambda im: (im.label, str(im.path)))


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
        group = sorted(group, key=lambda im: str(im.path))
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
    for rel, label in sorted((_relative(im.path, root), im.label) for im in images):
        digest.update(f"{label}\t{rel}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


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


def check_classes_readable(data: TrainingData, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse, before any training, a class whose training images are all unreadable: it would train
    as a class without examples. Decodes images of each class only until one works (usually one)."""
    groups: list[list[LabelledImage]] = [[] for _ in data.folders]
    for image in data.train:
        groups[image.label].append(image)
    for folder, images in zip(data.folders, groups, strict=True):
        reasons = []
        for image in images:
            try:
                load_image(image.path, max_pixels=max_pixels)
                break
            except UnreadableImageError as exc:
                reasons.append(exc.reason)
        else:
            if images:
                raise InputError(
                    f"class {folder!r} has no readable training images (all {len(images)} are unreadable; "
                    f"first: {reasons[0]})",
                    path=data.root,
                    fix="replace or remove the broken files",
                )


def prepare_training_data(
    root: str | Path,
    *,
    classes_file: str | Path | None = None,
    shots: int | None = None,
    seed: int = 0,
    val_split: float | Literal["auto"] = "auto",
) -> TrainingData:
    """Choose training and validation images for `fit`.

    Validation comes from `val/` when present. Otherwise `val_split` decides: a fraction is held out per
    class before few-shot sampling; `auto` validates few-shot runs on min(shots, 4) images per class that
    were not sampled (`few_shot_validation`, CoOp's convention) and full-data runs on a 10% hold-out per
    class; 0 disables validation.
    """
    root = Path(root)
    val_split = check_val_split(val_split)
    splits = find_splits(root)
    notes: list[str] = []
    if splits:
        if "train" not in splits:
            raise InputError("split folders found but no train/", path=root, fix="add root/train/<class>/<image>")
        others = [d.name for d in _visible_subdirs(root) if d.name not in splits]
        if others:
            notes.append(f"not a split, not used for training: {', '.join(others[:5])}")
        train_folder = read_image_folder(splits["train"], classes_file)
    else:
        train_folder = read_image_folder(root, classes_file)
    n_classes = len(train_folder.folders)
    if n_classes < 2:
        raise InputError(
            f"found only 1 class ({train_folder.folders[0]!r}); classification needs at least 2",
            path=train_folder.root,
            fix="add a folder per class",
        )
    if shots is not None and shots < 1:
        raise InputError(f"--shots must be at least 1, got {shots}")
    val_images = None
    if splits and "val" in splits:
        val_folder = read_image_folder(splits["val"], classes_file)
        _check_same_classes(train_folder, val_folder)
        val_images = list(val_folder.images)
    return split_training_pool(
        train_folder, list(train_folder.images), val_images, shots=shots, seed=seed, val_split=val_split, notes=notes
    )


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

    train = (
        few_shot_sample(pool, shots, seed, n_classes)
        if shots
        else sorted(pool, key=lambda im: (im.label, str(im.path)))
    )
    if val_split == "auto" and shots is not None and val_images is None:
        chosen = {im.path for im in train}
        val = few_shot_validation([im for im in pool if im.path not in chosen], shots, seed, n_classes)
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
        sampled_files=[record_name(_relative(im.path, train_folder.root)) for im in train] if shots else None,
        files_digest=files_digest(train, train_folder.root),
        notes=notes,
    )


def prepare_eval_data(root: str | Path, classes_file: str | Path | None = None) -> ImageFolder:
    """The labelled set `eval` scores: `test/` if the folder has splits (else `val/`), or the folder itself."""
    root = Path(root)
    splits = find_splits(root)
    for name in ("test", "val"):
        if name in splits:
            return read_image_folder(splits[name], classes_file)
    if splits:
        raise InputError("folder has only a train/ split; nothing held out to evaluate", path=root)
    return read_image_folder(root, classes_file)


# --------------------------------------------------------------------------------------- prediction inputs


def iter_input_paths(specs: Sequence[str], stdin: Iterable[str] | None = None) -> Iterator[Path]:
    """Expand predict arguments lazily: files, folders (recursive, sorted), globs, and `-` (one path per
    line on stdin, streamed). Missing paths raise InputError before anything is yielded for them."""
    for spec in specs:
        if spec == "-":
            for line in stdin if stdin is not None else sys.stdin:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield Path(line)
            continue
        path = Path(spec)
        if path.is_dir():
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


# --------------------------------------------------------------------------------------- batching


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
        paths: Sequence[Path],
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
        return cls([im.path for im in images], [im.label for im in images], transform, **kw)

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

    def __init__(self, paths: Iterable[Path], transform: Callable, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.paths = paths
        self.transform = transform
        self.max_pixels = max_pixels

    def __iter__(self):
        for index, path in enumerate(self.paths):
            yield _decode(path, index, -1, self.transform, self.max_pixels)


def _decode(path: Path, index: int, label: int, transform: Callable, max_pixels: int):
    try:
        image = load_image(path, max_pixels=max_pixels)
        return transform(image), label, index, str(path), None
    except UnreadableImageError as exc:
        return None, label, index, str(path), exc.reason
    except Exception as exc:  # a transform failing on one odd image must not end the run either
        return None, label, index, str(path), f"{type(exc).__name__}: {exc}"


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


def batches_needed(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
