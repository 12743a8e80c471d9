"""Full fine-tuning (full-ft) and RAda-FT: the towers train, are saved in the adapter file and come back
on load; the mask starts at zero-shot; bypassing needs the kept reference."""

from __future__ import annotations

import pytest
import torch

import adaclip
from adaclip.images import load_image
from adaclip.methods import make_method_config
from adaclip.methods.full_finetune import text_to_image_loss
from adaclip.model import AdaptedCLIP
from adaclip.training import make_optimizer

from .conftest import TINY

CLASSES = ["red circle", "green square", "blue stripes", "yellow cross"]


@pytest.fixture
def fresh_backbone():
    """Full fine-tuning changes its backbone in place: never hand it the shared session backbone."""
    return adaclip.create_backbone(TINY, "none", device="cpu")


def _pixels(backbone, dataset, n=6):
    paths = sorted((dataset / "test").rglob("*.png"))[:n]
    return torch.stack([backbone.eval_transform()(load_image(p)) for p in paths])


def test_full_ft_round_trip_restores_the_tuned_towers(dataset, fresh_backbone, tmp_path):
    original = {k: v.clone() for k, v in fresh_backbone.model.state_dict().items()}
    adapter = adaclip.fit(dataset, method="full-ft", backbone=fresh_backbone, epochs=2, lr=1e-3, seed=0)
    tuned = fresh_backbone.model.state_dict()
    changed = [k for k in original if not torch.equal(original[k], tuned[k])]
    assert any(k.startswith("visual.") for k in changed) and any(k.startswith("transformer.") for k in changed)
    assert "logit_scale" not in changed  # the temperature stays frozen
    breakdown = adapter.model.parameter_breakdown()
    assert breakdown["components.0.image_tower"] > 0 and breakdown["components.0.text_tower"] > 0
    path = adapter.save(tmp_path / "ft.adaclip")
    pixels = _pixels(fresh_backbone, dataset)
    expected = adapter.logits(pixels)

    loaded = adaclip.load(path, backbone=adaclip.create_backbone(TINY, "none", device="cpu"))
    assert torch.equal(loaded.logits(pixels), expected)
    restored = loaded.backbone.model.state_dict()
    assert all(torch.equal(restored[k], tuned[k]) for k in tuned)  # the weights went into the new backbone
    # and through the CLI's path (load builds the backbone itself)
    assert torch.equal(adaclip.load(path).logits(pixels), expected)


@pytest.mark.parametrize("softmax", ["joint", "row"])
def test_rada_ft_starts_at_zero_shot(dataset, fresh_backbone, softmax):
    pixels = _pixels(fresh_backbone, dataset)
    zero_shot = AdaptedCLIP(fresh_backbone, make_method_config("zeroshot"), CLASSES, ["a photo of a {}."])
    with torch.no_grad():
        expected = zero_shot(pixels)
    config = make_method_config("rada-ft", {"mask": {"softmax": softmax}})
    model = AdaptedCLIP(fresh_backbone, config, CLASSES, ["a photo of a {}."])
    assert not model.image_tower_frozen and not model.text_tower_frozen
    with torch.no_grad():
        assert (model(pixels) - expected).abs().max() <= 1e-6
    model.detach_components()
    assert not any(p.requires_grad for p in fresh_backbone.model.parameters())


def test_rada_ft_trains_towers_and_mask(dataset, fresh_backbone):
    before = {k: v.clone() for k, v in fresh_backbone.model.state_dict().items()}
    adapter = adaclip.fit(dataset, method="rada-ft", backbone=fresh_backbone, epochs=3, lr=1e-4, seed=0)
    state = adapter.model.adapter_state()
    assert state["head.out_proj.weight"].abs().sum() > 0  # the mask moved away from identity
    assert any(not torch.equal(before[k], v) for k, v in fresh_backbone.model.state_dict().items())
    history = adapter.metadata.training.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert adapter.metadata.method_config["objective"] == "contrastive"
    d = fresh_backbone.embed_dim
    assert adapter.model.parameter_breakdown()["head.q_proj1.weight"] == d * d


def test_mask_learns_at_its_own_rate(fresh_backbone):
    model = AdaptedCLIP(fresh_backbone, make_method_config("rada-ft"), CLASSES, ["{}"])
    cfg = model.config.train
    optimizer = make_optimizer(model.trainable_parameters(), cfg, model.lr_scales())
    rates = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            rates[id(p)] = group["lr"]
    assert {rates[id(p)] for p in model.head.parameters()} == {cfg.lr * 100}
    assert {rates[id(p)] for p in model.components[0].parameters() if p.requires_grad} == {cfg.lr}


def test_bypass_needs_the_reference(dataset, fresh_backbone):
    pixels = _pixels(fresh_backbone, dataset)
    with torch.no_grad():
        original = torch.nn.functional.normalize(fresh_backbone.encode_image(pixels), dim=-1)
    without = AdaptedCLIP(fresh_backbone, make_method_config("full-ft"), CLASSES, ["{}"])
    assert torch.equal(without.zero_shot_image_features(pixels), original)  # untouched towers: fine
    saved = fresh_backbone.model.visual.proj.detach().clone()
    with torch.no_grad():
        fresh_backbone.model.visual.proj.mul_(1.01)  # stands in for an optimiser step
    with pytest.raises(RuntimeError, match="keep_reference"):
        without.zero_shot_image_features(pixels)
    assert without.components[0].enabled  # the failed bypass left it enabled
    without.detach_components()
    with torch.no_grad():
        fresh_backbone.model.visual.proj.copy_(saved)

    model = AdaptedCLIP(fresh_backbone, make_method_config("full-ft", {"keep_reference": True}), CLASSES, ["{}"])
    with torch.no_grad():
        for p in fresh_backbone.model.visual.parameters():
            p.add_(0.05)  # stands in for training
    tuned = model.image_features(pixels)
    assert not torch.allclose(tuned, original)
    assert torch.equal(model.zero_shot_image_features(pixels), original)  # the frozen copy answers
    assert torch.equal(model.image_features(pixels), tuned)  # and the tuned towers are back


def test_text_to_image_loss_spreads_the_target_over_same_class_images():
    logits = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 3.0]])  # 3 images x 2 classes
    labels = torch.tensor([0, 0, 1])
    column0 = torch.log_softmax(logits[:, 0], 0)
    column1 = torch.log_softmax(logits[:, 1], 0)
    expected = (-(0.5 * column0[0] + 0.5 * column0[1]) - column1[2]) / 2
    assert torch.allclose(text_to_image_loss(logits, labels), expected)
