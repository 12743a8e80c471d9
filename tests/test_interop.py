"""Exports checked by the receiving library itself: open_clip loads the folded state dict, Hugging Face
PEFT loads the LoRA folder onto the same open_clip model, onnxruntime runs the ONNX graph; each must give
adaclip's own features / logits on real images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

import adaclip
from adaclip.cli import app

from .conftest import TINY

runner = CliRunner()
open_clip = pytest.importorskip("open_clip")


def real_images(dataset: Path) -> list[Path]:
    return sorted((dataset / "test").glob("*/*.png"))


def pixels_of(adapter, paths: list[Path]) -> torch.Tensor:
    transform = adapter.backbone.eval_transform()
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def adaclip_features(adapter, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised image features through the adapted tower, and the normalised class features."""
    model = adapter.model
    with torch.no_grad(), model._tower_pass():
        image = adapter.backbone.encode_image(pixels)
    with torch.no_grad():
        classes = model.class_features()
    return image, classes


def open_clip_class_features(model, name: str, class_names, templates) -> torch.Tensor:
    """CLIP's prompt ensemble, written here with open_clip's own tokenizer and encoder."""
    tokenizer = open_clip.get_tokenizer(name)
    rows = []
    for class_name in class_names:
        tokens = tokenizer([t.format(class_name) for t in templates])
        rows.append(F.normalize(F.normalize(model.encode_text(tokens), dim=-1).mean(dim=0), dim=-1))
    return torch.stack(rows)


