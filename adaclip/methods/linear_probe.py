"""Linear probe: logistic regression on frozen image features, started from the zero-shot classifier.

Starting from the text classifier (weights = class text features) means step 0 reproduces zero-shot
accuracy, and few shots refine it rather than learn from scratch. It is tied to the classes it was
trained on (not class-agnostic). With frozen encoders, features are cached: epochs after the first cost
only the probe.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from .base import Head, HeadOutput, MethodConfig, Parts, TrainConfig
from .contexts import BuildContext
from .registry import register_method


class LinearProbeHead(Head):
    def __init__(self, init_weight: torch.Tensor, learn_scale: bool):
        super().__init__()
        self.weight = nn.Parameter(init_weight.clone())
        self.bias = nn.Parameter(torch.zeros(init_weight.shape[0]))
        self.log_scale_delta = nn.Parameter(torch.zeros(()), requires_grad=learn_scale)

    def forward(self, image_features, class_features, logit_scale) -> HeadOutput:
        # class_features are ignored on purpose: the probe's weights replace the text classifier.
        scale = logit_scale * self.log_scale_delta.exp()
        return HeadOutput(logits=scale * image_features @ self.weight.t() + self.bias)


@register_method
class LinearProbeConfig(MethodConfig):
    name: ClassVar[str] = "linear-probe"
    summary: ClassVar[str] = "logistic regression on frozen image features, initialised from zero-shot"
    class_agnostic: ClassVar[bool] = False
    can_hold_mask: ClassVar[bool] = False  # scores with its own weight matrix, not class features

    learn_scale: bool = Field(False, description="also learn a multiplier on CLIP's logit scale")
    # lr 1e-2 chosen on a Fashion-MNIST validation split (74.0% vs 66.3% at 1e-3; docs/tuning.md).
    train: TrainConfig = TrainConfig(epochs=20, lr=1e-2, weight_decay=1e-4, batch_size=64, warmup_epochs=0)

    def build(self, ctx: BuildContext) -> Parts:
        return Parts(head=LinearProbeHead(ctx.zero_shot_class_features().detach(), self.learn_scale))
