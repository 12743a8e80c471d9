"""The records every kind of data becomes: labelled images, labelled sets, and what `fit` trains on.

A class folder, a manifest row and a WebDataset sample all end up as a `LabelledImage`; only where
the bytes come from differs (a file, or a span of a tar shard), and only the decoder looks at that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True, slots=True)
class TarSpan:
    """Where one member's bytes lie in an uncompressed tar shard: read by seek + read, never extracted."""

    shard: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.shard, "rb") as handle:
            handle.seek(self.offset)
            return handle.read(self.size)


@dataclass(frozen=True, slots=True)
class LabelledImage:
    """One image and its class index. `file` names it: a Path (folders), or text (manifest rows and
    shard members, `SHARD.tar/MEMBER`), kept as text because a million `Path` objects cost seconds and
    hundreds of MiB to build; `path` gives it as a Path. `span`, when set, is where its bytes are (a
    shard member); otherwise `file` is a file."""

    file: str | Path
    label: int
    span: TarSpan | None = None

    @property
    def path(self) -> Path:
        return self.file if isinstance(self.file, Path) else Path(self.file)

    @property
    def name(self) -> str:
        """`file` as text: what sorting and de-duplication use (no Path built)."""
        return self.file if isinstance(self.file, str) else str(self.file)

    def __str__(self) -> str:  # shown where a path would be (tta's records take str() of their inputs)
        return self.name


@dataclass
class ImageFolder:
    """The classes and images of one labelled set (no image decoded yet): a class folder, a manifest
    (or one split of it), or WebDataset shards.

    `folders` are the class keys (folder names, or the labels as written in a manifest or shard);
    `root` is what relative names are relative to; `source` is what the user named, when it is not
    `root` (a manifest file, a shard pattern)."""

    root: Path
    folders: list[str]
    class_names: list[str]
    images: list[LabelledImage]
    source: str | None = None
    skipped: int = 0  # rows or members left out while indexing (named in the log)

    @property
    def shown(self) -> str:
        return self.source or str(self.root)

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
    source: str | None = None

    def describe(self) -> dict:
        return {
            "root_name": record_name(Path(self.source).name if self.source else self.root.name),
            "n_classes": len(self.folders),
            "n_train": len(self.train),
            "n_val": len(self.val),
            "shots": self.shots,
            "val_source": self.val_source,
            "files_digest": self.files_digest,
            "files": self.sampled_files,
        }


# --------------------------------------------------------------------------------------- recorded names


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


def relative_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()
