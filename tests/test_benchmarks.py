"""The benchmark harness (not the benchmarks themselves, which are `make bench`): one method's speed
record on a tiny backbone, and the GPU-peak bookkeeping that a CPU machine cannot otherwise exercise."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks.common import ROOT, gpu_peak_tflops
from benchmarks.speed import add_ratios, render

from .conftest import TINY


@pytest.mark.parametrize(
    ("name", "precision", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", "bf16", 989.4),
        ("NVIDIA H100 PCIe", "bf16", 756.0),
        ("NVIDIA H100 80GB HBM3", "fp32", 66.9),
        ("NVIDIA H200", "fp16", 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA L4", "bf16", 121.0),
        ("NVIDIA L40S", "bf16", 362.1),
        ("NVIDIA L40", "bf16", None),  # not the L4 or the L40S: unknown, not a wrong number
        ("NVIDIA A10G", "bf16", None),
    ],
)
def test_gpu_peak_lookup_matches_whole_names(name, precision, peak):
    assert gpu_peak_tflops(name, precision) == peak


def _report(rows: list[dict], gpu: dict | None) -> dict:
    return {
        "date": "2026-01-01",
        "git_commit": "0" * 40,
        "command": "python -m benchmarks.speed",
        "machine": {"cpu": "cpu", "cpu_count": 16, "gpu": gpu},
        "settings": {"batch_size": 64, "predict_batch_size": 128, "tta_images": 32, "tta_episodic_images": 2},
        "runs": rows,
    }


def test_gpu_table_reports_achieved_rate_against_the_peak():
    rows = [
        {"backbone": "b", "method": "lora", "precision": "bf16", "train_images_per_second": 100.0,
         "gpu_name": "NVIDIA H100 80GB HBM3", "train_achieved_tflops": 98.94, "gpu_peak_tflops": 989.4,
         "train_fraction_of_peak": 0.1},
        {"backbone": "b", "method": "adaring", "precision": "bf16", "train_images_per_second": 150.0,
         "gpu_name": "NVIDIA H100 80GB HBM3", "train_achieved_tflops": 49.47, "gpu_peak_tflops": 989.4,
         "train_fraction_of_peak": 0.05},
    ]  # fmt: skip
    add_ratios(rows)
    assert rows[1]["train_speed_vs_lora"] == pytest.approx(1.5)
    text = render(_report(rows, {"name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2}))
    assert "| TFLOP/s | of peak |" in text
    assert "NVIDIA H100 80GB HBM3 bf16: 989.4 TFLOP/s" in text
    assert "| 0.05 |" in text and "| 49.47 |" in text
    assert "over 32 random images" in text and "| tta online img/s |" in text


def test_cpu_table_has_no_peak_columns():
    rows = [{"backbone": "b", "method": "lora", "precision": "fp32", "train_images_per_second": 1.0}]
    text = render(_report(rows, None))
    assert "of peak" not in text and "no GPU" in text


@pytest.mark.parametrize(("method", "settings", "adapts_mask"), [("adaring", {"blocks": "all", "ranks": [2]}, True),
                                                                ("linear-probe", {}, False)])  # fmt: skip
@pytest.mark.slow
def test_speed_one_measures_a_method_on_a_tiny_backbone(method, settings, adapts_mask):
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed_one", "--backbone", TINY, "--method", method,
         "--device", "cpu", "--batch-size", "2", "--steps", "1", "--predict-batch-size", "2", "--predict-steps", "1",
         "--tta-images", "3", "--tta-episodic-images", "1", "--settings", json.dumps(settings)],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["method"] == method and record["precision"] == "fp32"
    assert record["trainable_params"] > 0 and record["adapter_file_bytes"] > 0
    assert record["train_images_per_second"] > 0 and record["predict_images_per_second"] > 0
    assert record["train_step_gflop"] > 0
    assert "train_fraction_of_peak" not in record  # CPU: no peak to compare against
    assert record["tta_tda_images_per_second"] > 0  # training-free: any head
    for mode in ("online", "episodic"):
        rate = record[f"tta_{mode}_images_per_second"]
        assert (rate > 0) if adapts_mask else (rate is None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_speed_on_a_missing_gpu_stops_before_measuring_anything(tmp_path, capsys):
    from benchmarks.speed import main

    output = tmp_path / "speed.json"
    with pytest.raises(SystemExit) as stopped:
        main(["--device", "cuda", "--backbones", "lite", "--methods", "zeroshot", "--output", str(output)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "benchmarks.speed: --device cuda asked for, but CUDA is not available here (use --device cpu)"
    ]
    assert not output.exists()


def test_speed_passes_its_run_options_on_unchanged():
    """speed.py parses the run options once and hands them to each speed_one process as flags."""
    import argparse

    from benchmarks.common import RUN_OPTIONS, add_run_options, run_option_args

    def parser():
        p = argparse.ArgumentParser()
        add_run_options(p)
        return p

    given = ["--device", "cpu", "--precision", "bf16", "--batch-size", "5", "--steps", "2", "--predict-batch-size", "7"]
    given += ["--predict-steps", "4", "--tta-images", "0", "--tta-episodic-images", "1", "--peak-tflops", "12.5"]
    first = parser().parse_args(given)
    assert len(given) == 2 * len(RUN_OPTIONS)
    assert parser().parse_args(run_option_args(first)) == first
    defaults = parser().parse_args([])
    assert "--peak-tflops" not in run_option_args(defaults)  # None: not passed on
    assert parser().parse_args(run_option_args(defaults)) == defaults


@pytest.mark.slow
def test_lora_against_peft_on_a_tiny_backbone():
    pytest.importorskip("peft")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.speed_lora_peft", "--backbone", TINY, "--batch-size", "2",
         "--rounds", "1", "--record-only"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout.strip().splitlines()[-1])
    variants = {row["variant"]: row for row in record["variants"]}
    assert set(variants) == {"adaclip", "adaclip-dropout0", "peft"}
    assert len({row["trainable_params"] for row in variants.values()}) == 1  # the comparison's premise
    assert variants["peft"]["vs_peft"] == 1.0 and all(row["train_images_per_second"] > 0 for row in variants.values())


def test_accuracy_merge_folds_in_another_process_runs_and_names_its_command(tmp_path, monkeypatch):
    import benchmarks.accuracy as accuracy

    monkeypatch.setattr(accuracy, "DOCS", tmp_path)
    machine = {"cpu": "cpu", "cpu_count": 2}
    settings = {"backbone": "lite", "templates": "ensemble", "seeds": [1, 2], "section": None}

    def record(method, seed, acc):
        return {"protocol": "few-shot", "method": method, "shots": 4, "seed": seed, "accuracy": acc}

    def report(command, runs, b2n=()):
        header = {"command": command, "date": "d", "git_commit": "0" * 40, "machine": machine}
        return {**header, "settings": settings, "few_shot": runs, "base_to_new": list(b2n), "complete": True}

    ours = tmp_path / "ours.json"
    theirs = tmp_path / "theirs.json"
    ours.write_text(json.dumps(report("bench A", [record("coop", 1, 0.5), record("coop", 2, 0.7)])))
    new_to_us = {"protocol": "base-to-new", "method": "adaring", "shots": 16, "seed": 1}
    new_to_us |= {"base": 0.8, "new": 0.6, "all": 0.5, "hm": 0.6857}
    their_runs = [record("coop", 1, 0.1), record("adaring", 1, 0.6)]  # coop seed 1 is ours already
    theirs.write_text(json.dumps(report("bench B", their_runs, [new_to_us])))

    accuracy.main(["--output", str(ours), "--merge", str(theirs)])

    merged = json.loads(ours.read_text())
    runs = {(r["method"], r["seed"]): r["accuracy"] for r in merged["few_shot"]}
    assert runs == {("coop", 1): 0.5, ("coop", 2): 0.7, ("adaring", 1): 0.6}
    assert merged["base_to_new"] == [new_to_us]
    assert merged["earlier_commands"] == ["bench B"]
    docs = (tmp_path / "benchmarks.md").read_text()
    assert "`bench B`; `bench A`" in docs
    assert "| coop | 4 | 60.00 +- 14.14 | 2 |" in docs
    assert "| adaring | 80.00 | 60.00 | 50.00 | 68.57 | 1 |" in docs
