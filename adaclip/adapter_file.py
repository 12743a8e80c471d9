"""The `.adaclip` adapter file: one safetensors file, trainable tensors only, plus validated metadata.

Layout: a standard safetensors file (no pickle anywhere) whose header metadata holds one key,
`adaclip`, a JSON document described by `AdapterMetadata`, and `adaclip_sha256`, its digest. The
metadata declares every tensor's name, dtype and shape and a sha256 over the tensor data, so a
truncated, tampered-with or mismatched file is refused with a message instead of loading garbage.

Writes go to a temporary file in the same folder and are renamed into place, so an existing file is
either replaced whole or left untouched, and nothing is overwritten without `force`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._version import __version__
from .errors import AdapterFileError, UsageError
from .identity import BackboneIdentity, PreprocessConfig

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "adaclip-adapter"
FORMAT_VERSION = 1
SUFFIX = ".adaclip"
# A real adapter header is kilobytes (a few MB with a 10,000-file few-shot list); refuse anything that
# declares more before reading it, so a crafted file cannot make us allocate gigabytes.
MAX_HEADER_BYTES = 64 * 1024 * 1024
ALLOWED_DTYPES = ("F32", "F16", "BF16", "I64", "I32", "BOOL")


def _dtype_names() -> dict[torch.dtype, str]:
    """torch dtype -> safetensors name for what the serializer can write (training checkpoints also hold
    uint8 RNG states; adapter files are restricted to ALLOWED_DTYPES on read). A function, not a module
    constant, so reading a header (`adaclip info`) never imports torch."""
    import torch

    return {
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.bool: "BOOL",
        torch.uint8: "U8",
        torch.float64: "F64",
    }


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: str
    shape: list[int]


class DataRecord(BaseModel):
    """Which images trained the adapter (relative paths only: no absolute paths leak into files)."""

    model_config = ConfigDict(extra="forbid")
    root_name: str
    n_classes: int
    n_train: int
    n_val: int
    shots: int | None
    val_source: str
    files_digest: str
    files: list[str] | None = None


class TrainingRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int
    steps: int
    final_loss: float | None
    val_accuracy: float | None
    history: list[dict[str, Any]] = Field(default_factory=list)
    skipped_images: int = 0
    device: str
    precision: str
    resumed: bool = False


class AdapterMetadata(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["adaclip-adapter"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    adaclip_version: str = __version__
    created_at: str
    backbone: BackboneIdentity
    method: str
    method_config: dict[str, Any]
    class_names: list[str]
    class_folders: list[str] | None = None
    templates: list[str]
    preprocess: PreprocessConfig
    seed: int
    trainable_params: int
    data: DataRecord | None = None
    training: TrainingRecord | None = None
    tta: list[dict[str, Any]] = Field(default_factory=list)
    tensors: dict[str, TensorSpec] = Field(default_factory=dict)
    tensors_sha256: str = ""


def created_at_now() -> str:
    """UTC creation time; SOURCE_DATE_EPOCH (the reproducible-builds convention) pins it, so two runs
    with the same seed can produce byte-identical files."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    moment = (
        _dt.datetime.fromtimestamp(int(epoch), tz=_dt.UTC) if epoch and epoch.isdigit() else _dt.datetime.now(_dt.UTC)
    )
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    import torch

    names = _dtype_names()
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{names.get(tensor.dtype, str(tensor.dtype))}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _metadata_json(metadata: AdapterMetadata) -> str:
    return json.dumps(metadata.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def write_adapter_file(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: AdapterMetadata, *, force: bool = False
) -> Path:
    """Write atomically; refuse to replace an existing file unless `force`."""
    path = Path(path)
    if path.exists() and not force:
        raise UsageError("output file already exists", path=path, fix="choose another name or pass --force")
    if path.exists() and path.is_dir():
        raise UsageError("output path is a folder", path=path)
    if not path.parent.exists():
        raise UsageError("output folder does not exist", path=path.parent)
    names = _dtype_names()
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    for name, tensor in cpu.items():
        if tensor.dtype not in names:
            raise ValueError(f"tensor {name} has unsupported dtype {tensor.dtype}")
    metadata = metadata.model_copy(
        update={
            "tensors": {n: TensorSpec(dtype=names[t.dtype], shape=list(t.shape)) for n, t in sorted(cpu.items())},
            "tensors_sha256": tensor_digest(cpu),
        }
    )
    text = _metadata_json(metadata)
    header = {"adaclip": text, "adaclip_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return atomic_write(path, serialize_safetensors(cpu, header))


def atomic_write(path: Path, data: bytes) -> Path:
    """Write to a temporary file in the same folder, sync, then rename over `path`: readers see the old
    file or the new one, never a partial one, and an interrupted write leaves nothing behind."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


def serialize_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format, written with sorted keys so equal content gives equal bytes (the
    reference writer orders its header by hash map, which differs between runs)."""
    import torch

    names = _dtype_names()
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8-byte alignment
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs)


def read_adapter_header(path: str | Path) -> AdapterMetadata:
    """Read and validate the metadata only (cheap: no tensor data is read)."""
    path = Path(path)
    header = _read_raw_header(path)
    raw = header.get("__metadata__") or {}
    text = raw.get("adaclip")
    if not isinstance(text, str):
        raise AdapterFileError("not an adaclip adapter file (safetensors without adaclip metadata)", path=path)
    if hashlib.sha256(text.encode()).hexdigest() != raw.get("adaclip_sha256"):
        raise AdapterFileError("adapter metadata was modified after writing (digest mismatch)", path=path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        raise AdapterFileError("adapter metadata is not valid JSON", path=path) from None
    version = document.get("format_version") if isinstance(document, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise AdapterFileError(
            f"adapter file format {version} is newer than this adaclip understands ({FORMAT_VERSION})",
            path=path,
            fix=f"upgrade adaclip (this is {__version__}; file written by {document.get('adaclip_version')})",
        )
    try:
        metadata = AdapterMetadata.model_validate(document)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise AdapterFileError(f"adapter metadata is invalid ({where}: {first['msg']})", path=path) from None
    declared = {k: v for k, v in header.items() if k != "__metadata__"}
    if set(declared) != set(metadata.tensors):
        raise AdapterFileError("adapter tensors do not match their declaration (file edited?)", path=path)
    for name, entry in declared.items():
        spec = metadata.tensors[name]
        if entry.get("dtype") != spec.dtype or list(entry.get("shape", [])) != spec.shape:
            raise AdapterFileError(f"tensor {name} differs from its declared dtype/shape", path=path)
        if spec.dtype not in ALLOWED_DTYPES:
            raise AdapterFileError(f"tensor {name} has unsupported dtype {spec.dtype}", path=path)
    return metadata


def read_adapter_file(path: str | Path) -> tuple[AdapterMetadata, dict[str, torch.Tensor]]:
    """Metadata and tensors, both validated (digest, finite values)."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    metadata = read_adapter_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterFileError(f"adapter file is truncated or corrupt ({exc})", path=path) from None
    if tensor_digest(tensors) != metadata.tensors_sha256:
        raise AdapterFileError("adapter tensor data does not match its digest (corrupt or tampered)", path=path)
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"tensor {name} contains NaN or infinite values", path=path)
    return metadata, tensors


def _read_raw_header(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise AdapterFileError("adapter file not found", path=path)
    if path.is_dir():
        raise AdapterFileError("adapter path is a folder, not a file", path=path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise AdapterFileError("adapter file is truncated or empty", path=path)
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES:
                raise AdapterFileError(
                    f"adapter header declares {header_len:,} bytes (limit {MAX_HEADER_BYTES:,}); not a valid file",
                    path=path,
                )
            if 8 + header_len > size:
                raise AdapterFileError("adapter file is truncated (header runs past the end)", path=path)
            blob = handle.read(header_len)
    except PermissionError:
        raise AdapterFileError("cannot read adapter file (permission denied)", path=path) from None
    except OSError as exc:
        raise AdapterFileError(f"cannot read adapter file ({exc.strerror or exc})", path=path) from None
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError("not a safetensors adapter file (unreadable header)", path=path) from None
    if not isinstance(header, dict):
        raise AdapterFileError("not a safetensors adapter file", path=path)
    data_len = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            raise AdapterFileError(f"tensor {name} has a malformed header entry", path=path)
        if offsets[1] > data_len:
            raise AdapterFileError("adapter file is truncated (tensor data missing)", path=path)
    return header
