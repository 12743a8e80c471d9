"""Manifests: a CSV or JSONL file of image paths and labels, and Hugging Face `imagefolder` metadata.

    path,label,split            {"path": "imgs/1.png", "label": "cat", "split": "train"}
    imgs/1.png,cat,train        (JSONL: one object per line)

Paths are relative to the manifest's folder. A path that is absolute or climbs out of that folder
(`../`) is refused, so that a manifest someone shared cannot make adaclip read arbitrary files, unless
the user vouches for it (`allow_absolute`). `split` (train/val/test; `validation` is val) is optional.
A Hugging Face imagefolder keeps the same in `metadata.csv` / `metadata.jsonl` with a `file_name`
column.

Indexing reads the text only: no image is opened and no file is looked up, so a million-row manifest
indexes in seconds; a listed file that is missing or unreadable is skipped and counted where it is
decoded, as in a folder. Rows that cannot be used (a missing column, an empty path or label, an
unknown split) are skipped while indexing, counted and named.
"""

from __future__ import annotations

import csv
import json
import os
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, arg
from ..files import open_regular
from .classes import classes_from_labels, label_lookup
from .records import SPLIT_NAMES, ImageFolder, LabelledImage

MANIFEST_SUFFIXES = (".csv", ".jsonl")
HF_METADATA_FILES = ("metadata.csv", "metadata.jsonl")
HF_PATH_COLUMN = "file_name"
DEFAULT_PATH_COLUMN = "path"
DEFAULT_LABEL_COLUMN = "label"
SPLIT_COLUMN = "split"
_SPLIT_ALIASES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}
SHOWN_BAD_ROWS = 5


@dataclass
class ManifestIndex:
    """A manifest's rows, by split (None: the manifest has no split column), with its classes."""

    path: Path
    folders: list[str]
    class_names: list[str]
    by_split: dict[str | None, list[LabelledImage]]
    bad_rows: list[tuple[int, str]] = field(default_factory=list)  # (line, why), the first few
    n_bad: int = 0

    def labelled_set(self, split: str | None) -> ImageFolder:
        images = self.by_split.get(split, []) if split is not None else [im for v in self.by_split.values() for im in v]
        return ImageFolder(
            root=self.path.parent,
            folders=self.folders,
            class_names=self.class_names,
            images=images,
            source=str(self.path),
            skipped=self.n_bad,
        )

    @property
    def splits(self) -> list[str]:
        return [s for s in SPLIT_NAMES if self.by_split.get(s)]


def is_manifest_file(path: Path) -> bool:
    return path.suffix.lower() in MANIFEST_SUFFIXES and path.is_file()


def hf_metadata_file(folder: Path) -> Path | None:
    """The metadata.csv / metadata.jsonl of a Hugging Face imagefolder, if `folder` has one."""
    for name in HF_METADATA_FILES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def read_manifest(
    path: str | Path,
    *,
    path_column: str | None = None,
    label_column: str | None = None,
    allow_absolute: bool = False,
    classes_file: str | Path | None = None,
) -> ManifestIndex:
    """Index a manifest (no image opened); raises InputError for a path outside its folder."""
    path = Path(path)
    path_column = path_column or (HF_PATH_COLUMN if path.name in HF_METADATA_FILES else DEFAULT_PATH_COLUMN)
    label_column = label_column or DEFAULT_LABEL_COLUMN
    prefix = os.path.join(str(path.parent), "")  # "folder/": row paths are joined by concatenation, for speed
    # Per split, the joined paths and a small number per distinct label (labels repeat: a million rows
    # keep one string per label, not one per row).
    files: dict[str | None, list[str]] = {}
    label_ids: dict[str | None, array] = {}
    ids: dict[str, int] = {}
    bad: list[tuple[int, str]] = []
    n_bad = 0
    for line, file_text, label, split, problem in _rows(path, path_column, label_column):
        if problem is None:
            problem = _path_problem(file_text)
            if problem is not None and not allow_absolute:
                raise InputError(
                    f"line {line} of the manifest names {file_text!r}, which {problem}",
                    path=path,
                    fix=f"list paths relative to the manifest's folder, or pass {arg('allow_absolute')} if you "
                    "trust this manifest",
                )
            problem = None
            if split is not None:
                split = _SPLIT_ALIASES.get(split.strip().lower())
                if split is None:
                    problem = f"unknown split (use {', '.join(SPLIT_NAMES)})"
        if problem is not None:
            n_bad += 1
            if len(bad) < SHOWN_BAD_ROWS:
                bad.append((line, problem))
            continue
        if split not in files:
            files[split], label_ids[split] = [], array("l")
        files[split].append(file_text if os.path.isabs(file_text) else prefix + file_text)
        label_ids[split].append(ids.setdefault(label, len(ids)))
    folders, names = classes_from_labels(set(ids), classes_file, path)
    index_of = label_lookup(folders)
    class_of = [index_of(label) for label in ids]  # label id -> class index (ids are in first-seen order)
    by_split = {
        split: [LabelledImage(f, class_of[i]) for f, i in zip(files[split], label_ids[split], strict=True)]
        for split in files
    }
    index = ManifestIndex(path, folders, names, by_split, bad, n_bad)
    if n_bad:
        _report_bad_rows(index)
    return index


