"""Build (or reuse) the on-disk feature cache that head training reads."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from adaclip.lite import build_tokenizer, build_towers

from .captions import Item
from .features import cache_array_features, cache_item_features, items_digest, text_features
from .fmnist import load_split

FMNIST_VAL_SIZE = 2000  # fixed subset of the train split, for choosing settings


def towers_for_caching() -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(image trunk with ImageNet classifier, text tower, tokenizer), eval mode, channels_last trunk."""
    model = build_towers(embed_dim=64, keep_classifier=True).eval()
    trunk = model.visual.trunk.to(memory_format=torch.channels_last)
    return trunk, model.text, build_tokenizer()


def image_cache(cache_dir: Path, items: list[Item], seed: int, trunk: torch.nn.Module) -> dict:
    """Item-view features, classifier weights, Fashion-MNIST val/test features; computed once."""
    digest = items_digest(items, seed)
    path = cache_dir / f"images-{digest}.pt"
    if path.is_file():
        print(f"feature cache: reusing {path}")
        return torch.load(path, weights_only=True)
    print(f"feature cache: extracting image features for {len(items)} items -> {path}")
    data = cache_item_features(trunk, items, seed, cache_dir / f"chunks-{digest}")
    started = time.time()
    train_x, _ = load_split("train")
    val_idx = np.random.RandomState(seed).choice(len(train_x), FMNIST_VAL_SIZE, replace=False)
    data["fmnist_val_index"] = torch.from_numpy(val_idx)
    data["fmnist_val"] = cache_array_features(trunk, train_x[val_idx])
    test_x, _ = load_split("t10k")
    data["fmnist_test"] = cache_array_features(trunk, test_x)
    data["fmnist_seconds"] = time.time() - started
    data["classifier_weight"] = trunk.classifier.weight.detach().clone()
    data["classifier_bias"] = trunk.classifier.bias.detach().clone()
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def text_cache(cache_dir: Path, texts: list[str], text_tower: torch.nn.Module, tokenizer) -> dict[str, torch.Tensor]:
    """MiniLM features for each distinct text, reusing an earlier cache for texts seen before."""
    path = cache_dir / "texts.pt"
    known: dict[str, torch.Tensor] = torch.load(path, weights_only=False) if path.is_file() else {}
    todo = sorted({t for t in texts if t not in known})
    if todo:
        print(f"text cache: encoding {len(todo)} new texts")
        for text, feat in zip(todo, text_features(text_tower, tokenizer, todo), strict=True):
            known[text] = feat.clone()
        cache_dir.mkdir(parents=True, exist_ok=True)
        torch.save(known, path)
    return {t: known[t] for t in texts}
