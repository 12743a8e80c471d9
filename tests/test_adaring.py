"""AdaRing: tensor rings, block discovery, no-op start, gradients, learning, files, merged export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import adaclip
from adaclip.errors import UsageError
from adaclip.inject import ParallelBranchHook, discover_blocks, parse_block_selection
from adaclip.methods import FeatureSet, make_method_config
from adaclip.model import AdaptedCLIP
from adaclip.tensor_ring import TensorRing, balanced_factors, tr_num_parameters, tr_to_tensor

from .conftest import meta_backbone

ALL_BLOCKS = {"blocks": "all"}
# Default settings on ViT-B/16 (blocks last50%: 6 of 12 in each tower), counted on the meta device.
EXPECTED_VIT_B16 = 30_246


def _pixels(backbone, n=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=generator)


# ------------------------------------------------------------------------------------------ tensor rings


def _einsum_reference(cores):
    """Direct definition: T[i1..iN] = trace(G1[:, i1, :] ... GN[:, iN, :]), one einsum."""
    letters = "ijklmn"
    n = len(cores)
    bonds = "abcdefg"
    terms = [f"{bonds[k]}{letters[k]}{bonds[(k + 1) % n]}" for k in range(n)]
    return torch.einsum(",".join(terms) + "->" + letters[:n], *cores)


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 4), (4, 3, 5, 2), (6, 4, 3, 2, 5)])
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_ring_reconstruction_matches_einsum_and_tensorly(shape, rank):
    import tensorly as tl
    from tensorly.tr_tensor import tr_to_tensor as tensorly_tr_to_tensor

    generator = torch.Generator().manual_seed(len(shape) * 10 + rank)
    cores = [torch.randn(rank, n, rank, dtype=torch.float64, generator=generator) for n in shape]
    ours = tr_to_tensor(cores)
    assert ours.shape == shape
    torch.testing.assert_close(ours, _einsum_reference(cores), rtol=1e-10, atol=1e-10)
    with tl.backend_context("pytorch"):
        torch.testing.assert_close(ours, tensorly_tr_to_tensor(cores), rtol=1e-10, atol=1e-10)


def test_ring_gradients_match_einsum_reference():
    cores = [torch.randn(3, n, 3, dtype=torch.float64, requires_grad=True) for n in (4, 5, 2)]
    weights = torch.randn(4, 5, 2, dtype=torch.float64)
    grads = torch.autograd.grad((tr_to_tensor(cores) * weights).sum(), cores)
    expected = torch.autograd.grad((_einsum_reference(cores) * weights).sum(), cores)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_ring_init_spread_and_zero_core():
    ring = TensorRing([24, 32, 32, 8], rank=4, init_std=768**-0.5)
    std = ring().std().item()
    assert 0.5 * 768**-0.5 < std < 2.0 * 768**-0.5
    zero = TensorRing([32, 24, 32, 8], rank=4, zero_mode=3)
    assert torch.count_nonzero(zero()) == 0
    zero().sum().backward()  # a zero core still gets gradient from the others
    assert zero.cores[3].grad.abs().sum() > 0


def test_balanced_factors():
    assert balanced_factors(768) == [24, 32]
    assert balanced_factors(512) == [16, 32]
    assert balanced_factors(40) == [5, 8]
    assert balanced_factors(24) == [24]
    assert balanced_factors(1031) == [1031]  # prime: stays whole
    for n in (768, 512, 1280, 384, 1024):
        factors = balanced_factors(n)
        assert torch.tensor(factors).prod().item() == n and max(factors) <= 40


# ------------------------------------------------------------------------------------------ blocks


class _TupleLayer(nn.Module):
    """Hugging Face style: returns a tuple whose first element keeps the input shape."""

    def __init__(self, width):
        super().__init__()
        self.linear = nn.Linear(width, width)

    def forward(self, hidden, mask=None):
        return (hidden + self.linear(hidden), "attentions")


class _TupleTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.layers = nn.ModuleList(_TupleLayer(8) for _ in range(3))

    def forward(self, x):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, mask=None)[0]
        return h


def test_discovery_on_tuple_returning_layers_and_hooks():
    tower = _TupleTower()
    x = torch.randn(2, 7, 5)
    blocks = discover_blocks(tower, lambda: tower(x))
    assert [b.name for b in blocks] == ["layers.0", "layers.1", "layers.2"]
    assert all(b.width == 8 and b.channel_dim == -1 for b in blocks)
    before = tower(x)
    hook = ParallelBranchHook(blocks[2].module, lambda h: torch.ones_like(h))
    assert torch.allclose(tower(x), before + 1)
    hook.remove()
    assert torch.equal(tower(x), before)


def test_discovery_on_cnn_residual_blocks():
    import timm

    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    blocks = discover_blocks(net, lambda: net(torch.zeros(1, 3, 64, 64)))
    widths = [b.width for b in blocks]
    # stride-1 BasicBlocks keep their shape; the first block of stages 2-4 downsamples and is skipped
    assert widths == [64, 64, 128, 256, 512]
    assert all(b.channel_dim == 1 for b in blocks)


def test_discovery_on_open_clip_towers(tiny_backbone):
    towers = tiny_backbone.towers
    image = discover_blocks(towers.image, lambda: tiny_backbone.model.encode_image(tiny_backbone.sample_image()))
    tokens = tiny_backbone.tokenize(["a photo"])
    text = discover_blocks(towers.text, lambda: tiny_backbone.model.encode_text(tokens))
    assert [b.width for b in image] == [64] * 4 and [b.width for b in text] == [48] * 3
    assert image[0].name == "transformer.resblocks.0"


def test_block_selection_syntax():
    assert parse_block_selection("5-12", 12) == list(range(4, 12))
    assert parse_block_selection("5-12", 6) == [4, 5]
    assert parse_block_selection("all", 3) == [0, 1, 2]
    assert parse_block_selection("1,3,9-10", 12) == [0, 2, 8, 9]
    assert parse_block_selection("last2", 5) == [3, 4]
    with pytest.raises(ValueError):
        parse_block_selection("5..7", 12)


def test_relative_block_selection_follows_tower_depth():
    """`lastP%` takes the last ceil(P% of n) blocks of each tower, so the default adapts the second half of
    lite's 6-block text tower (3 blocks, where the old absolute 5-12 gave 2) and of ViT-B/16's 12."""
    assert parse_block_selection("last50%", 12) == list(range(6, 12))
    assert parse_block_selection("last50%", 6) == [3, 4, 5]
    assert parse_block_selection("last50%", 5) == [2, 3, 4]
    assert parse_block_selection("second-half", 3) == [1, 2]
    assert parse_block_selection("last100%", 4) == [0, 1, 2, 3]
    assert parse_block_selection("last1%", 12) == [11]
    assert parse_block_selection("last50%", 0) == []
    for bad in ("last0%", "last150%", "last%"):
        with pytest.raises(ValueError):
            parse_block_selection(bad, 12)


def test_default_blocks_are_the_second_half_of_each_tower(tiny_backbone):
    model = AdaptedCLIP(tiny_backbone, make_method_config("adaring"), ["a", "b"], ["{}"])
    placements = model.components[0].placements
    image = [name for tower, name, *_ in placements if tower == "image"]
    text = [name for tower, name, *_ in placements if tower == "text"]
    assert image == ["transformer.resblocks.2", "transformer.resblocks.3"]  # of 4
    assert len(text) == 2  # of 3


# ------------------------------------------------------------------------------------------ method


def test_zero_init_equals_zero_shot(tiny_backbone):
    classes = ["red circle", "green square", "blue stripes"]
    zero_shot = AdaptedCLIP(tiny_backbone, make_method_config("zeroshot"), classes, ["a photo of a {}."])
    adapted = AdaptedCLIP(tiny_backbone, make_method_config("adaring", ALL_BLOCKS), classes, ["a photo of a {}."])
    pixels = _pixels(tiny_backbone)
    with torch.no_grad():
        torch.testing.assert_close(adapted(pixels), zero_shot(pixels), rtol=0, atol=1e-6)
    # and the adapter really is in the graph: a non-zero up core changes the logits
    with torch.no_grad():
        for group in adapted.components[0].groups.values():
            for ring in group.up:
                ring.cores[-1].fill_(0.1)
        assert not torch.allclose(adapted(pixels), zero_shot(pixels), atol=1e-3)


@pytest.mark.parametrize(
    "settings",
    [
        {"ranks": [2, 4, 8]},
        {"ranks": [3], "bottleneck": 8},
        {"ranks": [1, 5], "width_modes": "single", "learnable_gates": False},
        {"ranks": [2], "towers": "image", "blocks": "2-3"},
    ],
)
def test_parameter_count_formula_matches_module(tiny_backbone, settings):
    config = make_method_config("adaring", {"blocks": "all", **settings})
    model = AdaptedCLIP(tiny_backbone, config, ["a", "b"], ["{}"])
    actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.n_trainable() == actual
    # R^2 * (sum of modes) per ring, down and up, per (tower, width) group, + one gate per ring
    expected = 0
    towers = {"image": (64, 4), "text": (48, 3)}
    for tower, (width, n_blocks) in towers.items():
        if config.towers not in ("both", tower):
            continue
        n_layers = len(parse_block_selection(config.blocks, n_blocks))
        modes = balanced_factors(width, config.max_mode) if config.width_modes == "factorized" else [width]
        for rank in config.ranks:
            expected += 2 * tr_num_parameters([*modes, config.bottleneck, n_layers], rank)
        expected += len(config.ranks) if config.learnable_gates else 0
    assert actual == expected


def test_vit_b16_default_parameter_budget():
    """At default settings on ViT-B/16: at most 10% of MMA's 674,560 trainable parameters."""
    model = AdaptedCLIP(meta_backbone("ViT-B-16"), make_method_config("adaring"), ["a", "b"], ["{}"])
    breakdown = model.parameter_breakdown()
    assert sum(breakdown.values()) <= 67_456
    assert sum(breakdown.values()) == EXPECTED_VIT_B16
    assert {k.split(".")[2] for k in breakdown} == {"image_w768", "text_w512"}


