"""Choose test-time adaptation settings on corrupted *training* images, never on the t10k test set.

The source is the TTA suite's: a 16-shot `rada` adapter (seed 1) fitted on clean Fashion-MNIST training
images. The images adapted to are other training-split images (not among the 16 shots), PER_CLASS per
class, under the suite's corruptions (`tools.make_sample_data.corrupt`); benchmarks.tta reports on t10k.
Each candidate is a JSON of `Adapter.tta` settings; prints one JSON record per (settings, corruption).

    python -m tools.tune_tta --mode episodic '{}' '{"min_crop_scale": 0.5}'
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np


def corrupted_training_images(data: Path, taken: set[Path], corruption: str, per_class: int, seed: int) -> Path:
    """DATA/tta-train/seed-S-N/<corruption>/ PNGs and <corruption>.csv beside it (written once)."""
    from PIL import Image

    from tools.make_sample_data import corrupt
    from tools.tune_defaults import validation_images

    root = data / "tta-train" / f"seed-{seed}-{per_class}" / corruption
    labels_file = root.parent / f"{corruption}.csv"
    if labels_file.exists():
        return root
    folder, chosen = validation_images(data, taken, per_class, seed)
    noise = np.random.default_rng(seed + 1)
    root.mkdir(parents=True, exist_ok=True)
    rows = [("file", "label")]
    for image in chosen:
        pixels = np.asarray(Image.open(image.path).convert("L"))
        name = f"{image.path.stem}.png"
        Image.fromarray(corrupt(pixels, corruption, noise)).save(root / name)
        rows.append((name, folder.folders[image.label]))
    partial = labels_file.with_suffix(".tmp")
    with open(partial, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    partial.rename(labels_file)  # the folder counts as written only when its labels are
    return root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="JSON Adapter.tta settings, one per candidate")
    parser.add_argument("--mode", default="episodic", choices=["episodic", "online", "tda"])
    parser.add_argument("--corruptions", nargs="+", default=["noise", "blur", "contrast"])
    parser.add_argument("--per-class", type=int, default=10, help="corrupted training images per class")
    parser.add_argument("--seed", type=int, default=1, help="of the source's 16 shots and of the images chosen")
    parser.add_argument("--backbone", default="lite")
    parser.add_argument("--templates", default="ensemble")
    args = parser.parse_args(argv)

    import adaclip
    from benchmarks.accuracy import prepare_dataset

    data = prepare_dataset()
    backbone = adaclip.create_backbone(args.backbone, None if args.backbone == "lite" else "openai")
    source = adaclip.fit(
        data / "train",
        "rada",
        backbone=backbone,
        shots=16,
        seed=args.seed,
        val_split=0,
        classes=data / "classes.json",
        templates=args.templates,
    )
    taken = {data / "train" / f for f in source.metadata.data.files}
    for raw in args.settings:
        settings = json.loads(raw)
        for corruption in args.corruptions:
            folder = corrupted_training_images(data, taken, corruption, args.per_class, args.seed)
            result = source.tta(folder, mode=args.mode, labels=folder.parent / f"{corruption}.csv", seed=0, **settings)
            record = {
                "mode": args.mode,
                "settings": settings,
                "corruption": corruption,
                "images": result.n_images,
                "accuracy_without_tta": round(result.accuracy_before, 4),
                "accuracy": round(result.accuracy, 4),
                "images_per_second": round(result.images_per_second, 2),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
