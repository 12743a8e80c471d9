"""adaclip's LoRA training step against Hugging Face PEFT's LoRA on the same open_clip model, in one process.

PEFT is a benchmark-only comparison (the `bench` extra). Both adapt every attention layer of both
towers with the same number of trainable parameters: PEFT's `nn.MultiheadAttention` layer puts a rank-r
update on the packed in_proj (r * (d + 3d)) and on out_proj (r * (d + d)), 6 r d per layer, exactly
adaclip's q, k and v at rank r (3 r (d + d)). Each variant has its own copy of the model (same seed,
same weights), its own AdamW, and runs the same step: encode the batch's images and the class prompts,
cosine logits, cross-entropy, backward, optimizer step.

Variants: `adaclip` (the CLIP-LoRA recipe: dropout 0.25 on the input of each low-rank branch, which
cannot be folded into the packed weight, so training computes the projections per token);
`adaclip-dropout0` (the same with dropout 0: updates folded into the weight, PyTorch's attention
module called on it, the work PEFT does); `peft` (its MultiheadAttention layer merges, calls the
module and unmerges; it does not apply `lora_dropout` there). Steps alternate between the variants,
round after round, so a shared machine's load falls on all of them alike; images/s is the batch over
the median step time, and each round also gives its own ratio to PEFT.

    python -m benchmarks.speed_lora_peft                       # ViT-B-16, CPU, fp32, batch 8
    python -m benchmarks.speed_lora_peft --rounds 3 --backbone ViT-B-32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .common import DOCS, RESULTS, ROOT, add_run_options, markdown_table, replace_section, run_header, write_json

N_CLASSES = 10
TEMPLATE = "a photo of a {}."


def _adaclip_step(backbone, settings: dict, pixels: torch.Tensor, labels: torch.Tensor):
    from adaclip.methods import make_method_config
    from adaclip.model import AdaptedCLIP
    from adaclip.training import make_optimizer

    config = make_method_config("lora", settings)
    model = AdaptedCLIP(backbone, config, [f"class {i}" for i in range(N_CLASSES)], [TEMPLATE], seed=0)
    optimizer = make_optimizer(model.trainable_parameters(), config.train)
    model.train()

    def step() -> None:
        loss, _ = model.training_loss(labels, pixels=pixels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.invalidate_class_cache()

    return step, model.n_trainable()


def _peft_step(backbone, rank: int, scale: float, dropout: float, pixels: torch.Tensor, labels: torch.Tensor):
    import peft

    model = backbone.model
    targets = sorted(name for name, module in model.named_modules() if isinstance(module, nn.MultiheadAttention))
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=scale * rank,  # PEFT scales by lora_alpha / r: the same scale as adaclip's
        lora_dropout=dropout,
        # a pattern: PEFT matches list entries as name suffixes, and the text tower's names are suffixes
        # of the image tower's
        target_modules="^(" + "|".join(re.escape(t) for t in targets) + ")$",
    )
    wrapped = peft.get_peft_model(model, config)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=1e-2)  # adaclip's lora recipe
    tokens = backbone.tokenize([TEMPLATE.format(f"class {i}") for i in range(N_CLASSES)])
    wrapped.train()

    def step() -> None:
        images = F.normalize(model.encode_image(pixels), dim=-1)
        texts = F.normalize(model.encode_text(tokens), dim=-1)
        loss = F.cross_entropy(model.logit_scale.exp() * images @ texts.t(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, sum(p.numel() for p in params), peft.__version__


def measure(args: argparse.Namespace) -> dict:
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    from adaclip.backbone import create_backbone
    from adaclip.methods import make_method_config

    def backbone():
        torch.manual_seed(0)  # every variant gets the same weights
        return create_backbone(args.backbone, args.pretrained, device=args.device, precision=args.precision)

    first = backbone()
    size = first.preprocess.size
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch_size, 3, size, size, generator=generator).to(first.device)
    labels = torch.randint(0, N_CLASSES, (args.batch_size,), generator=generator).to(first.device)
    recipe = make_method_config("lora")
    steps, params = {}, {}
    steps["adaclip"], params["adaclip"] = _adaclip_step(first, {}, pixels, labels)
    # the two adaclip models share one backbone, as models of one process do (each pass applies its own
    # components only); PEFT edits its model, so it gets a copy
    steps["adaclip-dropout0"], params["adaclip-dropout0"] = _adaclip_step(first, {"dropout": 0.0}, pixels, labels)
    steps["peft"], params["peft"], peft_version = _peft_step(
        backbone(), recipe.rank, recipe.scale, recipe.dropout, pixels, labels
    )
    if len(set(params.values())) != 1:
        raise SystemExit(f"benchmarks.speed_lora_peft: trainable parameters differ: {params}")

    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.rounds):
        for name, step in steps.items():
            started, started_cpu = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - started)
            cpu[name].append(time.process_time() - started_cpu)

    def per_second(seconds: list[float]) -> float:
        return args.batch_size / statistics.median(seconds)

    rows = []
    for name in steps:
        per_round = [p / own for own, p in zip(wall[name], wall["peft"], strict=True)]
        rows.append(
            {
                "variant": name,
                "trainable_params": params[name],
                "train_images_per_second": per_second(wall[name]),
                "vs_peft": per_second(wall[name]) / per_second(wall["peft"]),
                "vs_peft_per_round": [round(r, 3) for r in per_round],
                "vs_peft_cpu_time": statistics.median(cpu["peft"]) / statistics.median(cpu[name]),
                "step_seconds": [round(s, 3) for s in wall[name]],
            }
        )
    return {
        "backbone": first.identity.describe(),
        "device": str(first.device),
        "precision": first.precision,
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        "torch_threads": torch.get_num_threads(),
        "peft": peft_version,
        "variants": rows,
        # 1/5/15-minute load averages: other jobs inflate the seconds (not the ratios: steps alternate)
        "load_average": {"start": load_at_start, "end": [round(x, 2) for x in os.getloadavg()]},
    }


def render(report: dict) -> str:
    record = report["record"]
    return "\n".join(
        [
            f"adaclip's LoRA training step against Hugging Face PEFT {record['peft']}'s on the same open_clip "
            f"model ({record['backbone']}, {record['device']}, {record['precision']}, batch "
            f"{record['batch_size']}, {record['torch_threads']} threads), same trainable parameters, in one "
            f"process, steps alternating between the variants for {record['rounds']} rounds. Measured "
            f"{report['date']} on {report['machine']['cpu']} ({report['machine']['cpu_count']} cores), adaclip "
            f"{report['git_commit'][:12]}; 1/5/15-minute load averages {record['load_average']['start']} at "
            f"the start and {record['load_average']['end']} at the end (this process alone adds about "
            f"{record['torch_threads']}). Steps alternate, so load from other jobs falls on every variant alike.",
            "",
            f"Command: `{report['command']}`",
            "",
            "`adaclip`: the CLIP-LoRA recipe (dropout 0.25 on each low-rank branch's input, applied per token); "
            "`adaclip-dropout0`: dropout 0, the update folded into the packed weight and PyTorch's attention "
            "module called on it; `peft`: PEFT's MultiheadAttention layer (merge, call, unmerge), which does "
            "not apply `lora_dropout`. vs PEFT: images/s over PEFT's (median step times); per round: the same "
            "ratio in each round; CPU time: the ratio of the process's CPU seconds per step.",
            "",
            markdown_table(
                record["variants"],
                [
                    ("variant", "variant"),
                    ("trainable_params", "trainable params"),
                    ("train_images_per_second", "train img/s"),
                    ("vs_peft", "vs PEFT"),
                    ("vs_peft_per_round", "vs PEFT per round"),
                    ("vs_peft_cpu_time", "vs PEFT (CPU time)"),
                ],
            ),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="ViT-B-16")
    parser.add_argument("--pretrained", default="none")
    add_run_options(parser, ("--device", "--precision", "--batch-size"), device="cpu", precision="fp32", batch_size=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed steps of each variant, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument(
        "--output", type=Path, default=None, help="JSON report (default results/speed-lora-peft-<backbone>-<host>.json)"
    )
    parser.add_argument("--record-only", action="store_true", help="print the record on stdout, write nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = measure(args)
    print(json.dumps(record), file=sys.stderr, flush=True)  # kept in the log whatever happens next
    if args.record_only:
        json.dump(record, sys.stdout)
        sys.stdout.write("\n")
        return
    report = {**run_header(), "record": record}
    output = args.output or RESULTS / f"speed-lora-peft-{args.backbone}-{platform.node() or 'host'}.json"
    write_json(output, report)
    replace_section(DOCS / "benchmarks.md", f"speed-lora-peft-{args.backbone}", render(report))
    print(f"wrote {output} and {DOCS.relative_to(ROOT)}/benchmarks.md")


if __name__ == "__main__":
    main()