def test_only_adapters_get_gradients_and_backward_stops_at_first_adapted_block(tiny_backbone):
    config = make_method_config("adaring", {"blocks": "3-4", "towers": "image"})
    model = AdaptedCLIP(tiny_backbone, config, ["a", "b"], ["{}"])
    model.train()
    requires_grad = []
    hooks = [
        block.register_forward_hook(lambda m, i, o: requires_grad.append(o.requires_grad))
        for block in tiny_backbone.towers.image.transformer.resblocks
    ]
    try:
        loss, _ = model.training_loss(torch.tensor([0, 1, 0, 1]), pixels=_pixels(tiny_backbone))
    finally:
        for hook in hooks:
            hook.remove()
    assert requires_grad[:4] == [False, False, True, True]  # blocks 1-2 build no autograd graph
    loss.backward()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)


def test_adaring_learns_and_backbone_stays_bit_identical(dataset, tiny_backbone):
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    zero_shot = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone).evaluate(dataset).accuracy
    adapter = adaclip.fit(dataset, method="adaring", backbone=tiny_backbone, epochs=8, lr=1e-2, seed=0, **ALL_BLOCKS)
    history = adapter.metadata.training.history
    accuracy = adapter.evaluate(dataset).accuracy
    assert history[-1]["loss"] < history[0]["loss"] - 0.2
    assert accuracy >= zero_shot + 0.25, (zero_shot, accuracy)
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_load_and_merged_export_predict_the_same(dataset, tiny_backbone, tmp_path):
    adapter = adaclip.fit(dataset, method="adaring", backbone=tiny_backbone, epochs=2, lr=1e-2, **ALL_BLOCKS)
    path = adapter.save(tmp_path / "ring.adaclip")
    loaded = adaclip.load(path, backbone=tiny_backbone)
    pixels = _pixels(tiny_backbone, n=8, seed=3)
    reference = adapter.logits(pixels)
    assert torch.equal(loaded.logits(pixels), reference)
    merged_path = loaded.merged().save(tmp_path / "ring.merged.adaclip")
    merged = adaclip.load(merged_path, backbone=tiny_backbone)
    assert merged.metadata.method_config["merged"] is True
    assert not any("cores" in name for name in merged.model.adapter_state())
    torch.testing.assert_close(merged.logits(pixels), reference, rtol=0, atol=1e-5)
    assert [p.label for p in merged.predict(sorted((dataset / "test").rglob("*.png")))] == [
        p.label for p in adapter.predict(sorted((dataset / "test").rglob("*.png")))
    ]
    # in-library merge(): same logits, frozen per-layer matrices
    torch.testing.assert_close(loaded.merge().logits(pixels), reference, rtol=0, atol=1e-6)


