"""The leaderboard: a comparison's runs summarised per method (means and spread over the seeds), and the
recommended method, chosen on validation accuracy, never on the test images."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

from .protocol import Protocol
from .runs import RunResult


@dataclass
class LeaderboardRow:
    """One method over its seeds (means; std over seeds where there are several)."""

    method: str
    runs: int
    failed: int
    accuracy: float | None
    accuracy_std: float | None
    macro_f1: float | None
    new_accuracy: float | None
    new_accuracy_std: float | None
    val_accuracy: float | None
    trainable_params: int | None
    fit_seconds: float | None
    predict_images_per_second: float | None
    adapter_bytes: int | None
    error: str | None = None

    def record(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = [
    "method",
    "accuracy",
    "accuracy_std",
    "macro_f1",
    "new_accuracy",
    "new_accuracy_std",
    "val_accuracy",
    "trainable_params",
    "fit_seconds",
    "predict_images_per_second",
    "adapter_bytes",
    "runs",
    "failed",
    "error",
]


@dataclass
class Leaderboard:
    """What `compare` found: a row per method (best test accuracy first), every run, the recommended
    method (by validation accuracy, never test) and why."""

    rows: list[LeaderboardRow]
    runs: list[RunResult]
    protocol: dict[str, Any]
    seeds: list[int]
    recommended: str | None
    reason: str
    best_adapter: str | None = None
    test_paths: list[str] = field(default_factory=list)  # Protocol.test, for the report's gallery
    test_labels: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)  # the classes scored (base under base-to-new)
    notes: list[str] = field(default_factory=list)

    def row(self, method: str) -> LeaderboardRow:
        return next(r for r in self.rows if r.method == method)

    def records(self) -> list[dict[str, Any]]:
        return [r.record() for r in self.rows]

    def to_dict(self, *, runs: bool = False) -> dict[str, Any]:
        document = {
            "protocol": self.protocol,
            "seeds": self.seeds,
            "recommended": self.recommended,
            "reason": self.reason,
            "best_adapter": self.best_adapter,
            "leaderboard": self.records(),
            "notes": self.notes,
        }
        if runs:
            document["runs"] = [_summary(r) for r in self.runs]
        return document


def _summary(run: RunResult) -> dict[str, Any]:
    """A run without its per-image lists (those stay in the out_dir's files)."""
    skip = {"test_index", "test_predicted", "test_confidence", "per_class", "confusion", "history"}
    return {k: v for k, v in run.to_dict().items() if k not in skip}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _std(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.stdev(present) if len(present) > 1 else None


def build_leaderboard(runs: list[RunResult], methods: list[str], protocol: Protocol, seeds: list[int]) -> Leaderboard:
    rows = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        ok = [r for r in mine if r.status == "ok"]
        failed = [r for r in mine if r.status != "ok"]
        rows.append(
            LeaderboardRow(
                method=method,
                runs=len(ok),
                failed=len(failed),
                accuracy=_mean([r.accuracy for r in ok]),
                accuracy_std=_std([r.accuracy for r in ok]),
                macro_f1=_mean([r.macro_f1 for r in ok]),
                new_accuracy=_mean([r.new_accuracy for r in ok]),
                new_accuracy_std=_std([r.new_accuracy for r in ok]),
                val_accuracy=_mean([r.val_accuracy for r in ok]),
                trainable_params=ok[0].trainable_params if ok else None,
                fit_seconds=_mean([r.fit_seconds for r in ok]),
                predict_images_per_second=_mean([r.predict_images_per_second for r in ok]),
                adapter_bytes=ok[0].adapter_bytes if ok else None,
                error=failed[0].error if failed else None,
            )
        )
    rows.sort(key=lambda r: (r.accuracy is None, -(r.accuracy or 0.0), r.method))
    recommended, reason = _recommend(rows, protocol)
    return Leaderboard(
        rows=rows,
        runs=runs,
        protocol=protocol.describe(),
        seeds=list(seeds),
        recommended=recommended,
        reason=reason,
        test_paths=[str(im.path) for im in protocol.test],
        test_labels=[im.label for im in protocol.test],
        class_names=protocol.class_names[: protocol.n_base],
    )


def _recommend(rows: list[LeaderboardRow], protocol: Protocol) -> tuple[str | None, str]:
    """Highest mean validation accuracy over the seeds; a tie goes to fewer trainable parameters, then
    to the method name (never to the rows' order, which is by test accuracy). Test scores are not
    looked at. A method with a failed seed is not recommended."""
    candidates = [r for r in rows if r.val_accuracy is not None and r.failed == 0]
    if not candidates:
        return None, "no method has a validation accuracy (no validation images, or every method failed)"
    ranked = sorted(candidates, key=lambda r: (-round(r.val_accuracy, 6), r.trainable_params or 0, r.method))
    best = ranked[0]
    reason = (
        f"highest mean validation accuracy, {best.val_accuracy:.3f} over {best.runs} seed(s) "
        f"(validation: {protocol.val_source}; the test images were not used to choose)"
    )
    if len(ranked) > 1:
        second = ranked[1]
        tied = round(second.val_accuracy, 6) == round(best.val_accuracy, 6)
        reason += f"; next: {second.method} {second.val_accuracy:.3f}"
        if tied:
            reason += f" (a tie, broken by fewer trainable parameters: {best.trainable_params or 0:,})"
    return best.method, reason
