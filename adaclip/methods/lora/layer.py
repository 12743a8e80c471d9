"""The LoRA layers: a low-rank update, and the wrappers that apply updates to a backbone module.

The backbone is shared (several models may hold components on it, and a zero-shot reference pass
runs it with every component bypassed), so a wrapper never writes into the module it wraps. It
stands in for the module in its parent, exposes the original's parameters, buffers and submodules
under their own names (the backbone's `state_dict()` and `parameters()` do not change) without
registering the original itself, and applies the updates of the components that are active.

* `LinearWrapper` (an `nn.Linear`; each projection owns a row range of its weight, e.g. timm's fused
  qkv): `y = W x + b + s * B A dropout(x)`, per token, as PEFT's `lora.Linear` computes it.
* `MultiheadAttentionWrapper` (`nn.MultiheadAttention`, whose q/k/v live in one packed
  `in_proj_weight` and whose `out_proj` forward is never called): PEFT's approach. The update is
  added to the packed weight (`W + s B A` in the rows of q, k or v) and the ORIGINAL module is called
  with that weight in place of its own (as `torch.func.functional_call` would), so attention stays
  PyTorch's own code and fused kernels, whatever arguments the caller passes. One case cannot be
  folded into a weight: a dropout on the branch input acting (training with dropout > 0), whose mask
  differs per token. CLIP-LoRA's recipe trains so (PEFT skips that dropout on this layer); then the
  projections are computed here, per token, and attention by `F.scaled_dot_product_attention`, for
  the self-attention call open_clip's blocks make.

`merge()` folds the updates into frozen copies of the weights; the wrapped module's own tensors are
never modified, so `unmerge()` (dropping the copies) restores it bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import UsageError

if TYPE_CHECKING:
    from .model import LoRAAdapters


class LoRAUpdate(nn.Module):
    """x -> scale * B A dropout(x), held as A, B and scale: `_project` applies every update of a layer in
    one GEMM (`low` gives A dropout(x)). B starts at zero, so the update starts at exactly zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, scale: float, dropout: float):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default init, as in CLIP-LoRA / PEFT
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def low(self, x: torch.Tensor) -> torch.Tensor:
        """A dropout(x): the rank-r activations the update's B (times scale) maps to the output."""
        return F.linear(self.dropout(x), self.lora_A)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * self.lora_B @ self.lora_A

    @property
    def drops_input(self) -> bool:
        """Whether the branch's input dropout acts now (so the update cannot be folded into a weight)."""
        return isinstance(self.dropout, nn.Dropout) and self.dropout.training and self.dropout.p > 0


class _Entry:
    """One component's updates at one wrapped module."""

    def __init__(self, component: LoRAAdapters, updates: dict[str, LoRAUpdate]):
        self.component = component
        self.updates = updates  # projection -> update (plain dict: owned and saved by the component)
        self.merged: dict[str, torch.Tensor] | None = None  # tensor name -> frozen merged weight


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
        """Frozen copies of the adapted weights with `updates` folded in, by tensor name in the module."""
        raise NotImplementedError