def test_models_sharing_a_backbone_do_not_stack(tiny_backbone):
    """Two adapted models on one backbone: each forward applies only its own adapters."""
    classes, templates = ["a", "b"], ["{}"]
    first = AdaptedCLIP(tiny_backbone, make_method_config("adaring", ALL_BLOCKS), classes, templates, seed=1)
    second = AdaptedCLIP(tiny_backbone, make_method_config("adaring", ALL_BLOCKS), classes, templates, seed=2)
    with torch.no_grad():
        for model, value in ((first, 0.2), (second, -0.3)):
            for group in model.components[0].groups.values():
                for ring in group.up:
                    ring.cores[-1].fill_(value)
    pixels = _pixels(tiny_backbone)
    with torch.no_grad():
        alone = first(pixels)
        second(pixels)
        assert torch.equal(first(pixels), alone)


def test_bad_block_selection_is_a_usage_error(tiny_backbone):
    with pytest.raises(UsageError, match="matches no block"):
        AdaptedCLIP(tiny_backbone, make_method_config("adaring", {"blocks": "5-12"}), ["a", "b"], ["{}"])  # 4 blocks
    with pytest.raises(UsageError, match="bad block"):
        AdaptedCLIP(tiny_backbone, make_method_config("adaring", {"blocks": "x"}), ["a", "b"], ["{}"])


