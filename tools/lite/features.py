"""Feature caching: run the frozen towers once and keep pooled features on disk (not in the repo).

Image side: EfficientNet-Lite0 pooled 1280-d features for every item and view, plus the ImageNet
classifier's weights so its logits (pseudo-captions) can be computed from the cached features.
Text side: MiniLM mean-pooled 384-d features for every caption and prompt.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from adaclip.lite import PREPROCESS_CFG

from .captions import Item
from .views import VIEW_NAMES, load_rgb, make_views


def product_transform() -> Callable[[Image.Image], torch.Tensor]:
    """The transform adaclip applies at predict time for lite: open_clip's eval transform."""
    from open_clip.transform import image_transform

    cfg = PREPROCESS_CFG
    return image_transform(cfg["size"], False, cfg["mean"], cfg["std"], cfg["resize_mode"], cfg["interpolation"])


class _ItemViews(Dataset):
    """(views tensor (V, 3, H, W), ok flag) per item; unusable images give zeros and ok=False."""

    def __init__(self, items: Sequence[Item], seed: int):
        self.items, self.seed, self.tf = items, seed, product_transform()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool]:
        img = load_rgb(self.items[index].path)
        try:
            if img is None or min(img.size) < 4:
                raise ValueError("unusable image")
            views = make_views(img, self.seed * 1_000_003 + index)
            return torch.stack([self.tf(v.convert("RGB")) for v in views]), True
        except Exception:  # noqa: BLE001  a degenerate picture (e.g. a 1-pixel line) is counted, not fatal
            return torch.zeros(len(VIEW_NAMES), 3, PREPROCESS_CFG["size"], PREPROCESS_CFG["size"]), False


class _Arrays(Dataset):
    """uint8 greyscale arrays (Fashion-MNIST) through the product transform, as a user's PNGs would go."""

    def __init__(self, images: np.ndarray):
        self.images, self.tf = images, product_transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.tf(Image.fromarray(self.images[index]).convert("RGB"))


@torch.inference_mode()
def pooled_image_features(trunk: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """EfficientNet pooled features (B, 1280), before the ImageNet classifier."""
    return trunk.forward_head(trunk.forward_features(pixels), pre_logits=True)


def cache_item_features(
    trunk: nn.Module, items: Sequence[Item], seed: int, chunk_dir: Path, chunk_size: int = 1000, batch_size: int = 16
) -> dict:
    """Pooled features (N, V, 1280) float16 for every item and view, and the usable-item mask.

    Work is saved in chunks under chunk_dir, so an interrupted run resumes where it stopped.
    """
    chunk_dir.mkdir(parents=True, exist_ok=True)
    parts, seconds = [], 0.0
    for first in range(0, len(items), chunk_size):
        path = chunk_dir / f"chunk-{first:06d}.pt"
        if not path.is_file():
            part = _extract_chunk(trunk, items, seed, range(first, min(first + chunk_size, len(items))), batch_size)
            torch.save(part, path)
        parts.append(torch.load(path, weights_only=True))
        seconds += float(parts[-1]["seconds"])
        print(f"  images: {min(first + chunk_size, len(items))}/{len(items)} items", flush=True)
    return {
        "features": torch.cat([p["features"] for p in parts]),
        "ok": torch.cat([p["ok"] for p in parts]),
        "seconds": seconds,
    }


def _extract_chunk(trunk: nn.Module, items: Sequence[Item], seed: int, indices: range, batch_size: int) -> dict:
    dataset = torch.utils.data.Subset(_ItemViews(items, seed), list(indices))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=1)
    feats, oks, start = [], [], time.time()
    for views, ok in loader:
        b, v = views.shape[:2]
        feats.append(pooled_image_features(trunk, views.flatten(0, 1)).view(b, v, -1).half())
        oks.append(ok)
    return {"features": torch.cat(feats), "ok": torch.cat(oks), "seconds": time.time() - start}


def cache_array_features(trunk: nn.Module, images: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """Pooled features (N, 1280) float16 for greyscale uint8 arrays."""
    loader = DataLoader(_Arrays(images), batch_size=batch_size, num_workers=1)
    return torch.cat([pooled_image_features(trunk, x).half() for x in loader])


@torch.inference_mode()
def text_features(
    text_tower: nn.Module, tokenizer: Callable, texts: Sequence[str], batch_size: int = 256
) -> torch.Tensor:
    """MiniLM mean-pooled features (N, 384) float32, i.e. the text tower's output before its head.

    Padding columns beyond a batch's longest text are cut: they are masked out anyway, so the result
    equals the full-length computation, only faster.
    """
    out = []
    for start in range(0, len(texts), batch_size):
        tokens = tokenizer(list(texts[start : start + batch_size]))
        length = int((tokens != 0).sum(1).max())
        tokens = tokens[:, :length]
        mask = (tokens != 0).long()
        hidden = text_tower.transformer(input_ids=tokens, attention_mask=mask)
        out.append(text_tower.pooler(hidden, mask))
    return torch.cat(out)


def items_digest(items: Sequence[Item], seed: int) -> str:
    """Cache key: the item list (paths) and the view seed; captions are re-encoded cheaply anyway."""
    h = hashlib.sha256(json.dumps([[i.path for i in items], list(VIEW_NAMES), seed]).encode())
    return h.hexdigest()[:16]
