"""RAda (Rational Adaptation, "One Last Attention for Your Vision-Language Model", ICCV 2025).

RAda leaves both encoders alone and learns a *mask* over the rational matrix R = f * h (B x K x D: the
element-wise product of each normalised image feature f with each normalised class feature h, whose sum
over D is the cosine logit). One attention layer over the K classes of an image predicts the mask
M = relu(1 + out) (B x K x D) and the logits become s * sum_D(M * R). Its out-projection starts at zero,
so M == 1 and training starts exactly at zero-shot CLIP. The network sees only features, never class
indices, so a trained mask applies to class names it never saw (class-agnostic).

As in the paper / reference code (github.com/khufia/RAda, frozen-encoder trainer):
  - six nn.Linear(D, D) with bias: q_proj1, q_proj2, q_proj3, k_proj, v_proj, out_proj; out_proj weight
    and bias zero-initialised; 6 * (D^2 + D) parameters (1,575,936 for D = 512);
  - s = CLIP's (exponentiated) logit scale, a constant; queries q1 = sqrt(s) f (repeated over K),
    q2 = sqrt(s) h (repeated over B), q3 = s R; key = value = s R; 8 heads; scores q k^T / sqrt(D / 8);
  - the "joint" softmax: over all K*K entries of a head at once, divided by a temperature t, times K;
  - the three maps averaged, applied to V, heads merged, out_proj; M = relu(1 + out);
  - loss CE + alpha * mean over the batch of max |M - 1| (an L-infinity pull towards 1; other reference
    variants use MSE(M, 1)); logit scale frozen.

adaclip's choices (each a setting of `RationalMaskConfig` or the training recipe; `adaclip info --method rada`):
  - `softmax="row"` offers the ordinary attention softmax over keys as an alternative to "joint";
  - `alpha` defaults to 0.1, not the reference command line's 0.0; the learning rate to 5e-3 (AdamW,
    weight decay 5e-4, batch 32, 10 epochs, 1 warm-up epoch, cosine), chosen with the lite backbone on a
    Fashion-MNIST validation split (docs/tuning.md). alpha was first studied on synthetic CLIP-scale
    features (`python tools/rada_study.py`; results in docs/tuning.md): it gives up little where the mask
    has something to learn and guards where it has not. With real data, tune alpha on a validation split
    (`--set mask.alpha=...`);
  - the batch is streamed in chunks sized from `memory_budget_mb` (default 1024 MB of attention maps per
    chunk), with activation checkpointing per chunk while training, so memory grows with the chunk, not
    the batch (peak memory measured with `tools/rada_study.py memory`: docs/benchmarks.md);
  - logits are computed as s * f.h + s * sum_D((M - 1) * R), which equals s * sum_D(M * R) but makes the
    untrained mask reproduce zero-shot logits bit for bit.

Two things the reference computes the long way are computed in closed form here, with identical results:
q1 is the same vector for every class of an image, so its K x K map has identical rows and its joint
softmax equals the row softmax (both are computed as one row per image); and projections of repeated
vectors are computed once and broadcast.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.checkpoint import checkpoint

from .adaring import (
    AdaRingConfig,
    image_consistency_field,
    logit_consistency_field,
    text_consistency_field,
    training_cache_ties_field,
)
from .base import Head, HeadOutput, MethodConfig, Parts, TrainConfig
from .contexts import BuildContext
from .full_finetune import FullFineTuneConfig
from .registry import register_method

# Score maps alive per image while a chunk runs forward and backward (two K x K score maps, their
# softmaxes and gradients): the unit in which `memory_budget_mb` is spent.
_MAPS_PER_IMAGE = 6


class RationalMaskConfig(BaseModel):
    """Settings of RAda's mask network and its regulariser (the `mask` group of rada-style methods)."""

    model_config = ConfigDict(extra="forbid")

    heads: int = Field(8, ge=1, description="attention heads (the reference uses 8); must divide the embed dim")
    softmax: Literal["joint", "row"] = Field(
        "joint",
        description="joint: the reference's softmax over all K*K entries of a head, times K; row: per query",
    )
    temperature: float = Field(1.0, gt=0, description="softmax temperature t (reference default 1.0)")
    alpha: float = Field(
        0.1,
        ge=0,
        description="weight of the pull of the mask towards 1 (reference command-line default 0.0; see docs)",
    )
    regularizer: Literal["linf", "mse"] = Field(
        "linf", description="linf: mean over images of max |M - 1| (reference); mse: mean (M - 1)^2"
    )
    memory_budget_mb: float = Field(
        1024.0, gt=0, description="attention-map memory per chunk of images; sets the chunk size"
    )
    chunk_size: int | None = Field(None, ge=1, description="images per chunk (overrides memory_budget_mb)")


