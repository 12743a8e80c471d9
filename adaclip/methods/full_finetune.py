"""Full fine-tuning: every weight of both CLIP towers trains (the baseline PEFT methods compare against).

`FullFineTune` registers the backbone's model as its own submodule, so its `state_dict()` is the whole
tuned model (saved in the adapter file; hundreds of MB for ViT-B/16, which is expected) and
`load_state_dict()` writes the saved weights straight back into the backbone that `load()` built. The
logit scale stays frozen, as it is for every adaclip method, and the backbone stays in eval mode while
training (AdaptedCLIP.train() keeps it there), so dropout is off and BatchNorm statistics of ResNet
towers do not move: only weights change.

Objectives (`objective`):
  - "ce": cross-entropy of each image against all K class prompts (the loss every method trains with);
  - "contrastive": FLYP-style ("Finetune like you pretrain", Goyal et al. 2023). FLYP trains with CLIP's
    symmetric in-batch contrastive loss between images and their class-prompt captions. adaclip's
    reconstruction (no reference code for RAda-FT exists): the image -> text direction is the usual
    cross-entropy over all K class prompts; the text -> image direction is added as a loss term: for each
    class present in the batch, a cross-entropy over the batch's images whose target is spread evenly
    over the images of that class (a batch may hold several images of one class, which FLYP's one-to-one
    targets would push apart). Both directions use the head's logits, so with RAda's mask (rada-ft) the
    contrastive loss is taken on masked logits. `contrastive_weight` scales the text -> image term.

Bypass (`enabled = False`, used for frozen zero-shot references by consistency losses): fine-tuning
changes the backbone in place, so bypassing needs a frozen copy of the original weights. With
`keep_reference=True` the component keeps one (a second copy of the model in memory) and swaps it in
while disabled. Without it, bypassing works while the towers are still untouched (no parameter has been
written since `attach`, which PyTorch's version counters tell) and raises a clear error afterwards,
rather than silently returning tuned features. No built-in method needs the reference (rada-ft and
full-ft have no consistency loss).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from .base import Component, MethodConfig, Parts, TrainConfig
from .contexts import BuildContext
from .registry import register_method

if TYPE_CHECKING:
    from ..backbone import Backbone
    from .contexts import StepContext

# Parameters that stay frozen even under full fine-tuning: the temperature (and SigLIP's bias).
FROZEN_NAMES = ("logit_scale", "logit_bias")


class FullFineTune(Component):
    """Unfreezes both towers of the backbone. Its state dict is the backbone model's state dict."""

    adapts_image_tower = True
    adapts_text_tower = True

    def __init__(
        self,
        backbone: Backbone,
        *,
        objective: Literal["ce", "contrastive"] = "ce",
        contrastive_weight: float = 1.0,
        keep_reference: bool = False,
    ):
        super().__init__()
        self.model = backbone.model  # a submodule: saved, loaded, and moved with the adapted model
        self._backbone = [backbone]  # a list hides it from module registration
        self.objective = objective
        self.contrastive_weight = contrastive_weight
        self.keep_reference = keep_reference
        self._reference: list[torch.nn.Module] = []  # the frozen original, when kept
        self._pristine: tuple[int, ...] | None = None  # parameter versions at attach
        self._enabled = True

    # --- attach / bypass ----------------------------------------------------------------------------

    def attach(self, backbone: Backbone) -> None:
        if backbone is not self._backbone[0]:
            raise ValueError("FullFineTune must be attached to the backbone it was built with")
        if self.keep_reference and not self._reference:
            reference = copy.deepcopy(self.model)
            reference.requires_grad_(False)
            reference.eval()
            self._reference.append(reference)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name not in FROZEN_NAMES)
        self._pristine = self._versions()

    def _versions(self) -> tuple[int, ...]:
        """In-place writes (optimiser steps, load_state_dict) bump these counters."""
        return tuple(p._version for p in self.model.parameters())

    def detach(self) -> None:
        """Freeze the towers again (the tuned weights stay: fine-tuning is not undoable without a reference)."""
        self.enabled = True
        self.model.requires_grad_(False)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @enabled.setter
    def enabled(self, value: bool) -> None:
        # Called once from Component.__init__, before our attributes exist.
        if not hasattr(self, "_reference") or value == self._enabled:
            self._enabled = value
            return
        backbone = self._backbone[0]
        if not value:
            if not self._reference and self._versions() == getattr(self, "_pristine", None):
                self._enabled = value  # nothing has changed yet: the towers are still the zero-shot ones
                return
            if not self._reference:
                raise RuntimeError(
                    "full fine-tuning changes the backbone in place and keeps no frozen copy, so it cannot be "
                    "bypassed for zero-shot references; set keep_reference=true in the method's settings"
                )
            backbone.model = self._reference[0]
        else:
            backbone.model = self.model
        self._enabled = value

    # --- losses -----------------------------------------------------------------------------------

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        if self.objective != "contrastive":
            return {}
        return {"text_to_image": self.contrastive_weight * text_to_image_loss(ctx.logits, ctx.labels)}

    def parameter_breakdown(self) -> dict[str, int]:
        """Per tower rather than per tensor: a ViT-B/16 has hundreds of tensors."""
        image_tower = getattr(self.model, "visual", None)
        image_params = {id(p) for p in image_tower.parameters()} if image_tower is not None else set()
        counts = {"image_tower": 0, "text_tower": 0}
        for param in self.model.parameters():
            if param.requires_grad:
                counts["image_tower" if id(param) in image_params else "text_tower"] += param.numel()
        return {name: n for name, n in counts.items() if n}


def text_to_image_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For each class in the batch: cross-entropy over the batch's images (the columns of `logits`), with
    the target spread evenly over the images of that class."""
    classes = labels.unique()
    columns = logits[:, classes].t()  # (C, B): each present class scored against every image
    targets = (labels[None, :] == classes[:, None]).float()
    targets = targets / targets.sum(dim=1, keepdim=True)
    return -(targets * F.log_softmax(columns, dim=1)).sum(dim=1).mean()


@register_method
class FullFineTuneConfig(MethodConfig):
    """Both towers fully trained with CLIP's cosine classifier."""

    name: ClassVar[str] = "full-ft"
    tunes_whole_backbone: ClassVar[bool] = True
    masked_variant: ClassVar[str | None] = "rada-ft"
    summary: ClassVar[str] = "full fine-tuning of both towers, cosine head (baseline; large adapter files)"

    objective: Literal["ce", "contrastive"] = Field(
        "ce", description="ce: cross-entropy over class prompts; contrastive: FLYP-style, adds text -> image"
    )
    contrastive_weight: float = Field(1.0, ge=0, description="weight of the text -> image term (contrastive)")
    keep_reference: bool = Field(
        False, description="keep a frozen copy of the original towers (needed only for zero-shot references)"
    )
    # Full fine-tuning of CLIP wants a small learning rate (FLYP / WiSE-FT use 1e-5 with AdamW, wd 0.1).
    train: TrainConfig = TrainConfig(epochs=10, batch_size=32, lr=1e-5, weight_decay=0.1, warmup_epochs=1)

    def build(self, ctx: BuildContext) -> Parts:
        return Parts(components=[self.make_component(ctx)])

    def make_component(self, ctx: BuildContext) -> FullFineTune:
        return FullFineTune(
            ctx.backbone,
            objective=self.objective,
            contrastive_weight=self.contrastive_weight,
            keep_reference=self.keep_reference,
        )
