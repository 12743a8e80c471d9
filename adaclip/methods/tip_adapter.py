"""Tip-Adapter (`--method tip-adapter`): a training-free cache model of the few-shot images (Zhang et
al., ECCV 2022, github.com/gaopengcuhk/Tip-Adapter).

The cache holds one key per training image (its L2-normalised image feature) and one value (its
one-hot label). An image with normalised feature f is scored

    logits = logit_scale * f C^T + alpha * exp(-beta * (1 - f K^T)) V

where C are the zero-shot class features (templates and ensembles apply), K the keys and V the values.
Nothing is trained by default: the training loop hands the head every training image's features once
(`Head.fit_training_features`), here the mean over `train.cache_views` augmented views, renormalised
(Tip-Adapter averages 10 augmented passes; it averages before normalising, adaclip after, as its
feature cache stores normalised features). The cache is stored in the adapter file.

alpha and beta start at 1.0 and 5.5 (the paper's ImageNet values) and, when there is a validation set,
are searched on it afterwards (`Head.calibrate`) over Tip-Adapter's grid (200 betas in [0.1, 7), 20
alphas in [0.1, 3)); the chosen values are stored in the file and logged. A validation accuracy
reported after the search is optimistic, as the search saw those images.

Tip-Adapter-F (`--set finetune=true`): the keys become parameters and are fine-tuned with
cross-entropy (AdamW lr 1e-3, weight decay 1e-2 as PyTorch's AdamW default that Tip-Adapter-F used,
batch 256, cosine, 20 epochs), then alpha and beta are searched. Tip-Adapter-F's AdamW eps is 1e-4;
adaclip's loop uses PyTorch's 1e-8.

The values tie the adapter to the training classes (not class-agnostic).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, TypeAdapter, ValidationError
from torch import nn

from .base import BuildContext, FeatureSet, Head, HeadOutput, MethodConfig, Parts, TrainConfig, register_method

FINETUNE_EPOCHS = 20


@register_method
class TipAdapterConfig(MethodConfig):
    name: ClassVar[str] = "tip-adapter"
    summary: ClassVar[str] = "training-free cache of few-shot image features (Tip-Adapter; -F with finetune=true)"
    class_agnostic: ClassVar[bool] = False

    alpha: float = Field(1.0, ge=0, description="weight of the cache logits (before the validation search)")
    beta: float = Field(5.5, gt=0, description="sharpness of the affinity exp(-beta (1 - f.k))")
    search: bool = Field(True, description="search alpha and beta on the validation set when there is one")
    search_scale: tuple[float, float] = Field((7.0, 3.0), description="largest (beta, alpha) of the search grid")
    search_steps: tuple[int, int] = Field((200, 20), description="grid points for (beta, alpha)")
    finetune: bool = Field(False, description=f"Tip-Adapter-F: fine-tune the keys (default {FINETUNE_EPOCHS} epochs)")
    train: TrainConfig = TrainConfig(
        epochs=0, lr=1e-3, weight_decay=1e-2, batch_size=256, warmup_epochs=0, cache_views=10, min_crop_scale=0.5
    )

    @classmethod
    def default_train(cls, settings: dict[str, Any]) -> TrainConfig:
        """Tip-Adapter-F trains the keys for 20 epochs; plain Tip-Adapter trains nothing."""
        recipe = super().default_train(settings)
        try:
            finetune = TypeAdapter(bool).validate_python(settings.get("finetune", False))
        except ValidationError:
            return recipe  # the field's own validation reports it
        return recipe.model_copy(update={"epochs": FINETUNE_EPOCHS}) if finetune else recipe

    def build(self, ctx: BuildContext) -> Parts:
        return Parts(head=TipAdapterHead(ctx.n_classes, ctx.backbone.embed_dim, self))


def grid(largest: float, steps: int) -> torch.Tensor:
    """Tip-Adapter's search grid: `steps` values from 0.1 up to (not including) `largest`."""
    return 0.1 + torch.arange(steps, dtype=torch.float64) * (largest - 0.1) / steps


class TipAdapterHead(Head):
    uses_training_features = True
    uses_validation_features = True

    def __init__(self, n_classes: int, dim: int, config: TipAdapterConfig):
        super().__init__()
        self.config = config
        self.n_classes, self.dim = n_classes, dim
        self._set_cache(torch.zeros(0, dim), torch.zeros(0, n_classes))
        self.register_buffer("alpha", torch.tensor(float(config.alpha)))
        self.register_buffer("beta", torch.tensor(float(config.beta)))

    def _set_cache(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        if self.config.finetune:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys)
        self.register_buffer("cache_values", values)

    def fit_training_features(self, train: FeatureSet) -> None:
        keys = F.normalize(train.features.detach().float(), dim=-1).clone()
        values = F.one_hot(train.labels.long(), self.n_classes).to(keys)
        self._set_cache(keys, values)

    def adapt_to_state(self, state: dict[str, torch.Tensor]) -> None:
        keys, values = state.get("cache_keys"), state.get("cache_values")
        if keys is None or values is None or keys.dim() != 2 or values.dim() != 2:
            return  # the shape check of the caller reports the problem
        if keys.shape[1] == self.dim and values.shape == (keys.shape[0], self.n_classes):
            device = self.alpha.device
            self._set_cache(torch.zeros(keys.shape, device=device), torch.zeros(values.shape, device=device))

    @staticmethod
    def cache_logits(affinity: torch.Tensor, values: torch.Tensor, alpha, beta) -> torch.Tensor:
        return alpha * torch.exp(-beta * (1.0 - affinity)) @ values

    def forward(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        logits = logit_scale * image_features @ class_features.t()
        if len(self.cache_keys):
            affinity = image_features @ self.cache_keys.t().to(image_features.dtype)
            logits = logits + self.cache_logits(affinity, self.cache_values.to(logits.dtype), self.alpha, self.beta)
        return HeadOutput(logits=logits)

    @torch.no_grad()
    def calibrate(self, val: FeatureSet, class_features: torch.Tensor, logit_scale: float) -> dict[str, float] | None:
        """Tip-Adapter's search: the (beta, alpha) of the grid with the best validation accuracy (the first
        one in grid order on ties)."""
        if not self.config.search or not len(self.cache_keys):
            return None
        features = val.features.float()
        labels = val.labels.to(features.device)
        zero_shot = logit_scale * features @ class_features.float().t()
        affinity = features @ self.cache_keys.float().t()
        values = self.cache_values.float()
        alphas = grid(self.config.search_scale[1], self.config.search_steps[1]).tolist()
        best = (-1, 0.0, 0.0)
        for beta in grid(self.config.search_scale[0], self.config.search_steps[0]).tolist():
            cache = torch.exp(-beta * (1.0 - affinity)) @ values  # (N, K)
            for alpha in alphas:
                correct = int(((zero_shot + alpha * cache).argmax(dim=-1) == labels).sum())
                if correct > best[0]:
                    best = (correct, beta, alpha)
        correct, beta, alpha = best
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        return {"alpha": alpha, "beta": beta, "val_accuracy": correct / len(labels)}
