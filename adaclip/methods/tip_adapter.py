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

alpha and beta are searched after the cache is built (and after fine-tuning), as the reference does
(`search_hp`): every (beta, alpha) of a grid of 200 betas x 20 alphas is scored by accuracy, and the first
best in grid order (beta outer, alpha inner) wins. What adaclip adds, each a setting:
  - `search_units="scaled"` (default): the reference's grids are absolute (per dataset, beta up to 7-50,
    alpha up to 3-50) and assume CLIP's cosine ranges; another backbone's image-image cosines and logit
    scale put the useful values elsewhere (on `lite` the paper's alpha 1, beta 5.5 leave the cache
    logits a tenth the spread of the zero-shot ones). So the grid runs over beta * d and
    alpha * sigma_cache(beta) / sigma_zero-shot, where d is the median of 1 - f.k between the searched
    images and the keys and sigma the mean per-image spread (std over classes) of each logit term:
    dimensionless values, whatever the backbone. `search_units="reference"` searches the absolute grid.
  - `leave_one_out=True`: each training image whose class has another cache entry is also scored by
    the cache without its own entry, so the search sees up to shots x K images besides the validation
    ones (min(shots, 4) per class would otherwise decide 4,000 grid points) and runs without a
    validation set. Tip-Adapter-F's trained keys have seen those images, so its search after
    fine-tuning uses the validation images only.
