"""`make demo`: fit -> predict -> eval -> tta on sample_data/ with the offline `lite` backbone, through
the real `adaclip` command line, then a short table of what each step achieved; last, `adaclip compare`
over a quick method set, its leaderboard and where its HTML report is.

    python tools/demo.py                   # what `make demo` runs
    python tools/demo.py --workdir /tmp/x  # keep the adapter files somewhere else
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "sample_data"


def adaclip(*args: str, capture: bool = True) -> tuple[dict | list | None, float]:
    """Run one adaclip command, echo it, and return its JSON output and wall time."""
    command = [sys.executable, "-m", "adaclip", *args]
    print(f"$ adaclip {' '.join(shlex.quote(a) for a in args)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, stdout=subprocess.PIPE if capture else None, text=True, env=_env())
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"demo: the command above failed with exit code {done.returncode}")
    if not capture:
        return None, seconds
    text = done.stdout.strip()
    if (
        "--format" in args
        and args[args.index("--format") + 1] == "jsonl"
        or "-f" in args
        and args[args.index("-f") + 1] == "jsonl"
    ):
        return [json.loads(line) for line in text.splitlines() if line], seconds
    return json.loads(text), seconds


def _env() -> dict[str, str]:
    return dict(os.environ, ADACLIP_NO_PROGRESS=os.environ.get("ADACLIP_NO_PROGRESS", "1"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".demo")
    parser.add_argument("--backbone", default="lite")
    parser.add_argument("--pretrained", default=None)
    parser.add_argument("--methods", nargs="+", default=["adaring", "rada"])
    parser.add_argument("--set", dest="settings", action="append", default=[], help="extra adaring --set key=value")
    parser.add_argument(
        "--compare-methods",
        default="zeroshot,linear-probe,rada,adaring",
        help="methods of the compare step (comma-separated; empty: no compare step)",
    )
    parser.add_argument("--compare-seeds", default="1", help="seeds of the compare step, e.g. 1,2")
    args = parser.parse_args(argv)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    backbone = ["--backbone", args.backbone] + (["--pretrained", args.pretrained] if args.pretrained else [])
    common = [str(DATA), "--classes", str(DATA / "classes.json"), "--templates", "ensemble", "--val-split", "0"]
    rows = []
    started = time.perf_counter()

    for method in ["zeroshot", *args.methods]:
        out = work / f"{method}.adaclip"
        extra = [a for kv in args.settings for a in ("--set", kv)] if method == "adaring" else []
        summary, fit_seconds = adaclip(
            "fit", *common, "-m", method, "-o", str(out), "--force", "--seed", "0", *backbone, *extra, "-f", "json"
        )
        report, eval_seconds = adaclip("eval", str(out), str(DATA / "test"), "-f", "json")
        rows.append(
            {
                "step": f"fit + eval {method}",
                "method": method,
                "trainable params": summary["trainable_params"],
                "accuracy": report["accuracy"],
                "images": report["n_images"],
                "seconds": fit_seconds + eval_seconds,
            }
        )

    best = max(rows[1:], key=lambda r: r["accuracy"])["method"] if len(rows) > 1 else "zeroshot"
    examples = sorted((DATA / "test").glob("*/*.png"))[::40][:5]
    predictions, predict_seconds = adaclip(
        "predict", str(work / f"{best}.adaclip"), *map(str, examples), "--top-k", "2", "-f", "jsonl"
    )
    hits = sum(
        p["label"] == json.loads((DATA / "classes.json").read_text())[Path(p["path"]).parent.name] for p in predictions
    )
    rows.append(
        {
            "step": f"predict {len(examples)} images",
            "method": best,
            "accuracy": hits / len(examples),
            "images": len(examples),
            "seconds": predict_seconds,
        }
    )

    shifted = [str(DATA / "shifted"), "--labels-csv", str(DATA / "shifted_labels.csv"), "-f", "jsonl"]
    tta_source = "rada" if "rada" in args.methods else best
    # The modes that adapt over the stream. Episodic (TPT: 64 views per image) is too slow for 500 images in
    # a CPU demo; benchmarks.tta measures it.
    for mode in ("online", "tda"):
        written = ["-o", str(work / f"{tta_source}.tta-{mode}.adaclip"), "--force"] if mode == "online" else []
        predictions, seconds = adaclip("tta", str(work / f"{tta_source}.adaclip"), *shifted, "--mode", mode, *written)
        correct = sum(p["label"] == p["true_label"] for p in predictions)
        rows.append(
            {
                "step": f"tta {mode} on shifted/",
                "method": tta_source,
                "accuracy": correct / len(predictions),
                "images": len(predictions),
                "seconds": seconds,
            }
        )
    before, seconds = adaclip("predict", str(work / f"{tta_source}.adaclip"), str(DATA / "shifted"), "-f", "jsonl")
    truth = dict(line.split(",")[:2] for line in (DATA / "shifted_labels.csv").read_text().splitlines()[1:])
    names = json.loads((DATA / "classes.json").read_text())
    correct = sum(p["label"] == names.get(truth[Path(p["path"]).name], truth[Path(p["path"]).name]) for p in before)
    rows.insert(
        len(rows) - 2,
        {
            "step": "no tta on shifted/",
            "method": tta_source,
            "accuracy": correct / len(before),
            "images": len(before),
            "seconds": seconds,
        },
    )

    print()
    print(
        f"adaclip demo: backbone {args.backbone}, sample_data (10 classes, 16 training images each; "
        f"test/ 200 images; shifted/ {len(before)} corrupted images), total {time.perf_counter() - started:.0f} s"
    )
    print()
    header = f"{'step':<26} {'method':<14} {'trainable params':>16} {'accuracy':>9} {'images':>7} {'seconds':>8}"
    print(header)
    print("-" * len(header))
    for row in rows:
        params = row.get("trainable params")
        print(
            f"{row['step']:<26} {row['method']:<14} {params if params is not None else '':>16} "
            f"{row['accuracy']:>9.3f} {row['images']:>7} {row['seconds']:>8.1f}"
        )
    print(f"\nadapter files: {work}")
    if args.compare_methods:
        compare_step(args, work, backbone)
    print(f"\ndemo total {time.perf_counter() - started:.0f} s")


def compare_step(args, work: Path, backbone: list[str]) -> None:
    """Which method is best on sample_data: every method under one protocol (validation carved from
    train/, scored on test/), the leaderboard, the recommendation and the HTML report."""
    report = work / "compare.html"
    board, seconds = adaclip(
        "compare", str(DATA), "--classes", str(DATA / "classes.json"), "--templates", "ensemble",
        "-m", args.compare_methods, "--seeds", args.compare_seeds, *backbone,
        "--out-dir", str(work / "compare"), "--force", "--report", str(report), "-f", "json",
    )  # fmt: skip
    print(f"\nadaclip compare (seeds {args.compare_seeds}; {board['protocol']['validation']} for validation, "
          f"test/ for the scores), {seconds:.0f} s:\n")  # fmt: skip
    header = f"{'method':<14} {'test acc':>9} {'val acc':>8} {'trainable params':>16} {'fit s':>7}"
    print(header)
    print("-" * len(header))
    for row in board["leaderboard"]:
        if row["accuracy"] is None:
            print(f"{row['method']:<14} failed: {row['error']}")
            continue
        print(
            f"{row['method']:<14} {row['accuracy']:>9.3f} {row['val_accuracy'] or 0:>8.3f} "
            f"{row['trainable_params']:>16,} {row['fit_seconds']:>7.1f}"
        )
    print(f"\nrecommended: {board['recommended']} ({board['reason']})")
    print(f"best adapter: {board['best_adapter']}")
    print(f"report: {report}  (open it in a browser; no network needed)")


if __name__ == "__main__":
    main()
