"""The building blocks every method is made of (the registry that names methods is methods.registry).

A method is a pydantic config (registered by name) whose `build()` returns `Parts`:

* components: trainable pieces that live inside or around the encoders (AdaRing adapters, LoRA, full
  fine-tuning, learned prompts). A component may adapt the image tower, the text tower, or neither;
  the training loop uses that to decide what can be cached.
* a head: turns normalised image and class features into logits (cosine similarity, RAda's mask over
  the rational matrix, a linear probe).

Methods therefore differ only in what they build; the training loop, adapter file, prediction and TTA
code are shared. Composite methods (e.g. `adaring+rada`) reuse the parts of their members.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import nn

if TYPE_CHECKING:
    from ..backbone import Backbone
    from .contexts import BuildContext, StepContext


class TrainConfig(BaseModel):
    """The optimisation recipe. Each method sets defaults that work for it; the CLI can override."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(10, ge=0, description="passes over the training images")
    epochs_by_shots: dict[int, int] | None = Field(
        None,
        description=(
            "{min shots: epochs}: the epoch count for a run with at least that many shots per class (the "
            "largest key that fits), replacing `epochs`; CoOp's configs: {1: 50, 2: 100, 8: 200}"
        ),
    )
    iterations_per_shot: int | None = Field(
        None,
        ge=1,
        description=(
            "train for this many optimiser steps per shot (training images per class) instead of `epochs`: "
            "CLIP-LoRA's budget is 500 x shots; setting `epochs` alone turns it off"
        ),
    )
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="decoupled weight decay on matrices (not on 1-D params)")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up length, then cosine decay to 0")
    schedule: Literal["cosine", "constant"] = "cosine"
    augment: bool = Field(True, description="random resized crop + horizontal flip on training images")
    min_crop_scale: float = Field(0.5, gt=0, le=1, description="smallest area fraction a random crop keeps")
    grad_clip: float | None = Field(None, gt=0, description="clip the gradient norm to this value")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    feature_cache: Literal["off", "plain", "augmented"] = Field(
        "augmented",
        description=(
            "when the image encoder is frozen: encode each training image once ('plain', no augmentation), "
            "or `cache_views` augmented views and cycle through them ('augmented'); 'off' re-encodes every epoch"
        ),
    )
    cache_views: int = Field(
        4, ge=1, description="augmented views per image (feature_cache='augmented', reference_features='views')"
    )
    weight_averaging: Literal["off", "gaussian"] = Field(
        "off",
        description=(
            "'gaussian': end with a Gaussian-weighted average of the weights at each epoch's end (PromptSRC's "
            "GPA), peaking at averaging_peak x epochs with spread averaging_spread x epochs"
        ),
    )
    # PromptSRC's base-to-new recipe: mean epoch 15, std 1, of 20 epochs.
    averaging_peak: float = Field(0.75, gt=0, le=1, description="where the averaging weights peak, x epochs")
    averaging_spread: float = Field(0.05, gt=0, description="standard deviation of the averaging weights, x epochs")
    reference_features: Literal["views", "bypass", "unaugmented"] = Field(
        "views",
        description=(
            "frozen zero-shot image features for consistency losses: 'views' cycles each image through "
            "`cache_views` fixed augmented views and keeps the frozen "
            "features of each view once computed; 'bypass' draws fresh crops and recomputes them every step "
            "(one extra frozen forward per step); 'unaugmented' is the old mismatched reference (the "
            "un-augmented image against an augmented crop), kept for comparison"
        ),
    )

    @field_validator("reference_features", mode="before")
    @classmethod
    def _old_reference_name(cls, value):
        return "unaugmented" if value == "cached" else value  # adapter files written before 'views' existed


