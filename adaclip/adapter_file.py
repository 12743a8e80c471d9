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
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator

from ._version import __version__
from .checks import class_name_problem
from .errors import AdaclipError, AdapterFileError, InputError, UsageError
from .files import NotRegularFileError, atomic_write, check_output_path, open_regular
from .identity import BackboneIdentity, PreprocessConfig

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "adaclip-adapter"
FORMAT_VERSION = 1
SUFFIX = ".adaclip"
# A real adapter header is kilobytes (a few MB with a 10,000-file few-shot list); refuse anything that
# declares more before reading it, so a crafted file cannot make us allocate gigabytes.
MAX_HEADER_BYTES = 64 * 1024 * 1024
DIVERGED = "training diverged: train again with a lower --lr"
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
    format_version: StrictInt = FORMAT_VERSION  # "999" or true must not pass for a version
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

    @field_validator("class_names")
    @classmethod
    def _usable_class_names(cls, names: list[str]) -> list[str]:
        problem = class_name_problem(names)
        if problem:
            raise ValueError(problem)
        return names

    @field_validator("templates")
    @classmethod
    def _usable_templates(cls, templates: list[str]) -> list[str]:
        if not templates:
            raise ValueError("no prompt templates")
        if any(t.count("{}") != 1 for t in templates):
            raise ValueError("every template must contain exactly one {}")
        return templates


def created_at_now() -> str:
    """UTC creation time; SOURCE_DATE_EPOCH (the reproducible-builds convention) pins it, so two runs
    with the same seed can produce byte-identical files. A value that is not a time is refused (call
    this before expensive work to check it)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not epoch:
        moment = _dt.datetime.now(_dt.UTC)
    else:
        try:
            moment = _dt.datetime.fromtimestamp(int(epoch), tz=_dt.UTC)
            if not epoch.isdigit():
                raise ValueError
        except (ValueError, OverflowError, OSError):
            raise UsageError(
                f"SOURCE_DATE_EPOCH={epoch!r} is not a time adaclip can record",
                fix="give seconds since 1970 (e.g. $(git log -1 --format=%ct)) or unset it",
            ) from None
    return moment.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    import torch

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}\0{_dtype_names().get(tensor.dtype, str(tensor.dtype))}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _metadata_json(metadata: AdapterMetadata) -> str:
    return json.dumps(metadata.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def check_writable_metadata(metadata: AdapterMetadata) -> None:
    """Refuse, before training, text the file cannot hold: a lone surrogate (an undecodable byte that
    reached a name through a class file, a setting or the command line) has no UTF-8 encoding."""
    for key, value in metadata.model_dump(mode="json").items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(
                f"the adapter's {key} holds text that is not valid UTF-8 (an undecodable byte)",
                fix="use names, class files and settings in UTF-8",
            ) from None


def write_adapter_file(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: AdapterMetadata, *, force: bool = False
) -> Path:
    """Write atomically; refuse to replace an existing file unless `force`."""
    path = check_output_path(path, force=force)
    cpu = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    for name, tensor in cpu.items():
        if tensor.dtype not in _dtype_names():
            raise ValueError(f"tensor {name} has unsupported dtype {tensor.dtype}")
    check_finite(cpu, "refusing to write non-finite values (NaN or inf) in tensor {name}", path, fix=DIVERGED)
    check_writable_metadata(metadata)
    metadata = metadata.model_copy(
        update={
            "tensors": {
                n: TensorSpec(dtype=_dtype_names()[t.dtype], shape=list(t.shape)) for n, t in sorted(cpu.items())
            },
            "tensors_sha256": tensor_digest(cpu),
        }
    )
    text = _metadata_json(metadata)
    header = {"adaclip": text, "adaclip_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return atomic_write(path, serialize_safetensors(cpu, header))


def check_finite(
    tensors: dict[str, torch.Tensor], message: str, path: Path | None, error=AdaclipError, fix: str | None = None
) -> None:
    """Raise `error(message)` naming the first floating tensor with NaN or inf values."""
    import torch

    for name, tensor in sorted(tensors.items()):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise error(message.format(name=name), path=path, fix=fix)


def serialize_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors format, written with sorted keys so equal content gives equal bytes (the
    reference writer orders its header by hash map, which differs between runs)."""
    import torch

    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        blob = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {
            "dtype": _dtype_names()[tensor.dtype],
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
    if hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest() != raw.get("adaclip_sha256"):
        raise AdapterFileError("adapter metadata was modified after writing (digest mismatch)", path=path)
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        raise AdapterFileError("adapter metadata is not valid JSON", path=path) from None
    version = document.get("format_version") if isinstance(document, dict) else None
    if type(version) is int and version > FORMAT_VERSION:
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
        if entry.get("dtype") != spec.dtype or entry.get("shape") != spec.shape:
            raise AdapterFileError(f"tensor {name} differs from its declared dtype/shape", path=path)
        if spec.dtype not in ALLOWED_DTYPES:
            raise AdapterFileError(f"tensor {name} has unsupported dtype {spec.dtype}", path=path)
    return metadata


def read_adapter_file(path: str | Path) -> tuple[AdapterMetadata, dict[str, torch.Tensor]]:
    """Metadata and tensors, both validated (digest, finite values)."""
    path = Path(path)
    metadata = read_adapter_header(path)
    tensors = read_tensors(path, "adapter file")
    if tensor_digest(tensors) != metadata.tensors_sha256:
        raise AdapterFileError("adapter tensor data does not match its digest (corrupt or tampered)", path=path)
    check_finite(tensors, "tensor {name} contains NaN or infinite values", path, AdapterFileError)
    return metadata, tensors


def read_tensors(path: Path, what: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file whose header was already checked, read from one regular file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        with open_regular(path) as handle:
            data = handle.read()
        return load(data)
    except (SafetensorError, OSError, ValueError, TypeError, RuntimeError) as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise AdapterFileError(f"{what} is truncated or corrupt ({first})", path=path) from None


def _read_raw_header(path: Path, what: str = "adapter") -> dict[str, Any]:
    """The safetensors header of a regular file, checked for shape (not yet for meaning)."""
    if not path.exists():
        raise AdapterFileError(f"{what} file not found", path=path)
    if path.is_dir():
        raise AdapterFileError(f"{what} path is a folder, not a file", path=path)
    try:
        with open_regular(path) as handle:
            size = os.fstat(handle.fileno()).st_size
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
    except NotRegularFileError as exc:
        raise AdapterFileError(f"{what} path is {exc.kind}, not a regular file", path=path) from None
    except PermissionError:
        raise AdapterFileError(f"cannot read {what} file (permission denied)", path=path) from None
    except OSError as exc:
        raise AdapterFileError(f"cannot read {what} file ({exc.strerror or exc})", path=path) from None
    try:
        header = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterFileError(f"not a safetensors {what} file (unreadable header)", path=path) from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"not a safetensors {what} file", path=path)
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFileError(f"{what} file header has malformed metadata (not a map of strings)", path=path)
    data_len = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
            and isinstance(shape, list)
            and all(type(s) is int and s >= 0 for s in shape)
            and isinstance(entry.get("dtype"), str)
        ):
            raise AdapterFileError(f"tensor {name} has a malformed header entry", path=path)
        if offsets[1] > data_len:
            raise AdapterFileError(f"{what} file is truncated (tensor data missing)", path=path)
    return header
