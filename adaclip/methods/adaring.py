"""AdaRing: cross-layer tensor-ring adapters inside both CLIP encoders (`--method adaring`).

What the paper confirms (arXiv 2508.11870, abstract only; no public code):
  * adapters in many layers of both encoders are redundant across layers; AdaRing writes the adapters
    of all layers as one tensor decomposed by tensor-ring decomposition into layer-shared cores and
    layer-specific slices;
  * several adapters of different ranks cooperate, trained with generalization-aware fine-tuning;
  * about 90% fewer trainable parameters than prior adapter methods.

adaclip's reconstruction (every item below is a field of `AdaRingConfig`):
  * Placement: a parallel adapter per residual block, fed by the block's input normalised (a
    parameter-free LayerNorm over channels) and added to its output: y = block(x) + s * A_l(LN(x)).
    Default blocks: the second half of each tower (`last50%`, relative to its depth; absolute forms like
    5-12 stay available); any tower whose blocks keep their input shape works
    (ViT and text transformers, Hugging Face layers, timm CNN residual blocks; see adaclip.inject).
  * Adapter: A_l(x) = act(x W_down[l]) W_up[l], bottleneck `bottleneck` per ring.
  * Cross-layer rings: for each tower and width (blocks of equal width form a group of L layers), the
    L down matrices form one tensor (d, b, L) and the L up matrices one tensor (b, d, L), each in
    tensor-ring format. The width mode is split into small factors by default (768 -> 24 x 32), so a
    ring of rank R costs R^2 (24 + 32 + b + L) numbers; `width_modes="single"` keeps the plain 3-way
    tensor (methods.md), which at ranks {2,4,8} cannot meet the 10%-of-MMA budget on ViT-B/16
    (84 * (768 + 32 + 8) = 67,872 numbers for one projection of one tower alone).
    The cores over width and bottleneck modes are shared by all layers; the core over the layer mode
    holds one R x R slice per layer (the layer-specific part).
  * Diverse ranks: one ring per rank in `ranks` (default 2, 4, 8); their adapters are concatenated
    along the bottleneck (equivalently: summed), each with a learnable gate.
  * No-op start: the layer core of every up-projection ring is zero, so at step 0 the adapted model's
    logits equal zero-shot CLIP's exactly; gradients still reach every core.
  * Generalization-aware loss (PromptSRC-style self-consistency to the frozen model):
    CE + text_consistency * L1(text features, zero-shot text features)
       + image_consistency * L1(image features, zero-shot image features)
       + logit_consistency * KL(zero-shot probabilities || adapted probabilities),
    on PromptSRC's scale (L1 means over entries, KL summed / (B * K)), with PromptSRC's weights 25 / 10 / 1
    by default (adaring+rada: 2.5 / 0.25 / 1.25; docs/tuning.md).
  * Gaussian weight averaging over epochs (PromptSRC's GPA, `train.weight_averaging`), peak and spread
    0.6 x epochs (PromptSRC's few-shot 30 / 30 of 50).
    The frozen references are of the same augmented crop the adapted model sees, as in PromptSRC:
    zero-shot text features are computed once per run; each training image cycles through `cache_views`
    fixed augmented crops whose frozen features are kept once computed
    (TrainConfig.reference_features="views"), so the extra frozen forward is paid in the first
    `cache_views` epochs only ("bypass": fresh crops, one extra frozen forward every step).
  * Training cache (`training_cache`, on by default: docs/tuning.md): after training, Tip-Adapter's
    cache model over the trained model's own features of the training images is added to the scores,
    its alpha and beta searched on the validation images (adaclip.methods.training_cache). Scoring a
    class not trained on turns it off, so AdaRing stays class-agnostic; TTA's mask replaces the cosine
    head under it.
  * Efficiency: each group's per-layer matrices are materialised once per tower pass (a chain of small
    matrix products); `merge()` freezes them for inference, and `adaclip export --merged` stores them
    so predict never reconstructs. Backward stops at the first adapted block, as nothing before it
    requires grad.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..errors import UsageError
from ..inject import Block, BlockSelection, ParallelBranchHook
from ..tensor_ring import TensorRing, balanced_factors
from .base import Component, CosineHead, Head, MethodConfig, Parts, TrainConfig
from .class_offsets import ClassOffsets
from .contexts import BuildContext
from .registry import register_method
from .training_cache import TrainingCacheHead

if TYPE_CHECKING:
    from ..backbone import Backbone
    from .contexts import StepContext

_ACTIVATIONS = {"identity": nn.Identity, "gelu": nn.GELU, "relu": nn.ReLU}


# The consistency weights' one definition; a method built on AdaRing may declare other defaults.
def text_consistency_field(default: float) -> Any:
    return Field(default, ge=0, description="weight of L1(text features, zero-shot text features)")


def image_consistency_field(default: float) -> Any:
    return Field(default, ge=0, description="weight of L1(image features, zero-shot image features)")


def training_cache_ties_field(default: str) -> Any:
    return Field(
        default,
        description="the cache search's rule between (alpha, beta) with equally many validation images right: "
        "training, the most training images right when each is scored without its own cache entry; first, the "
        "first in grid order (Tip-Adapter's); loss, the lowest validation cross-entropy",
    )


def logit_consistency_field(default: float) -> Any:
    return Field(
        default,
        ge=0,
        description="weight of KL(zero-shot || adapted) on logits, summed / (batch x classes) as PromptSRC",
    )


class AdaRingSettings(BlockSelection):
    """AdaRing's own settings; shared by `adaring` and composite methods that include it."""

    # Relative to each tower's depth: the second half of lite's 6-block text tower is 3 blocks, of ViT-B/16's
    # 12 it is 6 (the old absolute default 5-12 left lite's text tower 2 blocks; docs/tuning.md).
    blocks: str = Field(
        "last50%", description="1-based blocks of each tower: lastP% (default last50%), all, lastN, 5-12, 1,3,9-12"
    )
    ranks: list[int] = Field([2, 4, 8], description="one tensor ring per rank; their adapters cooperate")
    bottleneck: int = Field(32, ge=1, description="adapter bottleneck width of each ring's adapter")
    width_modes: Literal["factorized", "single"] = Field(
        "factorized", description="split the width mode into small factors (768 -> 24x32), or keep it whole"
    )
    max_mode: int = Field(32, ge=2, description="largest factor when width_modes='factorized'")
    activation: Literal["identity", "gelu", "relu"] = Field("gelu", description="between down and up projection")
    scale: float = Field(1.0, description="s in y = block(x) + s * adapter(LN(x))")
    learnable_gates: bool = Field(True, description="one learnable gate per ring (init 1)")
    # One scale with PromptSRC: L1 means over feature entries, the KL summed and divided by B * K
    # (PromptSRC's reduction). The defaults are PromptSRC's own weights, 25 / 10 / 1: without the training
    # cache they held the lite backbone near its zero-shot accuracy, with it they validated best across
    # 4 shots, 16 shots and base-to-new (docs/tuning.md, fourth study). adaring+rada keeps its own.
    text_consistency: float = text_consistency_field(25.0)
    image_consistency: float = image_consistency_field(10.0)
    logit_consistency: float = logit_consistency_field(1.0)
    class_offsets: bool = Field(
        False,
        description=(
            "also learn an offset per trained class on its class features, started at zero (the classifier "
            "starts at the prompts' features); classes not trained on get none"
        ),
    )
    # At the rings' learning rate the offsets overfit 4 shots (docs/tuning.md); a tenth of it validated best.
    class_offsets_lr_scale: float = Field(0.1, gt=0, description="the offsets' learning rate relative to train.lr")
    # The cache of the trained features validated above AdaRing alone at 4 and 16 shots and in base-to-new
    # (docs/tuning.md); files written before it existed load without (settings_before_they_existed).
    training_cache: bool = Field(
        True,
        description=(
            "after training, add Tip-Adapter's cache of the training images' adapted features to the scores "
            "(alpha, beta searched on the validation images); off when scoring a class name not trained on"
        ),
    )
    training_cache_views: int = Field(
        1, ge=1, description="the cache's key per image: the mean over this many augmented crops (1: the image itself)"
    )
    # With 4 validation images per class many (alpha, beta) tie and the first in grid order is the weakest
    # cache; the training images decided better on the suite's own base-to-new fits (docs/tuning.md).
    training_cache_ties: Literal["first", "loss", "training"] = training_cache_ties_field("training")
    merged: bool = Field(False, description="store per-layer matrices instead of rings (set by export --merged)")

    @field_validator("ranks")
    @classmethod
    def _positive_ranks(cls, ranks: list[int]) -> list[int]:
        if not ranks or any(r < 1 for r in ranks):
            raise ValueError("ranks must be a non-empty list of positive integers")
        return ranks


