"""Tensor-ring reconstruction, forward + backward: adaclip.tensor_ring.tr_to_tensor (two chained halves
closed by one matmul) against the direct definition as one torch.einsum over all cores, on the shapes of
AdaRing's default rings for a 768-wide tower (24 x 32 width modes, bottleneck 32, 6 layers) and a
512-wide one. One thread, fp32, median of 30 runs (a quick check of the choice made in tr_to_tensor).

    python -m benchmarks.tensor_ring
"""

from __future__ import annotations

import statistics
import time

import torch

from adaclip.tensor_ring import tr_to_tensor

SHAPES = [((24, 32, 32, 6), 2), ((24, 32, 32, 6), 4), ((24, 32, 32, 6), 8), ((16, 32, 32, 6), 8)]


def einsum_reconstruction(cores: list[torch.Tensor]) -> torch.Tensor:
    n = len(cores)
    modes, bonds = "abcdefghij"[:n], "pqrstuvwxy"
    terms = [bonds[k] + modes[k] + bonds[(k + 1) % n] for k in range(n)]
    return torch.einsum(",".join(terms) + "->" + modes, *cores)


def median_ms(reconstruct, cores: list[torch.Tensor], runs: int = 30) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        reconstruct(cores).sum().backward()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print("| shape | rank | tr_to_tensor ms | einsum ms | einsum / tr_to_tensor |")
    print("| --- | --- | --- | --- | --- |")
    for shape, rank in SHAPES:
        cores = [torch.randn(rank, n, rank, requires_grad=True) for n in shape]
        ours, einsum = median_ms(tr_to_tensor, cores), median_ms(einsum_reconstruction, cores)
        print(f"| {shape} | {rank} | {ours:.3f} | {einsum:.3f} | {einsum / ours:.1f} |")


if __name__ == "__main__":
    main()