class RationalMaskHead(Head):
    """RAda's mask network over the rational matrix; logits (B, K) from features (B, D) and (K, D)."""

    def __init__(self, embed_dim: int, settings: RationalMaskConfig | None = None):
        super().__init__()
        settings = settings or RationalMaskConfig()
        if embed_dim % settings.heads:
            raise ValueError(f"mask heads ({settings.heads}) must divide the embedding size ({embed_dim})")
        self.settings = settings
        self.embed_dim = embed_dim
        d = embed_dim
        self.q_proj1 = nn.Linear(d, d)
        self.q_proj2 = nn.Linear(d, d)
        self.q_proj3 = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    # --- sizing -----------------------------------------------------------------------------------

    def chunk_images(self, n_classes: int) -> int:
        """Images per chunk: `chunk_size`, or as many as fit `memory_budget_mb` of attention maps."""
        if self.settings.chunk_size:
            return self.settings.chunk_size
        per_image = 4 * self.settings.heads * n_classes * n_classes * _MAPS_PER_IMAGE
        return max(1, int(self.settings.memory_budget_mb * 2**20 // per_image))

    # --- forward ----------------------------------------------------------------------------------

    def forward(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        n_images, n_classes = image_features.shape[0], class_features.shape[0]
        scale = float(logit_scale)
        # zero-shot logits, computed exactly as CLIP's cosine head does: the mask adds a correction to them
        logits = logit_scale * image_features @ class_features.t()
        q2 = self._split(self.q_proj2(math.sqrt(scale) * class_features))  # (H, K, hd): shared by all images
        chunk = self.chunk_images(n_classes)
        stream = torch.is_grad_enabled() and n_images > chunk  # keep one chunk's maps alive, not all
        corrections, deviations = [], []
        for start in range(0, n_images, chunk):
            f = image_features[start : start + chunk]
            if stream:
                correction, deviation = checkpoint(
                    self._chunk, f, class_features, q2, scale, use_reentrant=False, preserve_rng_state=False
                )
            else:
                correction, deviation = self._chunk(f, class_features, q2, scale)
            corrections.append(correction)
            deviations.append(deviation)
        logits = logits + torch.cat(corrections)
        terms = {}
        if self.training and torch.is_grad_enabled() and self.settings.alpha > 0:
            terms["mask_reg"] = self.settings.alpha * torch.cat(deviations).mean()
        return HeadOutput(logits=logits, loss_terms=terms)

    def mask(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> torch.Tensor:
        """The mask M (B, K, D) itself, unchunked: for inspection and tests."""
        scale = float(logit_scale)
        q2 = self._split(self.q_proj2(math.sqrt(scale) * class_features))
        rational = image_features[:, None, :] * class_features[None, :, :]
        return 1 + self._mask_minus_one(image_features, rational, q2, scale)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N, D) -> (..., H, N, D / H)."""
        heads = self.settings.heads
        return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(-3, -2)

    def _mask_minus_one(self, f: torch.Tensor, rational: torch.Tensor, q2: torch.Tensor, scale: float) -> torch.Tensor:
        b, k, d = rational.shape
        head_dim = d // self.settings.heads
        temperature = self.settings.temperature
        x = scale * rational  # key = value = third query's input = s * R
        key = self._split(self.k_proj(x))  # (b, H, K, hd)
        value = self._split(self.v_proj(x))
        q1 = self._split(self.q_proj1(math.sqrt(scale) * f)[:, None, :])  # (b, H, 1, hd): one row per image
        q3 = self._split(self.q_proj3(x))
        # 1 / sqrt(head_dim) and the temperature are folded into the keys, and the joint softmax's "times K"
        # into the values: the same numbers as the reference, with fewer K x K temporaries.
        key_t = key.transpose(-1, -2) / (math.sqrt(head_dim) * temperature)
        joint = self.settings.softmax == "joint"
        map_value = value * k if joint else value
        # q1's K x K map repeats one row, so its joint softmax (times K) is that row's softmax.
        a1 = torch.softmax(q1 @ key_t, dim=-1)  # (b, H, 1, K)
        context = a1 @ value  # (b, H, 1, hd): broadcast over the K queries below
        for query in (q2, q3):  # (H, K, hd) shared by all images, then (b, H, K, hd)
            scores = query @ key_t  # (b, H, K, K)
            if joint:
                attention = torch.softmax(scores.flatten(-2), dim=-1).view_as(scores)
            else:
                attention = torch.softmax(scores, dim=-1)
            del scores
            context = context + attention @ map_value
        out = self.out_proj((context / 3).transpose(1, 2).reshape(b, k, d))
        return torch.relu(1 + out) - 1

    def _chunk(self, f: torch.Tensor, h: torch.Tensor, q2: torch.Tensor, scale: float):
        """Logit corrections (b, K) and per-image mask deviations (b,) for one chunk of images."""
        rational = f[:, None, :] * h[None, :, :]  # (b, K, D)
        delta = self._mask_minus_one(f, rational, q2, scale)  # M - 1
        correction = scale * (delta * rational).sum(dim=-1)
        if self.settings.regularizer == "linf":
            deviation = delta.abs().flatten(1).amax(dim=1)
        else:
            deviation = delta.square().flatten(1).mean(dim=1)
        return correction, deviation


def build_mask_head(ctx: BuildContext, settings: RationalMaskConfig) -> RationalMaskHead:
    """The mask head for a backbone (what every rada-style method uses as its head)."""
    return RationalMaskHead(ctx.backbone.embed_dim, settings)


@register_method
class RAdaConfig(MethodConfig):
    """RAda with frozen encoders: only the mask network trains; image features are cached."""

    name: ClassVar[str] = "rada"
    summary: ClassVar[str] = "RAda: attention mask over the rational matrix, frozen encoders (class-agnostic)"
    has_mask: ClassVar[bool] = True
    masked_variant: ClassVar[str | None] = "rada"

    mask: RationalMaskConfig = RationalMaskConfig()
    # Reference recipe: Adam, wd 5e-4, cosine, 1 warm-up epoch, 5 epochs, batch 4, lr 3.5e-3, Dassl's
    # random resized crops (area 8-100%). adaclip: AdamW (decoupled decay), batch 32, 10 epochs over 4 cached
    # augmented views, lr 5e-3 (chosen on a Fashion-MNIST validation split with the lite backbone among
    # 2e-3 / 5e-3 / 1e-2: docs/tuning.md), crops of 50-100% (`train.min_crop_scale`; Dassl's 0.08 ties at
    # 16 shots and loses at 4 on that validation split: docs/tuning.md).
    train: TrainConfig = TrainConfig(
        epochs=10,
        batch_size=32,
        lr=5e-3,
        weight_decay=5e-4,
        warmup_epochs=1,
        schedule="cosine",
        feature_cache="augmented",
        min_crop_scale=0.5,
    )

    def build(self, ctx: BuildContext) -> Parts:
        return Parts(head=build_mask_head(ctx, self.mask))


@register_method
class RAdaFTConfig(FullFineTuneConfig):
    """RAda-FT (adaclip's reconstruction; no public code): both towers fine-tuned FLYP-style together with
    the mask. The towers train at `train.lr`, the mask at `train.lr * mask_lr_scale`, because a mask
    that starts at zero needs a learning rate about 100x that of pretrained towers."""

    name: ClassVar[str] = "rada-ft"
    summary: ClassVar[str] = "RAda-FT: mask + full fine-tuning of both towers, FLYP-style (our reconstruction)"
    has_mask: ClassVar[bool] = True
    masked_variant: ClassVar[str | None] = "rada-ft"

    objective: Literal["ce", "contrastive"] = Field(
        "contrastive", description="contrastive: FLYP-style (adds text -> image); ce: cross-entropy only"
    )
    mask: RationalMaskConfig = RationalMaskConfig()
    mask_lr_scale: float = Field(100.0, gt=0, description="the mask's learning rate is train.lr times this")

    def build(self, ctx: BuildContext) -> Parts:
        head = build_mask_head(ctx, self.mask)
        head.lr_scale = self.mask_lr_scale
        return Parts(components=[self.make_component(ctx)], head=head)


@register_method
class AdaRingRAdaConfig(AdaRingConfig):
    """AdaRing's adapters inside both encoders and RAda's mask on the rational matrix, trained together
    (beyond both papers: RAda's best published row is RAda + an adapter). AdaRing's consistency loss
    applies to the masked logits, pulling them towards zero-shot as RAda's regulariser does."""

    name: ClassVar[str] = "adaring+rada"
    summary: ClassVar[str] = "AdaRing adapters in both encoders + RAda's mask (class-agnostic)"
    has_mask: ClassVar[bool] = True
    masked_variant: ClassVar[str | None] = "adaring+rada"

    mask: RationalMaskConfig = RationalMaskConfig()
    # The mask already pulls the scores towards zero-shot; PromptSRC's heavier weights (AdaRing's default)
    # validated 2.4 points lower at 4 shots with it (docs/tuning.md), so the lighter ones stay here.
    text_consistency: float = text_consistency_field(2.5)
    image_consistency: float = image_consistency_field(0.25)
    logit_consistency: float = logit_consistency_field(1.25)
    # AdaRing's tie rule was studied on AdaRing alone; this method keeps the rule it was measured with.
    training_cache_ties: Literal["first", "loss", "training"] = training_cache_ties_field("first")

    def classifier_head(self, ctx: BuildContext) -> Head:
        return build_mask_head(ctx, self.mask)