@register_method
class AdaRingConfig(AdaRingSettings, MethodConfig):
    name: ClassVar[str] = "adaring"
    summary: ClassVar[str] = "cross-layer tensor-ring adapters in both encoders (ultra-light)"
    has_merged_form: ClassVar[bool] = True
    masked_variant: ClassVar[str | None] = "adaring+rada"
    settings_before_they_existed: ClassVar[dict[str, Any]] = {"training_cache": False, "training_cache_ties": "first"}

    # AdamW with one warm-up epoch and cosine decay (the few-shot adapter recipe of CLIP-Adapter / MMA);
    # lr 1e-2 chosen on a Fashion-MNIST validation split (docs/tuning.md: 2e-3 underfits in 10 epochs).
    # Ends with PromptSRC's Gaussian weight averaging at its few-shot spread (30 / 30 of 50 epochs).
    train: TrainConfig = TrainConfig(
        epochs=10,
        lr=1e-2,
        weight_decay=1e-4,
        batch_size=32,
        warmup_epochs=1,
        weight_averaging="gaussian",
        averaging_peak=0.6,
        averaging_spread=0.6,
    )

    def classifier_head(self, ctx: BuildContext) -> Head:
        """The head that turns features into scores (the training cache, if on, adds to it)."""
        return CosineHead()

    def build(self, ctx: BuildContext) -> Parts:
        components: list[Component] = [AdaRingAdapters(self, ctx.backbone)]
        if self.class_offsets:
            offsets = ClassOffsets(ctx.class_names, ctx.backbone.embed_dim)
            offsets.lr_scale = self.class_offsets_lr_scale
            components.append(offsets)
        head = self.classifier_head(ctx)
        if self.training_cache:
            head = TrainingCacheHead(
                head,
                ctx.class_names,
                ctx.backbone.embed_dim,
                views=self.training_cache_views,
                ties=self.training_cache_ties,
            )
        return Parts(components=components, head=head)


