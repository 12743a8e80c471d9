"""Shared fixtures: tiny random-weight open_clip backbones (configs in tests/model_configs, registered
through ADACLIP_MODEL_CONFIGS exactly as a user would register a custom architecture) and small
synthetic image folders whose classes a model can actually learn."""

from __future__ import annotations

import atexit
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
os.environ["ADACLIP_MODEL_CONFIGS"] = str(TESTS / "model_configs")
os.environ.setdefault("ADACLIP_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach for a model hub
# The feature cache is on, as for users, but in a folder of this session's own: never the user's cache,
# and every session starts cold.
os.environ["ADACLIP_CACHE"] = tempfile.mkdtemp(prefix="adaclip-test-features-")
atexit.register(shutil.rmtree, os.environ["ADACLIP_CACHE"], ignore_errors=True)

import torch  # noqa: E402
from PIL import Image  # noqa: E402

# One thread: the test towers are tiny, and on a 2-core machine a second thread costs more in
# synchronisation than it gains (measured: full suite 50 s vs 76 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def api_wording_after_each_test():
    """An in-process CLI call switches error fixes to option names for the rest of the process
    (adaclip.errors.use_cli_names); put the Python API's wording back so no test depends on the order."""
    yield
    from adaclip import errors

    errors._surface["cli"] = False


TINY = "adaclip-test-vit"
TINY_OTHER = "adaclip-test-vit-b"

# Colours far apart in RGB, with a shape cue: even random-weight towers separate them, so a trained
# adapter must beat zero-shot (which, with random text weights, is near chance).
PALETTE = {
    "red_circle": ((220, 40, 40), "circle"),
    "green_square": ((40, 200, 60), "square"),
    "blue_stripes": ((40, 60, 220), "stripes"),
    "yellow_cross": ((230, 210, 40), "cross"),
}


def draw(colour: tuple[int, int, int], shape: str, rng: random.Random, size: int = 40) -> Image.Image:
    jitter = tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in colour)
    background = tuple(rng.randint(0, 60) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    px = img.load()
    cx, cy, r = size // 2 + rng.randint(-3, 3), size // 2 + rng.randint(-3, 3), size // 3
    for y in range(size):
        for x in range(size):
            dx, dy = x - cx, y - cy
            inside = {
                "circle": dx * dx + dy * dy <= r * r,
                "square": abs(dx) <= r and abs(dy) <= r,
                "stripes": (y // 4) % 2 == 0,
                "cross": abs(dx) <= 3 or abs(dy) <= 3,
            }[shape]
            if inside:
                px[x, y] = jitter
    return img


def make_folder(root: Path, per_class: int, seed: int, classes: dict | None = None, fmt: str = "png") -> Path:
    rng = random.Random(seed)
    for name, (colour, shape) in (classes or PALETTE).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            draw(colour, shape, rng).save(folder / f"img_{i:03d}.{fmt}")
    return root


@pytest.fixture(scope="session")
def dataset(tmp_path_factory) -> Path:
    """root/{train,test}/<class>/: 12 train and 6 test images for each of 4 learnable classes."""
    root = tmp_path_factory.mktemp("shapes")
    make_folder(root / "train", 12, seed=1)
    make_folder(root / "test", 6, seed=2)
    return root


@pytest.fixture(scope="session")
def tiny_backbone():
    from adaclip import create_backbone

    return create_backbone(TINY, "none", device="cpu")


@pytest.fixture(scope="session")
def other_backbone():
    from adaclip import create_backbone

    return create_backbone(TINY_OTHER, "none", device="cpu")


def meta_backbone(name: str):
    """An open_clip architecture with its parameters on the meta device: shapes without memory or
    random init (ViT-B-16 would take seconds and ~600 MB), for tests that only count parameters."""
    import open_clip

    from adaclip.backbone.openclip import wrap_model

    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
    model.logit_scale = torch.nn.Parameter(torch.tensor(4.6052))  # the Backbone reads it as a number
    return wrap_model(model, open_clip.get_tokenizer(name), name, "none", None, None, torch.device("meta"), "fp32")
