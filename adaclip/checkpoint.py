"""Training checkpoints: everything `fit --resume` needs to finish with the adapter an uninterrupted
run would have written.

A checkpoint is a safetensors file next to the output (`OUT.adaclip.ckpt`): the trainable tensors,
the optimizer's tensors and the RNG state as tensors, and as JSON metadata the optimizer's and
scheduler's other values, the position in training (epoch, step within it), the per-epoch history, and a
fingerprint of the run (method, config, seed, backbone, training files). Resuming refuses a checkpoint
whose fingerprint differs. Epoch orders and augmentations are derived from (seed, epoch, image), so the
position is all the loop needs to pick up exactly where it stopped, on any number of processes.

Like adapter files, a checkpoint carries a sha256 of its JSON document and of its tensor data, and
its floating tensors must be finite: a damaged checkpoint is refused instead of resumed from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter_file import (
    _read_raw_header,
    check_finite,
    read_tensors,
    serialize_safetensors,
    tensor_digest,
)
from .errors import AdapterFileError, UsageError
from .files import atomic_write

CHECKPOINT_SUFFIX = ".ckpt"
CHECKPOINT_FORMAT = "adaclip-checkpoint/2"  # /2: digests of the document and the tensors


def checkpoint_path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + CHECKPOINT_SUFFIX)


def check_checkpoint_path(output: str | Path, *, resume: bool, force: bool) -> Path:
    """The checkpoint path of a fit writing `output`, checked before anything is read or built: an
    interrupted run's checkpoint is continued (`resume`) or replaced (`force`), never silently lost."""
    checkpoint = checkpoint_path_for(output)
    if checkpoint.is_dir():
        raise UsageError("the checkpoint path is a folder", path=checkpoint, fix="choose another -o")
    if checkpoint.exists() and not resume and not force:
        raise UsageError(
            "a checkpoint of an interrupted run exists",
            path=checkpoint,
            fix="add --resume to continue it, or --force",
        )
    return checkpoint


@dataclass
class TrainingPosition:
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # global batches completed in the current epoch
    global_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # Running sums of the epoch in progress, so a mid-epoch resume reports the same epoch loss.
    epoch_sums: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])


def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors inside nested dicts/lists by references, collecting them in `tensors`."""
    if isinstance(value, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if isinstance(value, (list, tuple)):
        return {
            "__list__": [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)],
            "tuple": isinstance(value, tuple),
        }
    return value


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__dict__"]}
        if "__list__" in value:
            items = [_unflatten(v, tensors) for v in value["__list__"]]
            return tuple(items) if value.get("tuple") else items
    return value


def save_checkpoint(
    path: Path,
    *,
    model_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    position: TrainingPosition,
    fingerprint: dict[str, Any],
    averaging_state: dict[str, Any] | None = None,
) -> Path:
    """Write atomically (temp file + rename): an interrupted write leaves the previous checkpoint."""
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    document = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": fingerprint,
        "position": position.__dict__,
        "optimizer": _flatten(optimizer.state_dict(), "optimizer", tensors),
        "scheduler": _flatten(scheduler.state_dict(), "scheduler", tensors),
        "rng": _flatten(rng, "rng", tensors),
    }
    if averaging_state is not None:
        document["averaging"] = _flatten(averaging_state, "averaging", tensors)
    document["tensors_sha256"] = tensor_digest(tensors)
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    header = {"adaclip_checkpoint": text, "adaclip_checkpoint_sha256": _text_digest(text)}
    return atomic_write(path, serialize_safetensors(tensors, header))


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass
class LoadedCheckpoint:
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng: dict[str, Any]
    position: TrainingPosition
    averaging_state: dict[str, Any] | None = None  # the running weight average (train.weight_averaging)


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> LoadedCheckpoint:
    """Read a checkpoint and check it belongs to this run."""
    if not path.exists():
        raise UsageError("no checkpoint to resume from", path=path, fix="run without --resume to start over")
    header = _read_raw_header(path, "checkpoint")
    raw = header.get("__metadata__") or {}
    text = raw.get("adaclip_checkpoint")
    try:
        document = json.loads(text) if isinstance(text, str) else None
    except (json.JSONDecodeError, RecursionError):
        document = None
    if not isinstance(document, dict) or not str(document.get("format", "")).startswith("adaclip-checkpoint/"):
        raise AdapterFileError("not an adaclip training checkpoint", path=path)
    if document["format"] != CHECKPOINT_FORMAT:
        raise AdapterFileError(
            f"checkpoint format {document['format']!r} is not {CHECKPOINT_FORMAT!r} (another adaclip version)",
            path=path,
            fix="resume with the adaclip that wrote it, or delete the checkpoint to start over",
        )
    if raw.get("adaclip_checkpoint_sha256") != _text_digest(text):
        raise AdapterFileError("checkpoint was modified or damaged (metadata digest mismatch)", path=path)
    saved = document.get("fingerprint")
    if not isinstance(saved, dict):
        raise AdapterFileError("checkpoint is damaged (no run fingerprint)", path=path)
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        raise UsageError(
            f"checkpoint belongs to a different run ({', '.join(differing)} differ)",
            path=path,
            fix="resume with the same data, method, settings and seed, or delete the checkpoint to start over",
        )
    tensors = read_tensors(path, "checkpoint")
    if tensor_digest(tensors) != document.get("tensors_sha256"):
        raise AdapterFileError("checkpoint tensor data does not match its digest (damaged)", path=path)
    check_finite(tensors, "checkpoint tensor {name} contains NaN or infinite values", path, AdapterFileError)
    prefix = "model."
    try:
        return LoadedCheckpoint(
            model_state={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
            optimizer_state=_unflatten(document["optimizer"], tensors),
            scheduler_state=_unflatten(document["scheduler"], tensors),
            rng=_unflatten(document["rng"], tensors),
            position=TrainingPosition(**document["position"]),
            averaging_state=_unflatten(document["averaging"], tensors) if "averaging" in document else None,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AdapterFileError(f"checkpoint is damaged ({type(exc).__name__}: {exc})", path=path) from None


def checkpoint_does_not_fit(path: Path, exc: Exception) -> AdapterFileError:
    """A checkpoint whose states the model, optimizer or scheduler refuse (missing or extra keys)."""
    first = (str(exc).strip().splitlines() or [""])[0]
    return AdapterFileError(f"checkpoint does not fit this run ({first})", path=path, fix="delete it to start over")


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
