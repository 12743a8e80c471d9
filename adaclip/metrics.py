"""Classification metrics from predicted and true labels.

`ClassificationReport.metrics` uses CLIP_benchmark's key names (acc1, acc5, mean_per_class_recall) so
results line up with its tables: acc5 is None (CLIP_benchmark: NaN) with fewer than 5 classes, and
mean per-class recall averages over the classes that have images (sklearn's balanced accuracy, which
CLIP_benchmark calls). adaclip adds macro_f1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class ClassScore:
    name: str
    support: int
    accuracy: float | None  # recall: correct / support; None without support
    precision: float | None
    f1: float | None


@dataclass
class ClassificationReport:
    n_images: int
    accuracy: float
    macro_f1: float
    per_class: list[ClassScore]
    confusion: list[list[int]]  # rows: true class, columns: predicted class
    skipped_images: int = 0
    extra: dict = field(default_factory=dict)
    top5_accuracy: float | None = None  # None with fewer than 5 classes, or when no scores were given
    predictions: list[dict] | None = field(default=None, repr=False)  # per image, when asked for

    @property
    def mean_per_class_recall(self) -> float:
        recalls = [c.accuracy for c in self.per_class if c.accuracy is not None]
        return sum(recalls) / len(recalls) if recalls else 0.0

    @property
    def metrics(self) -> dict[str, float | None]:
        """CLIP_benchmark's metric names, plus macro_f1."""
        return {
            "acc1": self.accuracy,
            "acc5": self.top5_accuracy,
            "mean_per_class_recall": self.mean_per_class_recall,
            "macro_f1": self.macro_f1,
        }

    def to_dict(self) -> dict:
        document = asdict(self)
        document.pop("predictions")
        document.pop("top5_accuracy")
        return {"metrics": self.metrics, **document}


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, n_classes: int) -> torch.Tensor:
    index = y_true.long() * n_classes + y_pred.long()
    return torch.bincount(index, minlength=n_classes * n_classes).view(n_classes, n_classes)


def top_k_accuracy(y_true: torch.Tensor, scores: torch.Tensor, k: int) -> float | None:
    """Fraction of rows whose true class is among the k highest scores; None when there are fewer than
    k classes (CLIP_benchmark reports acc5 only from 5 classes on)."""
    if scores.shape[-1] < k or len(y_true) == 0:
        return None
    top = scores.topk(k, dim=-1).indices
    return float((top == y_true.view(-1, 1).to(top.device)).any(dim=-1).double().mean())


def classification_report(
    y_true: Sequence[int] | torch.Tensor,
    y_pred: Sequence[int] | torch.Tensor,
    class_names: Sequence[str],
    scores: torch.Tensor | None = None,
) -> ClassificationReport:
    """Accuracy, macro-F1 over classes that have support, per-class scores, confusion matrix; with
    `scores` (N, K) also top-5 accuracy."""
    y_true = torch.as_tensor(y_true, dtype=torch.long)
    y_pred = torch.as_tensor(y_pred, dtype=torch.long)
    k = len(class_names)
    cm = confusion_matrix(y_true, y_pred, k) if len(y_true) else torch.zeros(k, k, dtype=torch.long)
    tp = cm.diag().double()
    support = cm.sum(dim=1).double()
    predicted = cm.sum(dim=0).double()
    per_class = []
    f1s = []
    for i, name in enumerate(class_names):
        recall = float(tp[i] / support[i]) if support[i] > 0 else None
        precision = float(tp[i] / predicted[i]) if predicted[i] > 0 else (0.0 if support[i] > 0 else None)
        if recall is None:
            f1 = None
        else:
            p = precision or 0.0
            f1 = 0.0 if (p + recall) == 0 else 2 * p * recall / (p + recall)
            f1s.append(f1)
        per_class.append(ClassScore(name, int(support[i]), recall, precision, f1))
    n = int(len(y_true))
    accuracy = float(tp.sum() / n) if n else 0.0
    macro_f1 = float(sum(f1s) / len(f1s)) if f1s else 0.0
    return ClassificationReport(
        n_images=n,
        accuracy=accuracy,
        macro_f1=macro_f1,
        per_class=per_class,
        confusion=cm.tolist(),
        top5_accuracy=top_k_accuracy(y_true, scores, 5) if scores is not None else None,
    )
