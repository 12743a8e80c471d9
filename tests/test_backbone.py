from __future__ import annotations

import socket
import time

import pytest
import torch

from adaclip.backbone import (
    create_backbone,
    host_reachable,
    image_transform,
    resolve_precision,
    select_device,
)
from adaclip.errors import BackboneUnavailableError, UsageError

from .conftest import TINY


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the with-block ends: connections are refused


def test_uncached_tag_fails_fast_when_hub_unreachable(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(BackboneUnavailableError) as info:
        create_backbone("ViT-B-16", "openai", device="cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10
    message = info.value.one_line()
    assert "unreachable" in message and "--pretrained /path/to/checkpoint" in message and "\n" not in message


def test_uncached_tag_fails_fast_in_offline_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(BackboneUnavailableError, match="HF_HUB_OFFLINE"):
        create_backbone("ViT-B-16", "openai", device="cpu", cache_dir=str(tmp_path))
    assert time.monotonic() - start < 10


def test_probe_of_unresolvable_host_returns_within_its_timeout():
    start = time.monotonic()
    assert host_reachable("adaclip-test.invalid", timeout=1.0) is False
    assert time.monotonic() - start < 3


def test_unknown_names_and_tags_are_usage_errors():
    with pytest.raises(UsageError, match="unknown backbone"):
        create_backbone("NoSuchNet-7", "none", device="cpu")
    with pytest.raises(UsageError, match="tags for ViT-B-16"):
        create_backbone("ViT-B-16", "no-such-tag", device="cpu")


def test_local_checkpoint_is_loaded_and_fingerprinted(tiny_backbone, tmp_path):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny_backbone.model.state_dict(), checkpoint)
    loaded = create_backbone(TINY, str(checkpoint), device="cpu")
    assert loaded.identity.pretrained == "tiny.pt"
    assert len(loaded.identity.checkpoint_sha256) == 64
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded.encode_image(pixels), tiny_backbone.encode_image(pixels))
    assert loaded.identity.mismatch(tiny_backbone.identity) is not None  # random vs checkpoint differ


def test_random_weights_are_announced(capsys):
    create_backbone(TINY, "none", device="cpu")
    assert "random weights" in capsys.readouterr().err


def test_device_and_precision_policy():
    assert select_device("cpu").type == "cpu"
    assert resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    with pytest.raises(UsageError):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(UsageError):
        select_device("tpu")


def test_class_prompts_are_ensembled_and_normalised(tiny_backbone):
    single = tiny_backbone.encode_prompts(["cat", "dog"], ["a photo of a {}."])
    pair = tiny_backbone.encode_prompts(["cat", "dog"], ["a photo of a {}.", "a drawing of a {}."])
    assert single.shape == pair.shape == (2, tiny_backbone.embed_dim)
    assert torch.allclose(pair.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert not torch.allclose(single, pair)


def test_transforms_give_model_sized_tensors(tiny_backbone):
    from PIL import Image

    wide = Image.new("RGB", (90, 30), (255, 0, 0))
    for transform in (tiny_backbone.eval_transform(), tiny_backbone.train_transform()):
        assert transform(wide).shape == (3, 32, 32)
    squash = image_transform(tiny_backbone.preprocess.model_copy(update={"resize_mode": "longest"}), train=False)
    assert squash(wide).shape == (3, 32, 32)
