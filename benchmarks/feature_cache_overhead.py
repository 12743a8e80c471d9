"""The feature cache's own cost, in one process: encode sample_data/train (160 images, lite, one seeded
augmented view) with the cache off, cold and warm, and time the cache's own work (key lookup: file
sha256s and index; storing: one safetensors shard) inside the cold run. End-to-end timings on a
shared machine swing more than the 5% target; this isolates what the cache adds.

    python -m benchmarks.feature_cache_overhead --trials 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from .common import ROOT, run_header, write_json


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "feature-cache-overhead-vm.json")
    args = parser.parse_args(argv)

    from adaclip import create_backbone, feature_store, inference
    from adaclip.data import LabelledImage
    from adaclip.methods import make_method_config
    from adaclip.model import AdaptedCLIP

    backbone = create_backbone("lite", None, device="cpu")
    model = AdaptedCLIP(backbone, make_method_config("zeroshot"), ["a", "b"], ["a photo of a {}."])
    images = [LabelledImage(p, 0) for p in sorted((ROOT / "sample_data" / "train").rglob("*.png"))]
    spent = [0.0]
    lookup, complete = feature_store.lookup, feature_store.Lookup.complete

    def timed_lookup(*a, **k):
        start = time.perf_counter()
        try:
            return lookup(*a, **k)
        finally:
            spent[0] += time.perf_counter() - start

    def timed_complete(self, *a):
        start = time.perf_counter()
        try:
            return complete(self, *a)
        finally:
            spent[0] += time.perf_counter() - start

    feature_store.lookup, feature_store.Lookup.complete = timed_lookup, timed_complete
    trials = []
    for trial in range(args.trials):
        crops = backbone.train_transform(0.5)
        with feature_store.using("off"):
            start = time.perf_counter()
            inference.encode_images(model, images, crops, seed=1, epoch=trial)
            off = time.perf_counter() - start
        spent[0] = 0.0
        with feature_store.using(tempfile.mkdtemp()):
            start = time.perf_counter()
            inference.encode_images(model, images, crops, seed=1, epoch=trial)
            cold, own = time.perf_counter() - start, spent[0]
            start = time.perf_counter()
            inference.encode_images(model, images, crops, seed=1, epoch=trial)
            warm = time.perf_counter() - start
        trials.append(
            {
                "images": len(images),
                "off_s": round(off, 3),
                "cold_s": round(cold, 3),
                "cache_own_work_in_cold_s": round(own, 4),
                "cache_own_share_of_cold": round(own / cold, 5),
                "warm_s": round(warm, 4),
            }
        )
        print(trials[-1], flush=True)
    write_json(args.output, {**run_header(), "benchmark": "feature_cache_overhead", "trials": trials})


if __name__ == "__main__":
    main()
