"""Image transforms: a `PreprocessConfig` (size, mean/std, interpolation, resize mode) -> the function
that turns a PIL image into model input, for training and for evaluation.

`PreprocessConfig` itself is defined in adaclip.identity (adapter-file headers record it and are read
without torch); it is re-exported here, beside what uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torchvision import transforms as T

from .identity import PreprocessConfig

__all__ = ["PreprocessConfig", "image_transform", "preprocess_from_open_clip"]

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def preprocess_from_open_clip(cfg: Mapping[str, Any]) -> PreprocessConfig:
    """open_clip's `model.visual.preprocess_cfg` as a PreprocessConfig (its size may be an (h, w) pair)."""
    size = cfg["size"] if isinstance(cfg["size"], int) else int(cfg["size"][0])
    return PreprocessConfig(
        size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )


def image_transform(cfg: PreprocessConfig, *, train: bool, min_scale: float = 0.5) -> Callable:
    """PIL RGB image -> normalised tensor. Training adds random resized crop + horizontal flip (the
    CoOp / CLIP-LoRA few-shot recipe); evaluation resizes and centre-crops like open_clip."""
    interp = _INTERPOLATION[cfg.interpolation]
    normalize = T.Normalize(cfg.mean, cfg.std)
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(cfg.size, scale=(min_scale, 1.0), interpolation=interp, antialias=True),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                normalize,
            ]
        )
    if cfg.resize_mode == "squash":
        resize: list = [T.Resize((cfg.size, cfg.size), interpolation=interp, antialias=True)]
    elif cfg.resize_mode == "longest":
        resize = [_ResizeLongestPad(cfg.size, interp)]
    else:
        resize = [T.Resize(cfg.size, interpolation=interp, antialias=True), T.CenterCrop(cfg.size)]
    return T.Compose([*resize, T.ToTensor(), normalize])


class _ResizeLongestPad:
    """Resize so the longest side fits, then pad to a square (open_clip's `longest` mode)."""

    def __init__(self, size: int, interp):
        self.size = size
        self.interp = interp

    def __repr__(self) -> str:  # parameters, not identity: equal transforms share encodings (inference)
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interp})"

    def __call__(self, img):
        w, h = img.size
        scale = self.size / max(w, h)
        img = T.functional.resize(img, [max(1, round(h * scale)), max(1, round(w * scale))], self.interp)
        w, h = img.size
        left, top = (self.size - w) // 2, (self.size - h) // 2
        return T.functional.pad(img, [left, top, self.size - w - left, self.size - h - top], fill=0)
