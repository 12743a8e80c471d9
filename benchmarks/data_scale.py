"""Data at scale: indexing a 1,000,000-row manifest, and memory over a long `predict` stream.

    python -m benchmarks.data_scale [--rows 1000000] [--stream 100000] [--lite-stream 2000]

1. Index: a CSV and a JSONL manifest of `--rows` rows (100 classes, train/test split column; the
   listed files need not exist, since indexing never looks at them) are indexed in a fresh process each:
   `read_manifest`, then a 16-shot training set chosen from it (`prepare_training_data`, which indexes
   again). Reports seconds and the peak RSS of each step (VmHWM, reset after the imports) over the RSS
   after the imports.
2. Stream: `adaclip predict ADAPTER - --format jsonl` in a subprocess, fed `--stream` paths on stdin
   (sample_data's PNGs, repeated), with the child's RSS read from /proc at 10%, 50% and 100% of the
   stream. With the tiny random-weight test tower (tests/model_configs, registered as users register
   their own architectures) the whole stream fits in minutes; with `lite` (about 10 images/s on two
   cores) only `--lite-stream` paths do, read at the same fractions.

Writes results/data-scale.json and the `data-scale` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import DOCS, RESULTS, markdown_table, replace_section, run_header, write_json

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data"

INDEX_CHILD = r"""
import json, sys, time
import adaclip.data
from adaclip.data import prepare_training_data, read_manifest

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

def reset_peak():  # Linux: VmHWM := VmRSS, so the peak below is the indexing's, not the imports'
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

path = sys.argv[1]
before = status("VmRSS")
reset_peak()
started = time.perf_counter()
index = read_manifest(path)
index_s = time.perf_counter() - started
index_peak = status("VmHWM")
n = sum(len(v) for v in index.by_split.values())
del index
reset_peak()
started = time.perf_counter()
training = prepare_training_data(path, shots=16, seed=0)
shots_s = time.perf_counter() - started
print(json.dumps({"rows_indexed": n, "index_s": index_s, "few_shot_s": shots_s, "n_train": len(training.train),
                  "rss_before_mib": before, "index_peak_mib": index_peak, "few_shot_peak_mib": status("VmHWM")}))
