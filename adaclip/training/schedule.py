"""How long and how fast training goes: the optimizer, the learning-rate schedule, the step budget,
which epochs validate, and each epoch's image order."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..methods import TrainConfig


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainConfig, lr_scales: dict[int, float] | None = None
) -> torch.optim.Optimizer:
    """Weight decay on matrices only: decaying gates, biases and norms towards 0 is rarely wanted.
    `lr_scales` (id(param) -> multiplier) gives a part its own learning rate (e.g. a head beside towers)."""
    lr_scales = lr_scales or {}
    grouped: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for p in params:
        grouped.setdefault((lr_scales.get(id(p), 1.0), p.ndim >= 2), []).append(p)
    groups = [
        {"params": members, "lr": cfg.lr * scale, "weight_decay": cfg.weight_decay if decay else 0.0}
        for (scale, decay), members in sorted(grouped.items(), key=lambda item: (item[0][0], not item[0][1]))
    ]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int, total_steps: int):
    """Linear warm-up, then cosine decay to zero (or constant)."""
    warmup = min(total_steps - 1, round(cfg.warmup_epochs * steps_per_epoch)) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def training_budget(
    cfg: TrainConfig, n_images: int, shots: int | None, n_classes: int, steps_per_epoch: int
) -> tuple[int, int]:
    """(epochs, optimiser steps). Shots = the few-shot count, else training images per class (rounded).
    `iterations_per_shot` fixes the step count (iterations x shots; the last epoch stops early);
    `epochs_by_shots` picks the epoch count by shots; otherwise `epochs`."""
    per_class = shots or max(1, round(n_images / max(1, n_classes)))
    if cfg.iterations_per_shot:
        total = cfg.iterations_per_shot * per_class
        return math.ceil(total / steps_per_epoch), total
    epochs = cfg.epochs
    if cfg.epochs_by_shots:
        fitting = [least for least in cfg.epochs_by_shots if least <= per_class]
        epochs = cfg.epochs_by_shots[max(fitting) if fitting else min(cfg.epochs_by_shots)]
    return epochs, epochs * steps_per_epoch


def validates_after(epoch: int, epochs: int) -> bool:
    """Whether epoch `epoch` (0-based) ends with a validation pass: every epoch of short runs, about 50
    times over long ones (an iteration budget can mean thousands of short epochs), always the last."""
    every = max(1, math.ceil(epochs / 50))
    return (epoch + 1) % every == 0 or epoch + 1 == epochs


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`: a function of (seed, epoch) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator)
