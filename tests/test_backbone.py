from __future__ import annotations

import socket
import time

import pytest
import torch

from adaclip.backbone import create_backbone
from adaclip.device import resolve_precision, select_device
from adaclip.errors import BackboneUnavailableError, UsageError, arg
from adaclip.transforms import image_transform
from adaclip.weights import host_reachable

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
    # The fix names the option as the surface in use spells it (CLI or API: earlier tests may switch it).
    assert "unreachable" in message and arg("pretrained", "/path/to/checkpoint") in message and "\n" not in message


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


# ------------------------------------------------------------------------------------------ hf-hub:org/name

HUB_REPO = "adaclip-test/tiny-clip"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_MEAN = (0.5, 0.4, 0.3)


def make_hub_cache(root, *, weights: bool = True):
    """A Hugging Face cache holding an open_clip model repo as `open_clip.push_to_hf_hub` lays it out
    (open_clip_config.json with model_cfg + preprocess_cfg, open_clip_model.safetensors), at HUB_COMMIT
    with refs/main pointing there. Its weights are the tiny test model's, scaled, so they are not the
    seeded random ones. Returns (cache folder, the state dict)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    reference = create_backbone(TINY, "none", device="cpu")
    state = {k: (v * 1.5 if v.is_floating_point() else v).contiguous() for k, v in reference.model.state_dict().items()}
    repo = Path(root) / ("models--" + HUB_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    config = json.loads((Path(__file__).parent / "model_configs" / f"{TINY}.json").read_text())
    (snapshot / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": config, "preprocess_cfg": {"mean": HUB_MEAN, "std": [0.25, 0.25, 0.25]}})
    )
    if weights:
        save_file(state, str(snapshot / "open_clip_model.safetensors"))
    return str(root), state


def test_hf_hub_backbone_loads_from_the_cache_offline(tmp_path):
    cache, state = make_hub_cache(tmp_path / "hub")
    hub = create_backbone(f"hf-hub:{HUB_REPO}", None, device="cpu", cache_dir=cache)
    assert hub.identity.name == f"hf-hub:{HUB_REPO}" and hub.identity.pretrained == HUB_COMMIT
    assert hub.preprocess.mean == HUB_MEAN  # the repo's preprocess_cfg, as open_clip applies it
    for key, value in hub.model.state_dict().items():
        assert torch.equal(value, state[key]), key  # the repo's weights, not random ones
    # The recorded commit loads the same files again (what predict/eval do with an adapter's identity).
    again = create_backbone(f"hf-hub:{HUB_REPO}", HUB_COMMIT, device="cpu", cache_dir=cache)
    assert again.identity.mismatch(hub.identity) is None
    pixels = torch.rand(2, 3, 32, 32)
    assert torch.equal(again.encode_image(pixels), hub.encode_image(pixels))
    random = create_backbone(f"hf-hub:{HUB_REPO}", "none", device="cpu", cache_dir=cache)
    assert random.identity.pretrained == "none" and hub.identity.mismatch(random.identity) is not None


def test_hf_hub_backbone_not_in_the_cache_fails_fast(monkeypatch, tmp_path):
    cache, _ = make_hub_cache(tmp_path / "hub", weights=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for repo, missing in ((HUB_REPO, "its weights are"), ("adaclip-test/absent", "it is")):
        with pytest.raises(BackboneUnavailableError, match="HF_HUB_OFFLINE") as info:
            create_backbone(f"hf-hub:{repo}", None, device="cpu", cache_dir=cache)
        message = info.value.one_line()
        assert f"hf-hub:{repo}" in message and missing in message and "\n" not in message
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"https://127.0.0.1:{_closed_port()}")
    start = time.monotonic()
    with pytest.raises(BackboneUnavailableError, match="unreachable"):
        create_backbone(f"hf-hub:{HUB_REPO}", "v1.0", device="cpu", cache_dir=cache)
    assert time.monotonic() - start < 10


def test_hf_hub_names_and_pretrained_misuse_are_usage_errors(tmp_path):
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"x")
    with pytest.raises(UsageError, match="not a Hugging Face Hub model id"):
        create_backbone("hf-hub:no-slash", None, device="cpu")
    with pytest.raises(UsageError, match="does not apply to an hf-hub backbone"):
        create_backbone(f"hf-hub:{HUB_REPO}", str(checkpoint), device="cpu")


def test_hf_hub_backbone_through_fit_and_predict(dataset, tmp_path):
    """The adapter file records the hub backbone (repo + commit); predict finds the same files again."""
    import json

    from typer.testing import CliRunner

    import adaclip
    from adaclip.cli import app

    runner = CliRunner()
    cache, _ = make_hub_cache(tmp_path / "hub")
    out = tmp_path / "hub.adaclip"
    common = ["--device", "cpu", "--cache-dir", cache]
    fit = runner.invoke(
        app,
        ["fit", str(dataset), "-m", "linear-probe", "--epochs", "2", "-b", f"hf-hub:{HUB_REPO}", "-o", str(out)]
        + common,
    )
    assert fit.exit_code == 0, fit.output
    info = json.loads(runner.invoke(app, ["info", str(out), "--format", "json"]).stdout)
    assert info["backbone"]["name"] == f"hf-hub:{HUB_REPO}" and info["backbone"]["pretrained"] == HUB_COMMIT
    image = next((dataset / "test").rglob("*.png"))
    predicted = runner.invoke(app, ["predict", str(out), str(image), "--format", "json"] + common)
    assert predicted.exit_code == 0, predicted.output
    expected = adaclip.load(out, device="cpu", cache_dir=cache).predict([image], top_k=4)[0]
    record = json.loads(predicted.stdout)[0]
    assert [t["label"] for t in record["top_k"]] == [label for label, _ in expected.top_k]
    assert [t["score"] for t in record["top_k"]] == pytest.approx([score for _, score in expected.top_k], abs=1e-5)
    missing = runner.invoke(
        app,
        ["fit", str(dataset), "-m", "zeroshot", "-b", "hf-hub:adaclip-test/absent", "-o", str(tmp_path / "x")] + common,
    )
    assert missing.exit_code == 1 and not (tmp_path / "x").exists()
    (line,) = [line for line in missing.stderr.splitlines() if line.strip()]
    assert line.startswith("error: cannot get hf-hub:adaclip-test/absent") and "HF_HUB_OFFLINE" in line