"""


def write_manifests(folder: Path, rows: int) -> dict[str, Path]:
    csv_path, jsonl_path = folder / "manifest.csv", folder / "manifest.jsonl"
    with csv_path.open("w") as c, jsonl_path.open("w") as j:
        c.write("path,label,split\n")
        for i in range(rows):
            label, split = f"class_{i % 100:03d}", "test" if i % 10 == 0 else "train"
            rel = f"images/{label}/{i:07d}.jpg"
            c.write(f"{rel},{label},{split}\n")
            j.write(json.dumps({"path": rel, "label": label, "split": split}) + "\n")
    return {"csv": csv_path, "jsonl": jsonl_path}


def index_runs(rows: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in write_manifests(Path(tmp), rows).items():
            out = subprocess.run(
                [sys.executable, "-c", INDEX_CHILD, str(path)], check=True, capture_output=True, text=True, cwd=ROOT
            )
            record = json.loads(out.stdout.strip().splitlines()[-1])
            record.update(kind=kind, rows=rows, file_mib=path.stat().st_size / 2**20, load_avg_1m=os.getloadavg()[0])
            record["index_peak_over_mib"] = record["index_peak_mib"] - record["rss_before_mib"]
            record["few_shot_peak_over_mib"] = record["few_shot_peak_mib"] - record["rss_before_mib"]
            results.append(record)
            print(f"index {kind}: {record}", file=sys.stderr)
    return results


def child_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def stream_run(adapter: Path, n: int, backbone: str, env: dict) -> dict:
    images = sorted(str(p) for p in (SAMPLE / "shifted").glob("*.png"))
    marks = sorted({max(1, n // 10), max(1, n // 2), n})
    command = [sys.executable, "-m", "adaclip", "predict", str(adapter), "-", "--format", "jsonl", "-k", "1"]
    child = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=ROOT
    )

    def feed() -> None:
        for i in range(n):
            child.stdin.write(images[i % len(images)] + "\n")
        child.stdin.close()

    threading.Thread(target=feed, daemon=True).start()
    started = time.perf_counter()
    samples, count, errors = [], 0, 0
    for line in child.stdout:
        count += 1
        errors += json.loads(line).get("error") is not None
        if count in marks:
            samples.append(
                {
                    "predictions": count,
                    "rss_mib": child_rss_mib(child.pid),
                    "s": time.perf_counter() - started,
                    "load_avg_1m": os.getloadavg()[0],
                }
            )
            print(f"{backbone}: {samples[-1]}", file=sys.stderr)
    child.wait()
    if child.returncode != 0 or count != n:
        raise SystemExit(f"predict ended with {child.returncode} after {count} of {n} predictions")
    first, last = samples[0], samples[-1]
    return {
        "backbone": backbone,
        "command": run_header()["command"],
        "paths": n,
        "distinct_images": len(images),
        "errors": errors,
        "samples": samples,
        "growth_mib": last["rss_mib"] - first["rss_mib"],
        "images_per_s": (last["predictions"] - first["predictions"]) / max(1e-9, last["s"] - first["s"]),
    }


def make_adapter(folder: Path, backbone: str) -> Path:
    import adaclip

    classes = sorted(p.name for p in (SAMPLE / "train").iterdir() if p.is_dir())
    pretrained = None if backbone == "lite" else "none"
    adapter = adaclip.zero_shot_adapter(classes, backbone=backbone, pretrained=pretrained, device="cpu")
    return adapter.save(folder / f"{backbone}.adaclip")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--stream", type=int, default=100_000, help="paths through the tiny test tower")
    parser.add_argument("--lite-stream", type=int, default=2_000, help="paths through lite")
    parser.add_argument("--output", type=Path, default=RESULTS / "data-scale.json")
    parser.add_argument(
        "--append",
        action="store_true",
        help="add to --output's runs (e.g. --rows 0 --lite-stream 0: only the tiny stream)",
    )
    args = parser.parse_args(argv)
    header = run_header()
    if args.append:  # a later run of some parts, added to the record of an earlier one
        document = json.loads(args.output.read_text())
        document.setdefault("later_runs", []).append(header)
    else:
        document = {**header, "index": [], "stream": []}
    if args.rows > 0:
        document["index"] = index_runs(args.rows)
    publish(document, args.output)
    env = {**os.environ, "ADACLIP_MODEL_CONFIGS": str(ROOT / "tests" / "model_configs"), "ADACLIP_NO_PROGRESS": "1"}
    os.environ["ADACLIP_MODEL_CONFIGS"] = env["ADACLIP_MODEL_CONFIGS"]
    with tempfile.TemporaryDirectory() as tmp:
        for backbone, n in (("lite", args.lite_stream), ("adaclip-test-vit", args.stream)):
            if n > 0:
                document["stream"].append(stream_run(make_adapter(Path(tmp), backbone), n, backbone, env))
                publish(document, args.output)  # each finished run is kept, even if a later one is stopped


def publish(document: dict, output: Path) -> None:
    """Write the JSON record and the docs table of what has been measured so far."""
    write_json(output, document)
    index_table = markdown_table(
        document["index"],
        [
            ("kind", "manifest"),
            ("rows", "rows"),
            ("file_mib", "file MiB"),
            ("index_s", "index s"),
            ("index_peak_over_mib", "index: peak RSS over start MiB"),
            ("few_shot_s", "index + 16-shot set s"),
            ("few_shot_peak_over_mib", "index + 16-shot set: peak over start MiB"),
            ("rss_before_mib", "RSS at start (imports) MiB"),
            ("load_avg_1m", "load avg (1 min) after"),
        ],
    )
    stream_rows = [
        {
            "backbone": run["backbone"],
            "paths": run["paths"],
            **{f"rss_{i}": f"{s['rss_mib']:.0f} MiB @ {s['predictions']:,}" for i, s in enumerate(run["samples"])},
            "growth_mib": run["growth_mib"],
            "images_per_s": run["images_per_s"],
        }
        for run in document["stream"]
    ]
    stream_table = markdown_table(
        stream_rows,
        [
            ("backbone", "backbone"),
            ("paths", "paths"),
            ("rss_0", "RSS at 10%"),
            ("rss_1", "RSS at 50%"),
            ("rss_2", "RSS at 100%"),
            ("growth_mib", "growth 10%->100% MiB"),
            ("images_per_s", "img/s"),
        ],
    )
    machine = document["machine"]
    text = (
        f"### Data at scale\n\n`{document['command']}` ({document['date']}, {document['git_commit'][:12]}, "
        f"{machine['cpu_count']}-core {machine['cpu']}, 1/5/15-minute load averages at the start "
        f"{machine.get('load_average', 'not recorded')})"
        + "".join(
            f"; then `{r['command']}` ({r['date']}, {r['git_commit'][:12]})" for r in document.get("later_runs", [])
        )
        + ".\n\n"
        f"Indexing a manifest (fresh process each; the listed files do not exist, indexing never opens them):"
        f"\n\n{index_table}\n\n`adaclip predict ADAPTER - --format jsonl` over a stream of paths on stdin "
        f"(sample_data/shifted's {document['stream'][0]['distinct_images'] if document['stream'] else 0} PNGs, "
        f"repeated); RSS of the predict process:\n\n{stream_table}\n"
    )
    replace_section(DOCS / "benchmarks.md", "data-scale", text)
    print(index_table, stream_table, sep="\n", file=sys.stderr)


if __name__ == "__main__":
    main()
