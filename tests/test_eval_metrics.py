"""eval's CLIP_benchmark-style metrics: parity with the definitions written out independently, and the
CLI's json / csv / --output / --predictions outputs agreeing with each other."""

from __future__ import annotations

import csv
import io
import json

import pytest
import torch
from typer.testing import CliRunner

from adaclip.cli import app
from adaclip.metrics import classification_report

from .conftest import TINY

runner = CliRunner()


def reference_metrics(truth: list[int], scores: list[list[float]]) -> dict:
    """CLIP_benchmark's acc1 / acc5 / mean_per_class_recall (sklearn balanced accuracy) and macro-F1 over
    the classes that have images, in plain Python."""
    n_classes = len(scores[0])
    ranked = [sorted(range(n_classes), key=lambda c: -row[c]) for row in scores]
    predicted = [r[0] for r in ranked]
    acc1 = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    acc5 = sum(t in r[:5] for r, t in zip(ranked, truth, strict=True)) / len(truth) if n_classes >= 5 else None
    present = sorted(set(truth))
    recalls, f1s = [], []
    for c in present:
        tp = sum(p == c and t == c for p, t in zip(predicted, truth, strict=True))
        support = sum(t == c for t in truth)
        predicted_c = sum(p == c for p in predicted)
        recall, precision = tp / support, (tp / predicted_c if predicted_c else 0.0)
        recalls.append(recall)
        f1s.append(0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall))
    return {
        "acc1": acc1,
        "acc5": acc5,
        "mean_per_class_recall": sum(recalls) / len(recalls),
        "macro_f1": sum(f1s) / len(f1s),
    }


@pytest.mark.parametrize("n_classes", [3, 7])
def test_metrics_match_the_definitions(n_classes):
    generator = torch.Generator().manual_seed(n_classes)
    truth = torch.randint(0, n_classes - 1, (40,), generator=generator)  # the last class has no images
    scores = torch.randn(40, n_classes, generator=generator) + 1.5 * torch.nn.functional.one_hot(truth, n_classes)
    report = classification_report(truth, scores.argmax(dim=-1), [f"c{i}" for i in range(n_classes)], scores=scores)
    expected = reference_metrics(truth.tolist(), scores.tolist())
    for key, value in expected.items():
        assert report.metrics[key] == (pytest.approx(value) if value is not None else None), key
    assert 0 < report.metrics["acc1"] < 1 and report.metrics["mean_per_class_recall"] != report.metrics["acc1"]


def test_eval_outputs_agree(dataset, tmp_path):
    adapter = tmp_path / "probe.adaclip"
    fit = runner.invoke(
        app,
        ["fit", str(dataset), "-m", "linear-probe", "-o", str(adapter), "--epochs", "3", "--lr", "0.01"]
        + ["-b", TINY, "-p", "none", "--device", "cpu"],
    )
    assert fit.exit_code == 0, fit.output
    report_file, per_image = tmp_path / "eval.json", tmp_path / "per-image.jsonl"
    result = runner.invoke(
        app,
        ["eval", str(adapter), str(dataset), "-f", "json", "-o", str(report_file), "--predictions", str(per_image)],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert json.loads(report_file.read_text()) == document
    metrics = document["metrics"]
    assert set(metrics) == {"acc1", "acc5", "mean_per_class_recall", "macro_f1"}
    assert metrics["acc1"] == document["accuracy"] and metrics["acc5"] is None  # 4 classes: no top-5
    records = [json.loads(line) for line in per_image.read_text().splitlines()]
    assert len(records) == document["n_images"] == 24
    assert sum(r["correct"] for r in records) / len(records) == pytest.approx(metrics["acc1"])
    assert all(r["label"] == r["top_k"][0]["label"] for r in records) and len(records[0]["top_k"]) == 4

    as_csv = runner.invoke(app, ["eval", str(adapter), str(dataset), "-f", "csv"])
    (row,) = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert float(row["acc1"]) == pytest.approx(metrics["acc1"], abs=1e-6) and row["acc5"] == ""
    assert float(row["mean_per_class_recall"]) == pytest.approx(metrics["mean_per_class_recall"], abs=1e-6)

    again = runner.invoke(app, ["eval", str(adapter), str(dataset), "-o", str(report_file)])
    assert again.exit_code == 2 and "already exists" in again.stderr
    table = runner.invoke(app, ["eval", str(adapter), str(dataset)])
    assert "acc5" in table.stdout and "mean per-class recall" in table.stdout
