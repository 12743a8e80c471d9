"""One run of a comparison: a method fitted at one seed under the protocol and scored on its test
images. `Comparison` runs them one at a time, sharing the backbone and the frozen-tower encodings."""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import AdaclipError, InputError
from ..inference import SharedEncodings, encode_images, logits_in_batches, sharing_frozen_encodings
from ..metrics import classification_report
from .protocol import Protocol


@dataclass
class RunResult:
    """One method at one seed: its scores on the test images, or why it failed."""

    method: str
    seed: int
    status: str = "ok"  # ok | failed
    error: str | None = None
    accuracy: float | None = None  # on the test images (base classes under base-to-new)
    macro_f1: float | None = None
    new_accuracy: float | None = None  # base-to-new: new classes among new names
    all_accuracy: float | None = None  # base-to-new: every test image among every class
    val_accuracy: float | None = None
    trainable_params: int | None = None
    fit_seconds: float | None = None
    predict_images_per_second: float | None = None
    test_seconds: float | None = None  # scoring the test images (shared encodings at their cost)
    adapter_bytes: int | None = None
    adapter_path: str | None = None
    image_tower_frozen: bool | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    # per readable test image (positions in Protocol.test): what the main score predicted, how surely
    test_index: list[int] = field(default_factory=list)
    test_predicted: list[int] = field(default_factory=list)
    test_confidence: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> RunResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in document.items() if k in known})


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, AdaclipError):
        return exc.one_line()
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


class Comparison:
    """Runs methods one (method, seed) at a time under one `Protocol`, sharing the backbone and the
    frozen-tower encodings between runs. `compare()` drives it; benchmarks.accuracy calls `run`."""

    def __init__(
        self,
        protocol: Protocol,
        backbone,
        *,
        templates: str | list[str] | None = "default",
        workers: int | None = None,
        batch_size: int = 64,
        config: dict[str, dict[str, Any]] | None = None,
        shared: SharedEncodings | None = None,
    ):
        self.protocol = protocol
        self.backbone = backbone
        self.templates = templates
        self.workers = workers
        self.batch_size = batch_size
        self.config = config or {}  # method -> settings
        self.shared = shared or SharedEncodings()

    def run(self, method: str, seed: int, *, adapter_path: Path | None = None, resume: bool = False) -> RunResult:
        """Fit `method` with `seed`, score it on the test images; a failure is returned, not raised
        (except Ctrl-C). With `adapter_path` the adapter is kept there (checkpointed beside it)."""
        from ..api import fit
        from ..checkpoint import checkpoint_path_for
        from ..training import TrainingInterrupted

        result = RunResult(method, seed)
        scratch = None
        try:
            with sharing_frozen_encodings(self.shared) as shared:
                reused_before = shared.reused_seconds
                started = time.perf_counter()
                checkpoint = checkpoint_path_for(adapter_path) if adapter_path is not None else None
                adapter = fit(
                    self.protocol.training_data(seed),
                    method,
                    backbone=self.backbone,
                    seed=seed,
                    templates=self.templates,
                    config=self.config.get(method),
                    workers=self.workers,
                    checkpoint=checkpoint,
                    resume=resume and checkpoint is not None and checkpoint.exists(),
                )
                # as if the run had encoded what it reused: every row pays for its own features
                result.fit_seconds = time.perf_counter() - started + shared.reused_seconds - reused_before
                self._score(adapter, result)
            if adapter_path is None:
                scratch = Path(tempfile.mkdtemp(prefix="adaclip-compare-"))
                path = adapter.save(scratch / f"{method}.adaclip")
            else:
                path = adapter.save(adapter_path, force=True)
                checkpoint.unlink(missing_ok=True)
                result.adapter_path = str(path)
            result.adapter_bytes = path.stat().st_size
            result.trainable_params = adapter.trainable_params
            result.image_tower_frozen = adapter.model.image_tower_frozen
            training = adapter.metadata.training
            result.val_accuracy = training.val_accuracy if training else None
            result.history = list(training.history) if training else []
        except KeyboardInterrupt:
            raise
        except TrainingInterrupted:
            raise KeyboardInterrupt from None  # fit turned Ctrl-C into its own message; compare has its own
        except Exception as exc:  # noqa: BLE001 - one failing method must not end the comparison
            result = RunResult(method, seed, status="failed", error=_one_line(exc))
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        return result

    def _test_features(self, adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(features, labels, positions in protocol.test, seconds it took to encode them)."""
        started = time.perf_counter()
        reused = self.shared.reused_seconds
        with sharing_frozen_encodings(self.shared):
            encoded = encode_images(
                adapter.model,
                self.protocol.test,
                adapter.backbone.eval_transform(),
                batch_size=self.batch_size,
                workers=self.workers,
                description="encoding test images",
            )
        seconds = time.perf_counter() - started + self.shared.reused_seconds - reused
        if len(encoded.labels) == 0:
            raise InputError("no readable test images", path=self.protocol.root)
        return encoded.features, encoded.labels.cpu(), encoded.indices.cpu(), seconds

    def _score(self, adapter, result: RunResult) -> None:
        protocol = self.protocol
        features, labels, positions, encode_seconds = self._test_features(adapter)
        n_base = protocol.n_base
        started = time.perf_counter()
        base_rows = labels < n_base
        base_names = protocol.class_names[:n_base]
        with adapter.classes(base_names):
            logits = logits_in_batches(adapter.model, features[base_rows.to(features.device)]).float().cpu()
        head_seconds = time.perf_counter() - started
        probabilities = logits.softmax(dim=-1)
        confidence, predicted = probabilities.max(dim=-1)
        truth = labels[base_rows]
        report = classification_report(truth, predicted, base_names)
        result.accuracy = report.accuracy
        result.macro_f1 = report.macro_f1
        result.per_class = [asdict(score) for score in report.per_class]
        result.confusion = report.confusion
        result.test_index = positions[base_rows].tolist()
        result.test_predicted = predicted.tolist()
        result.test_confidence = [round(float(c), 5) for c in confidence]
        n_scored = int(base_rows.sum())
        result.predict_images_per_second = n_scored / max(1e-9, encode_seconds * n_scored / len(labels) + head_seconds)
        result.test_seconds = encode_seconds + head_seconds
        if protocol.base_to_new:
            from ..methods import method_config_class

            if method_config_class(adapter.method).class_agnostic:
                result.new_accuracy = _accuracy_among(
                    adapter, features, labels, protocol.class_names, range(n_base, len(protocol.folders))
                )
                result.all_accuracy = _accuracy_among(
                    adapter, features, labels, protocol.class_names, range(len(protocol.folders))
                )


def _accuracy_among(adapter, features, labels, names: list[str], classes: range) -> float:
    """Accuracy on the test images of `classes`, each scored among those classes' names only."""
    rows = (labels >= classes.start) & (labels < classes.stop)
    with adapter.classes([names[i] for i in classes]):
        predicted = logits_in_batches(adapter.model, features[rows.to(features.device)]).argmax(dim=-1).cpu()
    return float((predicted == labels[rows] - classes.start).float().mean())
