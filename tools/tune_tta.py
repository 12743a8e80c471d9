"""Choose test-time adaptation settings on corrupted *training* images, never on the t10k test set.

The source is the TTA suite's: a 16-shot `rada` adapter (seed 1) fitted on clean Fashion-MNIST training
images. The images adapted to are other training-split images (not among the 16 shots), PER_CLASS per
class, under the suite's corruptions (`tools.make_sample_data.corrupt`); benchmarks.tta reports on t10k.
Each candidate is a JSON of `Adapter.tta` settings; prints one JSON record per (settings, corruption).

    python -m tools.tune_tta --mode episodic '{}' '{"min_crop_scale": 0.5}'

Episodic mode encodes 64 views per image. The source's image tower is frozen (rada adapts a mask on
features), so an image's views have the same features under every candidate: they are encoded once per
(image, crop scale) and reused, which makes each further candidate cost only the mask's steps. With
`--diagnose`, each corruption also gets a record of what TPT's objective pulls towards before any step:
how many images the original view, the mean prediction of the most confident 10% of the views (the
distribution whose entropy the step minimises) and the mean of all views classify correctly.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch


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


@contextlib.contextmanager
def views_encoded_once(model):
    """While active, a batch of pixels that `model` (an AdaptedCLIP whose image tower is frozen) or a copy
    of it with another head (what TTA adapts) has encoded before is not encoded again: episodic TTA's
    views of an image are the same under every candidate."""
    if not model.image_tower_frozen:
        raise ValueError("reusing encodings needs a frozen image tower")
    cls, memo = type(model), {}
    encode = cls.image_features

    def image_features(self, pixels):
        if torch.is_grad_enabled() or self.backbone is not model.backbone or not self.image_tower_frozen:
            return encode(self, pixels)
        key = (pixels.shape, hashlib.blake2b(pixels.cpu().numpy().tobytes(), digest_size=16).digest())
        if key not in memo:
            memo[key] = encode(self, pixels)
        return memo[key]

    cls.image_features = image_features
    try:
        yield
    finally:
        cls.image_features = encode


def diagnose(source, folder: Path, labels_file: Path, seed: int) -> dict:
    """Before any step: correct images by the original view, by the mean of the confident views (what
    TPT's step sharpens) and by the mean of all views, with episodic mode's default views."""
    from adaclip.data import open_item
    from adaclip.tta import confident_rows, episodic_views
    from adaclip.tta.settings import make_tta_settings

    defaults = make_tta_settings(mode="episodic")
    model, backbone = source.model, source.model.backbone
    with open(labels_file, newline="") as handle:
        truth = {row["file"]: row["label"] for row in csv.DictReader(handle)}
    counts = {"images": 0, "original_view": 0, "confident_views": 0, "all_views": 0}
    plain, crops = backbone.eval_transform(), backbone.train_transform(defaults.min_crop_scale)
    with torch.no_grad():
        class_features = model.class_features()
        for path in sorted(folder.iterdir()):
            pixels = episodic_views(open_item(path), seed, defaults.views, plain, crops)
            logits = model.head_output(model.image_features(pixels), class_features).logits.float()
            label = source.metadata.class_folders.index(truth[path.name])
            kept = confident_rows(logits, defaults.effective_confident_fraction)
            counts["images"] += 1
            counts["original_view"] += int(logits[0].argmax() == label)
            counts["confident_views"] += int(logits[kept].softmax(-1).mean(0).argmax() == label)
            counts["all_views"] += int(logits.softmax(-1).mean(0).argmax() == label)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("settings", nargs="+", help="JSON Adapter.tta settings, one per candidate")
    parser.add_argument("--mode", default="episodic", choices=["episodic", "online", "tda"])
    parser.add_argument("--corruptions", nargs="+", default=["noise", "blur", "contrast"])
    parser.add_argument("--per-class", type=int, default=10, help="corrupted training images per class")
    parser.add_argument("--seed", type=int, default=1, help="of the source's 16 shots and of the images chosen")
    parser.add_argument("--backbone", default="lite")
    parser.add_argument("--templates", default="ensemble")
    parser.add_argument("--diagnose", action="store_true", help="episodic: what the views predict before a step")
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
    with views_encoded_once(source.model):
        for corruption in args.corruptions:  # corruption first: its views are encoded once
            folder = corrupted_training_images(data, taken, corruption, args.per_class, args.seed)
            labels = folder.parent / f"{corruption}.csv"
            for raw in args.settings:
                settings = json.loads(raw)
                result = source.tta(folder, mode=args.mode, labels=labels, seed=0, **settings)
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
            if args.diagnose and args.mode == "episodic":
                record = {"corruption": corruption, "before_any_step": diagnose(source, folder, labels, seed=0)}
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