class MethodConfig(BaseModel):
    """Base of every method's config. Subclasses add their own fields and implement `build()`."""

    model_config = ConfigDict(extra="forbid")

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # False for methods with nothing to train (zero-shot): fit writes the file without a training loop.
    trainable: ClassVar[bool] = True
    # True when the method can score class names it was not trained on (base-to-new generalisation).
    class_agnostic: ClassVar[bool] = True
    # True when every weight of the backbone trains (hours on a CPU): `compare` runs it only on request.
    tunes_whole_backbone: ClassVar[bool] = False
    # True when the config has a `merged` setting: `export --merged` stores the precomputed form.
    has_merged_form: ClassVar[bool] = False
    # Test-time adaptation (adaclip.tta) adapts RAda's mask, which weighs image-class feature similarities.
    # True when this method's head is RAda's mask: TTA adapts that mask.
    has_mask: ClassVar[bool] = False
    # True when a mask can weigh this method's scores: its head is CLIP's cosine similarity of image and
    # class features (a fresh mask starts at identity) or the mask itself; False for heads with their own
    # classifier weights.
    can_hold_mask: ClassVar[bool] = True
    # The registered method an adapter of this one becomes with RAda's mask (the file TTA writes; the
    # method itself when `has_mask`); None when there is none.
    masked_variant: ClassVar[str | None] = None
    # Settings added after adapter files of this method existed, whose default is not what those files
    # did: an adapter file that lacks one loads with the value given here (the behaviour of its time).
    settings_before_they_existed: ClassVar[dict[str, Any]] = {}

    train: TrainConfig = TrainConfig()

    @classmethod
    def default_train(cls, settings: dict[str, Any]) -> TrainConfig:
        """The recipe this method trains with unless told otherwise (may depend on its other settings)."""
        return cls.model_fields["train"].default

    @model_validator(mode="before")
    @classmethod
    def _complete_train(cls, data: Any) -> Any:
        """A partial `train` (`--epochs`, `--set train.lr=...`) changes only the fields it names; the
        others keep this method's recipe rather than TrainConfig's generic defaults."""
        if isinstance(data, dict) and not isinstance(data.get("train"), TrainConfig):
            recipe = cls.default_train(data).model_dump()
            given = dict(data.get("train") or {})
            if "epochs" in given:  # an explicit epoch count replaces a budget that depends on the shots
                given.setdefault("iterations_per_shot", None)
                given.setdefault("epochs_by_shots", None)
            data = {**data, "train": {**recipe, **given}}
        return data

    def build(self, ctx: BuildContext) -> Parts:
        raise NotImplementedError


@dataclass
class HeadOutput:
    logits: torch.Tensor  # (B, K)
    loss_terms: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted, added to the loss


