"""AdaptedCLIP: a frozen backbone + a method's parts, producing logits for a set of class names.

This is the one place that knows how features flow: images through the (possibly adapted) image
tower, class prompts through the (possibly adapted) text tower, both into the method's head. It also
provides what training needs on top: the frozen zero-shot references and the loss of a step.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import Backbone
from .errors import UsageError
from .methods import BuildContext, Head, HeadOutput, MethodConfig, StepContext


class AdaptedCLIP(nn.Module):
    """Backbone (not a submodule: never saved, never trained) + components + head."""

    def __init__(
        self,
        backbone: Backbone,
        config: MethodConfig,
        class_names: list[str],
        templates: list[str],
        *,
        seed: int = 0,
    ):
        super().__init__()
        self._backbone = [backbone]  # a list hides it from nn.Module registration
        self.config = config
        self.class_names = list(class_names)
        self.templates = list(templates)
        self._class_cache: torch.Tensor | None = None
        self._zero_shot_cache: torch.Tensor | None = None
        self.components = nn.ModuleList()  # empty while building: zero-shot features need no parts
        self._token = object()  # identifies this model's components on the shared backbone
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # parameter init depends on the seed alone
            parts = config.build(
                BuildContext(backbone, self.class_names, self.templates, self.zero_shot_class_features)
            )
        self.components = nn.ModuleList(parts.components)
        self.head = parts.head
        self.to(backbone.device)
        for component in self.components:
            component.bind(backbone, self._token)
            component.attach(backbone)
        # Hooks live on the shared backbone: remove them when this model is garbage-collected.
        weakref.finalize(self, _detach_all, list(self.components))

    # --- structure --------------------------------------------------------------------------------

    @property
    def backbone(self) -> Backbone:
        return self._backbone[0]

    @property
    def image_tower_frozen(self) -> bool:
        return not any(c.adapts_image_tower for c in self.components)

    @property
    def text_tower_frozen(self) -> bool:
        return not any(c.adapts_text_tower for c in self.components)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def lr_scales(self) -> dict[int, float]:
        """id(parameter) -> learning-rate multiplier, for parts whose `lr_scale` is not 1."""
        scales: dict[int, float] = {}
        for part in [*self.components, self.head]:
            if part.lr_scale != 1.0:
                scales.update({id(p): float(part.lr_scale) for p in part.parameters() if p.requires_grad})
        return scales

    def with_head(self, head: Head, config: MethodConfig) -> AdaptedCLIP:
        """A sibling model with another head and config that shares this model's backbone and components
        (not copies: nothing is re-attached). Used to try a different head without changing this model."""
        sibling = copy.copy(self)
        sibling.__dict__["_modules"] = dict(self._modules)  # own module table; the components stay shared
        # The components' hooks are removed when their owner is collected: keep the owner alive.
        sibling.__dict__["_component_owner"] = self.__dict__.get("_component_owner", self)
        sibling.config = config
        sibling.head = head.to(self.backbone.device)
        return sibling

    def parameter_breakdown(self) -> dict[str, int]:
        breakdown: dict[str, int] = {}
        for index, component in enumerate(self.components):
            prefix = f"components.{index}"
            for name, count in component.parameter_breakdown().items():
                breakdown[f"{prefix}.{name}"] = count
        for name, count in self.head.parameter_breakdown().items():
            breakdown[f"head.{name}"] = count
        return breakdown

    def n_trainable(self) -> int:
        return sum(self.parameter_breakdown().values())

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """Exactly the tensors an adapter file stores."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    def adapt_to_state(self, state: dict[str, torch.Tensor]) -> None:
        """Let parts whose tensor shapes depend on the training data (a head's cache of training
        features) take the shapes of a saved state before it is loaded."""
        prefix = "head."
        self.head.adapt_to_state({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})

    def train(self, mode: bool = True) -> AdaptedCLIP:
        super().train(mode)
        self.backbone.model.eval()  # the backbone's normalisation statistics never move
        return self

    def detach_components(self) -> None:
        for component in self.components:
            component.detach()

    # --- classes ----------------------------------------------------------------------------------

    def set_classes(self, class_names: list[str]) -> None:
        """Score a different set of class names (class-agnostic methods only)."""
        if list(class_names) == self.class_names:
            return
        if not self.config.class_agnostic:
            raise UsageError(
                f"method {self.config.name!r} is tied to the {len(self.class_names)} classes it was trained on",
                fix="predict with the same classes, or fit a class-agnostic method such as adaring or rada",
            )
        self.class_names = list(class_names)
        self._class_cache = None
        self._zero_shot_cache = None
        self.head.score_classes(self.class_names)

    # --- features ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tower_pass(self) -> Iterator[None]:
        """During a pass through the towers, this model's components (and no other model's) apply;
        afterwards the shared backbone is plain again."""
        previous = self.backbone.active_token
        self.backbone.active_token = self._token
        try:
            for component in self.components:
                if component.enabled:
                    component.prepare()
            yield
        finally:
            self.backbone.active_token = previous

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised (B, D) features of preprocessed pixels through the adapted image tower."""
        with self._tower_pass():
            return F.normalize(self.backbone.encode_image(pixels), dim=-1)

    def class_features(self) -> torch.Tensor:
        """Normalised (K, D) class features; cached unless the text side is being trained."""
        trains_text = self.training and torch.is_grad_enabled() and not self.text_tower_frozen
        if not trains_text and self._class_cache is not None:
            features = self._class_cache
        else:
            features = self._compute_class_features()
            if not trains_text:
                self._class_cache = features.detach()
        # Offsets on the encoded features (a learned classifier residual) apply after the cache, so they
        # train even while the text tower is frozen and its features are cached.
        for component in self.components:
            if component.enabled:
                features = component.offset_class_features(features, self.class_names)
        return features

    def _compute_class_features(self) -> torch.Tensor:
        with self._tower_pass():
            for component in self.components:
                if component.enabled:
                    custom = component.class_features(self.backbone, self.class_names, self.templates)
                    if custom is not None:
                        return custom
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.text_tower_frozen):
                return self.backbone.encode_prompts(self.class_names, self.templates)

    def invalidate_class_cache(self) -> None:
        """Call after parameters changed (an optimiser step on text-side parts)."""
        self._class_cache = None

    @contextlib.contextmanager
    def components_disabled(self) -> Iterator[None]:
        """Run the plain backbone: every component bypassed (head untouched)."""
        states = [c.enabled for c in self.components]
        for c in self.components:
            c.enabled = False
        try:
            yield
        finally:
            for c, state in zip(self.components, states, strict=True):
                c.enabled = state

    def zero_shot_class_features(self) -> torch.Tensor:
        """Frozen-encoder class features (K, D), computed once per class set."""
        if self._zero_shot_cache is None:
            with torch.no_grad(), self.components_disabled(), self._tower_pass():
                self._zero_shot_cache = self.backbone.encode_prompts(self.class_names, self.templates)
        return self._zero_shot_cache

    def zero_shot_image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.components_disabled(), self._tower_pass():
            return F.normalize(self.backbone.encode_image(pixels), dim=-1)

    # --- logits -----------------------------------------------------------------------------------

    def head_output(self, image_features: torch.Tensor, class_features: torch.Tensor | None = None) -> HeadOutput:
        if class_features is None:
            class_features = self.class_features()
        return self.head(image_features, class_features, self.backbone.logit_scale)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) for preprocessed pixels."""
        return self.head_output(self.image_features(pixels)).logits

    def logits_from_features(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.head_output(image_features).logits

    # --- training ---------------------------------------------------------------------------------

    def training_loss(
        self,
        labels: torch.Tensor,
        *,
        pixels: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        reference_image_features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, StepContext]:
        """Cross-entropy on the head's logits plus every part's weighted loss terms.

        Give `pixels` when the image tower is adapted; frozen-tower methods may pass cached features.
        `reference_image_features` are the batch's frozen zero-shot features when the loop cached them.
        """
        if image_features is None:
            if pixels is None:
                raise ValueError("training_loss needs pixels or image_features")
            image_features = self.image_features(pixels)
        class_features = self.class_features()
        out = self.head(image_features, class_features, self.backbone.logit_scale)
        labels = labels.to(out.logits.device)
        ctx = StepContext(
            model=self,
            pixels=pixels,
            labels=labels,
            image_features=image_features,
            class_features=class_features,
            logits=out.logits,
            reference_image_features=reference_image_features,
        )
        terms = {"ce": F.cross_entropy(out.logits, labels, label_smoothing=self.config.train.label_smoothing)}
        terms.update(out.loss_terms)
        for component in self.components:
            terms.update(component.loss_terms(ctx))
        ctx.terms = terms
        return sum(terms.values()), ctx


def _detach_all(components: list) -> None:
    for component in components:
        component.detach()
