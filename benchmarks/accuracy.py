"""Accuracy of every method on a real dataset, side by side (`make bench-accuracy`).

Data: Fashion-MNIST from the Debian package dataset-fashion-mnist (installed by the bench set-up, never
committed), written once as PNG folders under ~/.cache/adaclip/bench/fashion-mnist so every run goes
through adaclip's own image-folder path. Backbone: the offline `lite` by default.

Protocols
* few-shot: 1 / 4 / 16 shots per class sampled by adaclip (`--shots K --seed s`) from the 60,000
  training images, 3 seeds, tested on the full 10,000-image test set; mean +- std over seeds.
* base-to-new: train (16 shots) on the first 5 classes (t-shirt/top, trouser, pullover, dress, coat),
  test on their test images among those 5 (base), on the other 5 classes' images among the other 5
  (new: class names never trained on), and on all 10 among all 10; harmonic mean of base and new.
  Methods tied to their training classes (linear-probe, tip-adapter) have no "new" score.
* test-time adaptation (when `adaclip tta` is available): see benchmarks.tta.

Validation: the product's own protocol (`val_split="auto"`, `adaclip.data.few_shot_validation`):
min(shots, 4) images per class from the training images not sampled as shots (CoOp's convention), the
same images for every method under a seed. Whatever a method searches or tracks uses only those; the
test set is never used for choices. The runs are `adaclip.comparison`'s (the engine of `adaclip
compare`), so the protocol lives in the product: the same sampling as `fit --shots K --seed s`, the test
images scored as compare scores them, and frozen-tower methods sharing one encoding per (image, view).

A row is a method name, `tip-adapter-f` (`tip-adapter` with `finetune=true`), or a method with settings:
`--methods "tip-adapter:leave_one_out=false" "rada:train.min_crop_scale=0.08"`.

    python -m benchmarks.accuracy                                  # the full suite
    python -m benchmarks.accuracy --shots 16 --seeds 1 --methods zeroshot adaring   # a quick look
    python -m benchmarks.accuracy --resume                         # finish a run that was stopped
    python -m benchmarks.accuracy --merge other.json               # fold in runs done by another process
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

from .common import DOCS, RESULTS, ROOT, markdown_table, replace_section, run_header, write_json

DEFAULT_METHODS = [
    "zeroshot",
    "linear-probe",
    "tip-adapter",
    "tip-adapter-f",
    "coop",
    "lora",
    "adaring",
    "rada",
    "adaring+rada",
]
# benchmark rows that are a registered method with settings
VARIANTS = {"tip-adapter-f": "tip-adapter:finetune=true"}


def method_spec(row: str) -> tuple[str, dict]:
    """A benchmark row -> (registered method, settings): `NAME`, a VARIANTS name, or
    `NAME:key=value:...` (values as JSON, else text; dotted keys nest, e.g. `rada:train.min_crop_scale=0.08`)."""
    name, *pairs = VARIANTS.get(row, row).split(":")
    settings: dict = {}
    for pair in pairs:
        key, _, text = pair.partition("=")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        node = settings
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return name, settings


CACHE = Path.home() / ".cache" / "adaclip" / "bench" / "fashion-mnist"
# Class folders in Fashion-MNIST label order, named as in sample_data (one source for both).
FOLDERS = tuple(json.loads((ROOT / "sample_data" / "classes.json").read_text()))
BASE = FOLDERS[:5]  # base-to-new trains on these; the other 5 are the new classes


def prepare_dataset(root: Path = CACHE) -> Path:
    """Fashion-MNIST as root/{train,test}/<class>/<index>.png + classes.json (written once)."""
    from PIL import Image

    from tools.lite.fmnist import FMNIST_DIR, load_split

    done = root / ".complete"
    if done.exists():
        return root
    if not (FMNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        sys.exit(f"Fashion-MNIST not found in {FMNIST_DIR}: apt-get install dataset-fashion-mnist")
    for split, folder in (("train", "train"), ("t10k", "test")):
        images, labels = load_split(split)
        for name in FOLDERS:
            (root / folder / name).mkdir(parents=True, exist_ok=True)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(image).save(root / folder / FOLDERS[label] / f"{index:05d}.png")
    names = json.loads((ROOT / "sample_data" / "classes.json").read_text())
    (root / "classes.json").write_text(json.dumps(names, indent=2))
    done.write_text("ok\n")
    return root


def suite_protocol(data: Path, protocol: str, shots: int):
    """The suite's images for one (protocol, shots) under DATA/{train,test}: validation is the product's
    few-shot rule; base-to-new trains on BASE (in sorted folder order). tools/ studies call it on
    training-split folders."""
    from adaclip.comparison import make_protocol

    return make_protocol(
        data,
        shots=shots,
        classes=data / "classes.json",
        val_split="auto",  # min(shots, 4) per class from the training images (CoOp's convention)
        base_to_new=sorted(BASE) if protocol == "base-to-new" else False,
    )


def comparison_for(args, backbone, data: Path, protocol: str, shots: int, shared, config: dict):
    """The compare engine for one (protocol, shots, row settings): test/ is the test set."""
    from adaclip.comparison import Comparison

    split = suite_protocol(data, protocol, shots)
    return Comparison(split, backbone, templates=args.templates, batch_size=32, shared=shared, config=config)


def _run(comparison, row: str, seed: int):
    result = comparison.run(method_spec(row)[0], seed)
    if result.status != "ok":
        sys.exit(f"{row} seed {seed} failed: {result.error}")
    return result


def few_shot_run(comparison, method: str, shots: int, seed: int) -> dict:
    result = _run(comparison, method, seed)
    return {
        "protocol": "few-shot",
        "method": method,
        "shots": shots,
        "seed": seed,
        "accuracy": result.accuracy,
        "trainable_params": result.trainable_params,
        "fit_seconds": round(result.fit_seconds, 1),
        "eval_seconds": round(result.test_seconds, 1),
    }


def base_to_new_run(comparison, method: str, seed: int) -> dict:
    result = _run(comparison, method, seed)
    base_acc, new_acc = result.accuracy, result.new_accuracy  # new is None for class-tied methods
    return {
        "protocol": "base-to-new",
        "method": method,
        "shots": 16,
        "seed": seed,
        "base": base_acc,
        "new": new_acc,
        "all": result.all_accuracy,
        "hm": 2 * base_acc * new_acc / (base_acc + new_acc) if new_acc else None,
    }


def planned_runs(args, methods: list[str]) -> list[tuple[str, str, int, int]]:
    """(protocol, method, shots, seed), seed outermost: a run cut short still covers every method and
    shot count with the seeds it finished (the table's `runs` column says how many)."""
    runs = []
    for seed in args.seeds:
        if "few-shot" in args.protocols:
            runs += [("few-shot", m, k, seed) for m in methods for k in args.shots]
        if "base-to-new" in args.protocols:
            runs += [("base-to-new", m, 16, seed) for m in methods]
    return runs


def _key(record: dict) -> tuple:
    return (record["protocol"], record["method"], record["shots"], record["seed"])


def summarize(records: list[dict], keys: list[str], group: list[str]) -> list[dict]:
    """Mean +- std over seeds, per group."""
    rows: dict[tuple, dict] = {}
    for record in records:
        row = rows.setdefault(tuple(record[g] for g in group), {g: record[g] for g in group} | {"runs": 0})
        row["runs"] += 1
        for key in keys:
            row.setdefault(f"_{key}", []).append(record[key])
    out = []
    for row in rows.values():
        for key in keys:
            values = [v for v in row.pop(f"_{key}") if v is not None]
            if values:
                row[key] = f"{100 * statistics.fmean(values):.2f}"
                if len(values) > 1:
                    row[key] += f" +- {100 * statistics.stdev(values):.2f}"
            else:
                row[key] = None
        out.append(row)
    return out


def render(report: dict) -> str:
    machine = report["machine"]
    lines = [
        f"Measured {report['date']} on {machine['cpu']} ({machine['cpu_count']} cores"
        + (f", GPU {machine['gpu']['name']}" if machine.get("gpu") else ", no GPU")
        + f"), adaclip {report['git_commit'][:12]}, backbone `{report['settings']['backbone']}`, "
        f"templates `{report['settings']['templates']}`.",
        "",
        "Commands, in order (each `--resume` keeps the runs before it): "
        + "; ".join(f"`{c}`" for c in [*report.get("earlier_commands", []), report["command"]]),
        "",
    ]
    if not report.get("complete", True):
        lines += ["Incomplete: the run was stopped before its last seeds; `runs` counts the seeds done.", ""]
    elif report.get("earlier_commands"):
        lines += ["Cells were filled by several commands: `runs` counts the seeds each one has.", ""]
    if report.get("few_shot"):
        lines += [
            "Few-shot on Fashion-MNIST (accuracy % on the 10,000 test images, mean +- std over seeds "
            f"{report['settings']['seeds']}):",
            "",
            markdown_table(
                summarize(report["few_shot"], ["accuracy"], ["method", "shots"]),
                [("method", "method"), ("shots", "shots"), ("accuracy", "accuracy %"), ("runs", "runs")],
            ),
            "",
        ]
    if report.get("base_to_new"):
        lines += [
            "Base-to-new (16 shots on 5 base classes; new = the 5 other classes, never trained on):",
            "",
            markdown_table(
                summarize(report["base_to_new"], ["base", "new", "all", "hm"], ["method"]),
                [
                    ("method", "method"),
                    ("base", "base %"),
                    ("new", "new %"),
                    ("all", "all 10 %"),
                    ("hm", "harmonic mean %"),
                    ("runs", "runs"),
                ],
            ),
        ]
    return "\n".join(lines)


def save(output: Path, report: dict, done: dict[tuple, dict], *, complete: bool) -> None:
    """Write the results file and the docs table from the runs done so far."""
    records = list(done.values())
    report["few_shot"] = [r for r in records if r["protocol"] == "few-shot"]
    report["base_to_new"] = [r for r in records if r["protocol"] == "base-to-new"]
    report["complete"] = complete
    write_json(output, report)
    section = report["settings"].get("section") or f"accuracy-{report['settings']['backbone']}"
    replace_section(DOCS / "benchmarks.md", section, render(report))


def merge(output: Path, others: list[Path]) -> None:
    """Add the runs of `others` that `output` lacks (two processes on one machine, one file each); their
    commands join `output`'s list, so the docs name every command that filled a cell."""
    report = json.loads(output.read_text())
    done = {_key(r): r for r in report["few_shot"] + report["base_to_new"]}
    commands = report.get("earlier_commands", [])
    for other in others:
        theirs = json.loads(other.read_text())
        added = [r for r in theirs["few_shot"] + theirs["base_to_new"] if _key(r) not in done]
        done.update({_key(r): r for r in added})
        commands += [c for c in [*theirs.get("earlier_commands", []), theirs["command"]] if c not in commands]
        print(f"{other}: {len(added)} runs added", file=sys.stderr)
    report["earlier_commands"] = [c for c in commands if c != report["command"]]
    save(output, report, done, complete=report.get("complete", True))
    print(f"wrote {output} and docs/benchmarks.md")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="lite")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS)
    parser.add_argument("--shots", nargs="+", type=int, default=[1, 4, 16])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--templates", default="ensemble")
    parser.add_argument("--protocols", nargs="+", default=["few-shot", "base-to-new"])
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--resume", action="store_true", help="keep the runs already in --output; do the rest")
    parser.add_argument(
        "--section",
        default=None,
        help="docs/benchmarks.md section to write (default accuracy-BACKBONE, the main table)",
    )
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="fold the runs of these results files (another process's --output) into --output and stop",
    )
    args = parser.parse_args(argv)
    if args.merge:
        merge(args.output or RESULTS / f"accuracy-{args.backbone}-{platform.node() or 'host'}.json", args.merge)
        return

    import adaclip
    from adaclip.methods import list_methods

    known = set(list_methods())
    methods = [m for m in args.methods if method_spec(m)[0] in known]
    data = prepare_dataset()
    backbone = adaclip.create_backbone(args.backbone, None if args.backbone == "lite" else "openai")
    report = {
        **run_header(),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "skipped_methods": sorted(set(args.methods) - set(methods)),
    }
    output = args.output or RESULTS / f"accuracy-{args.backbone}-{platform.node() or 'host'}.json"
    done: dict[tuple, dict] = {}
    if args.resume and output.exists():
        previous = json.loads(output.read_text())
        report["earlier_commands"] = previous.get("earlier_commands", []) + [previous["command"]]
        done = {_key(r): r for r in previous.get("few_shot", []) + previous.get("base_to_new", [])}
    from adaclip.inference import SharedEncodings

    shared = SharedEncodings()  # one frozen-tower encoding of the test images for every comparison
    comparisons: dict[tuple[str, int, str], object] = {}
    plan = planned_runs(args, methods)
    for number, (protocol, method, shots, seed) in enumerate(plan, 1):
        if (protocol, method, shots, seed) not in done:
            name, settings = method_spec(method)
            key = (protocol, shots, json.dumps(settings, sort_keys=True))
            if key not in comparisons:
                config = {name: settings} if settings else {}
                comparisons[key] = comparison_for(args, backbone, data, protocol, shots, shared, config)
            comparison = comparisons[key]
            if protocol == "few-shot":
                record = few_shot_run(comparison, method, shots, seed)
            else:
                record = base_to_new_run(comparison, method, seed)
            done[_key(record)] = record
            print(f"[{number}/{len(plan)}] " + json.dumps(record), file=sys.stderr, flush=True)
            save(output, report, done, complete=False)  # a run stopped early keeps what it measured
    save(output, report, done, complete=True)
    print(f"wrote {output} and docs/benchmarks.md")


if __name__ == "__main__":
    main()
