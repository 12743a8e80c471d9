"""Gaussian-weighted averaging of the trainable weights over epochs (PromptSRC's GPA, a setting of every
method: `train.weight_averaging=gaussian`).

After each epoch e (1-based) the running sum gains w_e x the weights; the run ends with that sum. w_e is
the normal density at e with mean `averaging_peak` x epochs and standard deviation `averaging_spread` x
epochs, normalised over the epochs (PromptSRC: mean 15, std 1 over 20 epochs for base-to-new).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..methods import TrainConfig


def averaging_weights(epochs: int, peak: float, spread: float) -> list[float]:
    """w_1..w_epochs, summing to 1."""
    mean, std = peak * epochs, spread * epochs
    density = [math.exp(-0.5 * ((e - mean) / std) ** 2) for e in range(1, epochs + 1)]
    total = sum(density)
    if total == 0.0:  # every epoch far in the tail (a tiny spread between epochs): the nearest epoch alone
        nearest = min(range(epochs), key=lambda i: abs(i + 1 - mean))
        return [1.0 if i == nearest else 0.0 for i in range(epochs)]
    return [d / total for d in density]


class WeightAverage:
    """The running weighted sum of the trainable parameters; its state travels in the checkpoint."""

    def __init__(self, params: list[nn.Parameter], cfg: TrainConfig, epochs: int):
        self.params = params
        self.weights = averaging_weights(epochs, cfg.averaging_peak, cfg.averaging_spread)
        self.sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]

    def add_epoch(self, epoch: int) -> None:
        """Add the weights as they are at the end of `epoch` (0-based)."""
        weight = self.weights[epoch]
        with torch.no_grad():
            for total, p in zip(self.sums, self.params, strict=True):
                total.add_(p.detach().to(torch.float32), alpha=weight)

    def apply(self) -> None:
        """Replace the trainable parameters by the average."""
        with torch.no_grad():
            for total, p in zip(self.sums, self.params, strict=True):
                p.copy_(total.to(p.dtype))

    def state_dict(self) -> dict[str, list[torch.Tensor]]:
        return {"sums": [t.clone() for t in self.sums]}

    def load_state_dict(self, state: dict[str, list[torch.Tensor]]) -> None:
        sums = state["sums"]
        if len(sums) != len(self.sums) or any(a.shape != b.shape for a, b in zip(sums, self.sums, strict=True)):
            raise ValueError("weight-averaging state does not match the trainable parameters")
        self.sums = [t.to(device=s.device, dtype=torch.float32) for t, s in zip(sums, self.sums, strict=True)]
