"""LoRA (`--method lora`): low-rank updates of the attention projections in both encoders (CLIP-LoRA).

The recipe is CLIP-LoRA's (Zanella & Ben Ayed, CVPR-W 2024, github.com/MaxZanella/CLIP-LoRA): rank 2,
alpha 1, on the query, key and value projections of every attention layer of both encoders, dropout
0.25 on the input of each low-rank branch, AdamW (lr 2e-4, weight decay 1e-2), batch 32, 500 x shots
iterations with a cosine schedule, random resized crops (scale 0.08-1) and flips; class features from the
first template only (`prompts="first"`: CLIP-LoRA encodes `template[0]`). With a frozen image tower (the
`lite` backbone's CNN) the training loop caches `train.cache_views` augmented views of each image's
features, so each iteration costs only the text tower. Each adapted projection W (d_out x d_in) gets

    y = W x + b + s * B A dropout(x),    A: (r, d_in) Kaiming-uniform,  B: (d_out, r) zero,

so the adapted model starts exactly at zero-shot CLIP, and costs r * (d_in + d_out) parameters:
184,320 on ViT-B/16 (768-wide image and 512-wide text towers, 12 layers each, q/k/v, r = 2).
The scale s is alpha / sqrt(r) by default: that is what CLIP-LoRA's code computes (loralib/layers.py;
alpha / r is commented out there); `rank_scaling="r"` gives the LoRA paper's and PEFT's alpha / r.

How it attaches: the backbone is shared and must stay untouched, so the module that owns a projection
is replaced in its parent by a wrapper that exposes the original's parameters, buffers and
submodules under their own names (the backbone's `state_dict()` and `parameters()` do not change)
without registering the original itself, and that adds the low-rank terms of the components that are
active. With no active component it calls the original module. `detach()` puts the original back.

* `nn.MultiheadAttention` (open_clip's ViT and text blocks): the fused `in_proj_weight` (3d x d) is
  split into q, k and v; the attention itself is recomputed with the same semantics as PyTorch's
  (batch_first, attn_mask, key_padding_mask, need_weights, is_causal), equal to the unwrapped module
  within 1e-6 at initialisation.
* Separate `nn.Linear` projections: Hugging Face BERT-style `query`/`key`/`value` (+ `output.dense`),
  `q_proj`/`k_proj`/`v_proj` (+ `out_proj`/`o_proj`), and timm's fused `qkv` (+ `proj`).

Towers without attention (a CNN image tower, e.g. the `lite` backbone's EfficientNet) are skipped with
a warning; the image features are then cached like any frozen tower. `merge()` folds s * B A into
frozen copies of the adapted weights (the backbone's own weights are never modified).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import nn

from ..errors import UsageError
from ..inject import BlockSelection
from ..ui import log
from .base import Component, MethodConfig, Parts, TrainConfig
from .contexts import BuildContext
from .registry import register_method

if TYPE_CHECKING:
    from ..backbone import Backbone

Projection = Literal["q", "k", "v", "out"]
PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "out")


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


# ------------------------------------------------------------------------------------------ low-rank update


class LoRAUpdate(nn.Module):
    """x -> scale * B A dropout(x); B starts at zero, so the update starts at exactly zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init, as in CLIP-LoRA / PEFT
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A


# ------------------------------------------------------------------------------------------ targets


@dataclass(frozen=True)
class Target:
    """One backbone module to wrap, and which output rows of which of its matrices each projection owns.

    kind "mha": an nn.MultiheadAttention; q/k/v are row blocks of `in_proj_weight`, out is `out_proj`.
    kind "linear": an nn.Linear; each projection owns a row range of its weight (fused qkv: three).
    """

    path: str  # within the tower
    kind: Literal["mha", "linear"]
    rows: dict[str, tuple[int, int]]  # projection -> (first row, end row) of its matrix
    d_in: int


