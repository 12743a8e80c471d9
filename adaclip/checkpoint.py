"""Training checkpoints: everything `fit --resume` needs to finish with the adapter an uninterrupted
run would have written.

A checkpoint is a safetensors file next to the output (`OUT.adaclip.ckpt`): the trainable tensors,
the optimizer's tensors and the RNG state as tensors, and as JSON metadata the optimizer's and
scheduler's other values, the position in training (epoch, step within it), the per-epoch history, and a
fingerprint of the run (method, config, seed, backbone, training files). Resuming refuses a checkpoint
whose fingerprint differs. Epoch orders and augmentations are derived from (seed, epoch, image), so the
position is all the loop needs to pick up exactly where it stopped, on any number of processes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .adapter_file import _read_raw_header, atomic_write, serialize_safetensors
from .errors import AdapterFileError, UsageError

CHECKPOINT_SUFFIX = ".ckpt"
CHECKPOINT_FORMAT = "adaclip-checkpoint/1"


def checkpoint_path_for(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + CHECKPOINT_SUFFIX)


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
    text = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return atomic_write(path, serialize_safetensors(tensors, {"adaclip_checkpoint": text}))


@dataclass
class LoadedCheckpoint:
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    scheduler_state: dict[str, Any]
    rng: dict[str, Any]
    position: TrainingPosition


def load_checkpoint(path: Path, fingerprint: dict[str, Any]) -> LoadedCheckpoint:
    """Read a checkpoint and check it belongs to this run."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.exists():
        raise UsageError("no checkpoint to resume from", path=path, fix="run without --resume to start over")
    header = _read_raw_header(path)
    text = (header.get("__metadata__") or {}).get("adaclip_checkpoint")
    try:
        document = json.loads(text) if isinstance(text, str) else None
    except json.JSONDecodeError:
        document = None
    if not isinstance(document, dict) or document.get("format") != CHECKPOINT_FORMAT:
        raise AdapterFileError("not an adaclip training checkpoint", path=path)
    saved = document["fingerprint"]
    differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
    if differing:
        raise UsageError(
            f"checkpoint belongs to a different run ({', '.join(differing)} differ)",
            path=path,
            fix="resume with the same data, method, settings and seed, or delete the checkpoint to start over",
        )
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise AdapterFileError(f"checkpoint is truncated or corrupt ({exc})", path=path) from None
    prefix = "model."
    return LoadedCheckpoint(
        model_state={k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)},
        optimizer_state=_unflatten(document["optimizer"], tensors),
        scheduler_state=_unflatten(document["scheduler"], tensors),
        rng=_unflatten(document["rng"], tensors),
        position=TrainingPosition(**document["position"]),
    )


def restore_rng(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
