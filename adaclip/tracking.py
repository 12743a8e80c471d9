"""Where `fit` reports its steps and epochs besides stderr: a JSON-lines file (`--log-jsonl FILE`) and
the experiment trackers TensorBoard and MLflow (`--tracker tensorboard|mlflow`, optional extras).

Each takes one record per step (what `training.StepCallback` receives: epoch, step, loss,
train_accuracy, images, lr, seconds, images_per_second) and one per epoch (what
`training.EpochCallback` receives: epoch, step, loss, lr, train_accuracy, val_accuracy, seconds,
images_per_second). The JSON-lines file tells them apart by "event" ("step" or "epoch"); the trackers
keep epoch scalars under their plain names (x: epoch) and step scalars under `step/NAME` (x: global
step). Both trackers write local file stores by
default (`--tracker-dir`: TensorBoard event files, an MLflow SQLite store `DIR/mlflow.db`), so they work
offline.
Everything that can fail (a file in the way, a tracker not installed) is checked by `open_run_logs`,
before training starts.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Protocol

from .errors import UsageError
from .files import check_output_path

TRACKERS = ("tensorboard", "mlflow")
SCALARS = ("loss", "lr", "train_accuracy", "val_accuracy", "images_per_second")


class RunLog(Protocol):
    def log_step(self, record: dict[str, Any]) -> None: ...

    def log_epoch(self, record: dict[str, Any]) -> None: ...

    def close(self, summary: dict[str, Any] | None = None) -> None: ...


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    return {
        k: float(record[k])
        for k in SCALARS
        if isinstance(record.get(k), (int, float)) and math.isfinite(float(record[k]))
    }


class JsonlLog:
    """One JSON object per line, flushed after each record (so `tail -f` follows the run)."""

    def __init__(self, path: Path, *, force: bool = False):
        self.check(path, force=force)
        self.path = path
        self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed by close()

    @staticmethod
    def check(path: Path, *, force: bool = False) -> None:
        check_output_path(path, force=force, what="log file", option="--log-jsonl")

    def log_step(self, record: dict[str, Any]) -> None:
        self._write({"event": "step", **record})

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._write({"event": "epoch", **record})

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, sort_keys=True) + "\n")
        self._file.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self._file.close()


class TensorBoardLog:
    def __init__(self, logdir: Path, run_name: str, params: dict[str, Any]):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError(
                "--tracker tensorboard needs the tensorboard package", fix="pip install 'adaclip[tensorboard]'"
            ) from None
        self.writer = SummaryWriter(log_dir=str(logdir / run_name))
        self.writer.add_text("adaclip/params", json.dumps(params, indent=2, sort_keys=True))

    def log_step(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(f"step/{key}", value, global_step=int(record["step"]))

    def log_epoch(self, record: dict[str, Any]) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["epoch"]))
        self.writer.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.writer.close()


class MlflowLog:
    def __init__(self, store: Path, run_name: str, params: dict[str, Any]):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise UsageError("--tracker mlflow needs the mlflow package", fix="pip install 'adaclip[mlflow]'") from None
        store.mkdir(parents=True, exist_ok=True)
        # MLflow 3 keeps its file store in maintenance mode and refuses it by default; SQLite is its
        # recommended local backend (sqlalchemy + alembic, in the mlflow extra).
        self.client = MlflowClient(tracking_uri=mlflow_store_uri(store))
        experiment = self.client.get_experiment_by_name("adaclip")
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("adaclip")
        self.run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        for key, value in params.items():
            self.client.log_param(self.run_id, key, json.dumps(value) if not isinstance(value, str) else value)

    def log_step(self, record: dict[str, Any]) -> None:
        self._log(record, prefix="step/", step=int(record["step"]))

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._log(record, prefix="", step=int(record["epoch"]))

    def _log(self, record: dict[str, Any], *, prefix: str, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(prefix + key, value, now, step) for key, value in _scalars(record).items()]
        self.client.log_batch(self.run_id, metrics=metrics)  # one store transaction per record

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if summary is not None else "FAILED")


def mlflow_store_uri(folder: Path) -> str:
    """The tracking URI of the local store `--tracker mlflow --tracker-dir FOLDER` writes."""
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def open_run_logs(
    *,
    jsonl: Path | None,
    tracker: str | None,
    tracker_dir: Path | None,
    run_name: str,
    params: dict[str, Any],
    force: bool = False,
) -> list[RunLog]:
    """The run logs the options ask for, opened (and so checked) before any training."""
    if tracker is not None and tracker not in TRACKERS:
        raise UsageError(f"unknown --tracker {tracker!r}", fix=f"use one of: {', '.join(TRACKERS)}")
    if jsonl is not None:
        JsonlLog.check(jsonl, force=force)  # before a tracker creates a run
    logs: list[RunLog] = []
    if tracker == "tensorboard":
        logs.append(TensorBoardLog(tracker_dir or Path("runs"), run_name, params))
    elif tracker == "mlflow":
        logs.append(MlflowLog(tracker_dir or Path("mlruns"), run_name, params))
    if jsonl is not None:
        logs.append(JsonlLog(jsonl, force=force))
    return logs
