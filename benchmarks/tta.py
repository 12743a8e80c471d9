"""Test-time adaptation under corruption, side by side (`make bench-tta`, part of `make bench-accuracy`).

Data: Fashion-MNIST t10k images under 3 corruptions (Gaussian noise, blur, low contrast; the functions
that made sample_data/shifted), 200 images per class (2,000 per corruption, fixed by a seed), written as
unlabeled PNG folders with a file,label CSV used only for scoring. Episodic mode sees 64 views per image,
so it runs on the first 300 of them (30 per class) to fit a CPU budget; the other modes see all 2,000.

Sources: the zero-shot adapter (RAda's mask starts at identity) and a 16-shot `rada` adapter fitted on
clean training images (seed 1). Modes: none (the source's own predictions, same images), tda (training-
free caches), rada online, rada episodic. Reported: accuracy and images/s (encoding included).

    python -m benchmarks.tta
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
from pathlib import Path

import numpy as np

from .accuracy import CACHE, FOLDERS, prepare_dataset
from .common import DOCS, RESULTS, markdown_table, replace_section, run_header, write_json

PER_CLASS = 200
EPISODIC_PER_CLASS = 30
CORRUPTIONS = ("noise", "blur", "contrast")


def prepare_corrupted(root: Path = CACHE / "tta", seed: int = 0) -> Path:
    """root/<corruption>/{all,episodic}/<index>.png + labels.csv (written once)."""
    from PIL import Image

    from tools.lite.fmnist import load_split
    from tools.make_sample_data import corrupt

    done = root / ".complete"
    if done.exists():
        return root
    images, labels = load_split("t10k")
    rng = np.random.default_rng(seed)
    chosen = [np.sort(rng.choice(np.flatnonzero(labels == k), PER_CLASS, replace=False)) for k in range(len(FOLDERS))]
    for corruption in CORRUPTIONS:
        noise = np.random.default_rng(seed + 1)
        for subset, per_class in (("all", PER_CLASS), ("episodic", EPISODIC_PER_CLASS)):
            folder = root / corruption / subset
            folder.mkdir(parents=True, exist_ok=True)
            rows = [("file", "label")]
            for k, indices in enumerate(chosen):
                for i in indices[:per_class]:
                    name = f"{i:05d}.png"
                    if subset == "all":
                        Image.fromarray(corrupt(images[i], corruption, noise)).save(folder / name)
                    else:  # the same corrupted pixels as in all/
                        (folder / name).write_bytes((root / corruption / "all" / name).read_bytes())
                    rows.append((name, FOLDERS[k]))
            with open(folder.parent / f"{subset}.csv", "w", newline="") as handle:
                csv.writer(handle).writerows(rows)
    done.write_text("ok\n")
    return root


def run(args) -> list[dict]:
    import adaclip

    data = prepare_dataset()
    corrupted = prepare_corrupted()
    backbone = adaclip.create_backbone(args.backbone, None if args.backbone == "lite" else "openai")
    common = dict(backbone=backbone, classes=data / "classes.json", templates=args.templates, val_split=0)
    sources = {
        "zeroshot": adaclip.fit(data / "train", "zeroshot", **common),
        "rada 16-shot": adaclip.fit(data / "train", "rada", shots=16, seed=1, **common),
    }
    records = []
    for corruption in CORRUPTIONS:
        for source_name, source in sources.items():
            for mode in args.modes:
                subset = "episodic" if mode == "episodic" else "all"
                folder = corrupted / corruption / subset
                result = source.tta(folder, mode=mode, labels=folder.parent / f"{subset}.csv", seed=0)
                record = {
                    "corruption": corruption,
                    "source": source_name,
                    "mode": mode,
                    "images": result.n_images,
                    "accuracy_without_tta": result.accuracy_before,
                    "accuracy": result.accuracy,
                    "images_per_second": result.images_per_second,
                }
                print(json.dumps(record), file=sys.stderr, flush=True)
                records.append(record)
    return records


def render(report: dict) -> str:
    machine = report["machine"]
    return "\n".join(
        [
            f"Measured {report['date']} on {machine['cpu']} ({machine['cpu_count']} cores"
            + (f", GPU {machine['gpu']['name']}" if machine.get("gpu") else ", no GPU")
            + f"), adaclip {report['git_commit'][:12]}, backbone `{report['settings']['backbone']}`.",
            "",
            f"Command: `{report['command']}`",
            "",
            f"Fashion-MNIST t10k under each corruption: {PER_CLASS * 10} images ({EPISODIC_PER_CLASS * 10} for "
            "episodic mode, 64 views each). `without tta` is the source adapter on the same images. Images/s "
            "include encoding.",
            "",
            markdown_table(
                report["runs"],
                [
                    ("corruption", "corruption"),
                    ("source", "source adapter"),
                    ("mode", "tta mode"),
                    ("images", "images"),
                    ("accuracy_without_tta", "without tta"),
                    ("accuracy", "with tta"),
                    ("images_per_second", "images/s"),
                ],
            ),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="lite")
    parser.add_argument("--templates", default="ensemble")
    parser.add_argument("--modes", nargs="+", default=["tda", "online", "episodic"])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument(
        "--section", default=None, help="docs/benchmarks.md section to write (default tta-BACKBONE, the main table)"
    )
    args = parser.parse_args(argv)
    report = {**run_header(), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    report["runs"] = run(args)
    output = args.output or RESULTS / f"tta-{args.backbone}-{platform.node() or 'host'}.json"
    write_json(output, report)
    replace_section(DOCS / "benchmarks.md", args.section or f"tta-{args.backbone}", render(report))
    print(f"wrote {output} and docs/benchmarks.md")


if __name__ == "__main__":
    main()
