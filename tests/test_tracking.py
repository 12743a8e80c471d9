"""`fit --log-jsonl` and `--tracker tensorboard|mlflow`: what was written is read back with each
library's own reader, and must equal the adapter's recorded history."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import adaclip
from adaclip.cli import app
from adaclip.tracking import mlflow_store_uri

from .conftest import TINY

runner = CliRunner()
TINY_FIT = ["-m", "linear-probe", "--epochs", "3", "--lr", "0.01", "-b", TINY, "-p", "none", "--device", "cpu"]


def fit(dataset, tmp_path, *extra: str):
    out = tmp_path / "probe.adaclip"
    result = runner.invoke(app, ["fit", str(dataset), "-o", str(out), *TINY_FIT, *extra])
    assert result.exit_code == 0, result.output
    return adaclip.load(out, device="cpu").metadata.training.history


def test_log_jsonl_has_one_record_per_epoch(dataset, tmp_path):
    log = tmp_path / "train.jsonl"
    history = fit(dataset, tmp_path, "--log-jsonl", str(log))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for record, entry in zip(records, history, strict=True):
        assert {k: record[k] for k in entry} == entry  # loss, lr, accuracies as the adapter file records them
        assert record["images_per_second"] > 0 and record["seconds"] > 0 and record["step"] >= record["epoch"]


def test_tensorboard_scalars_read_back(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    history = fit(dataset, tmp_path, "--tracker", "tensorboard", "--tracker-dir", str(tmp_path / "runs"))
    accumulator = EventAccumulator(str(tmp_path / "runs" / "probe.adaclip"))
    accumulator.Reload()
    losses = accumulator.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert "images_per_second" in accumulator.Tags()["scalars"]


def test_mlflow_metrics_read_back(dataset, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    history = fit(dataset, tmp_path, "--tracker", "mlflow", "--tracker-dir", str(store))
    client = MlflowClient(tracking_uri=mlflow_store_uri(store))
    (run,) = client.search_runs([client.get_experiment_by_name("adaclip").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "linear-probe"
    losses = client.get_metric_history(run.info.run_id, "loss")
    losses = sorted(losses, key=lambda m: m.step)
    assert [m.step for m in losses] == [h["epoch"] for h in history]
    assert [m.value for m in losses] == pytest.approx([h["loss"] for h in history], rel=1e-6)


def test_bad_log_options_fail_before_training(dataset, tmp_path):
    taken = tmp_path / "taken.jsonl"
    taken.write_text("precious\n")
    out = tmp_path / "never.adaclip"
    args = ["fit", str(dataset), "-o", str(out), *TINY_FIT, "--tracker-dir", str(tmp_path / "runs")]
    result = runner.invoke(app, [*args, "--log-jsonl", str(taken), "--tracker", "tensorboard"])
    assert result.exit_code == 2 and "log file already exists" in result.stderr
    assert taken.read_text() == "precious\n" and not (tmp_path / "runs").exists() and not out.exists()
    unknown = runner.invoke(app, [*args, "--tracker", "wandb"])
    assert unknown.exit_code == 2 and "tensorboard, mlflow" in unknown.stderr and not out.exists()