Without anything to search on, the configured alpha and beta (the paper's ImageNet values) are used.
The chosen values are stored in the file and logged; a validation accuracy reported after the search is
optimistic, as the search saw those images.

Tip-Adapter-F (`--set finetune=true`): the keys become parameters and are fine-tuned with
cross-entropy (AdamW lr 1e-3, weight decay 1e-2 as PyTorch's AdamW default that Tip-Adapter-F used,
batch 256, cosine, 20 epochs), then alpha and beta are searched on the validation images. The reference
trains at per-dataset init values chosen for CLIP (e.g. ImageNet alpha 1.17, beta 1); on another
backbone those can leave the cache a small fraction of the logits, so by default (`search_init=True`,
a named deviation) the same search (validation + leave-one-out, the keys being still the training
features) runs before fine-tuning and training starts at the values it found; `search_init=False`
trains at the configured alpha and beta. The reference picks the epoch with the best *test* accuracy; adaclip keeps the
last epoch. Tip-Adapter-F's AdamW eps is 1e-4; adaclip's loop uses PyTorch's 1e-8.

The values tie the adapter to the training classes (not class-agnostic).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, TypeAdapter, ValidationError
from torch import nn

from .base import FeatureSet, Head, HeadOutput, MethodConfig, Parts, TrainConfig
from .contexts import BuildContext
from .registry import register_method

FINETUNE_EPOCHS = 20


@register_method
class TipAdapterConfig(MethodConfig):
    name: ClassVar[str] = "tip-adapter"
    summary: ClassVar[str] = "training-free cache of few-shot image features (Tip-Adapter; -F with finetune=true)"
    class_agnostic: ClassVar[bool] = False
    can_hold_mask: ClassVar[bool] = False  # adds its cache model's scores to the cosine logits

    alpha: float = Field(1.0, ge=0, description="weight of the cache logits (when nothing is searched)")
    beta: float = Field(5.5, gt=0, description="sharpness of the affinity exp(-beta (1 - f.k))")
    search: bool = Field(True, description="search alpha and beta after building (and fine-tuning) the cache")
    search_units: Literal["scaled", "reference"] = Field(
        "scaled",
        description="scaled: the grid is over beta * median(1 - f.k) and alpha * cache spread / zero-shot spread "
        "(works on any backbone); reference: over absolute beta and alpha, as Tip-Adapter's configs",
    )
    search_scale: tuple[float, float] = Field(
        (10.0, 10.0), description="largest (beta, alpha) of the grid, in search_units (reference ImageNet: 7, 3)"
    )
    search_steps: tuple[int, int] = Field((200, 20), description="grid points for (beta, alpha)")
    search_ties: Literal["first", "loss", "training"] = Field(
        "first",
        description="among grid points with equally many correct: first, the first in grid order (the "
        "reference); loss, the lowest cross-entropy on the searched images; training, the most training "
        "images right when each is scored without its own cache entry (then the first)",
    )
    leave_one_out: bool = Field(
        True,
        description="also search on each training image scored without its own cache entry (plain Tip-Adapter; "
        "Tip-Adapter-F only before fine-tuning)",
    )
    finetune: bool = Field(False, description=f"Tip-Adapter-F: fine-tune the keys (default {FINETUNE_EPOCHS} epochs)")
    search_init: bool = Field(
        True,
        description="Tip-Adapter-F: search alpha and beta before fine-tuning too and train at the values found "
        "(false: train at the configured alpha and beta, as the reference trains at its per-dataset init values)",
    )
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


# At most this many training images are scored leave-one-out (a seeded subset beyond it): the search
# holds a (queries x keys) affinity matrix.
MAX_LEAVE_ONE_OUT = 4096


def spread(logits: torch.Tensor) -> torch.Tensor:
    """Mean over images of the std over classes: the scale of a logit term."""
    return logits.std(dim=-1).mean().clamp_min(1e-12)


def search_alpha_beta(
    zero_shot: torch.Tensor,
    affinity: torch.Tensor,
    values: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: tuple[float, float],
    steps: tuple[int, int],
    units: str,
    ties: str = "first",
    tie_break: torch.Tensor | None = None,
) -> tuple[int, float, float]:
    """(correct, beta, alpha) of the grid point with the most correct predictions. Rows where the boolean
    `tie_break` is set are not counted but decide between points with equally many correct; ties left
    after that: "first" keeps the first in grid order (beta outer, alpha inner), as Tip-Adapter's
    `search_hp`; "loss" the lowest cross-entropy on the counted rows. `affinity` may hold -inf where a
    key must not count (leave-one-out)."""
    distance = 1.0 - affinity
    if units == "scaled":
        finite = distance[torch.isfinite(distance)]
        beta_unit = 1.0 / float(finite.median().clamp_min(1e-6)) if finite.numel() else 1.0
        zero_shot_spread = spread(zero_shot)
    counted = torch.ones_like(labels, dtype=torch.bool) if tie_break is None else ~tie_break
    best, best_rank = (-1, 0.0, 0.0), None
    alphas = grid(scale[1], steps[1]).tolist()
    for beta_point in grid(scale[0], steps[0]).tolist():
        beta = beta_point * beta_unit if units == "scaled" else beta_point
        cache = torch.exp(-beta * distance) @ values  # (N, K)
        alpha_unit = float(zero_shot_spread / spread(cache)) if units == "scaled" else 1.0
        for alpha_point in alphas:
            alpha = alpha_point * alpha_unit
            scores = zero_shot + alpha * cache
            hits = scores.argmax(dim=-1) == labels
            rank: tuple[float, ...] = (int(hits[counted].sum()),)
            if tie_break is not None:
                rank += (int(hits[tie_break].sum()),)
            if ties == "loss":
                rank += (-float(F.cross_entropy(scores[counted], labels[counted])),)
            if best_rank is None or rank > best_rank:  # strictly better: the first point wins full ties
                best, best_rank = (int(rank[0]), beta, alpha), rank
    return best


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
        self._searched_once = False  # Tip-Adapter-F: the search before fine-tuning has run

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

    def base_output(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        """The scores the cache is added to: CLIP's cosine logits (a subclass may put another head here)."""
        return HeadOutput(logits=logit_scale * image_features @ class_features.t())

    def scored_values(self) -> torch.Tensor:
        """(N, K) values for the classes being scored: one column per class of the cache."""
        return self.cache_values

    def forward(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        out = self.base_output(image_features, class_features, logit_scale)
        if len(self.cache_keys):
            affinity = image_features @ self.cache_keys.t().to(image_features.dtype)
            values = self.scored_values().to(out.logits.dtype)
            out.logits = out.logits + self.cache_logits(affinity, values, self.alpha, self.beta)
        return out

    @property
    def calibrates_without_validation(self) -> bool:
        return self._searches_training_images

    @property
    def calibrates_before_training(self) -> bool:
        return self.config.finetune and self.config.search and self.config.search_init

    @property
    def _searches_training_images(self) -> bool:
        if not (self.config.search and self.config.leave_one_out):
            return False
        # Tip-Adapter-F: only in the search before fine-tuning, while the keys are the training features
        return not self.config.finetune or (self.config.search_init and not self._searched_once)

    @torch.no_grad()
    def calibrate(
        self, val: FeatureSet | None, class_features: torch.Tensor, logit_scale: float
    ) -> dict[str, float] | None:
        """Search (beta, alpha) on the validation images and, for plain Tip-Adapter, the training images
        scored leave-one-out (see the module docstring); with `search_ties="training"` those training
        images only break ties between grid points."""
        if not self.config.search or not len(self.cache_keys):
            return None
        leave_one_out, self._searched_once = self._searches_training_images, True
        tie_break_only = self.config.search_ties == "training" and not leave_one_out
        keys, values = self.cache_keys.detach().float(), self.cache_values.float()
        queries, labels, affinities = [], [], []
        if val is not None and len(val.labels):
            queries.append(val.features.float())
            labels.append(val.labels.to(keys.device))
            affinities.append(queries[-1] @ keys.t())
        if not queries and not leave_one_out:
            return None
        counted = sum(len(rows) for rows in labels)
        if (leave_one_out or tie_break_only) and bool((values.sum(dim=0) >= 2).any()):
            classes = values.argmax(dim=-1)
            # an image whose class has no other entry cannot be recognised by the rest of the cache
            rows = torch.nonzero(values.sum(dim=0)[classes] >= 2).flatten()
            if len(rows) > MAX_LEAVE_ONE_OUT:
                pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:MAX_LEAVE_ONE_OUT]
                rows = rows[pick.to(keys.device)].sort().values
            own = keys[rows] @ keys.t()
            own[torch.arange(len(rows), device=keys.device), rows] = -float("inf")  # its own entry is left out
            queries.append(keys[rows])
            labels.append(classes[rows])
            affinities.append(own)
        if not queries:
            return None
        features, truth, affinity = torch.cat(queries), torch.cat(labels), torch.cat(affinities)
        if tie_break_only:
            tie_break = torch.arange(len(truth), device=truth.device) >= counted
        else:
            tie_break, counted = None, len(truth)
        zero_shot = self.base_output(features, class_features.float(), logit_scale).logits.float()
        correct, beta, alpha = search_alpha_beta(
            zero_shot,
            affinity,
            values,
            truth,
            scale=self.config.search_scale,
            steps=self.config.search_steps,
            units=self.config.search_units,
            ties="first" if self.config.search_ties == "training" else self.config.search_ties,
            tie_break=tie_break,
        )
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        return {"alpha": alpha, "beta": beta, "search_accuracy": correct / counted, "searched_images": counted}