@dataclass(frozen=True)
class AttentionSite:
    """The attention of one block: where each of q, k, v, out lives."""

    block: int  # 0-based block index in the tower
    targets: dict[str, Target]  # projection -> target (several projections may share one target)


_SEPARATE_LINEARS = (
    # q, k, v Linear layers of one module, and where its output projection may be: a name in the same
    # module, or "../name" in its parent.
    (("query", "key", "value"), ("../output.dense",)),  # Hugging Face BERT / RoBERTa / MiniLM
    (("q_proj", "k_proj", "v_proj"), ("out_proj", "o_proj")),  # Hugging Face CLIP, BART, Llama-style
)


def _unwrap(module: nn.Module) -> nn.Module:
    return module.original if isinstance(module, _Wrapper) else module


def find_attention(block: nn.Module, block_name: str) -> dict[str, Target] | None:
    """The attention projections inside one block, as wrap targets (paths relative to the tower)."""

    def full(path: str) -> str:
        return f"{block_name}.{path}" if path else block_name

    def linear(path: str) -> nn.Linear | None:
        try:
            module = _unwrap(block.get_submodule(path))
        except AttributeError:
            return None
        return module if isinstance(module, nn.Linear) else None

    for name, module in block.named_modules():
        base = _unwrap(module)
        if isinstance(base, nn.MultiheadAttention):
            if not base._qkv_same_embed_dim or base.bias_k is not None or base.add_zero_attn:
                continue  # cross-attention with other widths, or extra key/value biases: not supported
            d = base.embed_dim
            rows = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d), "out": (0, d)}
            target = Target(full(name), "mha", rows, d)
            return dict.fromkeys(PROJECTIONS, target)
        prefix = f"{name}." if name else ""
        for (q, k, v), outs in _SEPARATE_LINEARS:
            layers = [linear(prefix + n) for n in (q, k, v)]
            if any(layer is None for layer in layers):
                continue
            targets = {
                proj: Target(full(prefix + n), "linear", {proj: (0, layer.out_features)}, layer.in_features)
                for proj, n, layer in zip(("q", "k", "v"), (q, k, v), layers, strict=True)
            }
            for out in outs:
                if out.startswith("../"):
                    parent = name.rpartition(".")[0]
                    out_path = f"{parent}.{out[3:]}" if parent else out[3:]
                else:
                    out_path = prefix + out
                out_layer = linear(out_path)
                if out_layer is not None:
                    rows = {"out": (0, out_layer.out_features)}
                    targets["out"] = Target(full(out_path), "linear", rows, out_layer.in_features)
                    break
            return targets
        qkv, proj = linear(prefix + "qkv"), linear(prefix + "proj")
        if qkv is not None and hasattr(base, "num_heads") and qkv.out_features == 3 * qkv.in_features:
            d = qkv.in_features
            fused = Target(full(prefix + "qkv"), "linear", {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}, d)
            targets = {"q": fused, "k": fused, "v": fused}
            if proj is not None:
                rows = {"out": (0, proj.out_features)}
                targets["out"] = Target(full(prefix + "proj"), "linear", rows, proj.in_features)
            return targets
    return None


# ------------------------------------------------------------------------------------------ wrappers


class _Entry:
    """One component's updates at one wrapped module."""

    def __init__(self, component: LoRAAdapters, updates: dict[str, LoRAUpdate]):
        self.component = component
        self.updates = updates  # projection -> update (plain dict: owned and saved by the component)
        self.merged: dict[str, torch.Tensor] | None = None  # matrix name -> frozen merged weight


