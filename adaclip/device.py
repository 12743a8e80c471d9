"""Device and precision policy: which device `auto` means, which precision runs there, and the
autocast context that applies it. One home, so the backbone, training and the server agree."""

from __future__ import annotations

import contextlib

import torch

from .errors import UsageError, arg


def select_device(device: str | None = None) -> torch.device:
    """`auto` (or None) picks cuda, then mps, then cpu."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", fix="use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"{arg('device', device)} asked for, but CUDA is not available here", fix=f"use {arg('device', 'cpu')}"
        )
    return chosen


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on CUDA (fast, no loss scaling needed), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"unknown precision {precision!r}", fix="use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 needs a CUDA device", fix=f"use {arg('precision', 'fp32')} or bf16")
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context that runs a resolved `precision` on `device` (none for fp32)."""
    if precision in ("bf16", "fp16") and device.type in ("cuda", "cpu"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return contextlib.nullcontext()
