from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from adaclip.errors import UnreadableImageError
from adaclip.images import load_image


@pytest.mark.parametrize("ext", ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff"])
def test_formats_open_as_rgb(tmp_path, ext):
    path = tmp_path / f"img.{ext}"
    Image.new("RGB", (16, 12), (200, 10, 10)).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (16, 12)
    r, g, b = img.getpixel((8, 6))
    assert r > 150 and g < 60 and b < 60


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert load_image(path).getpixel((0, 0))[0] > 200


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (10, 20)


def test_modes_cmyk_16bit_palette_alpha(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    assert load_image(tmp_path / "cmyk.jpg").mode == "RGB"
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    deep = np.asarray(load_image(tmp_path / "deep.png"))
    assert deep.min() == 0 and deep.max() == 255  # rescaled by its range, not clipped white
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # over white
    Image.new("P", (8, 8), 3).save(tmp_path / "pal.gif")
    assert load_image(tmp_path / "pal.gif").mode == "RGB"


def test_broken_files_raise_unreadable(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableImageError):
        load_image(empty)
    good = tmp_path / "good.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(good)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UnreadableImageError):
        load_image(truncated)
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a jpeg")
    with pytest.raises(UnreadableImageError):
        load_image(text)


def test_wrong_extension_still_decodes(tmp_path):
    path = tmp_path / "actually_png.jpg"
    Image.new("RGB", (4, 4), (1, 2, 3)).save(path, format="PNG")
    assert load_image(path).getpixel((0, 0)) == (1, 2, 3)


def test_decompression_bomb_guard(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (3000, 3000)).save(path)
    with pytest.raises(UnreadableImageError, match="pixel limit"):
        load_image(path, max_pixels=1_000_000)
    assert load_image(path, max_pixels=10_000_000).size == (3000, 3000)
