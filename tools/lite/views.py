"""Image views for feature caching: each source image becomes a few deterministic variants.

The towers are frozen, so augmentation happens once, before feature extraction, as a fixed set of
views per image. Besides the clean picture, the views broaden the clip-art domain toward what users'
folders and the benchmark contain: greyscale, low resolution, dark backgrounds, and negated
intensities (Fashion-MNIST, like many scanned or product-shot datasets, stores light objects on a dark
background). These are generic image changes: no Fashion-MNIST pixel is used to make them.
"""

from __future__ import annotations

import random
import warnings

from PIL import Image, ImageOps

MAX_PIXELS = 25_000_000  # a few openclipart PNGs exceed 100 megapixels: skipped, decoding takes seconds
WORK_SIZE = 320  # decoded images are shrunk to this first; every view ends at <= 224 px anyway

VIEW_NAMES = ("clean", "negative_lowres", "random")


def load_rgb(path: str, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image | None:
    """Decode, composite transparency onto `background`, shrink to WORK_SIZE; None if unusable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette-transparency and decompression-bomb warnings
        try:
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    return None
                img.draft("RGB", (WORK_SIZE, WORK_SIZE))
                rgba = img.convert("RGBA")
        except (OSError, ValueError, Image.DecompressionBombError):
            return None
    rgba.thumbnail((WORK_SIZE, WORK_SIZE), Image.Resampling.LANCZOS)
    canvas = Image.new("RGBA", rgba.size, background + (255,))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def pad_square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre on a square canvas so the product's resize+centre-crop keeps the whole object."""
    side = max(img.size)
    canvas = Image.new("RGB", (side, side), fill)
    canvas.paste(img, ((side - img.width) // 2, (side - img.height) // 2))
    return canvas


def trim(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Crop to the bounding box of non-background pixels (kept whole when nothing differs)."""
    diff = ImageOps.invert(img.convert("L")) if background == (255, 255, 255) else img.convert("L")
    box = diff.point(lambda v: 255 if v > 12 else 0).getbbox()
    return img.crop(box) if box else img


def negative_lowres(img: Image.Image, size: int = 28) -> Image.Image:
    """Greyscale, trimmed, longest side `size`, centred on black, intensities negated: light on dark."""
    grey = trim(img, (255, 255, 255)).convert("L")
    grey.thumbnail((size, size), Image.Resampling.LANCZOS)
    canvas = Image.new("L", (size, size), 255)
    canvas.paste(grey, ((size - grey.width) // 2, (size - grey.height) // 2))
    return ImageOps.invert(canvas).convert("RGB")


def random_view(img: Image.Image, rng: random.Random) -> Image.Image:
    """A mild random mix: crop, flip, greyscale, background change via negation, low resolution."""
    w, h = img.size
    scale = rng.uniform(0.65, 1.0)
    cw, ch = min(w, max(8, int(w * scale))), min(h, max(8, int(h * scale)))
    x0, y0 = rng.randint(0, w - cw), rng.randint(0, h - ch)
    out = img.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        out = ImageOps.mirror(out)
    if rng.random() < 0.5:
        out = ImageOps.grayscale(out).convert("RGB")
    if rng.random() < 0.3:
        out = ImageOps.invert(out)
    out = pad_square(out, out.getpixel((0, 0)))
    if rng.random() < 0.6:
        low = rng.choice((24, 32, 48, 64, 96))
        out = out.resize((low, low), Image.Resampling.BICUBIC)
    return out


def make_views(img: Image.Image, seed: int) -> list[Image.Image]:
    """The VIEW_NAMES variants of one decoded image (deterministic given seed)."""
    rng = random.Random(seed)
    return [pad_square(img, (255, 255, 255)), negative_lowres(img, rng.choice((28, 28, 32, 40))), random_view(img, rng)]
