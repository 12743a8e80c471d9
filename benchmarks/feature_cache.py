"""What the feature cache buys: the same `fit --method rada` and `compare` run three ways, end to end
as a user runs them (one `adaclip` process each, wall clock): cache off, cold (empty cache folder) and
warm (the folder the cold run filled). Targets (issue 17): warm >= 10x faster than cold, and cold at
most 5% slower than off.

    python -m benchmarks.feature_cache                    # lite and ViT-B-16 (random weights), fit and compare
    python -m benchmarks.feature_cache --cases lite-fit --repeats 2

ViT-B-16's real weights need a download; its timing does not depend on the weights, so the benchmark
saves a random-init ViT-B-16 (open_clip, seed 0) to a local safetensors checkpoint and passes it as
--pretrained FILE: its sha256 keys the cache as a real checkpoint's would.

Writes results/feature-cache-<machine>.json and prints a markdown table (for docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import ROOT, run_header, write_json

ADACLIP = [sys.executable, "-m", "adaclip"]
COMPARE_METHODS = "zeroshot,linear-probe,tip-adapter,rada"  # frozen image towers: what the cache serves


def vit_checkpoint(folder: Path) -> Path:
    """A random-init ViT-B-16 state dict (seed 0) as safetensors: a local checkpoint open_clip loads."""
    path = folder / "vit-b-16-random-seed0.safetensors"
    if not path.exists():
        import open_clip
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = open_clip.create_model("ViT-B-16", pretrained=None)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(path))
    return path


def subset(source: Path, target: Path, per_class: int) -> Path:
    """The first `per_class` images of each class of source/{train,test} (sorted names)."""
    if target.exists():
        shutil.rmtree(target)
    for split in ("train", "test"):
        for folder in sorted((source / split).iterdir()):
            if folder.is_dir():
                (target / split / folder.name).mkdir(parents=True)
                for image in sorted(folder.iterdir())[:per_class]:
                    shutil.copy(image, target / split / folder.name / image.name)
    return target


def timed(command: list[str], cache: str, log: Path) -> float:
    env = {**os.environ, "ADACLIP_CACHE": cache, "ADACLIP_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    with open(log, "ab") as err:
        done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}; see {log}")
    return seconds


def measure(name: str, command: list[str], work: Path, repeats: int) -> dict:
    """Per repeat: off, cold, warm, in that order (so each pair compared ran under similar load)."""
    runs = []
    log = work / f"{name}.log"
    for repeat in range(repeats):
        cache = work / f"cache-{name}-{repeat}"
        shutil.rmtree(cache, ignore_errors=True)
        row = {"off": timed(command, "off", log), "cold": timed(command, str(cache), log)}
        row["warm"] = timed(command, str(cache), log)
        row["cache_bytes"] = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
        row["load_average_after"] = os.getloadavg()[0]  # other jobs inflate seconds: the 1-minute load
        runs.append({k: round(v, 2) for k, v in row.items()})
        print(f"{name} #{repeat + 1}: {runs[-1]}", file=sys.stderr, flush=True)
    best = {k: min(r[k] for r in runs) for k in ("off", "cold", "warm")}
    return {
        "name": name,
        "command": " ".join(["adaclip", *command[len(ADACLIP) :]]).replace(str(work) + "/", ""),
        "runs": runs,
        "best_seconds": best,
        "speedup_warm_vs_cold": round(best["cold"] / best["warm"], 2),
        "overhead_cold_vs_off": round(best["cold"] / best["off"] - 1, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default="lite-fit,ViT-B-16-fit,lite-compare,ViT-B-16-compare")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--vit-per-class", type=int, default=4, help="ViT-B-16: images per class and split")
    parser.add_argument("--compare-per-class", type=int, default=8, help="compare on lite: images per class")
    parser.add_argument("--compare-seeds", default="1")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "feature-cache-vm.json")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="adaclip-cache-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    sample = ROOT / "sample_data"
    result = {
        **run_header(),
        "benchmark": "feature_cache",
        "cases": [],
    }
    for name in args.cases.split(","):
        backbone, command = name.rsplit("-", 1)
        per_class = args.vit_per_class if backbone != "lite" else args.compare_per_class
        data = (
            sample if (backbone, command) == ("lite", "fit") else subset(sample, work / f"data-{per_class}", per_class)
        )
        model = ["--backbone", "lite"]
        if backbone != "lite":
            model = ["--backbone", backbone, "--pretrained", str(vit_checkpoint(work))]
        if command == "fit":
            argv_ = [*ADACLIP, "fit", str(data / "train"), "--method", "rada", *model, "--seed", "1"]
            argv_ += ["-o", str(work / "out.adaclip"), "--force"]
        else:
            argv_ = [*ADACLIP, "compare", str(data), "--methods", COMPARE_METHODS, *model]
            argv_ += ["--seeds", args.compare_seeds]
        case = measure(name, argv_, work, args.repeats)
        images = sum(1 for p in (data / "train").rglob("*") if p.is_file())
        case["data"] = "sample_data" if data == sample else f"sample_data, first {per_class} images per class"
        case["train_images"] = images
        result["cases"].append(case)
        write_json(args.output, result)  # after each case: a long run stopped early keeps what it measured
    print(table(result["cases"]))


def table(cases: list[dict]) -> str:
    lines = [
        "| case | off (s) | cold (s) | warm (s) | warm vs cold | cold vs off |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        best = case["best_seconds"]
        lines.append(
            f"| {case['name']} | {best['off']:.1f} | {best['cold']:.1f} | {best['warm']:.1f} | "
            f"{case['speedup_warm_vs_cold']:.1f}x | {case['overhead_cold_vs_off'] * 100:+.1f}% |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