# ------------------------------------------------------------------------------------------ layer groups


class RingGroup(nn.Module):
    """Adapters of the L same-width blocks of one tower, stored as tensor rings."""

    def __init__(self, width: int, n_layers: int, settings: AdaRingSettings):
        super().__init__()
        self.width, self.n_layers, self.bottleneck = width, n_layers, settings.bottleneck
        modes = balanced_factors(width, settings.max_mode) if settings.width_modes == "factorized" else [width]
        b = settings.bottleneck
        # Down entries ~ N(0, 1/width) like a default linear layer; up rings start at zero.
        self.down = nn.ModuleList(TensorRing([*modes, b, n_layers], r, init_std=width**-0.5) for r in settings.ranks)
        self.up = nn.ModuleList(
            TensorRing([b, *modes, n_layers], r, init_std=b**-0.5, zero_mode=len(modes) + 1) for r in settings.ranks
        )
        self.gates = nn.Parameter(torch.ones(len(settings.ranks)), requires_grad=settings.learnable_gates)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_down (L, d, B), W_up (L, B, d)) with B = bottleneck * number of rings."""
        d, b, n = self.width, self.bottleneck, self.n_layers
        downs = [ring().reshape(d, b, n) for ring in self.down]
        ups = [ring().reshape(b, d, n) * gate for ring, gate in zip(self.up, self.gates, strict=True)]
        w_down = torch.cat(downs, dim=1).permute(2, 0, 1)
        w_up = torch.cat(ups, dim=0).permute(2, 0, 1)
        return w_down, w_up

    def breakdown(self) -> dict[str, int]:
        counts = {}
        for ring in self.down:
            counts[f"down.rank{ring.rank}"] = ring.num_parameters()
        for ring in self.up:
            counts[f"up.rank{ring.rank}"] = ring.num_parameters()
        if self.gates.requires_grad:
            counts["gates"] = self.gates.numel()
        return counts


class DenseGroup(nn.Module):
    """The same adapters as explicit per-layer matrices: what `export --merged` stores."""

    def __init__(self, width: int, n_layers: int, settings: AdaRingSettings):
        super().__init__()
        total = settings.bottleneck * len(settings.ranks)
        self.w_down = nn.Parameter(torch.zeros(n_layers, width, total), requires_grad=False)
        self.w_up = nn.Parameter(torch.zeros(n_layers, total, width), requires_grad=False)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.w_down, self.w_up

    def breakdown(self) -> dict[str, int]:
        return {}


# ------------------------------------------------------------------------------------------ component


class AdaRingAdapters(Component):
    """Discovers the selected blocks of each tower, owns one group of adapters per (tower, width), and
    hooks each block so its adapter runs in parallel."""

    def __init__(self, settings: AdaRingSettings, backbone: Backbone):
        super().__init__()
        self.settings = settings
        self.activation = _ACTIVATIONS[settings.activation]()
        self.groups = nn.ModuleDict()
        # (tower, block name, group key, layer index within the group, channel dim)
        self.placements: list[tuple[str, str, str, int, int]] = []
        for tower in settings.selected_towers():
            by_width: dict[int, list[Block]] = {}
            for block in settings.selected_blocks(backbone, tower, "adaring"):
                by_width.setdefault(block.width, []).append(block)
            for width, members in by_width.items():
                key = f"{tower}_w{width}"
                group_class = DenseGroup if settings.merged else RingGroup
                self.groups[key] = group_class(width, len(members), settings)
                for layer, block in enumerate(members):
                    self.placements.append((tower, block.name, key, layer, block.channel_dim))
        if not self.placements:
            raise UsageError("adaring: the block selection matches no block", fix="check --set blocks=...")
        self.adapts_image_tower = any(p[0] == "image" for p in self.placements)
        self.adapts_text_tower = any(p[0] == "text" for p in self.placements)
        self._hooks: list[ParallelBranchHook] = []
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._cache_key: tuple | None = None
        self._frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def uses_image_reference(self) -> bool:
        s = self.settings
        return self.adapts_image_tower and (s.image_consistency > 0 or s.logit_consistency > 0)

    # --- wiring -----------------------------------------------------------------------------------

    def attach(self, backbone: Backbone) -> None:
        towers = backbone.towers
        for tower, block_name, key, layer, channel_dim in self.placements:
            module = (towers.image if tower == "image" else towers.text).get_submodule(block_name)
            self._hooks.append(ParallelBranchHook(module, self._branch(key, layer, channel_dim)))

    def detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _branch(self, key: str, layer: int, channel_dim: int):
        scale = self.settings.scale

        def branch(x: torch.Tensor) -> torch.Tensor | None:
            if not self.active:
                return None
            w_down, w_up = self._weights(key)
            h = x.movedim(1, -1) if channel_dim == 1 else x  # channels last for the matmuls
            h = F.layer_norm(h, (int(h.shape[-1]),))  # a plain int: ONNX export traces the width as a constant
            h = self.activation(h @ w_down[layer].to(h.dtype)) @ w_up[layer].to(h.dtype)
            h = h * scale
            return h.movedim(-1, 1) if channel_dim == 1 else h

        return branch

    # --- weights ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Rebuild per-layer matrices once per tower pass while training (fresh autograd graph)."""
        if self._frozen is None and torch.is_grad_enabled():
            self._cache = {key: group.weights() for key, group in self.groups.items()}
            self._cache_key = ("grad",)

    def _weights(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self._frozen is not None:
            return self._frozen[key]
        if torch.is_grad_enabled():
            if self._cache_key != ("grad",):
                self.prepare()
            return self._cache[key]
        # Without grad: reuse until a parameter changes (optimizer steps bump tensor versions).
        version = ("nograd", *(p._version for p in self.parameters()), *(p.data_ptr() for p in self.parameters()))
        if self._cache_key != version:
            with torch.no_grad():
                self._cache = {k: tuple(w.detach() for w in g.weights()) for k, g in self.groups.items()}
            self._cache_key = version
        return self._cache[key]

    def merge(self) -> None:
        with torch.no_grad():
            self._frozen = {k: tuple(w.detach().clone() for w in g.weights()) for k, g in self.groups.items()}

    def unmerge(self) -> None:
        self._frozen = None
        self._cache_key = None

    def merged_state(self) -> dict[str, torch.Tensor]:
        """State of the merged (DenseGroup) form of these adapters, for `export --merged`."""
        with torch.no_grad():
            state = {}
            for key, group in self.groups.items():
                w_down, w_up = group.weights()
                state[f"groups.{key}.w_down"] = w_down.detach().clone()
                state[f"groups.{key}.w_up"] = w_up.detach().clone()
            return state

    # --- loss -------------------------------------------------------------------------------------

    def loss_terms(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        s = self.settings
        terms: dict[str, torch.Tensor] = {}
        if self.adapts_text_tower and s.text_consistency > 0:
            terms["text_l1"] = s.text_consistency * F.l1_loss(ctx.class_features, ctx.zero_shot_class_features())
        if self.adapts_image_tower and s.image_consistency > 0:
            terms["image_l1"] = s.image_consistency * F.l1_loss(ctx.image_features, ctx.zero_shot_image_features())
        if s.logit_consistency > 0:
            teacher = ctx.zero_shot_logits().softmax(dim=-1)
            student = ctx.logits.log_softmax(dim=-1)
            # PromptSRC's reduction: the sum over batch and classes divided by B * K (not batchmean's B)
            kl = F.kl_div(student, teacher, reduction="sum") / ctx.logits.numel()
            terms["logit_kl"] = s.logit_consistency * kl
        return terms

    def parameter_breakdown(self) -> dict[str, int]:
        return {f"{key}.{part}": n for key, group in self.groups.items() for part, n in group.breakdown().items()}