class _Wrapper(nn.Module):
    """Stands in for a backbone module. Shares the original's parameter, buffer and submodule dicts, so
    the backbone's state_dict() keys and parameters() are unchanged, but does not register the original
    (nor any LoRA tensor): the adapter file holds the components' tensors only."""

    def __init__(self, original: nn.Module, parent: nn.Module, attribute: str):
        super().__init__()
        object.__setattr__(self, "original", original)
        object.__setattr__(self, "parent", parent)
        self.__dict__["_parameters"] = original._parameters
        self.__dict__["_buffers"] = original._buffers
        self.__dict__["_non_persistent_buffers_set"] = original._non_persistent_buffers_set
        self.__dict__["_modules"] = original._modules
        self.training = original.training
        self.attribute = attribute
        self.entries: list[_Entry] = []

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            original = self.__dict__.get("original")
            if original is None:
                raise
            return getattr(original, name)  # e.g. nn.MultiheadAttention's batch_first, num_heads

    def train(self, mode: bool = True) -> _Wrapper:
        super().train(mode)
        self.original.training = mode  # not a registered child, so not reached by the recursion
        return self

    def _active(self) -> list[_Entry]:
        return [entry for entry in self.entries if entry.component.active]

    def _weights_and_updates(self, active: list[_Entry]) -> tuple[dict[str, torch.Tensor] | None, dict[str, list]]:
        """Merged weights of the one active merged entry (None: the original's), and the updates to add."""
        if len(active) == 1 and active[0].merged is not None:
            return active[0].merged, {}
        updates: dict[str, list[LoRAUpdate]] = {}
        for entry in active:
            for proj, update in entry.updates.items():
                updates.setdefault(proj, []).append(update)
        return None, updates

    def merged_weights(self, updates: dict[str, LoRAUpdate]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _project(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: dict[str, tuple[int, int]],
    updates: dict[str, list[LoRAUpdate]],
    offset: int = 0,
) -> torch.Tensor:
    """F.linear(x, weight, bias) plus each projection's low-rank updates, placed in its rows (shifted
    by `offset` when `weight` is a row block of a larger matrix)."""
    y = F.linear(x, weight, bias)
    d_out = weight.shape[0]
    for proj, (start, end) in rows.items():
        for update in updates.get(proj, ()):
            delta = update(x)
            if (start - offset, end - offset) != (0, d_out):
                delta = F.pad(delta, (start - offset, d_out - end + offset))
            y = y + delta
    return y


class LinearWrapper(_Wrapper):
    def __init__(self, original: nn.Linear, parent: nn.Module, attribute: str, rows: dict[str, tuple[int, int]]):
        super().__init__(original, parent, attribute)
        self.rows = dict(rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        active = self._active()
        if not active:
            return self.original(x)
        merged, updates = self._weights_and_updates(active)
        weight = merged["weight"] if merged else self.original.weight
        return _project(x, weight, self.original.bias, self.rows, updates)

    def merged_weights(self, updates: dict[str, LoRAUpdate]) -> dict[str, torch.Tensor]:
        weight = self.original.weight.detach().clone()
        for proj, update in updates.items():
            start, end = self.rows[proj]
            weight[start:end] += update.delta_weight().to(weight.dtype)
        return {"weight": weight}


class MultiheadAttentionWrapper(_Wrapper):
    """nn.MultiheadAttention with low-rank updates of q, k, v (row blocks of in_proj_weight) and out."""

    def __init__(self, original: nn.MultiheadAttention, parent: nn.Module, attribute: str):
        super().__init__(original, parent, attribute)
        d = original.embed_dim
        self.in_rows = {"q": (0, d), "k": (d, 2 * d), "v": (2 * d, 3 * d)}

    def merged_weights(self, updates: dict[str, LoRAUpdate]) -> dict[str, torch.Tensor]:
        mha = self.original
        in_weight = mha.in_proj_weight.detach().clone()
        out_weight = mha.out_proj.weight.detach().clone()
        for proj, update in updates.items():
            if proj == "out":
                out_weight += update.delta_weight().to(out_weight.dtype)
            else:
                start, end = self.in_rows[proj]
                in_weight[start:end] += update.delta_weight().to(in_weight.dtype)
        return {"in_proj_weight": in_weight, "out_proj.weight": out_weight}

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        active = self._active()
        if not active:
            return self.original(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        merged, updates = self._weights_and_updates(active)
        mha = self.original
        in_weight = merged["in_proj_weight"] if merged else mha.in_proj_weight
        out_weight = merged["out_proj.weight"] if merged else mha.out_proj.weight
        in_bias = mha.in_proj_bias

        # Same steps as torch.nn.functional.multi_head_attention_forward, with projections that add
        # the low-rank updates (sequence-first layout inside).
        batched = query.dim() == 3
        self_attention = query is key and key is value
        if mha.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        src_len = key.shape[0]
        heads = mha.num_heads
        head_dim = embed_dim // heads

        if self_attention:
            q, k, v = _project(query, in_weight, in_bias, self.in_rows, updates).chunk(3, dim=-1)
        else:
            q, k, v = (
                _project(
                    x,
                    in_weight[start:end],
                    None if in_bias is None else in_bias[start:end],
                    {proj: (start, end)},
                    updates,
                    offset=start,
                )
                for x, (proj, (start, end)) in zip((query, key, value), self.in_rows.items(), strict=True)
            )

        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=q.dtype,
        )
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # PyTorch, too, then lets the attention kernel apply the causal mask
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=q.dtype,
                check_other=False,
            )
            if key_padding_mask is not None:
                is_causal = False
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if key_padding_mask is not None:
            padding = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1)
            padding = padding.reshape(bsz * heads, 1, src_len)
            attn_mask = padding if attn_mask is None else attn_mask + padding

        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        k = k.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        dropout_p = mha.dropout if self.training else 0.0

        def out_projection(h: torch.Tensor) -> torch.Tensor:
            return _project(h, out_weight, mha.out_proj.bias, {"out": (0, embed_dim)}, updates)

        if need_weights:
            scores = q * math.sqrt(1.0 / head_dim)
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, scores, k.transpose(-2, -1))
            else:
                scores = torch.bmm(scores, k.transpose(-2, -1))
            weights = scores.softmax(dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
            out = out_projection(out).view(tgt_len, bsz, -1)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                out, weights = out.squeeze(1), weights.squeeze(0)
        else:
            if attn_mask is not None:
                if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                    attn_mask = attn_mask.unsqueeze(0)
                else:
                    attn_mask = attn_mask.view(bsz, heads, -1, src_len)
            q = q.view(bsz, heads, tgt_len, head_dim)
            k = k.view(bsz, heads, src_len, head_dim)
            v = v.view(bsz, heads, src_len, head_dim)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
            out = out_projection(out).view(tgt_len, bsz, -1)
            weights = None
            if not batched:
                out = out.squeeze(1)
        if mha.batch_first and batched:
            out = out.transpose(0, 1)
        return out, weights


def _wrap(tower: nn.Module, target: Target) -> _Wrapper:
    """The wrapper at `target` (installed in its parent on first use)."""
    module = tower.get_submodule(target.path)
    if isinstance(module, _Wrapper):
        return module
    parent_path, _, attribute = target.path.rpartition(".")
    parent = tower.get_submodule(parent_path) if parent_path else tower
    if target.kind == "mha":
        wrapper: _Wrapper = MultiheadAttentionWrapper(module, parent, attribute)
    else:
        wrapper = LinearWrapper(module, parent, attribute, target.rows)
    setattr(parent, attribute, wrapper)
    return wrapper


def _unwrap_if_unused(wrapper: _Wrapper) -> None:
    if not wrapper.entries and getattr(wrapper.parent, wrapper.attribute, None) is wrapper:
        setattr(wrapper.parent, wrapper.attribute, wrapper.original)


# ------------------------------------------------------------------------------------------ component


class LoRAAdapters(Component):
    """Low-rank updates for the selected attention projections of the selected towers and blocks.

    State dict: `lora.<tower>.<block>.<projection>.lora_A|lora_B` (block 0-based)."""

    def __init__(self, settings: LoRASettings, backbone: Backbone):
        super().__init__()
        self.settings = settings
        self.lora = nn.ModuleDict()
        self.sites: dict[str, list[AttentionSite]] = {}
        for tower in settings.selected_towers():
            sites = _tower_sites(backbone, tower, settings)
            if not sites:
                log.warning(f"lora: no attention layer to adapt in the selected {tower} blocks; the tower stays frozen")
                continue
            self.sites[tower] = sites
            layers = nn.ModuleDict()
            for site in sites:
                updates = nn.ModuleDict()
                for proj in settings.projections:
                    target = site.targets[proj]
                    start, end = target.rows[proj]
                    s = settings
                    updates[proj] = LoRAUpdate(target.d_in, end - start, s.rank, s.scale, s.dropout)
                layers[str(site.block)] = updates
            self.lora[tower] = layers
        if not self.sites:
            raise UsageError(
                "lora: no attention projections found to adapt",
                fix="check --set towers=/blocks=/projections=; supported: nn.MultiheadAttention, "
                "BERT-style query/key/value, q_proj/k_proj/v_proj and timm qkv Linear layers",
            )
        self.adapts_image_tower = "image" in self.sites
        self.adapts_text_tower = "text" in self.sites
        self._entries: list[tuple[_Wrapper, _Entry]] = []

    def class_features(self, backbone: Backbone, class_names: list[str], templates: list[str]) -> torch.Tensor | None:
        if self.settings.prompts == "all" or len(templates) == 1:
            return None  # the model's own encoding of every template
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.adapts_text_tower):
            return backbone.encode_prompts(class_names, templates[:1])

    # --- wiring -----------------------------------------------------------------------------------

    def attach(self, backbone: Backbone) -> None:
        towers = backbone.towers
        for tower, sites in self.sites.items():
            module = towers.image if tower == "image" else towers.text
            for site in sites:
                by_target: dict[str, tuple[Target, dict[str, LoRAUpdate]]] = {}
                for proj in self.settings.projections:
                    target = site.targets[proj]
                    by_target.setdefault(target.path, (target, {}))[1][proj] = self.lora[tower][str(site.block)][proj]
                for target, updates in by_target.values():
                    wrapper = _wrap(module, target)
                    entry = _Entry(self, updates)
                    wrapper.entries.append(entry)
                    self._entries.append((wrapper, entry))

    def detach(self) -> None:
        for wrapper, entry in self._entries:
            wrapper.entries = [e for e in wrapper.entries if e is not entry]
            _unwrap_if_unused(wrapper)
        self._entries.clear()

    # --- inference --------------------------------------------------------------------------------

    def merge(self) -> None:
        """Fold each update into frozen copies of the weights it adapts (the backbone is not modified)."""
        with torch.no_grad():
            for wrapper, entry in self._entries:
                entry.merged = wrapper.merged_weights(entry.updates)

    def unmerge(self) -> None:
        for _, entry in self._entries:
            entry.merged = None

    def parameter_breakdown(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for tower, layers in self.lora.items():
            for updates in layers.values():
                for proj, update in updates.items():
                    n = sum(p.numel() for p in update.parameters() if p.requires_grad)
                    counts[f"{tower}.{proj}"] = counts.get(f"{tower}.{proj}", 0) + n
        return counts


def _tower_sites(backbone: Backbone, tower: str, settings: LoRASettings) -> list[AttentionSite]:
    sites = []
    for block in settings.selected_blocks(backbone, tower, "lora"):
        index = block.index
        targets = find_attention(block.module, block.name)
        if targets is None:
            continue
        missing = [p for p in settings.projections if p not in targets]
        if missing:
            raise UsageError(
                f"lora: block {index + 1} of the {tower} tower has no {'/'.join(missing)} projection",
                fix="choose other --set projections=...",
            )
        sites.append(AttentionSite(index, targets))
    return sites
