"""True labels of unlabeled-folder images, for scoring predictions only (`tta --labels`,
`--labels-csv`, `Adapter.tta(labels=...)`): from sub-folder names, a CSV of file,label rows, or a mapping."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from .data import class_name_from_folder, labelled_items, open_data, record_name
from .errors import InputError


def resolve_labels(
    class_names: list[str],
    class_folders: list[str] | None,
    folder: Path | os.PathLike,
    images: list,
    labels: str | Path | dict | None,
) -> list[int | None] | None:
    """True class indices (into `class_names`) of `images` under `folder`, for scoring (never for
    adapting): `folders` (each image's parent folder), a CSV with `file,label` columns (paths relative to
    the folder), or a {path: label} mapping. Labels may be class folder names or class names."""
    if labels is None:
        return None
    index = _label_index(class_names, class_folders)
    data, folder = folder, Path(folder)  # `data` may be a DataSource carrying a manifest's options
    if isinstance(labels, str) and labels == "folders" and open_data(data).kind != "folder":
        named = {str(item): key for item, key in labelled_items(data)}  # a manifest's or shards' own labels
    elif isinstance(labels, str) and labels == "folders":
        named = {str(p): record_name(p.parent.name) for p in images if p.parent != folder}
    elif isinstance(labels, dict):
        named = {str(Path(k) if Path(k).is_absolute() else folder / k): str(v) for k, v in labels.items()}
    else:
        named = _read_label_csv(Path(labels), folder)
    unknown = sorted({name for name in named.values() if _lookup(index, name) is None})
    if unknown:
        raise InputError(
            f"labels name classes the adapter does not have: {', '.join(map(repr, unknown[:5]))}",
            fix=f"labels must be class folder names or class names, e.g. {class_names[0]!r}",
        )
    result = [_lookup(index, named[str(p)]) if str(p) in named else None for p in images]
    if all(r is None for r in result):
        raise InputError("no image in the folder has a label", fix="check the label file's paths (relative to FOLDER)")
    return result


def _label_index(class_names: list[str], class_folders: list[str] | None) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(class_names):
        index.setdefault(name.lower(), i)
    for i, folder in enumerate(class_folders or []):
        index.setdefault(folder.lower(), i)
        index.setdefault(class_name_from_folder(folder).lower(), i)
    return index


def _lookup(index: dict[str, int], name: str) -> int | None:
    key = name.strip().lower()
    found = index.get(key)
    return found if found is not None else index.get(class_name_from_folder(name).lower())


def _read_label_csv(path: Path, folder: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise InputError("label file not found", path=path) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read label file ({exc})", path=path) from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "label"]:
        rows = rows[1:]
    named: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise InputError(f"label file row {number} needs two columns: file,label", path=path)
        file = Path(row[0].strip())
        named[str(file if file.is_absolute() else folder / file)] = row[1].strip()
    return named