def test_cli_fit_info_and_merged_export(dataset, tmp_path):
    import json

    from typer.testing import CliRunner

    from adaclip.cli import app

    from .conftest import TINY

    runner = CliRunner()
    ring = tmp_path / "ring.adaclip"
    fit = runner.invoke(
        app,
        ["fit", str(dataset), "-m", "adaring", "-o", str(ring), "-b", TINY, "-p", "none", "--epochs", "1"]
        + ["--set", "blocks=all", "--set", "ranks=[2,4]", "-f", "json"],
    )
    assert fit.exit_code == 0, fit.output
    summary = json.loads(fit.stdout)
    assert summary["trainable_params"] == sum(summary["parameter_breakdown"].values())
    assert json.loads(runner.invoke(app, ["info", str(ring), "-f", "json"]).stdout)["method_config"]["ranks"] == [2, 4]
    merged = tmp_path / "merged.adaclip"
    export = runner.invoke(app, ["export", str(ring), "--merged", "-o", str(merged), "--summary", "json"])
    assert export.exit_code == 0, export.output
    assert json.loads(export.stdout)["output_bytes"] == merged.stat().st_size
    again = runner.invoke(app, ["export", str(ring), "--merged", "-o", str(merged)])
    assert again.exit_code == 2 and "already exists" in again.stderr
    images = str(dataset / "test" / "red_circle")
    original = [
        json.loads(x) for x in runner.invoke(app, ["predict", str(ring), images, "-f", "jsonl"]).stdout.splitlines()
    ]
    exported = [
        json.loads(x) for x in runner.invoke(app, ["predict", str(merged), images, "-f", "jsonl"]).stdout.splitlines()
    ]
    assert [r["label"] for r in exported] == [r["label"] for r in original] and len(original) == 6
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(exported, original, strict=True))


# ------------------------------------------------------------------------------------------ consistency


def _terms_per_step(monkeypatch) -> list[dict[str, float]]:
    """Record AdaRing's consistency terms at every training step."""
    from adaclip.methods.adaring import AdaRingAdapters

    recorded: list[dict[str, float]] = []
    original = AdaRingAdapters.loss_terms

    def recording(self, ctx):
        terms = original(self, ctx)
        recorded.append({k: float(v.detach()) for k, v in terms.items()})
        return terms

    monkeypatch.setattr(AdaRingAdapters, "loss_terms", recording)
    return recorded


@pytest.mark.parametrize("reference", ["views", "bypass"])
def test_consistency_terms_are_zero_at_step_zero_on_augmented_batches(dataset, tiny_backbone, monkeypatch, reference):
    """The frozen references are of the same augmented crop (PromptSRC): while the adapter is a no-op every
    consistency term is 0. With lr 1e-12 the adapter stays a no-op for the whole run, so the terms of the
    second epoch check the kept references too ('views' with one view: epoch 2 reuses epoch 1's crops)."""
    recorded = _terms_per_step(monkeypatch)
    train = {"lr": 1e-12, "epochs": 2, "augment": True, "cache_views": 1, "reference_features": reference}
    weights = {"text_consistency": 1.0, "image_consistency": 1.0, "logit_consistency": 1.0}  # float noise x 1
    config = {"train": train, **weights}
    adaclip.fit(dataset, method="adaring", backbone=tiny_backbone, seed=0, val_split=0, config=config)
    assert len(recorded) >= 4 and set(recorded[0]) == {"text_l1", "image_l1", "logit_kl"}
    assert max(v for terms in recorded for v in terms.values()) < 1e-7, recorded


