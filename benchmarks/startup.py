"""Start-up time of the CLI: wall time of `adaclip --help` and `adaclip info FILE` against `python -c
pass` (the interpreter's own start) and `python -c "import torch"` (what a command that does work pays).

    python -m benchmarks.startup [--repeats 7]

Each command runs `repeats` times in a fresh process; the table reports the median and the fastest run.
Writes results/startup.json and the `startup` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import DOCS, RESULTS, markdown_table, replace_section, run_header, write_json


def make_adapter_file(folder: Path) -> Path:
    import torch

    from adaclip.adapter_file import AdapterMetadata, write_adapter_file
    from adaclip.identity import BackboneIdentity, PreprocessConfig

    metadata = AdapterMetadata(
        created_at="2026-01-01T00:00:00Z",
        backbone=BackboneIdentity(name="ViT-B-16", pretrained="openai", embed_dim=512, image_size=224),
        method="linear-probe",
        method_config={},
        class_names=[f"class {i}" for i in range(10)],
        templates=["a photo of a {}."],
        preprocess=PreprocessConfig(size=224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
        seed=0,
        trainable_params=5130,
    )
    tensors = {"head.weight": torch.zeros(10, 512), "head.bias": torch.zeros(10)}
    return write_adapter_file(folder / "probe.adaclip", tensors, metadata)


def time_command(argv: list[str], repeats: int) -> list[float]:
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds.append(time.perf_counter() - started)
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS / "startup.json")
    args = parser.parse_args(argv)
    adaclip_cli = [sys.executable, "-m", "adaclip"]
    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_adapter_file(Path(tmp))
        commands = [
            ("python -c pass", [sys.executable, "-c", "pass"]),
            ("adaclip --help", [*adaclip_cli, "--help"]),
            ("adaclip fit --help", [*adaclip_cli, "fit", "--help"]),
            ("adaclip info FILE", [*adaclip_cli, "info", str(adapter)]),
            ("adaclip methods", [*adaclip_cli, "methods"]),
            ('python -c "import torch, open_clip"', [sys.executable, "-c", "import torch, open_clip"]),
        ]
        rows = []
        for label, command in commands:
            seconds = time_command(command, args.repeats)
            rows.append(
                {"command": label, "median_s": statistics.median(seconds), "min_s": min(seconds), "runs": seconds}
            )
    baseline = rows[0]["median_s"]
    for row in rows:
        row["over_python_s"] = row["median_s"] - baseline
    document = {**run_header(), "repeats": args.repeats, "rows": rows}
    write_json(args.output, document)
    table = markdown_table(
        rows,
        [
            ("command", "command"),
            ("median_s", "median s"),
            ("min_s", "fastest s"),
            ("over_python_s", "median over `python -c pass`, s"),
        ],
    )
    command = document["command"]
    text = (
        f"### CLI start-up\n\n`{command}` ({document['date']}, {document['git_commit'][:12]}, "
        f"{document['machine']['cpu_count']}-core {document['machine']['cpu']}; {args.repeats} fresh processes "
        f"each; `adaclip` run as `python -m adaclip`):\n\n{table}\n"
    )
    replace_section(DOCS / "benchmarks.md", "startup", text)
    print(table)


if __name__ == "__main__":
    main()
