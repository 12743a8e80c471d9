"""WebDataset tar shards: `shards-{000000..000099}.tar` (a brace pattern, or paths joined by `::`).

A sample is the members that share a key (`dir/abc.jpg` + `dir/abc.cls`, webdataset's rule): one
image (jpg, png, webp, ...) and a label from `cls` (a class index), `json` (its `label` field, or
the `--label-column` named) or `txt`. Shards are never unpacked to disk.

- Labelled use (`fit`, `eval`, `compare`, `tta`): one indexing pass reads tar headers and the small
  label members only; image bytes are skipped by seeking, and their place in the shard is kept
  (`TarSpan`). Few-shot sampling, hold-outs and validation then work on this index exactly as on a
  folder, and a chosen image is read back by seek + read when it is decoded. This needs
  uncompressed `.tar` shards (a gzip stream cannot be entered in the middle).
- `predict` streams the shards with webdataset's own tar reader, one sample in memory at a time, so
  memory stays flat however many shards there are.

Undecodable image members are skipped and counted where they are decoded, as files in a folder are;
samples without an image or a label are skipped and counted while indexing.
"""

from __future__ import annotations

import glob
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError, arg
from ..files import IMAGE_EXTENSIONS
from .classes import classes_from_labels, label_lookup
from .loading import ImageBytes
from .records import ImageFolder, LabelledImage, TarSpan

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
IMAGE_KEYS = frozenset(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)
LABEL_KEYS = ("cls", "json", "txt")  # in the order a label is looked for
SHOWN_BAD = 5


def is_shard_spec(spec: str) -> bool:
    """True for what names tar shards: a brace pattern, `a.tar::b.tar`, or a path ending in .tar."""
    text = str(spec)
    if "{" in text and ".." in text and "}" in text:
        return True
    return any(part.lower().endswith(SHARD_SUFFIXES) for part in text.split("::"))


def expand_shards(spec: str) -> list[str]:
    """The shard files a spec names (webdataset's expansion: `::` lists and brace ranges), each checked
    to exist before anything is read."""
    from webdataset.shardlists import expand_urls

    urls = expand_urls(str(spec))
    if len(urls) == 1 and glob.has_magic(urls[0]) and not Path(urls[0]).exists():
        urls = sorted(glob.glob(urls[0]))  # `shards-*.tar`: the shell would have expanded it too
    if not urls:
        raise InputError("shard pattern names no files", path=spec)
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise InputError(
            f"{len(missing)} of {len(urls)} shard(s) not found (first: {missing[0]})",
            path=spec,
            fix="check the pattern, e.g. shards-{000000..000009}.tar",
        )
    return urls


def _key_and_ext(name: str) -> tuple[str | None, str | None]:
    from webdataset.tariterators import base_plus_ext

    key, ext = base_plus_ext(name)
    return key, (ext.lower() if ext is not None else None)


@dataclass
class _Sample:
    key: str
    image: tuple[str, TarSpan] | None = None
    labels: dict[str, bytes] = field(default_factory=dict)


def _read_samples(shard: str, notes: list[str]) -> Iterator[_Sample]:
    """Samples of one uncompressed shard from its headers and label members (images are not read)."""
    try:
        tar = tarfile.open(shard, mode="r:")
    except tarfile.ReadError:
        raise InputError(
            "not an uncompressed tar file",
            path=shard,
            fix="adaclip reads .tar shards for training and evaluation; decompress .tar.gz shards first",
        ) from None
    except OSError as exc:
        raise InputError(f"cannot read shard ({exc.strerror or exc})", path=shard) from None
    current: _Sample | None = None
    with tar:
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError) as exc:
                notes.append(f"the rest of {shard} ({exc})")
                break
            if member is None:
                break
            tar.members = []  # an index of a million members must not also keep every header
            if not member.isreg():
                continue
            key, ext = _key_and_ext(member.name)
            if key is None or Path(member.name).name.startswith("__"):
                continue
            if current is None or current.key != key:
                if current is not None:
                    yield current
                current = _Sample(key)
            if ext in IMAGE_KEYS and current.image is None:
                current.image = (f"{key}.{ext}", TarSpan(shard, member.offset_data, member.size))
            elif ext in LABEL_KEYS:
                handle = tar.extractfile(member)
                current.labels[ext] = handle.read() if handle is not None else b""
    if current is not None:
        yield current


