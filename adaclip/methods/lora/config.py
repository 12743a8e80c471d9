"""`--method lora`: its settings, its training recipe, and its registration by name."""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from ...inject import BlockSelection
from ..base import MethodConfig, Parts, TrainConfig
from ..contexts import BuildContext
from ..registry import register_method
from .model import LoRAAdapters

Projection = Literal["q", "k", "v", "out"]


class LoRASettings(BlockSelection):
    projections: list[Projection] = Field(["q", "k", "v"], description="attention projections to adapt")
    rank: int = Field(2, ge=1, description="r: rank of each low-rank update")
    alpha: float = Field(1.0, gt=0, description="LoRA alpha; the update is scaled by alpha / sqrt(r) or alpha / r")
    rank_scaling: Literal["sqrt_r", "r"] = Field(
        "sqrt_r", description="scale = alpha / sqrt(r) (CLIP-LoRA's code) or alpha / r (LoRA paper, PEFT)"
    )
    dropout: float = Field(0.25, ge=0, lt=1, description="dropout on the input of each low-rank branch")
    prompts: Literal["first", "all"] = Field(
        "first",
        description="class features from the first template only (CLIP-LoRA's template[0], in training and "
        "prediction) or from the whole --templates ensemble (each template costs a text-tower pass per step)",
    )

    @field_validator("projections", mode="before")
    @classmethod
    def _projection_list(cls, value: Any) -> Any:
        """Also accept `q,v` or `[q,k,v,out]` (what `--set projections=...` gives without JSON quotes)."""
        if isinstance(value, str):
            return [part.strip() for part in value.strip().strip("[]").split(",") if part.strip()]
        return value

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rank_scaling == "sqrt_r" else self.rank)


@register_method
class LoRAConfig(LoRASettings, MethodConfig):
    name: ClassVar[str] = "lora"
    summary: ClassVar[str] = "low-rank updates of q/k/v in both encoders (CLIP-LoRA recipe)"

    # CLIP-LoRA (main.py, lora.py): AdamW lr 2e-4, weight decay 1e-2, batch 32, cosine decay, no warm-up,
    # crops of scale 0.08-1, and 500 x shots iterations (8,000 at 16 shots, whatever the number of classes).
    # `--epochs N` replaces the iteration budget with N epochs.
    train: TrainConfig = TrainConfig(
        epochs=50,
        iterations_per_shot=500,
        lr=2e-4,
        weight_decay=1e-2,
        batch_size=32,
        warmup_epochs=0,
        min_crop_scale=0.08,
    )

    def build(self, ctx: BuildContext) -> Parts:
        return Parts(components=[LoRAAdapters(self, ctx.backbone)])
