"""Opening user images robustly: any common format and mode in, an RGB PIL image out.

One bad file must never stop a 10,000-image run, so every failure becomes an
:class:`UnreadableImageError` that callers skip and count.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UnreadableImageError
from .files import NotRegularFileError, open_regular

# Decompression-bomb guard. Pillow's own limit (~179 MP) raises; ours is lower and configurable so that a
# crafted PNG cannot take gigabytes of memory, while real 100-megapixel photos still open.
DEFAULT_MAX_PIXELS = 120_000_000


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS, data: BinaryIO | None = None) -> Image.Image:
    """Decode the first frame of ``path`` (or of ``data``, an in-memory upload that ``path`` names) as an
    8-bit RGB image, honouring EXIF orientation.

    Transparent pixels are composited over white (clip-art and emoji are drawn on transparency; black
    would change their meaning). 16-bit and float images are rescaled to 8 bits by their range.
    Raises UnreadableImageError for anything that cannot be decoded; its `kind` says why.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with contextlib.ExitStack() as stack:
                source = stack.enter_context(open_regular(path)) if data is None else data
                img = stack.enter_context(Image.open(source))
                width, height = img.size
                if width * height > max_pixels:
                    raise UnreadableImageError(
                        path,
                        f"{width}x{height} exceeds the {max_pixels:,}-pixel limit (decompression-bomb guard)",
                        kind="too_large",
                    )
                img.seek(0)  # first frame of animations and multi-page TIFFs
                if img.format == "JPEG":
                    img.draft("RGB", (1024, 1024))  # decode big JPEGs at reduced size: we downscale anyway
                img.load()
                img = ImageOps.exif_transpose(img)
                return _to_rgb(img)
    except UnreadableImageError:
        raise
    except NotRegularFileError as exc:  # FIFOs and devices are never opened for reading: they could block
        raise UnreadableImageError(path, f"not a regular file ({exc.kind})") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, f"too large (decompression-bomb guard): {exc}", kind="too_large") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(
            path, "cannot identify image file (unknown format or corrupt)", kind="not_image"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as exc:
        # Pillow reports truncated, corrupt and unknown formats through these.
        reason = str(exc) or type(exc).__name__
        raise UnreadableImageError(path, reason) from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(scaled.round().astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB") if img.mode != "RGB" else img
