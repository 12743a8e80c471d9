"""RAda's mask network: the math against a literal implementation of the reference, the zero-shot start,
parameter counts, streaming, frozen-encoder training with cached features, and that it learns."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import adaclip
from adaclip.images import load_image
from adaclip.methods import make_method_config
from adaclip.methods.rada import RationalMaskConfig, RationalMaskHead
from adaclip.model import AdaptedCLIP

from .conftest import TINY

SCALE = 100.0


def literal_reference(head: RationalMaskHead, f: torch.Tensor, h: torch.Tensor, s: float):
    """The mask network written out as the reference describes it: every query repeated to B x K x D,
    three full K x K maps, joint (or row) softmax, averaged maps applied to V. Returns logits and M."""
    b, d = f.shape
    k = h.shape[0]
    heads = head.settings.heads
    hd = d // heads
    t = head.settings.temperature
    rational = f[:, None, :] * h[None, :, :]
    q1 = head.q_proj1(math.sqrt(s) * f[:, None, :].expand(b, k, d))
    q2 = head.q_proj2(math.sqrt(s) * h[None, :, :].expand(b, k, d))
    q3 = head.q_proj3(s * rational)
    key = head.k_proj(s * rational)
    value = head.v_proj(s * rational)

    def split(x):
        return x.view(b, k, heads, hd).transpose(1, 2)

    maps = []
    for q in (split(q1), split(q2), split(q3)):
        w = q @ split(key).transpose(-1, -2) / math.sqrt(hd)
        if head.settings.softmax == "joint":
            maps.append(torch.softmax(w.reshape(b, heads, -1) / t, dim=-1).view(b, heads, k, k) * k)
        else:
            maps.append(torch.softmax(w / t, dim=-1))
    attention = (maps[0] + maps[1] + maps[2]) / 3
    out = head.out_proj((attention @ split(value)).transpose(1, 2).reshape(b, k, d))
    mask = torch.relu(1 + out)
    return s * (mask * rational).sum(-1), mask


def _features(b: int, k: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(b, d, generator=g), dim=-1), F.normalize(torch.randn(k, d, generator=g), dim=-1)


def _perturbed_head(d: int, seed: int = 0, **settings) -> RationalMaskHead:
    """A head whose out-projection is no longer zero (a trained mask), so every path matters."""
    torch.manual_seed(seed)
    head = RationalMaskHead(d, RationalMaskConfig(**settings))
    torch.nn.init.normal_(head.out_proj.weight, std=0.2)
    torch.nn.init.normal_(head.out_proj.bias, std=0.2)
    return head


@pytest.mark.parametrize("softmax", ["joint", "row"])
def test_mask_network_matches_the_literal_reference(softmax):
    head = _perturbed_head(32, softmax=softmax, temperature=0.7)
    f, h = _features(5, 7, 32)
    expected_logits, expected_mask = literal_reference(head, f, h, SCALE)
    assert (expected_mask == 0).any() and (expected_mask > 1).any()  # relu active: a real test of M
    assert torch.allclose(head.mask(f, h, SCALE), expected_mask, atol=1e-5)
    assert torch.allclose(head(f, h, SCALE).logits, expected_logits, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("softmax", ["joint", "row"])
def test_untrained_mask_gives_zero_shot_logits(tiny_backbone, dataset, softmax):
    class_names = ["red circle", "green square", "blue stripes", "yellow cross"]
    templates = ["a photo of a {}."]
    zero_shot = AdaptedCLIP(tiny_backbone, make_method_config("zeroshot"), class_names, templates)
    rada = AdaptedCLIP(
        tiny_backbone, make_method_config("rada", {"mask": {"softmax": softmax}}), class_names, templates
    )
    paths = sorted((dataset / "test").rglob("*.png"))[:8]
    pixels = torch.stack([tiny_backbone.eval_transform()(load_image(p)) for p in paths])
    with torch.no_grad():
        expected = zero_shot(pixels)
        assert (rada(pixels) - expected).abs().max() <= 1e-6
    rada.train()
    out = rada.head(rada.image_features(pixels), rada.class_features(), tiny_backbone.logit_scale)
    assert (out.logits - expected).abs().max() <= 1e-6
    assert out.loss_terms["mask_reg"].item() == 0.0  # M == 1 exactly


def test_parameter_count_is_six_linear_layers(tiny_backbone):
    d = tiny_backbone.embed_dim
    model = AdaptedCLIP(tiny_backbone, make_method_config("rada"), ["a", "b", "c"], ["{}"])
    assert model.n_trainable() == 6 * (d * d + d) == 6336
    assert sum(p.numel() for p in RationalMaskHead(512).parameters()) == 6 * (512 * 512 + 512) == 1_575_936


@pytest.mark.parametrize("softmax", ["joint", "row"])
def test_streamed_chunks_equal_one_pass(softmax):
    d, k, b = 32, 24, 10
    f, h = _features(b, k, d, seed=1)
    y = torch.arange(b) % k
    results = []
    for chunk in (None, 3):  # 10 images in chunks of 3 (4 chunks, the last one short), with checkpointing
        head = _perturbed_head(d, seed=2, softmax=softmax, chunk_size=chunk).train()
        assert head.chunk_images(k) == (chunk or head.chunk_images(k))
        f_ = f.clone().requires_grad_(True)
        out = head(f_, h, SCALE)
        loss = F.cross_entropy(out.logits, y) + out.loss_terms["mask_reg"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in head.named_parameters()}
        results.append((out.logits.detach(), out.loss_terms["mask_reg"].detach(), grads, f_.grad))
    (logits_a, reg_a, grads_a, fgrad_a), (logits_b, reg_b, grads_b, fgrad_b) = results
    assert torch.allclose(logits_a, logits_b, atol=1e-5) and torch.allclose(reg_a, reg_b, atol=1e-6)
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6), name
    assert torch.allclose(fgrad_a, fgrad_b, rtol=1e-4, atol=1e-6)


def test_chunk_size_follows_the_memory_budget():
    head = RationalMaskHead(512, RationalMaskConfig(memory_budget_mb=1024))
    assert head.chunk_images(1000) == 5  # 6 maps of 8 x 1000 x 1000 floats per image: 192 MB
    assert head.chunk_images(10) >= 1000
    assert RationalMaskHead(512, RationalMaskConfig(memory_budget_mb=1)).chunk_images(1000) == 1


def test_mse_regularizer_and_alpha_zero():
    f, h = _features(4, 5, 32)
    head = _perturbed_head(32, regularizer="mse", alpha=0.5).train()
    mask = head.mask(f, h, SCALE)
    assert torch.allclose(head(f, h, SCALE).loss_terms["mask_reg"], 0.5 * (mask - 1).square().mean(), atol=1e-6)
    linf = _perturbed_head(32, alpha=0.5).train()
    expected = 0.5 * (linf.mask(f, h, SCALE) - 1).abs().flatten(1).amax(1).mean()
    assert torch.allclose(linf(f, h, SCALE).loss_terms["mask_reg"], expected, atol=1e-6)
    assert _perturbed_head(32, alpha=0.0).train()(f, h, SCALE).loss_terms == {}
    with torch.no_grad():
        assert head(f, h, SCALE).loss_terms == {}  # only while training


def test_frozen_mode_trains_only_the_mask_and_leaves_the_backbone(dataset, tiny_backbone):
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    model = AdaptedCLIP(tiny_backbone, make_method_config("rada"), ["a", "b", "c", "d"], ["{}"], seed=0)
    assert model.image_tower_frozen and model.text_tower_frozen
    model.train()
    pixels = torch.stack([tiny_backbone.eval_transform()(load_image(p)) for p in sorted(dataset.rglob("*.png"))[:6]])
    torch.nn.init.normal_(model.head.out_proj.weight, std=0.1)  # past step 0, so every layer gets a gradient
    loss, _ = model.training_loss(torch.tensor([0, 1, 2, 3, 0, 1]), pixels=pixels)
    loss.backward()
    head_params = {id(p) for p in model.head.parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.head.parameters())
    assert all(p.grad is None and not p.requires_grad for p in tiny_backbone.model.parameters())
    assert {id(p) for p in model.trainable_parameters()} == head_params
    adaclip.fit(dataset, method="rada", backbone=tiny_backbone, epochs=2, seed=0)
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cached_features_train_exactly_like_uncached(dataset, tiny_backbone):
    states = []
    for cache in ("plain", "off"):
        adapter = adaclip.fit(
            dataset,
            method="rada",
            backbone=tiny_backbone,
            seed=3,
            lr=1e-2,
            config={
                "train": {"epochs": 1, "augment": False, "feature_cache": cache, "batch_size": 8, "warmup_epochs": 0}
            },
        )
        assert adapter.metadata.training.steps == 6  # 44 images in batches of 8
        states.append(adapter.model.adapter_state())
    plain, off = states
    assert not torch.equal(plain["head.out_proj.weight"], torch.zeros_like(plain["head.out_proj.weight"]))
    for name in plain:
        assert (plain[name] - off[name]).abs().max() <= 1e-6, name


def test_fitted_mask_beats_zero_shot(dataset, tiny_backbone):
    zero_shot = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone).evaluate(dataset).accuracy
    adapter = adaclip.fit(dataset, method="rada", backbone=tiny_backbone, lr=1e-2, seed=0)
    accuracy = adapter.evaluate(dataset).accuracy
    # measured (2026-12-07, 24 test images: one image is 0.042): zero-shot 0.25 (chance; 0.35 leaves 2 images
    # of margin), rada 0.875 (seeds 0-2: 0.875, 0.875, 0.792); 0.65 is 5 images below seed 0 and 3 below
    # the worst seed, and the gain of 0.625 over zero-shot is about twice the 0.3 asked for
    assert zero_shot <= 0.35 and accuracy >= 0.65 and accuracy >= zero_shot + 0.3
    history = adapter.metadata.training.history
    assert history[-1]["loss"] < history[0]["loss"]
    assert adapter.metadata.method_config["mask"]["alpha"] == 0.1
    assert adapter.trainable_params == 6336


def test_rada_round_trip_and_new_class_names(dataset, tiny_backbone, tmp_path):
    adapter = adaclip.fit(dataset, method="rada", backbone=tiny_backbone, lr=1e-2, epochs=2, seed=0)
    path = adapter.save(tmp_path / "rada.adaclip")
    loaded = adaclip.load(path, backbone=tiny_backbone)
    paths = sorted((dataset / "test").rglob("*.png"))[:5]
    pixels = torch.stack([tiny_backbone.eval_transform()(load_image(p)) for p in paths])
    assert torch.equal(adapter.logits(pixels), loaded.logits(pixels))
    with loaded.classes(["pink dot", "grey bar", "red circle"]):  # class-agnostic: any class names
        assert loaded.logits(pixels).shape == (5, 3)


def test_info_reports_the_mask_parameters():
    from typer.testing import CliRunner

    from adaclip.cli import app

    result = CliRunner().invoke(app, ["info", "--method", "rada", "--backbone", TINY, "--format", "json"])
    assert result.exit_code == 0, result.output
    import json

    document = json.loads(result.stdout)
    assert document["trainable_params"] == 6336 and document["class_agnostic"] is True
    assert document["config"]["mask"]["softmax"] == "joint"


def test_adaring_plus_rada_starts_at_zero_shot_and_counts_both(tiny_backbone, dataset):
    paths = sorted((dataset / "test").rglob("*.png"))[:6]
    pixels = torch.stack([tiny_backbone.eval_transform()(load_image(p)) for p in paths])
    names = ["red circle", "green square", "blue stripes", "yellow cross"]
    zero_shot = AdaptedCLIP(tiny_backbone, make_method_config("zeroshot"), names, ["{}"])
    both = AdaptedCLIP(tiny_backbone, make_method_config("adaring+rada", {"blocks": "all"}), names, ["{}"])
    adaring = AdaptedCLIP(tiny_backbone, make_method_config("adaring", {"blocks": "all"}), names, ["{}"])
    with torch.no_grad():
        assert (both(pixels) - zero_shot(pixels)).abs().max() <= 1e-5
    breakdown = both.parameter_breakdown()
    assert sum(v for k, v in breakdown.items() if k.startswith("head.")) == 6336
    assert both.n_trainable() == adaring.n_trainable() + 6336
