"""Tensor-ring (TR) decomposition: a tensor of shape (n_1, ..., n_N) stored as N cores G_k of shape
(R, n_k, R), with T[i_1, ..., i_N] = trace(G_1[:, i_1, :] @ G_2[:, i_2, :] @ ... @ G_N[:, i_N, :]).

Storage is R^2 * sum(n_k) numbers instead of prod(n_k); reconstruction is a chain of small matrix
products (`tr_to_tensor`), cheap next to a forward pass through a CLIP tower. This module is plain
torch so gradients flow to the cores; tests check it against a direct einsum and tensorly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


def _chain(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Merge consecutive cores into one (R_first, prod(n), R_last) core with plain matmuls."""
    merged = cores[0]
    for core in cores[1:]:
        left, n, bond = merged.shape
        merged = (merged.reshape(left * n, bond) @ core.reshape(bond, -1)).reshape(left, -1, core.shape[-1])
    return merged


def tr_to_tensor(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Full tensor from TR cores [(R_0, n_1, R_1), (R_1, n_2, R_2), ..., (R_{N-1}, n_N, R_0)].

    The ring is cut in two halves, each merged into one core, and closed with a single matmul over
    both bonds: cost ~ R^2 * prod(n), R times less than chaining all cores and taking a trace. Plain
    matmuls, not one torch.einsum over all cores (slower on CPU: docs/benchmarks.md; the tests keep the
    einsum as the reference).
    """
    if not cores:
        raise ValueError("need at least one core")
    shape = [c.shape[1] for c in cores]
    if len(cores) == 1:
        return torch.diagonal(cores[0], dim1=0, dim2=2).sum(-1)
    half = (len(cores) + 1) // 2
    left, right = _chain(cores[:half]), _chain(cores[half:])
    r0, n_left, r_mid = left.shape
    # full[i, j] = sum_{a, b} left[a, i, b] * right[b, j, a]
    left_flat = left.permute(1, 0, 2).reshape(n_left, r0 * r_mid)
    right_flat = right.permute(2, 0, 1).reshape(r0 * r_mid, -1)
    return (left_flat @ right_flat).reshape(shape)


def tr_num_parameters(shape: Sequence[int], rank: int) -> int:
    return rank * rank * sum(shape)


def balanced_factors(n: int, max_factor: int = 32) -> list[int]:
    """Split a width into few small modes so a ring over it stays tiny (768 -> [24, 32], 512 -> [16, 32],
    40 -> [5, 8], 24 -> [24]). Widths up to `max_factor` stay one mode; primes stay whole."""
    if n <= max_factor:
        return [n]
    best = None
    for a in range(int(math.isqrt(n)), 1, -1):
        if n % a == 0:
            best = [a, n // a]
            break
    if best is None:
        return [n]
    out: list[int] = []
    for part in best:
        out.extend(balanced_factors(part, max_factor) if part > max_factor else [part])
    return sorted(out)


class TensorRing(nn.Module):
    """A learnable tensor of `shape` in TR format with one rank `rank` on every bond.

    `init_std` is the target standard deviation of the reconstructed entries; cores are drawn so the
    product of N cores summed over R^N paths has that spread. `zero_mode` zero-initialises that core,
    making the whole tensor 0 at step 0 (the adapter starts as a no-op) while still receiving gradients.
    """

    def __init__(self, shape: Sequence[int], rank: int, init_std: float = 0.02, zero_mode: int | None = None):
        super().__init__()
        self.shape = tuple(int(n) for n in shape)
        self.rank = int(rank)
        n_cores = len(self.shape)
        # Var(entry) = R^N * sigma^(2N)  =>  sigma = (init_std^2 / R^N)^(1 / 2N)
        core_std = (init_std**2 / self.rank**n_cores) ** (1.0 / (2 * n_cores))
        self.cores = nn.ParameterList()
        for mode, n in enumerate(self.shape):
            core = torch.randn(self.rank, n, self.rank) * core_std
            if mode == zero_mode:
                core.zero_()
            self.cores.append(nn.Parameter(core))

    def forward(self) -> torch.Tensor:
        return tr_to_tensor(list(self.cores))

    def num_parameters(self) -> int:
        return tr_num_parameters(self.shape, self.rank)