def iter_manifest_paths(
    path: str | Path, *, path_column: str | None = None, allow_absolute: bool = False
) -> Iterator[Path]:
    """The image paths a manifest lists, streamed (for `predict`: labels are not needed). The whole
    file is checked first (text only), so a path outside its folder fails before any prediction."""
    path = Path(path)
    path_column = path_column or (HF_PATH_COLUMN if path.name in HF_METADATA_FILES else DEFAULT_PATH_COLUMN)
    base = str(path.parent)  # an absolute row path replaces it in os.path.join
    if not allow_absolute:
        for line, file_text, _, _, problem in _rows(path, path_column, None):
            if problem is None and (escape := _path_problem(file_text)) is not None:
                raise InputError(
                    f"line {line} of the manifest names {file_text!r}, which {escape}",
                    path=path,
                    fix=f"list paths relative to the manifest's folder, or pass {arg('allow_absolute')}",
                )
    n_bad = 0
    for _, file_text, _, _, problem in _rows(path, path_column, None):
        if problem is None:
            yield Path(os.path.join(base, file_text))
        else:
            n_bad += 1
    if n_bad:
        from ..ui import log

        log.warning(f"skipped {n_bad} row(s) of {path} without a path")


def _path_problem(file_text: str) -> str | None:
    """Why a manifest path may not be read without --allow-absolute (None: it stays in the folder)."""
    if ".." not in file_text and not file_text.startswith(os.sep):
        return None  # the common case, decided without normalising
    if os.path.isabs(file_text):
        return "is absolute"
    normal = os.path.normpath(file_text)
    if normal == os.pardir or normal.startswith(os.pardir + os.sep):
        return "climbs out of the manifest's folder"
    return None


def _report_bad_rows(index: ManifestIndex) -> None:
    from ..ui import log

    for line, why in index.bad_rows:
        log.warning(f"skipped line {line} of {index.path}: {why}")
    if index.n_bad > len(index.bad_rows):
        log.warning(f"skipped {index.n_bad - len(index.bad_rows)} more bad row(s) of {index.path}")


# (line number, path, label, split, problem): problem is None for a usable row
Row = tuple[int, str, str, str | None, str | None]


def _rows(path: Path, path_column: str, label_column: str | None) -> Iterator[Row]:
    text = _open_text(path)
    if path.suffix.lower() == ".jsonl":
        return _jsonl_rows(path, text, path_column, label_column)
    return _csv_rows(path, text, path_column, label_column)


def _open_text(path: Path):
    try:
        handle = open_regular(path)
    except FileNotFoundError:
        raise InputError("manifest not found", path=path) from None
    except OSError as exc:
        raise InputError(f"cannot read manifest ({exc.strerror or exc})", path=path) from None
    return _Lines(handle, path)


class _Lines:
    """UTF-8 lines of the manifest; a byte that is not UTF-8 is a one-line error naming the file."""

    def __init__(self, handle, path: Path):
        self.handle, self.path = handle, path

    def __iter__(self) -> Iterator[str]:
        with self.handle:
            for number, raw in enumerate(self.handle, start=1):
                try:
                    yield raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError:
                    raise InputError(f"line {number} of the manifest is not UTF-8 text", path=self.path) from None


def _missing_column(path: Path, what: str, column: str, present: list[str]) -> InputError:
    option = "path_column" if what == "path" else "label_column"
    return InputError(
        f"manifest has no {column!r} column (columns: {', '.join(map(repr, present[:10])) or 'none'})",
        path=path,
        fix=f"name the {what} column with {arg(option, 'NAME')}",
    )


def _csv_rows(path: Path, lines, path_column: str, label_column: str | None) -> Iterator[Row]:
    reader = csv.reader(iter(lines))
    header = next(reader, None)
    if header is None:
        raise InputError("manifest is empty", path=path, fix=f"first line: {path_column},{label_column or 'label'}")
    header = [h.strip() for h in header]
    if path_column not in header:
        raise _missing_column(path, "path", path_column, header)
    if label_column is not None and label_column not in header:
        raise _missing_column(path, "label", label_column, header)
    pi = header.index(path_column)
    li = header.index(label_column) if label_column is not None else None
    si = header.index(SPLIT_COLUMN) if SPLIT_COLUMN in header else None
    width = max(i for i in (pi, li, si) if i is not None) + 1
    line = 1
    for row in reader:
        line = reader.line_num
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line
        if len(row) < width:
            yield line, "", "", None, f"has {len(row)} field(s), the header {len(header)}"
            continue
        file_text = row[pi].strip()
        label = row[li].strip() if li is not None else ""
        split = row[si] if si is not None else None
        yield line, file_text, label, split, _empty(file_text, label, li is not None)


def _jsonl_rows(path: Path, lines, path_column: str, label_column: str | None) -> Iterator[Row]:
    seen_path = seen_label = False
    first_keys: list[str] | None = None
    for line, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield line, "", "", None, f"not JSON ({exc.msg})"
            continue
        if not isinstance(record, dict):
            yield line, "", "", None, "not a JSON object"
            continue
        if first_keys is None:
            first_keys = list(record)
        file_value = record.get(path_column)
        label_value = record.get(label_column) if label_column is not None else ""
        seen_path |= file_value is not None
        seen_label |= label_value is not None
        if file_value is None or label_value is None:
            missing = path_column if file_value is None else label_column
            yield line, "", "", None, f"no {missing!r}"
            continue
        if not isinstance(file_value, str) or not isinstance(label_value, str | int) or isinstance(label_value, bool):
            yield line, "", "", None, "path must be text and label text or a whole number"
            continue
        split = record.get(SPLIT_COLUMN)
        split = None if split is None else str(split)
        file_text, label = file_value.strip(), str(label_value).strip()
        yield line, file_text, label, split, _empty(file_text, label, label_column is not None)
    if first_keys is not None and not seen_path:
        raise _missing_column(path, "path", path_column, first_keys)
    if first_keys is not None and label_column is not None and not seen_label:
        raise _missing_column(path, "label", label_column, first_keys)


def _empty(file_text: str, label: str, need_label: bool) -> str | None:
    if not file_text:
        return "empty path"
    if need_label and not label:
        return "empty label"
    return None