class Component(nn.Module):
    """A trainable piece attached to the backbone. Its `state_dict()` is exactly what gets saved."""

    adapts_image_tower: bool = False
    adapts_text_tower: bool = False
    uses_image_reference: bool = False  # its loss needs frozen zero-shot image features of the batch

    def __init__(self) -> None:
        super().__init__()
        self.enabled = True  # False bypasses the component (used for frozen zero-shot references)
        self._binding: tuple[Backbone, object] | None = None
        self.lr_scale = 1.0  # this part's learning rate = train.lr * lr_scale

    def bind(self, backbone: Backbone, owner_token: object) -> None:
        """Tie the component to the model that owns it. Several models may share one backbone; only the
        components of the model whose pass is running (`backbone.active_token`) take part in it."""
        self._binding = (backbone, owner_token)

    @property
    def active(self) -> bool:
        """Whether hooks and wrappers should apply now: enabled, and owned by the active model."""
        if not self.enabled:
            return False
        return self._binding is None or self._binding[0].active_token is self._binding[1]

    def attach(self, backbone: Backbone) -> None:
        """Install hooks or wrappers into the backbone. Called once, after construction."""

    def detach(self) -> None:
        """Undo `attach`, leaving the backbone exactly as it was."""

    def prepare(self) -> None:
        """Called before each pass through the towers (e.g. to rebuild weights from tensor cores once)."""

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Extra weighted loss terms for a training step."""
        return {}

    def class_features(self, backbone: Backbone, class_names: list[str], templates: list[str]) -> torch.Tensor | None:
        """Override to compute class features differently (learned prompts); None keeps the default."""
        return None

    def offset_class_features(self, features: torch.Tensor, class_names: list[str]) -> torch.Tensor:
        """Override to change the encoded (K, D) class features of `class_names` (a learned residual per
        class); the default returns them unchanged."""
        return features

    def merge(self) -> None:
        """Precompute whatever makes inference cheaper; training after merge() needs unmerge()."""

    def merged_state(self) -> dict[str, torch.Tensor] | None:
        """This component's state in the form a `merged: true` config expects (for `export --merged`),
        or None when it has no merged form."""
        return None

    def unmerge(self) -> None:
        """Undo `merge`."""

    def parameter_breakdown(self) -> dict[str, int]:
        """Trainable parameters by part, for `adaclip info` and the fit summary."""
        return {name: p.numel() for name, p in self.named_parameters() if p.requires_grad}


@dataclass
class FeatureSet:
    """Normalised image features of labelled images, as the training loop hands them to a head."""

    features: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,) class indices


class Head(nn.Module):
    """Normalised image features (B, D) and class features (K, D) -> logits (B, K).

    Heads built from data (a cache model of the training images' features, hyper-parameters searched on
    validation features) set `uses_training_features` / `uses_validation_features`; the training loop
    then calls `fit_training_features` before the first step (also when nothing is trained) and
    `calibrate` after the last.
    """

    uses_training_features: ClassVar[bool] = False
    uses_validation_features: ClassVar[bool] = False
    # True: fit_training_features gets the trained model's features, after the last step (a cache of an
    # adapted image tower's own features), instead of before the first.
    fits_after_training: ClassVar[bool] = False
    # fits_after_training heads: the features are the mean over this many augmented crops of each image
    # (1: one un-augmented pass).
    training_views: int = 1
    calibrates_without_validation: bool = False  # calibrate(None, ...) is called when there is no validation set
    calibrates_before_training: bool = False  # calibrate is also called after fit_training_features, before training
    lr_scale: float = 1.0  # this part's learning rate = train.lr * lr_scale (set per instance to change)

    def fit_training_features(self, train: FeatureSet) -> None:
        """Build state from every training image's features (un-augmented, or the mean of the cached
        augmented views). Called before the optimiser is made, so it may create parameters."""

    def calibrate(
        self, val: FeatureSet | None, class_features: torch.Tensor, logit_scale: float
    ) -> dict[str, float] | None:
        """Tune settings on the validation features after training (None: there are none, and the head
        said it can tune without); return what was chosen (logged)."""
        return None

    def score_classes(self, class_names: list[str]) -> None:
        """The model now scores these class names (it was built for the names it was trained on): a head
        with per-class state maps it by name."""

    def with_classifier(self, classifier: Head) -> Head:
        """This head with `classifier` scoring images against class features in its place (TTA puts RAda's
        mask there); a head that adds scores of its own on top keeps them. A plain head is replaced."""
        return classifier

    def adapt_to_state(self, state: dict[str, torch.Tensor]) -> None:
        """Before a saved state is loaded: resize tensors whose shape depends on the training data
        (e.g. one cache entry per training image). `state` holds this head's tensors, keys relative."""

    def forward(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        raise NotImplementedError

    def parameter_breakdown(self) -> dict[str, int]:
        return {name: p.numel() for name, p in self.named_parameters() if p.requires_grad}


class CosineHead(Head):
    """CLIP's own classifier: scaled cosine similarity. No parameters."""

    def forward(self, image_features: torch.Tensor, class_features: torch.Tensor, logit_scale: float) -> HeadOutput:
        return HeadOutput(logits=logit_scale * image_features @ class_features.t())


@dataclass
class Parts:
    components: list[Component] = field(default_factory=list)
    head: Head = field(default_factory=CosineHead)
