"""The embedded offline backbone on real images: it loads offline, its zero-shot predictions are real,
adaptation improves them, and AdaRing's block injection covers its CNN and BERT towers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import adaclip
from adaclip.methods import make_method_config
from adaclip.model import AdaptedCLIP

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
CLASSES = SAMPLE / "classes.json"


@pytest.fixture(scope="module")
def lite():
    return adaclip.create_backbone("lite", device="cpu")


@pytest.fixture(scope="module")
def zero_shot_accuracy(lite) -> float:
    adapter = adaclip.fit(SAMPLE, "zeroshot", backbone=lite, classes=CLASSES, templates="ensemble", val_split=0)
    return adapter.evaluate(SAMPLE / "test").accuracy


def test_lite_is_a_frozen_clip_with_the_shared_interface(lite):
    assert lite.identity.name == "lite" and lite.embed_dim == 384
    assert lite.preprocess.size == 224 and lite.preprocess.mean == (0.5, 0.5, 0.5)
    assert not any(p.requires_grad for p in lite.model.parameters())
    texts = lite.encode_prompts(["shoe", "bag"], ["a photo of a {}."])
    images = lite.encode_image(torch.zeros(2, 3, 224, 224))
    assert texts.shape == (2, 384) and images.shape == (2, 384)
    assert 1 < lite.logit_scale <= 100


def test_lite_zero_shot_is_real(zero_shot_accuracy):
    # measured: 0.325 on the 200 sample_data test images (chance 0.10)
    assert zero_shot_accuracy >= 0.25


@pytest.mark.slow
def test_rada_on_lite_beats_zero_shot_clearly(lite, zero_shot_accuracy, tmp_path):
    adapter = adaclip.fit(SAMPLE, "rada", backbone=lite, classes=CLASSES, templates="ensemble", val_split=0, seed=0)
    accuracy = adapter.evaluate(SAMPLE / "test").accuracy
    # measured: 0.735 with the default recipe (zero-shot 0.325; `make demo` runs the same fit)
    assert accuracy >= zero_shot_accuracy + 0.2, (zero_shot_accuracy, accuracy)
    loaded = adaclip.load(adapter.save(tmp_path / "rada.adaclip"))
    assert loaded.backbone.identity == lite.identity
    assert loaded.evaluate(SAMPLE / "test").accuracy == accuracy


def test_lite_text_tower_runs_without_the_padding_columns_and_gives_the_same_embeddings(lite):
    prompts = ["a photo of a bag.", "a blurry photo of an ankle boot that is made of leather."]
    tokens = lite.tokenize(prompts)
    assert tokens.shape == (2, 64)
    longest = int((tokens != lite.text_padding_id).sum(dim=1).max())
    assert longest < 20
    seen = []
    hook = lite.model.text.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    try:
        trimmed = lite.encode_text(tokens)
    finally:
        hook.remove()
    assert seen == [(2, longest)]
    with torch.no_grad():
        full = lite.model.encode_text(tokens)  # the tower on all 64 columns, as open_clip calls it
    torch.testing.assert_close(trimmed, full, rtol=0, atol=1e-5)
    no_padding = lite.tokenize(["word " * 80])  # cut at the context length: no padding column to drop
    assert (no_padding != lite.text_padding_id).all()
    torch.testing.assert_close(lite.encode_text(no_padding), lite.model.encode_text(no_padding), rtol=0, atol=0)


def test_adaring_injects_into_the_cnn_and_bert_towers(lite):
    config = make_method_config("adaring")  # default blocks last50%: image blocks 5-9 of 9, text layers 4-6 of 6
    model = AdaptedCLIP(lite, config, ["sandal", "sneaker", "bag"], ["a photo of a {}."])
    component = model.components[0]
    groups = sorted(component.groups)
    assert any(g.startswith("image_w") for g in groups) and "text_w384" in groups
    image_widths = {int(g.split("_w")[1]) for g in groups if g.startswith("image_")}
    assert image_widths == {112, 192}  # EfficientNet-Lite0's residual blocks 5-9 (stages of width 112, 192)
    text_layers = [p for p in component.placements if p[0] == "text"]
    assert [p[1] for p in text_layers] == [f"transformer.encoder.layer.{i}" for i in (3, 4, 5)]
    zero_shot = AdaptedCLIP(lite, make_method_config("zeroshot"), model.class_names, model.templates)
    pixels = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), zero_shot(pixels), rtol=0, atol=1e-6)
    model.train()
    loss, _ = model.training_loss(torch.tensor([0, 2]), pixels=pixels)
    loss.backward()
    assert all(p.grad is not None for p in model.trainable_parameters())
    assert all(p.grad is None for p in lite.model.parameters())
