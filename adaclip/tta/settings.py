"""How a test-time adaptation run is set up: `TTASettings` (with TDA's caches in `TDASettings`), and
each mode's defaults (see adaclip.tta for where they come from)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..checks import MAX_SEED
from ..errors import UsageError
from ..methods.rada import RationalMaskConfig

# Episodic: a tenth of TPT's 5e-3. One AdamW step moves every parameter by about lr whatever its gradient,
# and RAda's mask has hundreds of times more numbers than TPT's prompt (887,040 on lite against 4 x 512),
# so TPT's rate moves the scores far more; on corrupted training images it lost 5.7 points on blur, 5e-4
# gained on all three corruptions (docs/tuning.md).
DEFAULT_LR = {"episodic": 5e-4, "online": 1e-3}
DEFAULT_CONFIDENT = {"episodic": 0.1, "online": 1.0}
# TPT builds torch.optim.AdamW(params, lr), so PyTorch's default weight decay 0.01 applies; online keeps none.
DEFAULT_WEIGHT_DECAY = {"episodic": 0.01, "online": 0.0}


class TDASettings(BaseModel):
    """TDA's caches; defaults are the paper's ImageNet settings."""

    model_config = ConfigDict(extra="forbid")

    positive_capacity: int = Field(3, ge=1, description="features kept per class in the positive cache")
    positive_alpha: float = Field(2.0, ge=0)
    positive_beta: float = Field(5.0, ge=0)
    negative_capacity: int = Field(2, ge=0, description="features kept per class in the negative cache (0: off)")
    negative_alpha: float = Field(0.117, ge=0)
    negative_beta: float = Field(1.0, ge=0)
    negative_entropy: tuple[float, float] = Field(
        (0.2, 0.5),
        description=(
            "band of entropy (nats) / log2(K), as the reference computes it, of images that enter the negative cache"
        ),
    )
    negative_mask: tuple[float, float] = Field(
        (0.03, 1.0), description="a negative entry's value marks the classes with probability strictly inside this band"
    )


class TTASettings(BaseModel):
    """How test-time adaptation runs; recorded in the adapted file's `tta` history."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["episodic", "online", "tda"] = "episodic"
    steps: int = Field(1, ge=1, description="optimiser steps per image (episodic) or per batch (online)")
    views: int = Field(64, ge=1, description="episodic: views per image, the original included (TPT: 64)")
    confident_fraction: float | None = Field(
        None, gt=0, le=1, description="fraction of lowest-entropy views/images kept (default 0.1 episodic, 1 online)"
    )
    lr: float | None = Field(None, gt=0, description="AdamW learning rate (default 5e-4 episodic, 1e-3 online)")
    weight_decay: float | None = Field(
        None, ge=0, description="AdamW weight decay (default 0.01 episodic, as TPT's AdamW; 0 online)"
    )
    batch_size: int = Field(32, ge=1, description="online: images per adaptation step")
    min_crop_scale: float = Field(
        0.08, gt=0, le=1, description="episodic: smallest area a random crop keeps (TPT's RandomResizedCrop: 0.08)"
    )
    diversity_weight: float = Field(1.0, ge=0, description="online: weight of the diversity term (SHOT: 1)")
    diversity_momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="online: 0 (SHOT) takes the diversity term on the batch's mean prediction; m > 0 on a running "
        "mean m * previous + (1 - m) * batch (its gradient then passes only through 1 - m)",
    )
    shuffle: bool = Field(True, description="online: adapt in a seeded random order (results stay in folder order)")
    anchor_weight: float = Field(1.0, ge=0, description="online: weight of KL(start || adapted)")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, strict=True, description="fixes the views and a fresh mask's initialisation"
    )
    mask: RationalMaskConfig = Field(
        default_factory=RationalMaskConfig, description="settings of a fresh mask (adapters without one)"
    )
    tda: TDASettings = Field(default_factory=lambda: TDASettings(), description="tda: the caches (TDA's defaults)")

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def effective_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.mode]

    @property
    def effective_confident_fraction(self) -> float:
        return self.confident_fraction if self.confident_fraction is not None else DEFAULT_CONFIDENT[self.mode]


def make_tta_settings(**values: Any) -> TTASettings:
    try:
        return TTASettings.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise UsageError(f"invalid tta settings: {problems}") from None