def _label_of(sample: _Sample, label_field: str) -> str | None:
    """The sample's label as text (None when it has none usable)."""
    raw = sample.labels
    try:
        if "cls" in raw:
            return str(int(raw["cls"].decode("utf-8").strip()))
        if "json" in raw:
            value = json.loads(raw["json"].decode("utf-8"))
            if isinstance(value, dict):
                value = value.get(label_field)
            if isinstance(value, bool) or not isinstance(value, str | int):
                return None
            return str(value).strip() or None
        if "txt" in raw:
            return raw["txt"].decode("utf-8").strip() or None
    except (UnicodeDecodeError, ValueError):
        return None
    return None


def read_shards(spec: str, *, label_column: str | None = None, classes_file: str | Path | None = None) -> ImageFolder:
    """Index WebDataset shards as a labelled set (one pass over headers and label members)."""
    urls = expand_shards(spec)
    label_field = label_column or "label"
    entries: list[tuple[str, TarSpan, str]] = []  # (name, span, label)
    notes: list[str] = []  # shards cut short
    bad: list[str] = []  # the first few samples skipped
    n_bad = 0
    for shard in urls:
        for sample in _read_samples(shard, notes):
            problem = None
            if sample.image is None:
                problem = "no image member"
            else:
                label = _label_of(sample, label_field)
                if label is None:
                    problem = f"no usable label ({'/'.join(LABEL_KEYS)})"
            if problem is not None:
                n_bad += 1
                if len(bad) < SHOWN_BAD:
                    bad.append(f"{shard}/{sample.key}: {problem}")
                continue
            name, span = sample.image
            entries.append((f"{shard}/{name}", span, label))
    if not entries:
        raise InputError(
            "no labelled images found in the shards",
            path=spec,
            fix=f"each sample needs an image and a label member (.cls, .json with {arg('label_column')}, or .txt)",
        )
    folders, names = classes_from_labels({label for _, _, label in entries}, classes_file, spec)
    index_of = label_lookup(folders)
    images = [LabelledImage(name, index_of(label), span) for name, span, label in entries]
    _report(spec, notes + bad, n_bad - len(bad))
    return ImageFolder(
        root=Path(urls[0]).parent, folders=folders, class_names=names, images=images, source=str(spec), skipped=n_bad
    )


def _report(spec: str, lines: list[str], more: int) -> None:
    from ..ui import log

    for line in lines:
        log.warning(f"skipped {line}")
    if more > 0:
        log.warning(f"skipped {more} more sample(s) of {spec}")


def iter_shard_images(spec: str) -> Iterator[ImageBytes]:
    """Every sample's image, streamed in shard order with webdataset's tar reader (no index kept)."""
    from webdataset.tariterators import tarfile_samples

    from ..ui import log

    problems = {"count": 0}

    def skip(exc: Exception) -> bool:  # a broken shard ends that shard, not the run
        problems["count"] += 1
        if problems["count"] <= SHOWN_BAD:
            log.warning(f"skipped the rest of a shard: {exc}")
        return True

    no_image = 0
    for sample in tarfile_samples([{"url": url} for url in expand_shards(spec)], handler=skip):
        image_ext = next((ext for ext in sample if ext.lower() in IMAGE_KEYS), None)
        if image_ext is None:
            no_image += 1
            continue
        yield ImageBytes(Path(f"{sample['__url__']}/{sample['__key__']}.{image_ext}"), sample[image_ext])
    if no_image:
        log.warning(f"skipped {no_image} sample(s) of {spec} without an image member")
