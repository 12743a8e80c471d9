"""Class names: display names from folder names or labels, and the class files (`--classes`) that
override them."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ..checks import class_name_problem
from ..errors import InputError
from ..files import read_text_file


def class_name_from_folder(folder: str) -> str:
    """`golden_retriever` -> `golden retriever`; `t-shirt` -> `t shirt`. Bytes that are not UTF-8 show as
    `\\xNN` (a display name need not round-trip; the recorded folder name does)."""
    shown = folder.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return " ".join(shown.replace("_", " ").replace("-", " ").split())


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


def _is_index(label: str) -> bool:
    return label.isascii() and label.isdigit()


def classes_from_labels(
    labels: set[str], classes_file: str | Path | None, source: str | Path
) -> tuple[list[str], list[str]]:
    """(class keys, display names) for the labels of a manifest or of shards.

    Keys are the distinct labels, sorted (as numbers when every label is a class index such as `cls`
    holds, so "10" follows "9"). Without `classes_file`, display names come from the keys as from
    folder names. A class file may be a JSON {label: name} object, a list of names in key order, or,
    for index labels, a list whose line i names class i (then every listed class exists, even one with
    no images), or a list of the labels themselves in the order wanted.
    """
    if not labels:
        raise InputError("no labelled images found", path=source, fix="check the label column")
    indices = all(_is_index(label) for label in labels)
    keys = sorted({str(int(x)) for x in labels}, key=int) if indices else sorted(labels)
    if not classes_file:
        names = check_class_names(
            [class_name_from_folder(k) for k in keys], source, fix="give display names with --classes"
        )
        return keys, names
    path = Path(classes_file)
    text = read_text_file(path, "class file").strip()
    if text.startswith("{"):
        return keys, read_class_file(path, keys)
    if text.startswith("["):
        names = read_name_list(path)
    else:
        names = check_class_names([line.strip() for line in text.splitlines() if line.strip()], path)
    if indices and int(keys[-1]) < len(names):
        return [str(i) for i in range(len(names))], names
    if len(names) == len(keys):
        return keys, names
    if set(keys) <= set(names):
        return list(names), names
    raise InputError(
        f"class file has {len(names)} names but the data has {len(keys)} distinct labels",
        path=path,
        fix="give one name per label in sorted label order, or a JSON {label: name} object",
    )


def label_lookup(keys: Sequence[str]):
    """label as written -> class index (None for a label that is not a class): index labels match by
    number, so "07" is class "7"."""
    index = {key: i for i, key in enumerate(keys)}
    if all(_is_index(k) for k in keys):
        return lambda label: index.get(str(int(label)) if _is_index(label) else label)
    return index.get
