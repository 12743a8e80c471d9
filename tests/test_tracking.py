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
    """Fit with 8-image batches (several steps per epoch); the training record the adapter file keeps."""
    out = tmp_path / "probe.adaclip"
    result = runner.invoke(app, ["fit", str(dataset), "-o", str(out), *TINY_FIT, "--batch-size", "8", *extra])
    assert result.exit_code == 0, result.output
    return adaclip.load(out, device="cpu").metadata.training


def test_log_jsonl_has_one_record_per_step_and_per_epoch(dataset, tmp_path):
    log = tmp_path / "train.jsonl"
    training = fit(dataset, tmp_path, "--log-jsonl", str(log))
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r["event"] for r in records} == {"step", "epoch"}
    epochs = [r for r in records if r["event"] == "epoch"]
    steps = [r for r in records if r["event"] == "step"]
    # Epoch records: as before (plus "event"), equal to the adapter file's history.
    assert [r["epoch"] for r in epochs] == [1, 2, 3]
    for record, entry in zip(epochs, training.history, strict=True):
        assert {k: record[k] for k in entry} == entry  # loss, lr, accuracies as the adapter file records them
        assert record["images_per_second"] > 0 and record["seconds"] > 0 and record["step"] >= record["epoch"]
    # Step records: every step once, in order, each epoch's before its epoch record.
    assert training.steps > len(epochs)
    assert [r["step"] for r in steps] == list(range(1, training.steps + 1))
    for record, entry in zip(epochs, training.history, strict=True):
        mine = [r for r in steps if r["epoch"] == entry["epoch"]]
        assert mine[-1]["step"] == record["step"] and records.index(mine[-1]) < records.index(record)
        # The epoch's loss and accuracy are the image-weighted means of its steps'.
        seen = sum(r["images"] for r in mine)
        assert sum(r["loss"] * r["images"] for r in mine) / seen == pytest.approx(entry["loss"], abs=2e-6)
        assert sum(r["train_accuracy"] * r["images"] for r in mine) / seen == pytest.approx(
            entry["train_accuracy"], abs=2e-6
        )
        assert all(r["images_per_second"] > 0 and r["seconds"] > 0 for r in mine)
    # A step records the lr it used: the first step of an epoch uses the lr the previous epoch ended with.
    for previous, entry in zip(training.history, training.history[1:], strict=False):
        first = next(r for r in steps if r["epoch"] == entry["epoch"])
        assert first["lr"] == previous["lr"]


def test_tensorboard_scalars_read_back(dataset, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    training = fit(dataset, tmp_path, "--tracker", "tensorboard", "--tracker-dir", str(tmp_path / "runs"))
    history = training.history
    accumulator = EventAccumulator(str(tmp_path / "runs" / "probe.adaclip"))
    accumulator.Reload()
    losses = accumulator.Scalars("loss")
    assert [e.step for e in losses] == [1, 2, 3]
    assert [e.value for e in losses] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    assert "images_per_second" in accumulator.Tags()["scalars"]
    step_losses = accumulator.Scalars("step/loss")
    assert [e.step for e in step_losses] == list(range(1, training.steps + 1))
    assert "step/lr" in accumulator.Tags()["scalars"]


def test_mlflow_metrics_read_back(dataset, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = tmp_path / "mlruns"
    training = fit(dataset, tmp_path, "--tracker", "mlflow", "--tracker-dir", str(store))
    history = training.history
    client = MlflowClient(tracking_uri=mlflow_store_uri(store))
    (run,) = client.search_runs([client.get_experiment_by_name("adaclip").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["method"] == "linear-probe"
    losses = client.get_metric_history(run.info.run_id, "loss")
    losses = sorted(losses, key=lambda m: m.step)
    assert [m.step for m in losses] == [h["epoch"] for h in history]
    assert [m.value for m in losses] == pytest.approx([h["loss"] for h in history], rel=1e-6)
    step_losses = client.get_metric_history(run.info.run_id, "step/loss")
    assert sorted(m.step for m in step_losses) == list(range(1, training.steps + 1))


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
