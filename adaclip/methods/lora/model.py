"""The injector: which modules of which towers and blocks get low-rank updates, and the component
that owns the updates, attaches their wrappers (layer.py) and folds them for inference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from ...errors import UsageError
from ...ui import log
from ..base import Component
from .layer import LoRAUpdate, _Entry, _Wrapper, unwrap_if_unused, unwrapped, wrap

if TYPE_CHECKING:
    from ...backbone import Backbone
    from .config import LoRASettings

PROJECTIONS: tuple[str, ...] = ("q", "k", "v", "out")


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


def find_attention(block: nn.Module, block_name: str) -> dict[str, Target] | None:
    """The attention projections inside one block, as wrap targets (paths relative to the tower)."""

    def full(path: str) -> str:
        return f"{block_name}.{path}" if path else block_name

    def linear(path: str) -> nn.Linear | None:
        try:
            module = unwrapped(block.get_submodule(path))
        except AttributeError:
            return None
        return module if isinstance(module, nn.Linear) else None

    for name, module in block.named_modules():
        base = unwrapped(module)
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
                    wrapper = wrap(module, target.path, target.kind, target.rows)
                    entry = _Entry(self, updates)
                    wrapper.entries.append(entry)
                    self._entries.append((wrapper, entry))

    def detach(self) -> None:
        for wrapper, entry in self._entries:
            wrapper.entries = [e for e in wrapper.entries if e is not entry]
            unwrap_if_unused(wrapper)
        self._entries.clear()

    # --- inference --------------------------------------------------------------------------------

    def merge(self) -> None:
        """Fold each update into frozen copies of the weights it adapts (the backbone is not modified)."""
        with torch.no_grad():
            for wrapper, entry in self._entries:
                entry.merged = wrapper.merged_weights(entry.updates)

    def unmerge(self) -> None:
        """Drop the merged copies: the backbone's own weights, never modified, apply again."""
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
