"""Finding the blocks of an encoder and adding a parallel branch to them, without editing the model.

A *block* is any module whose output has the same shape as its input, found among the children of
`nn.ModuleList` / `nn.Sequential` containers (the outermost such modules, in execution order, holding
at least one weight matrix or kernel). That
covers open_clip's ViT and text transformer blocks, Hugging Face encoder layers (tuple outputs) and
the residual blocks of timm CNNs alike, so adapters written against this interface run on any tower.
Blocks are discovered by one probe forward pass with hooks, and grouped by width (the channel size:
the last axis of token tensors, axis 1 of convolutional feature maps).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.hooks import RemovableHandle

if TYPE_CHECKING:
    from .backbone import Backbone


@dataclass(frozen=True)
class Block:
    name: str  # qualified name within the tower
    module: nn.Module
    index: int  # 0-based position among the tower's blocks, in execution order
    width: int
    channel_dim: int  # -1 for (B, N, D) token tensors, 1 for (B, C, H, W) feature maps


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _output_tensor(output: Any) -> torch.Tensor | None:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    return None


def channel_dim_of(shape: torch.Size) -> int:
    return 1 if len(shape) == 4 else -1


def discover_blocks(tower: nn.Module, probe: Callable[[], Any]) -> list[Block]:
    """Run `probe()` (a forward pass through `tower`) and return the tower's blocks in execution order."""
    candidates: dict[nn.Module, str] = {}
    for name, module in tower.named_modules():
        if isinstance(module, (nn.ModuleList, nn.Sequential)):
            for child_name, child in module.named_children():
                # A block computes something: it holds a matrix or kernel (norms and activations alone,
                # also shape-preserving, do not count).
                if any(p.ndim >= 2 for p in child.parameters()):
                    candidates.setdefault(child, f"{name}.{child_name}" if name else child_name)
    seen: list[tuple[nn.Module, torch.Size]] = []
    handles: list[RemovableHandle] = []

    def record(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        x, y = _first_tensor(args, kwargs), _output_tensor(output)
        if x is not None and y is not None and x.shape == y.shape and x.dim() >= 2:
            if all(m is not module for m, _ in seen):
                seen.append((module, x.shape))

    entry_order: list[nn.Module] = []

    def enter(module: nn.Module, args: tuple, kwargs: dict) -> None:
        entry_order.append(module)

    try:
        for module in candidates:
            handles.append(module.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(module.register_forward_hook(record, with_kwargs=True))
        with torch.no_grad():
            probe()
    finally:
        for handle in handles:
            handle.remove()
    shapes = dict(seen)
    chosen = [m for m in dict.fromkeys(entry_order) if m in shapes]
    names = {m: candidates[m] for m in chosen}
    # Outermost only: drop blocks nested inside another chosen block.
    outer = [m for m in chosen if not any(names[m].startswith(names[o] + ".") for o in chosen if o is not m)]
    blocks = []
    for index, module in enumerate(outer):
        shape = shapes[module]
        dim = channel_dim_of(shape)
        blocks.append(Block(names[module], module, index, int(shape[dim]), dim))
    return blocks


def tower_blocks(backbone: Backbone, tower: Literal["image", "text"]) -> list[Block]:
    """The blocks of one of the backbone's towers, found by a probe pass (a zero image, or one prompt)."""
    towers = backbone.towers
    if tower == "image":
        return discover_blocks(towers.image, lambda: backbone.model.encode_image(backbone.sample_image()))
    tokens = backbone.tokenize(["a photo of a thing."])
    return discover_blocks(towers.text, lambda: backbone.model.encode_text(tokens.to(backbone.device)))


class BlockSelection(BaseModel):
    """Which towers and blocks a block-injecting method adapts; methods inherit these settings."""

    model_config = ConfigDict(extra="forbid")

    towers: Literal["both", "image", "text"] = Field("both", description="which encoders get adapted")
    blocks: str = Field(
        "all", description="1-based blocks of each tower: all, lastN, lastP% (second-half = last50%), 5-12, 1,3,9-12"
    )
    image_blocks: str | None = Field(None, description="overrides `blocks` for the image tower")
    text_blocks: str | None = Field(None, description="overrides `blocks` for the text tower")

    def selected_towers(self) -> list[Literal["image", "text"]]:
        return [t for t in ("image", "text") if self.towers in ("both", t)]

    def selected_blocks(self, backbone: Backbone, tower: Literal["image", "text"], method: str) -> list[Block]:
        """The tower's blocks this selection names, in execution order (UsageError for a bad spec)."""
        from .errors import UsageError

        blocks = tower_blocks(backbone, tower)
        spec = (self.image_blocks if tower == "image" else self.text_blocks) or self.blocks
        try:
            return [blocks[i] for i in parse_block_selection(spec, len(blocks))]
        except ValueError as exc:
            raise UsageError(f"{method} {tower} blocks: {exc}") from None


def parse_block_selection(spec: str, n_blocks: int) -> list[int]:
    """`all`, `none`, `5-12`, `1,3,7-9`, `last4`, `last50%` (or `second-half`) -> sorted 0-based indices
    (1-based in the spec), clipped to the tower's block count. `lastP%` is relative to the tower's depth
    (the last ceil(P% of n) blocks, at least one), so one spec means the same part of a 6-block and a
    12-block tower; the absolute forms name the same blocks whatever the depth."""
    spec = spec.strip().lower().replace(" ", "")
    if spec in ("all", "*"):
        return list(range(n_blocks))
    if spec in ("none", ""):
        return []
    if spec == "second-half":
        spec = "last50%"
    match = re.fullmatch(r"last(\d+(?:\.\d+)?)%", spec)
    if match:
        percent = float(match.group(1))
        if not 0 < percent <= 100:
            raise ValueError(f"bad block selection {spec!r}: lastP% needs 0 < P <= 100")
        count = max(1, math.ceil(n_blocks * percent / 100 - 1e-9)) if n_blocks else 0
        return list(range(n_blocks - count, n_blocks))
    match = re.fullmatch(r"last(\d+)", spec)
    if match:
        return list(range(max(0, n_blocks - int(match.group(1))), n_blocks))
    chosen: set[int] = set()
    for part in spec.split(","):
        bounds = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not bounds:
            raise ValueError(
                f"bad block selection {spec!r}: use all, none, lastN, lastP%, or 1-based numbers/ranges like 5-12"
            )
        lo = int(bounds.group(1))
        hi = int(bounds.group(2) or lo)
        if lo < 1 or hi < lo:
            raise ValueError(f"bad block range {part!r} in {spec!r}")
        chosen.update(i - 1 for i in range(lo, hi + 1) if i <= n_blocks)
    return sorted(chosen)


class ParallelBranchHook:
    """Adds `branch(block_input)` to a block's output (first element when the block returns a tuple)."""

    def __init__(self, block: nn.Module, branch: Callable[[torch.Tensor], torch.Tensor | None]):
        self.branch = branch
        self.handle = block.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        x = _first_tensor(args, kwargs)
        delta = self.branch(x) if x is not None else None
        if delta is None:
            return output
        if isinstance(output, torch.Tensor):
            return output + delta.to(output.dtype)
        first = output[0] + delta.to(output[0].dtype)
        return type(output)((first, *output[1:])) if isinstance(output, tuple) else [first, *output[1:]]

    def remove(self) -> None:
        self.handle.remove()
