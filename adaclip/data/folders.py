"""Class folders: `root/<class>/<image>`, and `root/{train,val,test}/<class>/<image>` splits.

Classes are the sorted class-folder names; their display names turn `_` and `-` into spaces unless a
class file says otherwise. Folders are indexed by listing directories only: no image is opened until it
is batched, so a 100,000-image folder indexes in seconds, and unreadable files are skipped (and counted)
where they are decoded.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError
from ..files import IMAGE_EXTENSIONS, is_image_file
from .classes import check_class_names, class_name_from_folder, read_class_file
from .records import SPLIT_NAMES, ImageFolder, LabelledImage, record_name


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
