"""TDA's training-free caches (Karmanov et al., CVPR 2024; our implementation; see adaclip.tta)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .settings import TDASettings


class TDACache:
    """TDA's positive and negative caches of test features (see the module docstring)."""

    def __init__(self, n_classes: int, settings: TDASettings):
        self.n_classes = n_classes
        self.settings = settings
        # per class: list of (normalised entropy, feature, value row)
        self.positive: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_classes)]
        self.negative: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_classes)]

    @staticmethod
    def _insert(slot: list, capacity: int, item: tuple) -> None:
        if capacity <= 0:
            return
        if len(slot) < capacity:
            slot.append(item)
        elif item[0] < slot[-1][0]:
            slot[-1] = item
        else:
            return
        slot.sort(key=lambda entry: entry[0])

    @staticmethod
    def _logits(feature: torch.Tensor, slots: list[list], beta: float) -> torch.Tensor | None:
        entries = [entry for slot in slots for entry in slot]
        if not entries:
            return None
        keys = torch.stack([e[1] for e in entries])
        values = torch.stack([e[2] for e in entries])
        affinity = torch.exp(-beta * (1.0 - keys @ feature))
        return affinity @ values

    def observe_and_adjust(self, feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Add one image to the caches, then return its cache-adjusted logits."""
        s = self.settings
        probs = logits.softmax(dim=-1)
        # The reference divides an entropy in nats by log2(K) (utils.get_entropy); its thresholds were set
        # on that scale, so the same division is kept.
        normalised = float(-(probs * logits.log_softmax(dim=-1)).sum() / math.log2(max(2, self.n_classes)))
        predicted = int(probs.argmax())
        feature = feature.float()
        one_hot = F.one_hot(torch.tensor(predicted), self.n_classes).float().to(feature.device)
        self._insert(self.positive[predicted], s.positive_capacity, (normalised, feature, one_hot))
        low, high = s.negative_entropy
        if low < normalised < high:
            low_p, high_p = s.negative_mask
            possible = ((probs > low_p) & (probs < high_p)).float()  # subtracted below: "probably not these"
            self._insert(self.negative[predicted], s.negative_capacity, (normalised, feature, possible))
        adjusted = logits.clone()
        positive = self._logits(feature, self.positive, s.positive_beta)
        if positive is not None:
            adjusted += s.positive_alpha * positive
        negative = self._logits(feature, self.negative, s.negative_beta)
        if negative is not None:
            adjusted -= s.negative_alpha * negative
        return adjusted
