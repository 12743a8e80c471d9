"""What AdaRing keeps of the classes it was not trained on (docs/tuning.md): one base-to-new fit per seed
on the training-only split of `tools.tune_defaults --protocol base-to-new` (16 shots of the first 5
classes; 50 scored training-split images per class, never t10k), then base and new accuracy of

  zeroshot     the frozen model,
  text G       the adapted model with each class feature blended with the frozen one, (1 - G) a + G z
               (renormalised): what a pull of the class features towards zero-shot at inference gives,
  prob G       the adapted model's probabilities blended with the frozen model's, (1 - G) p + G q
               (an output ensemble; costs a second, frozen image encoding),

for G in 0 (the adapter as it is), 0.25, 0.5, 0.75. Neither blend is a product setting.

    python -m tools.new_class_study adaring '{}' --seeds 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("method", help="a class-agnostic method, e.g. adaring")
    parser.add_argument("settings", help="JSON method settings")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(argv)

    import adaclip
    from adaclip.inference import encode_images
    from benchmarks.accuracy import prepare_dataset
    from tools.tune_defaults import base_to_new_split

    data = prepare_dataset()
    backbone = adaclip.create_backbone("lite", None)
    split = base_to_new_split(data, val_per_class=50, shots=16)
    config = json.loads(args.settings)
    for seed in args.seeds:
        started = time.perf_counter()
        adapter = adaclip.fit(
            split.training_data(seed), args.method, backbone=backbone, seed=seed, templates="ensemble", config=config
        )
        model, plain = adapter.model, backbone.eval_transform()
        record = {"method": args.method, "settings": config, "seed": seed}
        record["fit_seconds"] = round(time.perf_counter() - started)
        with torch.no_grad():
            encoded = encode_images(model, split.test, plain, batch_size=64)
            with model.components_disabled():
                frozen = encode_images(model, split.test, plain, batch_size=64).features
            labels = encoded.labels.cpu()
            for part, classes in (("base", range(split.n_base)), ("new", range(split.n_base, len(split.folders)))):
                rows = (labels >= classes.start) & (labels < classes.stop)
                truth = labels[rows] - classes.start
                with adapter.classes([split.class_names[i] for i in classes]):
                    adapted_classes = model.class_features()
                    frozen_classes = F.normalize(model.zero_shot_class_features(), dim=-1)
                    adapted = model.head_output(encoded.features[rows], adapted_classes).logits.float()
                    zero_shot = (backbone.logit_scale * frozen[rows] @ frozen_classes.t()).float()
                    record[f"{part}_zeroshot"] = round(float((zero_shot.argmax(-1) == truth).float().mean()), 4)
                    for g in (0.0, 0.25, 0.5, 0.75):
                        blended = F.normalize((1 - g) * adapted_classes + g * frozen_classes, dim=-1)
                        logits = model.head_output(encoded.features[rows], blended).logits.float()
                        record[f"{part}_text{g}"] = round(float((logits.argmax(-1) == truth).float().mean()), 4)
                        probs = (1 - g) * adapted.softmax(-1) + g * zero_shot.softmax(-1)
                        record[f"{part}_prob{g}"] = round(float((probs.argmax(-1) == truth).float().mean()), 4)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    sys.exit(main())
