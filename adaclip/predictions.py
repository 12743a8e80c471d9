"""What a prediction is: `Prediction` (one image's labels and scores) and the records built from
class probabilities, shared by `Adapter.predict`, `Adapter.evaluate`, test-time adaptation and the server.
How records are printed (table, json, csv) is the CLI's business, not this module's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Prediction:
    """One image's result: best label and score, and the top-k (label, probability) pairs."""

    path: str | None
    label: str | None
    score: float | None
    class_index: int | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    true_label: str | None = None  # set when the caller knows the answer (e.g. `tta --labels`)

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"path": self.path, "label": self.label, "score": self.score}
        record["top_k"] = [{"label": label, "score": score} for label, score in self.top_k]
        if self.true_label is not None:
            record["true_label"] = self.true_label
        if self.error:
            record["error"] = self.error
        return record


def top_prediction(path: str | None, probs: torch.Tensor, class_names: list[str], top_k: int) -> Prediction:
    """The Prediction for one image's class probabilities (K,): its `top_k` classes (at least one)."""
    k = max(1, min(top_k, len(probs)))
    scores, indices = probs.topk(k)
    pairs = [(class_names[i], round(float(s), 6)) for s, i in zip(scores.tolist(), indices.tolist(), strict=True)]
    return Prediction(path, pairs[0][0], pairs[0][1], int(indices[0]), pairs)


def labelled_record(
    path: str, probs: torch.Tensor, true_index: int, class_names: list[str], top_k: int
) -> dict[str, Any]:
    """One evaluated image as `evaluate --predictions` records it: true label, best label, whether they
    agree, and the `top_k` (label, score) pairs."""
    scores, best = probs.topk(max(1, min(top_k, len(class_names))))
    return {
        "path": path,
        "true_label": class_names[true_index],
        "label": class_names[int(best[0])],
        "correct": int(best[0]) == true_index,
        "score": round(float(scores[0]), 6),
        "top_k": [
            {"label": class_names[int(i)], "score": round(float(v), 6)}
            for v, i in zip(scores.tolist(), best.tolist(), strict=True)
        ],
    }
