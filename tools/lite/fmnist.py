"""Fashion-MNIST from the Debian package dataset-fashion-mnist (MIT, Zalando), read from its idx files.

Used only for evaluation: the t10k split for the reported zero-shot number, and a fixed subset of the
train split as validation while choosing head settings (the heads never train on either).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# What the prompts say: lower-case official names, "T-shirt/top" as the plainer "t-shirt or top".
PROMPT_NAMES = (
    "t-shirt or top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)


def load_split(split: str, root: Path = FMNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels uint8 (N,)) of split "train" or "t10k"."""
    with gzip.open(root / f"{split}-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / f"{split}-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), np.uint8, offset=8)
    if len(images) != len(labels):
        raise ValueError(f"{split}: {len(images)} images but {len(labels)} labels")
    return images, labels