def test_unaugmented_reference_mismatches_the_crop(dataset, tiny_backbone, monkeypatch):
    """The old reference (un-augmented image against an augmented crop), kept as a named setting: its
    terms are not 0 at step 0, which is the defect 'views' fixes."""
    recorded = _terms_per_step(monkeypatch)
    train = {"lr": 1e-12, "epochs": 1, "augment": True, "reference_features": "unaugmented"}
    weights = {"text_consistency": 1.0, "image_consistency": 1.0, "logit_consistency": 1.0}
    config = {"train": train, **weights}
    adaclip.fit(dataset, method="adaring", backbone=tiny_backbone, seed=0, val_split=0, config=config)
    assert recorded[0]["image_l1"] > 1e-4 and recorded[0]["logit_kl"] > 1e-6, recorded[0]
    assert recorded[0]["text_l1"] < 1e-7


def test_logit_consistency_uses_promptsrc_reduction(tiny_backbone):
    """KL(zero-shot || adapted) summed over batch and classes and divided by B * K, as PromptSRC's
    trainer does; written here in plain torch from that formula."""
    from adaclip.methods import StepContext

    classes = ["a", "b", "c", "d", "e"]
    model = AdaptedCLIP(tiny_backbone, make_method_config("adaring", ALL_BLOCKS), classes, ["{}"])
    generator = torch.Generator().manual_seed(0)
    dim = tiny_backbone.embed_dim
    refs = torch.nn.functional.normalize(torch.randn(6, dim, generator=generator), dim=-1)
    logits = torch.randn(6, len(classes), generator=generator) * 5
    ctx = StepContext(
        model=model,
        pixels=None,
        labels=torch.zeros(6, dtype=torch.long),
        image_features=refs,
        class_features=model.zero_shot_class_features(),
        logits=logits,
        reference_image_features=refs,
    )
    weight = model.components[0].settings.logit_consistency
    got = model.components[0].loss_terms(ctx)["logit_kl"] / weight
    teacher = tiny_backbone.logit_scale * refs @ model.zero_shot_class_features().t()
    p, log_p, log_q = teacher.softmax(-1), teacher.log_softmax(-1), logits.log_softmax(-1)
    expected = (p * (log_p - log_q)).sum() / (6 * len(classes))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


# --- class offsets (`--set class_offsets=true`) -----------------------------------------------------


def test_class_offsets_start_at_zero_and_add_to_each_trained_class(tiny_backbone):
    """Logits = scale * image @ (class features + offset)^T, written out here in plain torch."""
    classes, templates = ["red circle", "green square", "blue stripes"], ["a photo of a {}."]
    plain = AdaptedCLIP(tiny_backbone, make_method_config("adaring", ALL_BLOCKS), classes, templates, seed=4)
    offset = AdaptedCLIP(
        tiny_backbone, make_method_config("adaring", {**ALL_BLOCKS, "class_offsets": True}), classes, templates, seed=4
    )
    pixels = _pixels(tiny_backbone)
    with torch.no_grad():
        assert torch.equal(offset(pixels), plain(pixels))  # zero offsets: the same model at step 0
        for model in (plain, offset):
            for group in model.components[0].groups.values():
                for ring in group.up:
                    ring.cores[-1].fill_(0.05)
        values = torch.randn(3, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(0))
        offset.components[1].offsets.copy_(values)
        image = plain.image_features(pixels)
        expected = tiny_backbone.logit_scale * image @ (plain.class_features() + values).t()
        torch.testing.assert_close(offset(pixels), expected, rtol=0, atol=1e-5)
        # other names: a trained name keeps its row, a new one gets none
        offset.set_classes(["blue stripes", "yellow star"])
        plain.set_classes(["blue stripes", "yellow star"])
        shifted = plain.class_features() + torch.stack([values[2], torch.zeros_like(values[2])])
        expected = tiny_backbone.logit_scale * plain.image_features(pixels) @ shifted.t()
        torch.testing.assert_close(offset(pixels), expected, rtol=0, atol=1e-5)
    assert offset.parameter_breakdown()["components.1.offsets"] == 3 * tiny_backbone.embed_dim
    # their own learning rate: class_offsets_lr_scale x train.lr
    assert offset.lr_scales() == {id(offset.components[1].offsets): 0.1}


