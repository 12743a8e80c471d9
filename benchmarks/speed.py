"""Speed and memory of every method, side by side (`make bench-speed`).

For each backbone (ViT-B-16 with random weights: timing does not depend on the weights; and the
offline `lite` backbone) and each method, one fresh process (benchmarks.speed_one) measures:
training-step throughput with images through the encoders (and on cached features where the image
tower is frozen), FLOPs of that step and the achieved rate, peak memory (RSS; CUDA max allocated on
GPU), predict throughput (merged adapters), trainable parameters and adapter file size. Throughputs are
also reported as ratios to full fine-tuning and to CLIP-LoRA. A separate run times real `fit` epochs for
frozen-tower methods, to check that epochs after the first cost a few percent of the first. When lora
is among the methods, benchmarks.speed_lora_peft then times its training step against Hugging Face
PEFT's LoRA on the same ViT-B-16 in one process (its own JSON and table; `--no-peft` skips it).

Writes results/speed-<host>.json (one record per run, with the exact command, git commit, machine and
versions) and the table in docs/benchmarks.md.

    python -m benchmarks.speed                      # everything, CPU defaults
    python -m benchmarks.speed --backbones lite --methods adaring lora --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import (
    DOCS,
    RESULTS,
    ROOT,
    add_run_options,
    markdown_table,
    replace_section,
    run_header,
    run_option_args,
    write_json,
)

DEFAULT_METHODS = [
    "zeroshot",
    "linear-probe",
    "tip-adapter",
    "coop",
    "lora",
    "adaring",
    "rada",
    "adaring+rada",
    "full-ft",
]
# AdaRing's default blocks are the second half of each tower (last50%): 6 of a ViT-B's 12, 3 of the lite
# text tower's 6, 5 of its image tower's 9.
PER_BACKBONE_SETTINGS: dict[str, dict[str, dict]] = {}


def run_one(backbone: str, method: str, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        "-m",
        "benchmarks.speed_one",
        "--backbone",
        backbone,
        "--pretrained",
        "none" if backbone != "lite" else "default",
        "--method",
        method,
        *run_option_args(args),
    ]
    settings = PER_BACKBONE_SETTINGS.get(backbone, {}).get(method)
    if settings:
        command += ["--settings", json.dumps(settings)]
    env = dict(os.environ, ADACLIP_NO_PROGRESS="1")
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"backbone": backbone, "method": method, "error": f"took longer than --timeout {args.timeout} s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        return {"backbone": backbone, "method": method, "error": last}
    record = json.loads(done.stdout.strip().splitlines()[-1])
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    return record


def add_ratios(records: list[dict]) -> None:
    """Throughput relative to full fine-tuning and to LoRA on the same backbone and batch size."""
    for backbone in {r["backbone"] for r in records}:
        group = {r["method"]: r for r in records if r["backbone"] == backbone and "error" not in r}
        for reference in ("full-ft", "lora"):
            base = group.get(reference, {}).get("train_images_per_second")
            for record in group.values():
                own = record.get("train_images_per_second")
                record[f"train_speed_vs_{reference}"] = own / base if own and base else None
        zero_shot = group.get("zeroshot", {}).get("predict_images_per_second")
        for record in group.values():
            own = record.get("predict_images_per_second")
            record["predict_speed_vs_zeroshot"] = own / zero_shot if own and zero_shot else None


def cached_epoch_timing(method: str, backbone_name: str, data: Path, epochs: int = 4) -> dict:
    """Real fit epochs for a frozen-image-tower method: the first encodes images, later ones reuse them."""
    import adaclip
    from adaclip.data import prepare_training_data
    from adaclip.methods import make_method_config
    from adaclip.model import AdaptedCLIP
    from adaclip.training import train

    backbone = adaclip.create_backbone(backbone_name, "none" if backbone_name != "lite" else None, device="cpu")
    training = prepare_training_data(data, val_split=0.0, seed=0)
    config = make_method_config(method, {"train": {"epochs": epochs, "feature_cache": "plain"}})
    model = AdaptedCLIP(backbone, config, training.class_names, ["a photo of a {}."])
    outcome = train(model, training, seed=0)
    first, later = outcome.epoch_seconds[0], outcome.epoch_seconds[1:]
    mean_later = sum(later) / len(later)
    return {
        "backbone": backbone.identity.describe(),
        "method": method,
        "images": len(training.train),
        "epoch_seconds": [round(s, 4) for s in outcome.epoch_seconds],
        "later_epoch_fraction_of_first": mean_later / first,
    }


def _synthetic_folder(root: Path, classes: int = 10, per_class: int = 16) -> Path:
    from PIL import Image

    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), ((c * 25) % 255, (i * 15) % 255, 128)).save(folder / f"{i}.png")
    return root


def _peak_note(rows: list[dict]) -> list[str]:
    peaks = {(r["gpu_name"], r.get("precision"), r["gpu_peak_tflops"]) for r in rows if r.get("gpu_name")}
    if not peaks:
        return []
    described = "; ".join(
        f"{name} {precision}: {peak} TFLOP/s" if peak else f"{name} {precision}: unknown (pass --peak-tflops)"
        for name, precision, peak in sorted(peaks, key=str)
    )
    return [
        "",
        "TFLOP/s: FLOPs of one training step (torch.utils.flop_counter) over its time; of peak: that rate over "
        f"the GPU's dense data-sheet peak ({described}).",
    ]


def render(report: dict) -> str:
    rows = report["runs"]
    lines = [
        f"Measured {report['date']} on {report['machine']['cpu']} ({report['machine']['cpu_count']} cores"
        + (f", GPU {report['machine']['gpu']['name']}" if report["machine"].get("gpu") else ", no GPU")
        + f"), adaclip {report['git_commit'][:12]}.",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Training batch {report['settings']['batch_size']}, predict batch {report['settings']['predict_batch_size']}, "
        f"precision {rows[0].get('precision', '?') if rows else '?'}; images/s through the encoders (forward, "
        "backward to the first trainable part, optimizer step); cached = a step on cached image features "
        "(what fit runs when the image tower is frozen). Ratios are training images/s relative to full "
        "fine-tuning and to LoRA on the same backbone. TTA: `adaclip tta` end to end (decode, encode, adapt, "
        f"predict) over {report['settings'].get('tta_images', '?')} random images (episodic, 64 views each: "
        f"the first {report['settings'].get('tta_episodic_images', '?')}); '-' where the method's head has no "
        "mask to adapt (TDA works with any head).",
        *_peak_note(rows),
        "",
        markdown_table(
            rows,
            [
                ("backbone", "backbone"),
                ("method", "method"),
                ("trainable_params", "trainable params"),
                ("train_images_per_second", "train img/s"),
                ("cached_images_per_second", "cached img/s"),
                ("train_speed_vs_full-ft", "vs full FT"),
                ("train_speed_vs_lora", "vs LoRA"),
                ("train_achieved_gflops", "GFLOP/s"),
                *(
                    [("train_achieved_tflops", "TFLOP/s"), ("train_fraction_of_peak", "of peak")]
                    if any("train_achieved_tflops" in r for r in rows)
                    else []
                ),
                ("peak_rss_mib", "peak RSS MiB"),
                ("cuda_max_allocated_mib", "CUDA MiB"),
                ("predict_images_per_second", "predict img/s"),
                ("predict_speed_vs_zeroshot", "predict vs zero-shot"),
                ("tta_online_images_per_second", "tta online img/s"),
                ("tta_tda_images_per_second", "tta tda img/s"),
                ("tta_episodic_images_per_second", "tta episodic img/s"),
                ("adapter_file_bytes", "file bytes"),
                ("error", "error"),
            ],
        ),
    ]
    if report.get("cached_epochs"):
        lines += [
            "",
            "Real `fit` epochs with `feature_cache=plain` (first epoch encodes the images):",
            "",
            markdown_table(
                report["cached_epochs"],
                [
                    ("backbone", "backbone"),
                    ("method", "method"),
                    ("images", "images"),
                    ("epoch_seconds", "epoch seconds"),
                    ("later_epoch_fraction_of_first", "later epoch / first"),
                ],
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["ViT-B-16", "lite"])
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    add_run_options(parser)
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--no-epoch-timing", action="store_true")
    parser.add_argument("--no-peft", action="store_true", help="skip the lora-vs-PEFT run (benchmarks.speed_lora_peft)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    from adaclip.device import select_device
    from adaclip.errors import AdaclipError, use_cli_names
    from adaclip.methods import list_methods

    use_cli_names()  # a command line: its errors name its options

    try:  # once, up front: otherwise every method's process fails alike and the table is all errors
        select_device(args.device)
    except AdaclipError as exc:
        parser.exit(2, f"benchmarks.speed: {exc.one_line()}\n")

    known = set(list_methods())
    report = {**run_header(), "settings": vars(args) | {"output": str(args.output)}, "runs": [], "skipped": []}
    output = args.output or RESULTS / f"speed-{platform.node() or 'host'}.json"
    for backbone in args.backbones:
        for method in args.methods:
            if method not in known:
                report["skipped"].append({"method": method, "reason": "not registered"})
                continue
            record = run_one(backbone, method, args)
            print(json.dumps(record), file=sys.stderr, flush=True)
            report["runs"].append(record)
            write_json(output, report)  # after every run: a run stopped early keeps what it measured
    add_ratios(report["runs"])
    if not args.no_epoch_timing:
        report["cached_epochs"] = []
        with tempfile.TemporaryDirectory() as tmp:
            data = _synthetic_folder(Path(tmp) / "data")
            for method in ("rada", "linear-probe"):
                if method in known:
                    for backbone in args.backbones:
                        report["cached_epochs"].append(cached_epoch_timing(method, backbone, data))
    write_json(output, report)
    section = f"speed-{'gpu' if report['machine'].get('gpu') else 'cpu'}"
    if args.backbones != parser.get_default("backbones"):
        section += "-" + "-".join(args.backbones)  # a partial run gets its own table, next to the full one
    replace_section(DOCS / "benchmarks.md", section, render(report))
    print(f"wrote {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output} and docs/benchmarks.md")
    if "lora" in args.methods and not args.no_peft:
        peft_run = [sys.executable, "-m", "benchmarks.speed_lora_peft", "--device", args.device]
        subprocess.run(peft_run + ["--precision", args.precision], cwd=ROOT, check=False, timeout=args.timeout)


if __name__ == "__main__":
    main()
