"""The study behind AdaRing's `training_cache` (docs/tuning.md): one fit of a method *without* the cache
per (shots, seed), then the same trained model scored on Fashion-MNIST training-split validation images
(never t10k; the images `tools.tune_defaults` scores) alone and with Tip-Adapter's cache over its own
trained features of the training images, in these variants:

  plain          the un-augmented image's feature as key, alpha/beta searched on the fit's validation images
  views10        the mean of 10 augmented crops as key (Tip-Adapter's 10 passes), same search
  leave-one-out  plain keys, the search also scores each training image without its own entry
  plain-loss     plain, the search's ties broken by the lowest cross-entropy instead of grid order
  plain-training plain, ties broken by the training images scored leave-one-out (then grid order)

    python -m tools.training_cache_study adaring --shots 4 16 --seeds 1 2

`--protocol base-to-new` fits on `tools.tune_defaults --protocol base-to-new`'s training-only split
(16 shots of the first 5 classes) and scores its base images (the cache holds only the base classes):

    python -m tools.training_cache_study adaring --protocol base-to-new --seeds 1 2 3 4 5

`--protocol base-to-new-suite` fits on exactly the accuracy suite's base-to-new training images of each
seed (shots and validation from the whole training split) and scores other training-split images of the
base classes (`--val-per-class` per class, none of them seen by the fit; never t10k).

The product's `training_cache=true` is `plain` (and `training_cache_views=10` is `views10`), so those
columns equal `python -m tools.tune_defaults adaring '{"training_cache": true}' --val-split auto ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="a method with a cosine head, e.g. adaring")
    parser.add_argument("--shots", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--protocol", choices=["few-shot", "base-to-new", "base-to-new-suite"], default="few-shot")
    args = parser.parse_args(argv)

    import adaclip
    from adaclip.data import prepare_training_data
    from adaclip.inference import encode_images, logits_in_batches
    from adaclip.methods import FeatureSet
    from adaclip.methods.tip_adapter import TipAdapterConfig, TipAdapterHead
    from benchmarks.accuracy import prepare_dataset, suite_protocol
    from tools.tune_defaults import base_to_new_split, validation_images

    data = prepare_dataset()
    backbone = adaclip.create_backbone("lite", None)
    runs = [(shots, seed) for shots in args.shots for seed in args.seeds]
    if args.protocol == "base-to-new":
        split = base_to_new_split(data, val_per_class=args.val_per_class, shots=16)
        runs = [(16, seed) for seed in args.seeds]
    elif args.protocol == "base-to-new-suite":
        split = suite_protocol(data, "base-to-new", 16)
        runs = [(16, seed) for seed in args.seeds]
    for shots, seed in runs:
        started = time.perf_counter()
        if args.protocol.startswith("base-to-new"):
            chosen = split.training_data(seed)
            if args.protocol == "base-to-new":
                scored = [image for image in split.test if image.label < split.n_base]
            else:
                seen = {image.path for image in [*chosen.train, *chosen.val]}
                base = {folder: i for i, folder in enumerate(split.folders[: split.n_base])}
                others = validation_images(data, seen, args.val_per_class, seed)[1]
                scored = [
                    dataclasses.replace(image, label=base[image.path.parent.name])
                    for image in others
                    if image.path.parent.name in base
                ]
            adapter = adaclip.fit(
                chosen,
                args.method,
                backbone=backbone,
                seed=seed,
                templates="ensemble",
                config={"training_cache": False},
            )
        else:
            chosen = prepare_training_data(
                data / "train", classes_file=data / "classes.json", shots=shots, seed=seed, val_split="auto"
            )
            seen = {image.path for image in [*chosen.train, *chosen.val]}
            scored = validation_images(data, seen, args.val_per_class, seed)[1]
            adapter = adaclip.fit(
                data / "train",
                args.method,
                backbone=backbone,
                shots=shots,
                seed=seed,
                val_split="auto",
                classes=data / "classes.json",
                templates="ensemble",
                config={"training_cache": False},
            )
        fit_seconds = time.perf_counter() - started
        model, plain = adapter.model, backbone.eval_transform()
        with torch.no_grad():
            train = encode_images(model, chosen.train, plain, batch_size=128)
            val = encode_images(model, chosen.val, plain, batch_size=128)
            test = encode_images(model, scored, plain, batch_size=128)
            crops = backbone.train_transform(model.config.train.min_crop_scale)
            views = [encode_images(model, chosen.train, crops, seed=seed, epoch=v).features for v in range(10)]
            views10 = F.normalize(torch.stack(views).mean(dim=0), dim=-1)
            logits = logits_in_batches(model, test.features)
            record = {"method": args.method, "protocol": args.protocol, "shots": shots, "seed": seed}
            record["fit_seconds"] = round(fit_seconds)
            record["no_cache"] = round(float((logits.argmax(-1).cpu() == test.labels).float().mean()), 4)
            for name, keys, leave_one_out, ties in (
                ("plain", train.features, False, "first"),
                ("views10", views10, False, "first"),
                ("leave-one-out", train.features, True, "first"),
                ("plain-loss", train.features, False, "loss"),
                ("plain-training", train.features, False, "training"),
            ):
                config = TipAdapterConfig(leave_one_out=leave_one_out, search_ties=ties)
                head = TipAdapterHead(len(chosen.class_names), backbone.embed_dim, config)
                head.fit_training_features(FeatureSet(keys, train.labels))
                chosen_values = head.calibrate(
                    FeatureSet(val.features, val.labels), model.class_features(), backbone.logit_scale
                )
                affinity = test.features @ head.cache_keys.t()
                cache = head.cache_logits(affinity, head.cache_values, head.alpha, head.beta)
                correct = (logits + cache).argmax(-1).cpu() == test.labels
                record[name] = round(float(correct.float().mean()), 4)
                record[f"{name}_alpha_beta"] = [round(chosen_values["alpha"], 3), round(chosen_values["beta"], 3)]
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
