"""Choose method defaults on a validation set that is not the test set.

Fits a method with several settings on K shots per class sampled from Fashion-MNIST's *training* split
(benchmarks.accuracy's cache) and scores each on other training-split images, never on t10k. The
chosen defaults and this script's output are recorded in docs/tuning.md.

    python -m tools.tune_defaults adaring '{}' '{"train": {"lr": 0.01}}'
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch


def validation_images(data, shots_taken: set, per_class: int, seed: int):
    from adaclip.data import read_image_folder

    folder = read_image_folder(data / "train", data / "classes.json")
    rng = random.Random(seed + 12345)
    groups: dict[int, list] = {}
    for image in folder.images:
        if image.path not in shots_taken:
            groups.setdefault(image.label, []).append(image)
    chosen = [im for label in sorted(groups) for im in rng.sample(groups[label], per_class)]
    return folder, chosen


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method")
    parser.add_argument("settings", nargs="+", help="JSON method settings, one per candidate")
    parser.add_argument("--backbone", default="lite")
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1])
    parser.add_argument("--val-per-class", type=int, default=100)
    parser.add_argument("--templates", default="ensemble")
    parser.add_argument(
        "--val-split",
        default="0",
        help="the fit's own validation (what a method searches or tracks): 0 (none) or 'auto' (the product's "
        "min(shots, 4) per class); its images are never among the scored ones",
    )
    args = parser.parse_args(argv)
    val_split = args.val_split if args.val_split == "auto" else float(args.val_split)

    import adaclip
    from adaclip.data import prepare_training_data
    from adaclip.inference import encode_images, logits_in_batches
    from benchmarks.accuracy import prepare_dataset

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = prepare_dataset()
    backbone = adaclip.create_backbone(args.backbone, None)
    # Per seed, once: what a fit sees (its shots, and its own validation with --val-split auto) and the
    # images scored instead, which are none of those.
    seen: dict[int, set] = {}
    scored: dict[int, list] = {}
    for seed in args.seeds:
        chosen = prepare_training_data(
            data / "train", classes_file=data / "classes.json", shots=args.shots, seed=seed, val_split=val_split
        )
        seen[seed] = {image.path for image in [*chosen.train, *chosen.val]}
        scored[seed] = validation_images(data, seen[seed], args.val_per_class, seed)[1]
    for raw in args.settings:
        settings = json.loads(raw)
        for seed in args.seeds:
            started = time.perf_counter()
            adapter = adaclip.fit(
                data / "train",
                args.method,
                backbone=backbone,
                shots=args.shots,
                seed=seed,
                val_split=val_split,
                classes=data / "classes.json",
                templates=args.templates,
                config=settings,
            )
            fit_seconds = time.perf_counter() - started
            trained_on = {data / "train" / f for f in adapter.metadata.data.files}
            if not trained_on <= seen[seed]:
                sys.exit(f"seed {seed}: the fit trained on images outside its sample; the scored set may overlap")
            val = scored[seed]
            encoded = encode_images(adapter.model, val, backbone.eval_transform(), batch_size=128)
            predictions = logits_in_batches(adapter.model, encoded.features).argmax(-1).cpu()
            accuracy = float((predictions == encoded.labels.cpu()).float().mean())
            history = adapter.metadata.training.history
            print(
                json.dumps(
                    {
                        "method": args.method,
                        "settings": settings,
                        "seed": seed,
                        "shots": args.shots,
                        "val_accuracy": round(accuracy, 4),
                        "val_images": len(val),
                        "final_train_accuracy": history[-1]["train_accuracy"] if history else None,
                        "fit_seconds": round(fit_seconds, 1),
                    }
                ),
                flush=True,
            )


if __name__ == "__main__":
    sys.exit(main())
