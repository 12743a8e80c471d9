"""Inference across processes: `torchrun --nproc-per-node N -m adaclip predict|eval|tta ...`.

The rule is one for every command: the inputs are cut into batches of `batch_size` in input order,
exactly the batches one process makes, and rank r takes batches r, r+N, r+2N, ... (whole batches,
not single images r, r+N, ...). A batch is therefore encoded with the same images in the same rows
as in a single process, which keeps features bit-identical (a kernel's results may depend on how
many rows it is given), and the ranks' results concatenated in rank order are already in input
order: no sort, no per-rank part files.

The inputs advance in rounds of N batches. In each round every rank encodes its batch and the
results are all-gathered (gloo or NCCL; objects, so paths and skipped images travel too), so every
rank holds the round's results in input order and memory stays at one round. A stream (`predict -`)
is read by rank 0 alone and its paths broadcast each round. What comes after encoding -- metrics,
TTA's mask updates, TDA's caches -- runs on every rank on the gathered results, in input order, so
each rank ends with what one process computes; only rank 0 writes stdout and files.

A single process (world size 1) runs none of this: its code paths are unchanged.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch

from .distributed import SINGLE, DistContext, context_from_env, init_distributed

T = TypeVar("T")
R = TypeVar("R")


def active_context(device: torch.device | None = None) -> DistContext:
    """The torchrun environment, its process group joined (a no-op for a single process)."""
    ctx = context_from_env()
    if ctx.enabled:
        init_distributed(ctx, device or torch.device("cpu"))
    return ctx


def owned_indices(n: int, batch_size: int, ctx: DistContext = SINGLE) -> list[int]:
    """Positions (of `n` inputs) this rank encodes: its batches r, r+N, ... of `batch_size` inputs."""
    if not ctx.enabled:
        return list(range(n))
    return [
        i
        for start in range(ctx.rank * batch_size, n, ctx.world * batch_size)
        for i in range(start, min(start + batch_size, n))
    ]


def rounds(items: Iterable[T], batch_size: int, ctx: DistContext) -> Iterator[list[tuple[int, T]]]:
    """Per round, this rank's batch as (input position, item) pairs; empty when the inputs ran out
    before its turn. Every rank sees the same number of rounds. A sequence is sliced on every rank; any
    other iterable (stdin) is read by rank 0 only and each round broadcast, with a failure to read it
    (a missing path) re-raised on every rank."""
    span = batch_size * ctx.world
    if isinstance(items, Sequence):
        for start in range(0, len(items), span):
            mine = range(start + ctx.rank * batch_size, min(start + (ctx.rank + 1) * batch_size, len(items)))
            yield [(i, items[i]) for i in mine]
        return
    iterator = iter(items) if ctx.is_main else None
    start = 0
    while True:
        message: tuple[str, object]
        if ctx.is_main:
            try:
                message = ("items", list(itertools.islice(iterator, span)))  # type: ignore[arg-type]
            except Exception as exc:  # noqa: BLE001 - every rank stops with rank 0's error
                message = ("error", exc)
        else:
            message = ("", None)
        kind, value = ctx.broadcast_object(message)
        if kind == "error":
            raise value  # type: ignore[misc]
        chunk: list = value  # type: ignore[assignment]
        if not chunk:
            return
        mine = range(ctx.rank * batch_size, min((ctx.rank + 1) * batch_size, len(chunk)))
        yield [(start + i, chunk[i]) for i in mine]
        start += len(chunk)


def map_in_order(
    items: Iterable[T],
    batch_size: int,
    process: Callable[[list[tuple[int, T]]], list[R]],
    ctx: DistContext,
) -> Iterator[list[R]]:
    """`process` each rank's batch of every round; yield every batch's results (one list per batch,
    rank 0's first), in input order, on every rank. `process` must return its batch's results in its
    batch's order; it sees (input position, item) pairs and is not called for an empty batch."""
    for part in rounds(items, batch_size, ctx):
        local = process(part) if part else None
        for results in ctx.all_gather_object(local):
            if results is not None:
                yield results
