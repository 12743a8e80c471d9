"""What every benchmark record carries: the exact command, code version, machine and library versions."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOCS = ROOT / "docs"


def git_commit() -> str:
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "") if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "hostname": platform.node(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "gpu": None,
        # allocator settings change CPU throughput a lot (Makefile, bench targets): recorded with the numbers
        "malloc_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")},
        # other jobs on the machine inflate timings: the 1/5/15-minute load averages when this header is
        # taken (most benchmarks take it before measuring; startup, speed_lora_peft and
        # feature_cache_overhead after)
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)}
    return info


def versions() -> dict[str, str]:
    import open_clip
    import torch
    import torchvision

    import adaclip

    return {
        "python": platform.python_version(),
        "adaclip": adaclip.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "open_clip": open_clip.__version__,
    }


def run_header(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv if argv is None else argv
    return {
        "command": "python -m " + " ".join(shlex.quote(a) for a in [_module_name(argv[0]), *argv[1:]]),
        "git_commit": git_commit(),
        "date": _dt.datetime.now(_dt.UTC).replace(microsecond=0).isoformat(),
        "machine": machine(),
        "versions": versions(),
    }


def _module_name(path: str) -> str:
    p = Path(path)
    if p.suffix == ".py":
        try:
            return ".".join(p.resolve().relative_to(ROOT).with_suffix("").parts)
        except ValueError:
            return str(p)
    return path


def write_json(path: Path, document: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(document, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[tuple[str, str]]) -> str:
    """rows -> a GitHub markdown table; columns are (key, heading) pairs."""
    head = "| " + " | ".join(h for _, h in columns) + " |"
    rule = "| " + " | ".join("---" for _ in columns) + " |"
    body = ["| " + " | ".join(_cell(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join([head, rule, *body])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def replace_section(path: Path, marker: str, content: str) -> None:
    """Replace the text between `<!-- marker:start -->` and `<!-- marker:end -->` (or append it)."""
    start, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    block = f"{start}\n{content.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# Dense (no 2:4 sparsity) peak TFLOP/s from the vendors' data sheets, for "achieved vs peak". Each
# pattern is a whole-word match against torch.cuda.get_device_properties().name, tried in order, so
# the more specific names come first. "half" is the bf16/fp16 tensor-core rate with fp32 accumulation;
# "fp32" the plain fp32 rate (PyTorch does not use TF32 for fp32 matmuls unless asked to).
GPU_PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"H100 PCIe", {"half": 756.0, "fp32": 51.2}),
    (r"H100 NVL", {"half": 835.0, "fp32": 60.0}),
    (r"H100", {"half": 989.4, "fp32": 66.9}),  # SXM5, reported as e.g. "NVIDIA H100 80GB HBM3"
    (r"H200", {"half": 989.4, "fp32": 66.9}),
    (r"A100", {"half": 312.0, "fp32": 19.5}),
    (r"L40S", {"half": 362.1, "fp32": 91.6}),
    (r"L4", {"half": 121.0, "fp32": 30.3}),
)


PEAK_HELP = "the GPU's peak TFLOP/s at the run's precision, for GPUs not in benchmarks.common.GPU_PEAK_TFLOPS"


def gpu_peak_tflops(device_name: str, precision: str) -> float | None:
    """The data-sheet peak for this GPU at this precision (bf16, fp16 or fp32), or None if unknown."""
    kind = "fp32" if precision == "fp32" else "half"
    for pattern, peaks in GPU_PEAK_TFLOPS:
        if re.search(rf"\b{pattern}\b", device_name, flags=re.IGNORECASE):
            return peaks[kind]
    return None


# The options of one measured run: speed.py parses them and passes them on to speed_one.py (one process
# per method), which parses them again; speed_lora_peft.py uses some of them with its own defaults.
RUN_OPTIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("--device", {"default": "auto"}),
    ("--precision", {"default": "auto"}),
    ("--batch-size", {"type": int, "default": 32}),
    ("--steps", {"type": int, "default": 3}),
    ("--predict-batch-size", {"type": int, "default": 64}),
    ("--predict-steps", {"type": int, "default": 3}),
    ("--tta-images", {"type": int, "default": 32, "help": "images for online/tda TTA timing (0: skip TTA)"}),
    ("--tta-episodic-images", {"type": int, "default": 2, "help": "of those, images for episodic TTA"}),
    ("--peak-tflops", {"type": float, "default": None, "help": PEAK_HELP}),
)


def add_run_options(parser: Any, only: tuple[str, ...] | None = None, **defaults: Any) -> None:
    """Add RUN_OPTIONS (or the flags in `only`) to an argparse parser; `defaults` overrides by dest name."""
    for flag, spec in RUN_OPTIONS:
        if only is None or flag in only:
            dest = flag[2:].replace("-", "_")
            parser.add_argument(flag, **{**spec, "default": defaults.get(dest, spec["default"])})


def run_option_args(args: Any) -> list[str]:
    """The command-line form of the RUN_OPTIONS values in `args` (those not None)."""
    argv: list[str] = []
    for flag, _ in RUN_OPTIONS:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is not None:
            argv += [flag, str(value)]
    return argv