def test_class_offsets_train_save_and_load(dataset, tiny_backbone, tmp_path):
    adapter = adaclip.fit(
        dataset, method="adaring", backbone=tiny_backbone, epochs=2, lr=1e-2, seed=0, class_offsets=True, **ALL_BLOCKS
    )
    offsets = adapter.model.components[1].offsets
    assert offsets.abs().max() > 0  # it trained
    loaded = adaclip.load(adapter.save(tmp_path / "offsets.adaclip"), backbone=tiny_backbone)
    assert torch.equal(loaded.model.components[1].offsets, offsets)
    pixels = _pixels(tiny_backbone, n=6, seed=5)
    assert torch.equal(loaded.logits(pixels), adapter.logits(pixels))
    # frozen text tower (image blocks only): the offsets still train, after the class-feature cache
    image_only = adaclip.fit(
        dataset,
        method="adaring",
        backbone=tiny_backbone,
        epochs=2,
        lr=1e-2,
        seed=0,
        class_offsets=True,
        blocks="all",
        towers="image",
    )
    assert image_only.model.text_tower_frozen
    assert image_only.model.components[1].offsets.abs().max() > 0


# --- training cache (`--set training_cache=true`) --------------------------------------------------


def _plain_cache_logits(features, keys, labels, n_classes, alpha, beta):
    """Tip-Adapter's cache model from its paper: alpha * exp(-beta * (1 - f K^T)) one_hot(labels)."""
    one_hot = torch.zeros(len(labels), n_classes)
    one_hot[torch.arange(len(labels)), labels] = 1.0
    return alpha * torch.exp(-beta * (1.0 - features @ keys.t())) @ one_hot


@pytest.mark.parametrize("method", ["adaring", "adaring+rada"])
def test_training_cache_adds_tip_adapters_cache_to_the_methods_scores_by_class_name(tiny_backbone, method):
    classes, templates = ["red circle", "green square", "blue stripes"], ["a photo of a {}."]
    plain = AdaptedCLIP(
        tiny_backbone, make_method_config(method, {**ALL_BLOCKS, "training_cache": False}), classes, templates, seed=4
    )
    cached = AdaptedCLIP(
        tiny_backbone, make_method_config(method, {**ALL_BLOCKS, "training_cache": True}), classes, templates, seed=4
    )
    pixels = _pixels(tiny_backbone)
    with torch.no_grad():
        assert torch.equal(cached(pixels), plain(pixels))  # an empty cache adds nothing
        for model in (plain, cached):
            for group in model.components[0].groups.values():
                for ring in group.up:
                    ring.cores[-1].fill_(0.05)
            if method == "adaring+rada":
                head = model.head.inner if model is cached else model.head
                head.load_state_dict(plain.head.state_dict())
                torch.nn.init.normal_(head.out_proj.weight, std=0.02, generator=torch.Generator().manual_seed(1))
        generator = torch.Generator().manual_seed(0)
        keys = torch.nn.functional.normalize(torch.randn(7, tiny_backbone.embed_dim, generator=generator), dim=-1)
        labels = torch.tensor([0, 1, 2, 2, 0, 1, 2])
        cached.head.fit_training_features(FeatureSet(keys, labels))
        cached.head.alpha.fill_(3.0)
        cached.head.beta.fill_(2.5)
        image = plain.image_features(pixels)
        expected = plain(pixels) + _plain_cache_logits(image, keys, labels, 3, 3.0, 2.5)
        torch.testing.assert_close(cached(pixels), expected, rtol=0, atol=1e-5)
        # a subset of the trained names keeps their columns; any name not trained on turns the cache off
        cache = _plain_cache_logits(image, keys, labels, 3, 3.0, 2.5)
        for model in (plain, cached):
            model.set_classes(["blue stripes", "red circle"])
        expected = plain(pixels) + cache[:, [2, 0]]
        torch.testing.assert_close(cached(pixels), expected, rtol=0, atol=1e-5)
        for model in (plain, cached):
            model.set_classes(["blue stripes", "yellow star"])
        assert torch.equal(cached(pixels), plain(pixels))
        for model in (plain, cached):
            model.set_classes(classes)
        torch.testing.assert_close(cached(pixels), plain(pixels) + cache, rtol=0, atol=1e-5)
    assert cached.n_trainable() == plain.n_trainable()  # the cache is data, not trained


