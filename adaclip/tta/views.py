"""TPT's views of an image for episodic adaptation: the original and seeded random augmentations."""

from __future__ import annotations

import hashlib

import torch
from PIL import Image


def view_seed(seed: int, image: Image.Image) -> int:
    """The seed of an image's episodic views: from `seed` and the image's pixels, so the same image gets the
    same views anywhere in any folder, and two images of the same size get different crops."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=8, key=str(seed).encode())
    digest.update(f"{image.mode}{image.size}".encode())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def episodic_views(image: Image.Image, seed: int, n_views: int, eval_transform, augment) -> torch.Tensor:
    """TPT's views of one image: the original (eval transform) and `n_views - 1` random augmentations,
    drawn from a generator seeded by `view_seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(seed, image))
        return torch.stack([eval_transform(image)] + [augment(image) for _ in range(n_views - 1)])