def _project(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: dict[str, tuple[int, int]],
    updates: dict[str, list[LoRAUpdate]],
) -> torch.Tensor:
    """F.linear(x, weight, bias) plus each projection's low-rank updates, placed in its rows.

    All updates go through one GEMM that accumulates into the base output: their rank-r activations
    side by side (N, sum r) times their scaled B's stacked as columns of a (d_out, sum r) matrix, each
    in its projection's rows, so the output is written once instead of once per update, padding and
    concatenation of (N, d) tensors."""
    y = F.linear(x, weight, bias)
    placed = [(rows[proj], update) for proj in rows for update in updates.get(proj, ())]
    if not placed:
        return y
    d_out = weight.shape[0]
    lows = torch.cat([update.low(x) for _, update in placed], dim=-1)
    columns = torch.cat(
        [F.pad(update.lora_B * update.scale, (0, 0, start, d_out - end)) for (start, end), update in placed], dim=1
    )
    lows = lows.reshape(-1, lows.shape[-1]).to(y.dtype)
    return torch.addmm(y.reshape(-1, d_out), lows, columns.t().to(y.dtype)).view(y.shape)


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

    def adapted_weights(self, updates: dict[str, list[LoRAUpdate]]) -> dict[str, torch.Tensor]:
        """`in_proj_weight` and `out_proj.weight` plus their updates (differentiable in A and B)."""
        mha = self.original
        weights: dict[str, torch.Tensor] = {}
        if any(proj in updates for proj in self.in_rows):
            d = mha.embed_dim
            blocks = []
            for proj in self.in_rows:
                deltas = [update.delta_weight() for update in updates.get(proj, ())]
                blocks.append(sum(deltas[1:], deltas[0]) if deltas else mha.in_proj_weight.new_zeros(d, d))
            weights["in_proj_weight"] = mha.in_proj_weight + torch.cat(blocks).to(mha.in_proj_weight.dtype)
        if updates.get("out"):
            out = mha.out_proj.weight
            weights["out_proj.weight"] = out + sum(u.delta_weight() for u in updates["out"]).to(out.dtype)
        return weights

    def merged_weights(self, updates: dict[str, LoRAUpdate]) -> dict[str, torch.Tensor]:
        mha = self.original
        with torch.no_grad():
            weights = self.adapted_weights({proj: [update] for proj, update in updates.items()})
        weights.setdefault("in_proj_weight", mha.in_proj_weight.detach().clone())
        weights.setdefault("out_proj.weight", mha.out_proj.weight.detach().clone())
        return weights

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs: Any) -> Any:
        active = self._active()
        if not active:
            return self.original(query, key, value, **kwargs)
        merged, updates = self._weights_and_updates(active)
        if merged is None and any(update.drops_input for group in updates.values() for update in group):
            return self._forward_per_token(query, key, value, updates, **kwargs)
        weights = merged if merged is not None else self.adapted_weights(updates)
        with _parameters_replaced(self.original, weights):
            return self.original(query, key, value, **kwargs)

    def _forward_per_token(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        updates: dict[str, list[LoRAUpdate]],
        attn_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        key_padding_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        average_attn_weights: bool = True,
    ) -> tuple[torch.Tensor, None]:
        """Self-attention with each branch's dropout applied per token (training only): the projections
        as `_project` computes them, attention as nn.MultiheadAttention computes it with need_weights=False."""
        mha = self.original
        if not (query is key and key is value) or query.dim() != 3 or need_weights or key_padding_mask is not None:
            raise UsageError(
                "lora: training with dropout on nn.MultiheadAttention supports self-attention called with "
                "need_weights=False and no key_padding_mask (open_clip's blocks)",
                fix="--set dropout=0 (the updates are then folded into the packed weights, for any call)",
            )
        # Projections are per token: run them on the input's own memory layout (a transposed view would
        # turn each GEMM into a batched one), then arrange q, k, v as (N, heads, L, head_dim).
        heads = mha.num_heads
        if mha.batch_first:
            batch, length, width = query.shape
            to_heads = (2, 0, 3, 1, 4)  # (N, L, 3, heads, hd) -> (3, N, heads, L, hd)
        else:
            length, batch, width = query.shape
            to_heads = (2, 1, 3, 0, 4)  # (L, N, 3, heads, hd) -> (3, N, heads, L, hd)
        qkv = _project(query, mha.in_proj_weight, mha.in_proj_bias, self.in_rows, updates)
        q, k, v = qkv.view(*query.shape[:2], 3, heads, width // heads).permute(to_heads).unbind(0)
        if is_causal:
            attn_mask = None  # a hint that attn_mask is causal: the kernel applies it, as in nn.MultiheadAttention
        else:
            attn_mask = F._canonical_mask(
                mask=attn_mask,
                mask_name="attn_mask",
                other_type=None,
                other_name="",
                target_type=q.dtype,
                check_other=False,
            )
        if attn_mask is not None:  # (L, S) or (N * heads, L, S) -> broadcastable to (N, heads, L, S)
            attn_mask = (
                attn_mask.view(1, 1, length, -1) if attn_mask.dim() == 2 else attn_mask.view(batch, heads, length, -1)
            )
        dropout_p = mha.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        out = out.transpose(1, 2) if mha.batch_first else out.permute(2, 0, 1, 3)  # back to the input's layout
        out = _project(out.reshape(-1, width), mha.out_proj.weight, mha.out_proj.bias, {"out": (0, width)}, updates)
        return out.view(query.shape), None


@contextmanager
def _parameters_replaced(module: nn.Module, tensors: dict[str, torch.Tensor]) -> Iterator[None]:
    """For the duration, `module` sees `tensors` in place of its parameters of those (dotted) names and
    autograd reaches them. This is what torch.func.functional_call does, which refuses to run while
    torch.jit traces the module (ONNX export); the entries are replaced in place, so the parameters'
    order, hence the backbone's state_dict() order, never changes."""
    saved = []
    try:
        for name, tensor in tensors.items():
            owner_path, _, attribute = name.rpartition(".")
            owner = module.get_submodule(owner_path)
            saved.append((owner, attribute, owner._parameters[attribute]))
            owner._parameters[attribute] = tensor
        yield
    finally:
        for owner, attribute, parameter in reversed(saved):
            owner._parameters[attribute] = parameter


def wrap(tower: nn.Module, path: str, kind: str, rows: dict[str, tuple[int, int]]) -> _Wrapper:
    """The wrapper of the module at `path` in `tower` (installed in its parent on first use)."""
    module = tower.get_submodule(path)
    if isinstance(module, _Wrapper):
        return module
    parent_path, _, attribute = path.rpartition(".")
    parent = tower.get_submodule(parent_path) if parent_path else tower
    if kind == "mha":
        wrapper: _Wrapper = MultiheadAttentionWrapper(module, parent, attribute)
    else:
        wrapper = LinearWrapper(module, parent, attribute, rows)
    setattr(parent, attribute, wrapper)
    return wrapper


def unwrap_if_unused(wrapper: _Wrapper) -> None:
    if not wrapper.entries and getattr(wrapper.parent, wrapper.attribute, None) is wrapper:
        setattr(wrapper.parent, wrapper.attribute, wrapper.original)


def unwrapped(module: nn.Module) -> nn.Module:
    return module.original if isinstance(module, _Wrapper) else module