def test_training_cache_is_built_after_training_from_the_trained_features(
    dataset, tiny_backbone, tmp_path, monkeypatch
):
    from adaclip.data import prepare_training_data
    from adaclip.inference import encode_images

    sizes_while_training = []
    original = AdaptedCLIP.training_loss

    def training_loss(self, *args, **kwargs):
        sizes_while_training.append(len(self.head.cache_keys))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AdaptedCLIP, "training_loss", training_loss)
    data = prepare_training_data(dataset / "train", shots=4, seed=0, val_split="auto")
    adapter = adaclip.fit(
        data, method="adaring", backbone=tiny_backbone, epochs=2, lr=1e-2, seed=0, training_cache=True, **ALL_BLOCKS
    )
    assert sizes_while_training and set(sizes_while_training) == {0}  # the loss is AdaRing's own
    head = adapter.model.head
    trained = encode_images(adapter.model, data.train, tiny_backbone.eval_transform())
    # the trained model's features, un-augmented (batching may change the last bits)
    torch.testing.assert_close(head.cache_keys, trained.features, rtol=0, atol=1e-6)
    assert torch.equal(head.cache_values.argmax(dim=-1), trained.labels)
    # searched on the validation images (the configured 1.0 / 5.5 would stay otherwise), ties decided by
    # the training images (AdaRing's rule; adaring+rada keeps Tip-Adapter's first tied point)
    assert (float(head.alpha), float(head.beta)) != (1.0, 5.5)
    assert head.config.search_ties == "training" and adapter.metadata.method_config["training_cache_ties"] == "training"
    assert make_method_config("adaring+rada", {}).training_cache_ties == "first"
    loaded = adaclip.load(adapter.save(tmp_path / "cache.adaclip"), backbone=tiny_backbone)
    assert torch.equal(loaded.model.head.cache_keys, head.cache_keys)
    pixels = _pixels(tiny_backbone, n=6, seed=5)
    assert torch.equal(loaded.logits(pixels), adapter.logits(pixels))
    merged = loaded.merged()  # export --merged keeps the cache
    assert torch.equal(merged.model.head.cache_keys, head.cache_keys)
    torch.testing.assert_close(merged.logits(pixels), adapter.logits(pixels), rtol=0, atol=1e-5)
    # TTA puts RAda's mask in the cosine head's place and keeps the cache's scores as they are
    adapted = loaded.tta(dataset / "test", mode="online", batch_size=8, lr=1e-2).adapter
    assert adapted.method == "adaring+rada" and adapted.metadata.method_config["training_cache"] is True
    assert torch.equal(adapted.model.head.cache_keys, head.cache_keys)
    assert torch.equal(adapted.model.head.alpha, head.alpha) and torch.equal(adapted.model.head.beta, head.beta)
    assert adapted.model.head.inner.out_proj.weight.abs().max() > 0  # the mask adapted
    reloaded = adaclip.load(adapted.save(tmp_path / "cache-tta.adaclip"), backbone=tiny_backbone)
    assert torch.equal(reloaded.logits(pixels), adapted.logits(pixels))
    # keys as the mean over augmented crops of each image, drawn from the seed
    viewed = adaclip.fit(
        data, method="adaring", backbone=tiny_backbone, epochs=1, seed=3, training_cache=True, training_cache_views=3
    )
    crops = tiny_backbone.train_transform(viewed.model.config.train.min_crop_scale)
    passes = [encode_images(viewed.model, data.train, crops, seed=3, epoch=view).features for view in range(3)]
    expected = torch.nn.functional.normalize(torch.stack(passes).mean(dim=0), dim=-1)
    torch.testing.assert_close(viewed.model.head.cache_keys, expected, rtol=0, atol=1e-6)
    unaugmented = encode_images(viewed.model, data.train, tiny_backbone.eval_transform()).features
    assert (viewed.model.head.cache_keys - unaugmented).abs().max() > 1e-3
    # no validation images: nothing to search on, the configured values stay
    unvalidated = adaclip.fit(
        dataset, method="adaring", backbone=tiny_backbone, epochs=1, seed=0, val_split=0, training_cache=True
    )
    assert len(unvalidated.model.head.cache_keys) == 4 * 12
    assert (float(unvalidated.model.head.alpha), float(unvalidated.model.head.beta)) == (1.0, 5.5)