def export(*args: str) -> dict:
    result = runner.invoke(app, ["export", *args, "--summary", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def randomised_lora(dataset: Path, tmp_path: Path, projections: list[str], **backbone) -> Path:
    """A LoRA adapter whose updates are far from zero (B starts at zero; one short fit moves it little)."""
    backbone = backbone or {"backbone": TINY, "pretrained": "none"}
    adapter = adaclip.fit(dataset, "lora", epochs=0, device="cpu", projections=projections, **backbone)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in adapter.model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return adapter.save(tmp_path / "lora.adaclip")


@pytest.fixture(scope="module")
def lora_file(dataset, tmp_path_factory) -> Path:
    return randomised_lora(dataset, tmp_path_factory.mktemp("lora"), ["q", "k", "v"])


def assert_open_clip_reproduces(adapter_file: Path, dataset: Path, tmp_path: Path) -> None:
    state = tmp_path / "model.safetensors"
    summary = export(str(adapter_file), "--format", "open_clip", "-o", str(state))
    assert summary["open_clip_model"] == TINY and state.is_file()
    model, _, _ = open_clip.create_model_and_transforms(TINY, pretrained=str(state))
    model.eval()
    adapter = adaclip.load(adapter_file, device="cpu")
    pixels = pixels_of(adapter, real_images(dataset))
    ours_image, ours_classes = adaclip_features(adapter, pixels)
    with torch.no_grad():
        theirs_image = model.encode_image(pixels)
        theirs_classes = open_clip_class_features(model, TINY, adapter.class_names, adapter.model.templates)
        zero_shot_image = adaclip.create_backbone(TINY, "none", device="cpu").encode_image(pixels)
    assert (ours_image - zero_shot_image).abs().max() > 1e-2  # the adapter changed the tower: a real check
    torch.testing.assert_close(theirs_image, ours_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_classes, ours_classes, atol=1e-5, rtol=1e-5)
    theirs_predictions = (F.normalize(theirs_image, dim=-1) @ theirs_classes.t()).argmax(dim=-1)
    assert torch.equal(theirs_predictions, adapter.logits(pixels).argmax(dim=-1))


def test_open_clip_loads_folded_lora(lora_file, dataset, tmp_path):
    assert_open_clip_reproduces(lora_file, dataset, tmp_path)


def test_open_clip_loads_folded_lora_on_an_hf_hub_backbone(dataset, tmp_path, monkeypatch):
    """open_clip ignores `pretrained` for hf-hub names, so the export's recipe loads the repo's model and
    then our file; run exactly as printed, it must give adaclip's adapted features."""
    import huggingface_hub.constants

    from .test_backbone import HUB_REPO, make_hub_cache

    cache, _ = make_hub_cache(tmp_path / "hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)  # the user's default cache
    adapter_file = randomised_lora(dataset, tmp_path, ["q", "k", "v"], backbone=f"hf-hub:{HUB_REPO}")
    state = tmp_path / "model.safetensors"
    summary = export(str(adapter_file), "--format", "open_clip", "-o", str(state))
    assert summary["open_clip_model"] == f"hf-hub:{HUB_REPO}"
    namespace = {"open_clip": open_clip}
    exec(summary["load_with"], namespace)  # the recipe as the user would paste it
    model = namespace["model"].eval()
    adapter = adaclip.load(adapter_file, device="cpu")
    pixels = pixels_of(adapter, real_images(dataset))
    ours_image, _ = adaclip_features(adapter, pixels)
    with torch.no_grad():
        theirs_image = model.encode_image(pixels)
        repo_image = adapter.backbone.encode_image(pixels)  # the hub weights without the adapter
    assert (ours_image - repo_image).abs().max() > 1e-2  # the adapter changed the tower: a real check
    torch.testing.assert_close(theirs_image, ours_image, atol=1e-5, rtol=1e-5)


def test_open_clip_loads_full_finetune(dataset, tmp_path):
    adapter = adaclip.fit(dataset, "full-ft", backbone=TINY, pretrained="none", epochs=1, lr=1e-2, device="cpu")
    path = adapter.save(tmp_path / "ft.adaclip")
    assert_open_clip_reproduces(path, dataset, tmp_path)


def test_open_clip_export_refuses_what_does_not_fold(dataset, tmp_path):
    adapter = adaclip.fit(dataset, "adaring", backbone=TINY, pretrained="none", epochs=0, device="cpu", blocks="all")
    ring = adapter.save(tmp_path / "ring.adaclip")
    out = tmp_path / "ring.safetensors"
    result = runner.invoke(app, ["export", str(ring), "--format", "open_clip", "-o", str(out)])
    assert result.exit_code == 2 and not out.exists()
    assert "cannot be exported as open_clip" in result.stderr and "--format onnx" in result.stderr
    peft = runner.invoke(app, ["export", str(ring), "--format", "peft", "-o", str(tmp_path / "peft")])
    assert peft.exit_code == 2 and "only LoRA adapters" in peft.stderr


def test_peft_loads_lora_onto_the_same_open_clip_model(dataset, tmp_path):
    peft = pytest.importorskip("peft")
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    lora = randomised_lora(dataset, tmp_path, ["q", "v"])  # k missing: a zero block between q's and v's
    base_file = tmp_path / "base.safetensors"
    zero_shot = adaclip.zero_shot_adapter(["a", "b"], backbone=TINY, pretrained="none", device="cpu")
    zero_shot.save(tmp_path / "zs.adaclip")
    export(str(tmp_path / "zs.adaclip"), "--format", "open_clip", "-o", str(base_file))
    folder = tmp_path / "peft"
    summary = export(str(lora), "--format", "peft", "-o", str(folder))
    assert summary["r"] == 6 and summary["adapted_modules"] == 7  # 4 image + 3 text attention layers

    base = open_clip.create_model(TINY, pretrained=str(base_file)).eval()
    model = peft.PeftModel.from_pretrained(base, str(folder)).eval()
    written = load_file(str(folder / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(written)  # every tensor found its layer, and no layer was left untrained
    for key, tensor in written.items():
        assert torch.equal(loaded[key], tensor), key

    adapter = adaclip.load(lora, device="cpu")
    pixels = pixels_of(adapter, real_images(dataset))
    ours_image, ours_classes = adaclip_features(adapter, pixels)
    with torch.no_grad():
        theirs_image = model.encode_image(pixels)
        theirs_classes = open_clip_class_features(model, TINY, adapter.class_names, adapter.model.templates)
    torch.testing.assert_close(theirs_image, ours_image, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(theirs_classes, ours_classes, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.disable_adapter():
        assert (model.encode_image(pixels) - ours_image).abs().max() > 1e-2  # PEFT's layers did the work


def test_peft_export_refuses_the_out_projection(dataset, tmp_path):
    lora = randomised_lora(dataset, tmp_path, ["q", "k", "v", "out"])
    result = runner.invoke(app, ["export", str(lora), "--format", "peft", "-o", str(tmp_path / "peft")])
    assert result.exit_code == 2 and "out_proj update twice" in result.stderr
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize(
    ("method", "settings"),
    [
        ("lora", {}),
        ("adaring", {"blocks": "all"}),
        ("adaring", {"blocks": "all", "training_cache": True}),
        ("rada", {}),
        ("tip-adapter", {}),
    ],
)
def test_onnxruntime_matches_adaclip_logits(dataset, tmp_path, method, settings):
    ort = pytest.importorskip("onnxruntime")
    adapter = adaclip.fit(dataset, method, backbone=TINY, pretrained="none", epochs=1, device="cpu", **settings)
    path = adapter.save(tmp_path / f"{method}.adaclip")
    onnx_file = tmp_path / f"{method}.onnx"
    summary = export(str(path), "--format", "onnx", "-o", str(onnx_file))
    assert summary["classes"] == 4
    labels = json.loads(Path(summary["labels"]).read_text())
    assert labels["class_names"] == adapter.class_names and labels["preprocess"]["size"] == 32

    onnx = pytest.importorskip("onnx")
    onnx.checker.check_model(onnx.load(str(onnx_file)), full_check=True)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    pixels = pixels_of(adapter, real_images(dataset))  # 24 real images: a batch size the export never saw
    (logits,) = session.run(["logits"], {"pixels": pixels.numpy()})
    ours = adaclip.load(path, device="cpu").logits(pixels)
    torch.testing.assert_close(torch.from_numpy(logits), ours, atol=1e-4, rtol=1e-4)


def test_export_checks_before_writing(lora_file, tmp_path):
    taken = tmp_path / "taken.onnx"
    taken.write_bytes(b"precious")
    result = runner.invoke(app, ["export", str(lora_file), "--format", "onnx", "-o", str(taken)])
    assert result.exit_code == 2 and "already exists" in result.stderr and taken.read_bytes() == b"precious"
    unknown = runner.invoke(app, ["export", str(lora_file), "--format", "tflite", "-o", str(tmp_path / "x")])
    assert unknown.exit_code == 2 and "open_clip, peft, onnx" in unknown.stderr
