"""Measure one method on one backbone, in a fresh process (so peak memory is this method's alone).

Prints one JSON record on stdout. Run by benchmarks.speed; usable alone:

    python -m benchmarks.speed_one --backbone lite --method adaring --batch-size 32 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from .common import PEAK_HELP, gpu_peak_tflops

N_CLASSES = 10


def _peak_memory(device: torch.device) -> dict[str, float]:
    peak = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def _against_peak(achieved_tflops: float, device: torch.device, precision: str, args) -> dict:
    """Achieved training-step TFLOP/s as a fraction of the GPU's data-sheet peak at this precision."""
    name = torch.cuda.get_device_properties(device).name
    peak = args.peak_tflops or gpu_peak_tflops(name, precision)
    return {
        "gpu_name": name,
        "train_achieved_tflops": achieved_tflops,
        "gpu_peak_tflops": peak,
        "train_fraction_of_peak": achieved_tflops / peak if peak else None,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, repeats: int, device: torch.device) -> float:
    """Seconds per call, after one untimed warm-up call."""
    fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats


def measure(args: argparse.Namespace) -> dict:
    from adaclip.adapter import Adapter
    from adaclip.api import adapter_metadata
    from adaclip.backbone import create_backbone
    from adaclip.methods import make_method_config
    from adaclip.model import AdaptedCLIP
    from adaclip.training import make_optimizer

    torch.manual_seed(0)
    backbone = create_backbone(args.backbone, args.pretrained, device=args.device, precision=args.precision)
    device = backbone.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    classes = [f"class {i}" for i in range(N_CLASSES)]
    config = make_method_config(args.method, json.loads(args.settings) if args.settings else {})
    model = AdaptedCLIP(backbone, config, classes, ["a photo of a {}."], seed=0)
    record: dict = {
        "backbone": backbone.identity.describe(),
        "method": args.method,
        "device": str(device),
        "precision": backbone.precision,
        "train_batch_size": args.batch_size,
        "predict_batch_size": args.predict_batch_size,
        "trainable_params": model.n_trainable(),
        "image_tower_frozen": model.image_tower_frozen,
    }
    size = backbone.preprocess.size
    pixels = torch.randn(args.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, N_CLASSES, (args.batch_size,), device=device)

    # --- training step: images through the encoders, backward, optimizer step ---------------------
    params = model.trainable_parameters()
    if params and config.trainable:
        optimizer = make_optimizer(params, config.train)
        references = model.zero_shot_image_features(pixels)  # what the loop caches once per image
        model.train()

        def train_step() -> None:
            loss, _ = model.training_loss(labels, pixels=pixels, reference_image_features=references)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not model.text_tower_frozen:
                model.invalidate_class_cache()

        seconds = _timed(train_step, args.steps, device)
        record["train_step_seconds"] = seconds
        record["train_images_per_second"] = args.batch_size / seconds
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            train_step()
        record["train_step_gflop"] = counter.get_total_flops() / 1e9
        record["train_achieved_gflops"] = record["train_step_gflop"] / seconds
        if device.type == "cuda":
            record.update(_against_peak(record["train_achieved_gflops"] / 1e3, device, backbone.precision, args))
        if model.image_tower_frozen:
            # what the shared loop actually runs for frozen image towers: steps on cached features
            features = model.zero_shot_image_features(pixels)

            def cached_step() -> None:
                loss, _ = model.training_loss(labels, image_features=features)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

            cached = _timed(cached_step, max(args.steps, 10), device)
            record["cached_step_seconds"] = cached
            record["cached_images_per_second"] = args.batch_size / cached
    record.update(_peak_memory(device))

    # --- predict: merged where the method has a merged form -------------------------------------
    model.eval()
    for component in model.components:
        component.merge()
    predict_pixels = torch.randn(args.predict_batch_size, 3, size, size, device=device)

    def predict() -> None:
        with torch.inference_mode():
            model(predict_pixels)

    seconds = _timed(predict, args.predict_steps, device)
    record["predict_images_per_second"] = args.predict_batch_size / seconds

    # --- adapter file size ------------------------------------------------------------------------
    adapter = Adapter(model, adapter_metadata(model, seed=0))
    with tempfile.TemporaryDirectory() as tmp:
        path = adapter.save(Path(tmp) / "bench.adaclip")
        record["adapter_file_bytes"] = path.stat().st_size
        # --- test-time adaptation: the adapter over a folder of images, as `adaclip tta` runs it ---
        if args.tta_images:
            record.update(_tta_throughput(adapter, Path(tmp) / "images", size, args))
    return record


def _tta_throughput(adapter, folder: Path, size: int, args: argparse.Namespace) -> dict:
    """Images/s of each TTA mode end to end (decode, encode, adapt, predict). Episodic encodes
    `views` crops per image, so it runs on the first `--tta-episodic-images` images only."""
    from PIL import Image

    from adaclip.errors import UsageError
    from adaclip.tta import TestTimeAdaptation, make_tta_settings

    folder.mkdir()
    generator = torch.Generator().manual_seed(0)
    images = []
    for index in range(args.tta_images):
        pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8).numpy()
        images.append(folder / f"{index:05d}.png")
        Image.fromarray(pixels).save(images[-1])
    record: dict = {}
    for mode, subset in (
        ("online", images),
        ("tda", images),
        ("episodic", images[: args.tta_episodic_images]),
    ):
        settings = make_tta_settings(mode=mode, batch_size=args.predict_batch_size)
        try:
            run = TestTimeAdaptation(adapter.model, settings)
        except UsageError:  # a head that scores with its own weights (linear-probe...): no mask to adapt
            record[f"tta_{mode}_images_per_second"] = None
            continue
        for _ in run.run(subset):
            pass
        record[f"tta_{mode}_images_per_second"] = run.n_images / run.seconds
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--method", required=True)
    parser.add_argument("--settings", default="", help="JSON method settings")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--predict-batch-size", type=int, default=64)
    parser.add_argument("--predict-steps", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None, help=PEAK_HELP)
    parser.add_argument("--tta-images", type=int, default=32, help="images for online/tda TTA timing (0: skip TTA)")
    parser.add_argument("--tta-episodic-images", type=int, default=2, help="of those, images for episodic TTA")
    args = parser.parse_args(argv)
    json.dump(measure(args), sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
