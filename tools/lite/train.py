"""LiT-style head training on cached features: towers frozen, only the projection heads learn.

Two losses share the heads:
- caption InfoNCE (CLIP's symmetric contrastive loss) on (image view, caption) pairs; captions that
  are the same string count as positives for each other, so repeated titles ("star") are not pushed apart;
- ImageNet distillation: the image tower's own 1000-class classifier acts as a pseudo-captioner. For
  every training image, the similarity of its embedding to the embedded ImageNet class prompts is
  pulled toward the classifier's class probabilities (KL). This teaches the heads the 1000 ImageNet
  concepts, far more than the clip-art captions name, from the same unlabeled images.

The modules trained are the product model's own heads (CustomTextCLIP.visual.head and text.proj), so
what is saved is exactly what build_lite_model loads.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adaclip.lite import build_towers


@dataclass
class HeadConfig:
    """Head shape and training settings (recorded in docs/lite-heads.json)."""

    embed_dim: int = 384
    image_proj: str = "linear"
    image_proj_bias: bool = True
    text_proj: str = "linear"
    steps: int = 3000
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.05
    feature_dropout: float = 0.1
    distill_weight: float = 1.0
    distill_temperature: float = 1.0
    init_logit_scale: float = math.log(1 / 0.07)
    seed: int = 0

    def model_config(self) -> dict:
        return {k: getattr(self, k) for k in ("embed_dim", "image_proj", "image_proj_bias", "text_proj")}

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainData:
    """Cached features for training, as float32 tensors."""

    image: torch.Tensor  # (N, V, 1280) item-view features, training items only
    caption_feats: torch.Tensor  # (C, 384)
    caption_item: torch.Tensor  # (C,) index into image's first axis
    caption_text_id: torch.Tensor  # (C,) equal ids for equal caption strings
    class_prompts: torch.Tensor  # (1000, T, 384) ImageNet class prompts
    teacher: torch.Tensor  # (N, V, 1000) float16 ImageNet classifier probabilities per view


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def new_model(cfg: HeadConfig) -> nn.Module:
    """A lite model with freshly initialised heads (towers loaded but unused while training heads)."""
    model = build_towers(**cfg.model_config())
    with torch.no_grad():
        model.logit_scale.fill_(cfg.init_logit_scale)
    return model


def embed_images(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Normalised image embeddings from pooled trunk features (== model.encode_image on pixels)."""
    return F.normalize(model.visual.head(pooled), dim=-1)


def embed_texts(model: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
    """Normalised text embeddings from MiniLM mean-pooled features (== model.encode_text on tokens)."""
    return F.normalize(model.text.proj(pooled), dim=-1)


def _caption_loss(
    model: nn.Module, data: TrainData, cfg: HeadConfig, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over a batch of random captions, each with a random view of its image."""
    pick = torch.randint(len(data.caption_item), (cfg.batch_size,), generator=gen)
    items = data.caption_item[pick]
    views = torch.randint(data.image.shape[1], (cfg.batch_size,), generator=gen)
    pooled = F.dropout(data.image[items, views], cfg.feature_dropout)
    text = F.dropout(data.caption_feats[pick], cfg.feature_dropout)
    img, txt = embed_images(model, pooled), embed_texts(model, text)
    logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
    same = (data.caption_text_id[pick, None] == data.caption_text_id[None, pick]) | (items[:, None] == items[None, :])
    target = same.float() / same.float().sum(1, keepdim=True)
    loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2
    return loss, (items, views)


def teacher_probabilities(
    image: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, temperature: float
) -> torch.Tensor:
    """The ImageNet classifier's softened class probabilities for every cached view, computed once."""
    flat = image.flatten(0, 1)
    probs = [
        F.softmax((flat[i : i + 4096] @ weight.T + bias) / temperature, -1).half() for i in range(0, len(flat), 4096)
    ]
    return torch.cat(probs).view(*image.shape[:2], -1)


def _distill_loss(
    model: nn.Module,
    picked: tuple[torch.Tensor, torch.Tensor],
    data: TrainData,
    cfg: HeadConfig,
    distill_scale: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """KL(classifier probabilities || softmax over embedded ImageNet class prompts) for the batch."""
    items, views = picked
    pooled, teacher = data.image[items, views], data.teacher[items, views].float()
    template = torch.randint(data.class_prompts.shape[1], (data.class_prompts.shape[0],), generator=gen)
    prompts = data.class_prompts[torch.arange(data.class_prompts.shape[0]), template]
    img = embed_images(model, F.dropout(pooled, cfg.feature_dropout))
    logits = distill_scale.exp().clamp(max=100) * img @ embed_texts(model, prompts).T
    return F.kl_div(F.log_softmax(logits, -1), teacher, reduction="batchmean")


def train_heads(data: TrainData, cfg: HeadConfig, log_every: int = 500) -> tuple[nn.Module, dict]:
    """Train the heads; returns the model (eval mode) and a small log of losses and timing."""
    seed_everything(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = new_model(cfg)
    head_params = [*model.visual.head.parameters(), *model.text.proj.parameters()]
    distill_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    optimizer = torch.optim.AdamW(
        [
            {"params": head_params, "weight_decay": cfg.weight_decay},
            {"params": [model.logit_scale, distill_scale], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _warmup_cosine(s, cfg.steps))
    model.train()
    history, start = [], time.time()
    for step in range(cfg.steps):
        clip_loss, picked = _caption_loss(model, data, cfg, gen)
        loss = clip_loss
        distill = torch.zeros(())
        if cfg.distill_weight > 0:
            distill = _distill_loss(model, picked, data, cfg, distill_scale, gen)
            loss = loss + cfg.distill_weight * distill
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            entry = {
                "step": step,
                "caption_loss": round(clip_loss.item(), 4),
                "distill_loss": round(distill.item(), 4),
                "logit_scale": round(model.logit_scale.exp().item(), 2),
            }
            history.append(entry)
            print(f"  {entry}", flush=True)
    model.eval()
    return model, {"seconds": round(time.time() - start, 1), "history": history}


def _warmup_cosine(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
