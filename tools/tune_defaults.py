"""Choose method defaults on a validation set that is not the test set.

Fits a method with several settings on K shots per class sampled from Fashion-MNIST's *training* split
(benchmarks.accuracy's cache) and scores each on other training-split images, never on t10k. The
chosen defaults and this script's output are recorded in docs/tuning.md.

    python -m tools.tune_defaults adaring '{}' '{"train": {"lr": 0.01}}'

`--protocol base-to-new` runs the accuracy suite's base-to-new protocol (adaclip.comparison: 16 shots on
the first 5 classes, new = the other 5) on a split of the training images alone: `--val-per-class`
images per class are scored, 500 others per class are the pool the shots and the fit's own validation
are drawn from (symlinks under ~/.cache/adaclip/bench/, written once).

    python -m tools.tune_defaults adaring '{}' --protocol base-to-new --val-per-class 50 --seeds 1 2
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


def training_split_folders(data, per_class: int, pool_per_class: int = 500):
    """root/{train,test}/<class>/ of symlinks to Fashion-MNIST *training* images: `per_class` scored
    images per class in test/, `pool_per_class` others in train/; no image in both, none from t10k."""
    root = data.parent / f"{data.name}-train-split-{per_class}-{pool_per_class}"
    if (root / ".complete").exists():
        return root
    rng = random.Random(12345)
    for folder in sorted(p for p in (data / "train").iterdir() if p.is_dir()):
        files = sorted(folder.glob("*.png"))
        picked = rng.sample(files, per_class + pool_per_class)
        for split, chosen in (("test", picked[:per_class]), ("train", picked[per_class:])):
            (root / split / folder.name).mkdir(parents=True, exist_ok=True)
            for image in chosen:
                link = root / split / folder.name / image.name
                if not link.is_symlink():
                    link.symlink_to(image)
    (root / "classes.json").write_text((data / "classes.json").read_text())
    (root / ".complete").write_text("ok\n")
    return root


def base_to_new_split(data, val_per_class: int, shots: int):
    """The accuracy suite's base-to-new protocol (its base classes, the product's own validation) on
    `training_split_folders`: what `--protocol base-to-new` and tools.new_class_study score."""
    from benchmarks.accuracy import suite_protocol

    return suite_protocol(training_split_folders(data, val_per_class), "base-to-new", shots)


def base_to_new(args, backbone, data) -> None:
    """Each candidate through the product's base-to-new comparison on a training-only split."""
    from adaclip.comparison import Comparison
    from adaclip.inference import SharedEncodings

    split = base_to_new_split(data, args.val_per_class, args.shots)
    shared = SharedEncodings()
    for raw in args.settings:
        settings = json.loads(raw)
        comparison = Comparison(
            split, backbone, templates=args.templates, batch_size=32, shared=shared, config={args.method: settings}
        )
        for seed in args.seeds:
            result = comparison.run(args.method, seed)
            if result.status != "ok":
                sys.exit(f"{args.method} {settings} seed {seed} failed: {result.error}")
            base, new = result.accuracy, result.new_accuracy
            hm = 2 * base * new / (base + new) if new else None
            record = {"method": args.method, "settings": settings, "seed": seed, "protocol": "base-to-new"}
            record |= {"base": round(base, 4), "new": round(new, 4) if new is not None else None}
            record |= {"hm": round(hm, 4) if hm is not None else None, "fit_seconds": round(result.fit_seconds, 1)}
            print(json.dumps(record), flush=True)


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
    parser.add_argument("--protocol", choices=["few-shot", "base-to-new"], default="few-shot")
    args = parser.parse_args(argv)
    val_split = args.val_split if args.val_split == "auto" else float(args.val_split)

    import adaclip
    from adaclip.data import prepare_training_data
    from adaclip.inference import encode_images, logits_in_batches
    from benchmarks.accuracy import prepare_dataset

    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = prepare_dataset()
    backbone = adaclip.create_backbone(args.backbone, None)
    if args.protocol == "base-to-new":
        return base_to_new(args, backbone, data)
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
