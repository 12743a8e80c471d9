"""Evaluation of lite heads: held-out caption retrieval and Fashion-MNIST zero-shot accuracy.

`zero_shot_accuracy` and `retrieval_recall_at_1` work on cached pooled features through the model's
own head modules (fast, used while training). `end_to_end_zero_shot` runs the shipped model on pixels
through the product transform and tokenizer, to check that the cached path and the product agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from .train import embed_images, embed_texts

# The ensemble reported in docs/lite-heads.json (the brief's list).
REPORT_TEMPLATES = (
    "a photo of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a photo of the {}, a type of clothing.",
    "a product photo of a {}.",
)


def prompts_for(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    return [t.format(name) for name in class_names for t in templates]


@torch.no_grad()
def class_embeddings(model: nn.Module, prompt_feats: torch.Tensor, n_classes: int) -> torch.Tensor:
    """CLIP's ensemble: normalised mean of each class's normalised template embeddings (K, D)."""
    per_prompt = embed_texts(model, prompt_feats)
    return torch.nn.functional.normalize(per_prompt.view(n_classes, -1, per_prompt.shape[-1]).mean(1), dim=-1)


@torch.no_grad()
def cached_predictions(
    model: nn.Module, image_feats: torch.Tensor, prompt_feats: torch.Tensor, n_classes: int
) -> np.ndarray:
    """Zero-shot class indices for cached pooled image features and cached prompt features."""
    classes = class_embeddings(model, prompt_feats, n_classes)
    return (embed_images(model, image_feats.float()) @ classes.T).argmax(-1).numpy()


def zero_shot_accuracy(
    model: nn.Module, image_feats: torch.Tensor, labels: np.ndarray, prompt_feats: torch.Tensor, n_classes: int
) -> dict:
    """Top-1 accuracy and per-class recall of zero-shot classification on cached pooled features."""
    pred = cached_predictions(model, image_feats, prompt_feats, n_classes)
    per_class = [float((pred[labels == k] == k).mean()) for k in range(n_classes)]
    return {"accuracy": float((pred == labels).mean()), "per_class_recall": [round(r, 3) for r in per_class]}


@torch.no_grad()
def retrieval_recall_at_1(
    model: nn.Module, image_feats: torch.Tensor, caption_feats: torch.Tensor, caption_ids: torch.Tensor
) -> dict:
    """Held-out image<->caption R@1; a retrieved caption with the same text as the true one counts."""
    img, txt = embed_images(model, image_feats.float()), embed_texts(model, caption_feats)
    sim = img @ txt.T
    i2t = caption_ids[sim.argmax(1)] == caption_ids
    t2i = caption_ids[sim.argmax(0)] == caption_ids
    return {
        "image_to_text": float(i2t.float().mean()),
        "text_to_image": float(t2i.float().mean()),
        "n": len(caption_ids),
    }


@torch.no_grad()
def end_to_end_zero_shot(
    model: nn.Module,
    tokenizer,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 64,
) -> dict:
    """Zero-shot accuracy of the full model on uint8 greyscale arrays via the product transform."""
    from PIL import Image

    from .features import product_transform

    tf = product_transform()
    text = model.encode_text(tokenizer(prompts_for(class_names, templates)), normalize=True)
    classes = torch.nn.functional.normalize(text.view(len(class_names), len(templates), -1).mean(1), dim=-1)
    preds, start = [], time.time()
    for i in range(0, len(images), batch_size):
        pixels = torch.stack([tf(Image.fromarray(a).convert("RGB")) for a in images[i : i + batch_size]])
        preds.append((model.encode_image(pixels, normalize=True) @ classes.T).argmax(-1))
    pred = torch.cat(preds).numpy()
    return {
        "accuracy": float((pred == labels).mean()),
        "n": len(labels),
        "seconds": round(time.time() - start, 1),
        "predictions": pred,
    }


def image_throughput(model: nn.Module, batch_size: int = 32, repeats: int = 5, size: int = 224) -> float:
    """Image-tower images/s at fp32 under torch.inference_mode (one warm-up batch first)."""
    x = torch.randn(batch_size, 3, size, size)
    with torch.inference_mode():
        model.encode_image(x)
        start = time.perf_counter()
        for _ in range(repeats):
            model.encode_image(x)
    return batch_size * repeats / (time.perf_counter() - start)
