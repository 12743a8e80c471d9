"""Baselines as methods: LoRA (CLIP-LoRA), CoOp and Tip-Adapter(-F) on tiny random-weight backbones."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import adaclip
from adaclip.data import prepare_training_data
from adaclip.errors import UsageError
from adaclip.inference import encode_images
from adaclip.inject import parse_block_selection
from adaclip.methods import make_method_config
from adaclip.methods.lora import LoRAUpdate, MultiheadAttentionWrapper, _Entry
from adaclip.methods.tip_adapter import grid
from adaclip.model import AdaptedCLIP

CLASSES = ["red circle", "green square", "blue stripes"]
TEMPLATES = ["a photo of a {}."]


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny models run fastest on one thread; on a busy 2-core machine a second one costs ~10x CPU time
    in spin-waits (measured: a 40-epoch CoOp fit takes 1.1 s of CPU on 1 thread, 11.8 s on 2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pixels(n=4, seed=0):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _state(backbone):
    return {k: v.clone() for k, v in backbone.model.state_dict().items()}


def _same_state(before, backbone):
    after = backbone.model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _randomize(model, std=0.1, seed=0):
    """Move every trainable tensor away from its (no-op) start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    model.invalidate_class_cache()


@pytest.fixture(scope="module")
def zero_shot_accuracy(dataset, tiny_backbone):
    return adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone).evaluate(dataset).accuracy


@pytest.fixture(scope="module")
def hf_backbone():
    """A tiny open_clip CustomTextCLIP whose text tower is a Hugging Face BERT (like `lite`'s MiniLM)."""
    pytest.importorskip("transformers")
    import open_clip
    from open_clip.hf_model import HFTextEncoder
    from transformers import BertConfig

    from adaclip.backbone import Backbone
    from adaclip.identity import BackboneIdentity, PreprocessConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vision = {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32}
        text = {"context_length": 16, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1}
        model = open_clip.CustomTextCLIP(embed_dim=48, vision_cfg=vision, text_cfg=text)
        bert = BertConfig(
            vocab_size=49408,
            hidden_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=96,
            max_position_embeddings=16,
            pad_token_id=0,
        )
        model.text = HFTextEncoder("bert", output_dim=48, config=bert, pooler_type="mean_pooler", proj_type="linear")
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=16)
    preprocess = PreprocessConfig(size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    identity = BackboneIdentity(name="test-hf-bert", pretrained="none", embed_dim=48, image_size=32)
    return Backbone(model, tokenizer, preprocess, identity, torch.device("cpu"), "fp32")


# ------------------------------------------------------------------------------------------ LoRA


class _Active:
    active = True


def _mha_cases(batch_first: bool):
    L, S, B, D = 5, 7, 3, 16
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        shape = (B, n, D) if batch_first else (n, B, D)
        return torch.randn(shape, generator=generator)

    x, memory = tokens(L), tokens(S)
    causal = torch.triu(torch.full((L, L), float("-inf")), 1)
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[0, -2:] = True
    single = x[0] if batch_first else x[:, 0]
    return [
        {"query": x, "key": x, "value": x},
        {"query": x, "key": x, "value": x, "attn_mask": causal, "need_weights": False},
        {"query": x, "key": x, "value": x, "attn_mask": causal, "is_causal": True, "need_weights": False},
        {"query": x, "key": x, "value": x, "attn_mask": causal < 0},
        {"query": x, "key": x, "value": x, "key_padding_mask": padding, "attn_mask": causal < 0, "need_weights": False},
        {"query": x, "key": x, "value": x, "attn_mask": torch.randn(B * 4, L, L, generator=generator)},
        {"query": x, "key": x, "value": x, "average_attn_weights": False},
        {"query": x, "key": memory, "value": memory},
        {"query": single, "key": single, "value": single},
    ]


def _wrapped_attention(batch_first: bool):
    """A 16-wide nn.MultiheadAttention, its LoRA wrapper, and zero-initialised q/k/v/out updates."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    parent = nn.Module()
    parent.attn = mha
    wrapper = MultiheadAttentionWrapper(mha, parent, "attn")
    return mha, wrapper, {p: LoRAUpdate(16, 16, rank=2, scale=0.5, dropout=0.0) for p in ("q", "k", "v", "out")}


@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_attention_matches_multihead_attention(batch_first):
    """At init the wrapper reproduces nn.MultiheadAttention (outputs and weights) within 1e-6; with
    non-zero updates it equals the module whose weights carry W + s B A."""
    mha, wrapper, updates = _wrapped_attention(batch_first)
    wrapper.entries.append(_Entry(_Active(), updates))
    cases = _mha_cases(batch_first)
    with torch.no_grad():
        for case in cases:
            for want, got in zip(mha(**case), wrapper(**case), strict=True):
                assert (want is None) == (got is None)
                if want is not None:
                    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        for update in updates.values():
            update.lora_B.normal_()
        merged = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        merged.load_state_dict(mha.state_dict())
        for name, weight in wrapper.merged_weights(updates).items():
            merged.get_parameter(name).copy_(weight)
        for case in cases:
            torch.testing.assert_close(wrapper(**case)[0], merged(**case)[0], rtol=0, atol=1e-5)
    wrapper.entries.clear()
    with torch.no_grad():  # no active component: the original module runs
        assert torch.equal(wrapper(**cases[0])[0], mha(**cases[0])[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_lora_attention_per_token_path_matches_the_folded_weights(batch_first):
    """Training with dropout computes the projections per token (a dropout mask cannot be folded into a
    weight); with the masks switched off that path equals PyTorch's module on W + s B A within 1e-6."""
    mha, wrapper, updates = _wrapped_attention(batch_first)
    x, causal = _mha_cases(batch_first)[0]["query"], torch.triu(torch.full((5, 5), float("-inf")), 1)
    with torch.no_grad():
        for update in updates.values():
            update.lora_B.normal_()
        grouped = {p: [u] for p, u in updates.items()}
        merged = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        merged.load_state_dict(mha.state_dict())
        for name, weight in wrapper.adapted_weights(grouped).items():
            merged.get_parameter(name).copy_(weight)
        for extra in ({}, {"attn_mask": causal}, {"attn_mask": causal < 0}, {"attn_mask": causal, "is_causal": True}):
            want = merged(x, x, x, need_weights=False, **extra)[0]
            got = wrapper._forward_per_token(x, x, x, grouped, need_weights=False, **extra)[0]
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="dropout=0"):
        wrapper._forward_per_token(x, x, x, grouped)  # need_weights=True: only the folded path serves it


def test_lora_branch_dropout_is_inverted_dropout_per_element():
    """The branch input's dropout, as CLIP-LoRA applies it: each input element is kept with probability
    1 - p and scaled by 1 / (1 - p), or zeroed; the gradient sees the same mask; eval mode drops
    nothing. With A = I the rank-r activations are the dropped input itself."""
    torch.manual_seed(0)
    update = LoRAUpdate(32, 32, rank=32, scale=1.0, dropout=0.25)
    with torch.no_grad():
        update.lora_A.copy_(torch.eye(32))
    x = torch.full((4096, 32), 2.0, requires_grad=True)
    update.train()
    dropped = update.low(x)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], torch.full_like(dropped[kept], 2.0 / 0.75), rtol=0, atol=1e-6)
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 131,072 draws: std 0.0012
    dropped.sum().backward()
    torch.testing.assert_close(x.grad, kept.float() / 0.75, rtol=0, atol=1e-6)
    assert not torch.equal(update.low(x) != 0, kept)  # a fresh mask per call
    update.eval()
    assert torch.equal(update.low(x), x.detach() @ torch.eye(32))


def test_lora_merge_unmerge_round_trip(tiny_backbone):
    """merge() folds the updates into frozen copies of the weights: the logits agree within 1e-5. The
    backbone's own tensors are never written (PEFT's unmerge subtracts the update again, exact only to
    rounding), so after unmerge() its weights and the logits are the unmerged ones bit for bit."""
    before = _state(tiny_backbone)
    model = AdaptedCLIP(
        tiny_backbone, make_method_config("lora", {"projections": ["q", "k", "v", "out"]}), CLASSES, TEMPLATES
    )
    _randomize(model)
    model.eval()
    pixels = _pixels()
    with torch.no_grad():
        unmerged = model(pixels)
        model.components[0].merge()
        model.invalidate_class_cache()
        merged = model(pixels)
        assert _same_state(before, tiny_backbone)  # merged copies, not the backbone's tensors
        model.components[0].unmerge()
        model.invalidate_class_cache()
        again = model(pixels)
        with model.components_disabled():
            model.invalidate_class_cache()
            zero_shot = model(pixels)
    assert not torch.allclose(unmerged, zero_shot, atol=1e-3)  # the updates are visible
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    assert torch.equal(again, unmerged)
    assert _same_state(before, tiny_backbone)
    model.detach_components()


def test_lora_starts_at_zero_shot_and_detach_restores_the_backbone(tiny_backbone):
    pixels = _pixels()
    blocks = tiny_backbone.model.visual.transformer.resblocks
    original = blocks[0].attn
    keys = list(tiny_backbone.model.state_dict())
    zero_shot = AdaptedCLIP(tiny_backbone, make_method_config("zeroshot"), CLASSES, TEMPLATES)
    with torch.no_grad():
        reference = zero_shot(pixels)
    model = AdaptedCLIP(tiny_backbone, make_method_config("lora"), CLASSES, TEMPLATES).eval()
    assert isinstance(blocks[0].attn, MultiheadAttentionWrapper)
    assert list(tiny_backbone.model.state_dict()) == keys  # wrappers expose the original tensors' names
    assert all(".lora." in k and k.endswith(("lora_A", "lora_B")) for k in model.adapter_state())
    with torch.no_grad():
        torch.testing.assert_close(model(pixels), reference, rtol=0, atol=1e-5)
        _randomize(model)
        assert not torch.allclose(model(pixels), reference, atol=1e-3)
        with model.components_disabled():  # inactive: the original modules run, bit for bit
            model.invalidate_class_cache()
            assert torch.equal(model(pixels), reference)
    model.detach_components()
    assert blocks[0].attn is original and type(blocks[0].attn) is nn.MultiheadAttention
    assert type(tiny_backbone.model.transformer.resblocks[0].attn) is nn.MultiheadAttention
    zero_shot.invalidate_class_cache()
    with torch.no_grad():
        assert torch.equal(zero_shot(pixels), reference)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"projections": ["q", "v", "out"], "rank": 4},
        {"towers": "image", "blocks": "2-3", "rank": 1},
        {"towers": "text", "text_blocks": "last1", "projections": ["out"]},
    ],
)
def test_lora_parameter_count_is_r_times_din_plus_dout(tiny_backbone, settings):
    config = make_method_config("lora", settings)
    model = AdaptedCLIP(tiny_backbone, config, ["a", "b"], ["{}"])
    actual = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert model.n_trainable() == actual == sum(v.numel() for v in model.adapter_state().values())
    expected = 0
    for tower, (width, n_blocks) in {"image": (64, 4), "text": (48, 3)}.items():
        if config.towers in ("both", tower):
            spec = (config.image_blocks if tower == "image" else config.text_blocks) or config.blocks
            n_layers = len(parse_block_selection(spec, n_blocks))
            expected += n_layers * len(config.projections) * config.rank * (width + width)
    assert actual == expected
    model.detach_components()


def test_lora_vit_b16_has_clip_loras_184320_parameters():
    from typer.testing import CliRunner

    from adaclip.cli import app

    result = CliRunner().invoke(
        app, ["info", "--method", "lora", "--backbone", "ViT-B-16", "--pretrained", "none"] + ["-f", "json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["trainable_params"] == 184_320  # CLIP-LoRA's published count
    per_projection = {k.split(".", 2)[2]: v for k, v in info["parameter_breakdown"].items()}
    # 12 layers x r * (d_in + d_out), r = 2: 768-wide image tower, 512-wide text tower
    assert per_projection == {
        **{f"image.{p}": 12 * 2 * (768 + 768) for p in "qkv"},
        **{f"text.{p}": 12 * 2 * (512 + 512) for p in "qkv"},
    }
    assert info["config"]["rank"] == 2 and info["config"]["dropout"] == 0.25
    assert info["config"]["train"]["lr"] == 2e-4 and info["class_agnostic"] is True


def test_lora_gradients_reach_only_lora_and_dropout_acts_in_training(tiny_backbone):
    model = AdaptedCLIP(tiny_backbone, make_method_config("lora"), CLASSES, TEMPLATES)
    _randomize(model)
    model.train()
    pixels = _pixels()
    loss, _ = model.training_loss(torch.tensor([0, 1, 2, 0]), pixels=pixels)
    loss.backward()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    trainable = model.trainable_parameters()
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    with torch.no_grad():
        torch.manual_seed(0)
        first = model.image_features(pixels)
        second = model.image_features(pixels)
        assert not torch.allclose(first, second)  # a fresh dropout mask per pass
        model.eval()
        assert torch.equal(model.image_features(pixels), model.image_features(pixels))
    model.detach_components()


def test_lora_models_sharing_a_backbone_do_not_stack(tiny_backbone):
    first = AdaptedCLIP(tiny_backbone, make_method_config("lora"), CLASSES, TEMPLATES, seed=1)
    second = AdaptedCLIP(tiny_backbone, make_method_config("lora"), CLASSES, TEMPLATES, seed=2)
    _randomize(first, seed=1)
    _randomize(second, seed=2)
    first.eval()
    second.eval()
    pixels = _pixels()
    with torch.no_grad():
        alone = first(pixels)
        second(pixels)
        assert torch.equal(first(pixels), alone)
    first.detach_components()  # in either order: the wrappers stay while the other model uses them
    with torch.no_grad():
        assert not torch.allclose(second(pixels), alone)
    second.detach_components()
    assert type(tiny_backbone.model.visual.transformer.resblocks[0].attn) is nn.MultiheadAttention


def test_lora_learns_keeps_the_backbone_and_round_trips(dataset, tiny_backbone, zero_shot_accuracy, tmp_path):
    before = _state(tiny_backbone)
    adapter = adaclip.fit(dataset, method="lora", backbone=tiny_backbone, epochs=10, lr=2e-2, seed=0)
    accuracy = adapter.evaluate(dataset).accuracy
    history = adapter.metadata.training.history
    assert history[-1]["loss"] < history[0]["loss"] - 0.5
    assert accuracy >= zero_shot_accuracy + 0.4, (zero_shot_accuracy, accuracy)
    adapter.model.detach_components()
    assert _same_state(before, tiny_backbone)
    adapter.model.components[0].attach(tiny_backbone)
    path = adapter.save(tmp_path / "lora.adaclip")
    loaded = adaclip.load(path, backbone=tiny_backbone)
    pixels = _pixels(8, seed=3)
    reference = adapter.logits(pixels)
    assert torch.equal(loaded.logits(pixels), reference)
    loaded.model.invalidate_class_cache()
    torch.testing.assert_close(loaded.merge().logits(pixels), reference, rtol=0, atol=1e-5)
    assert _same_state(before, tiny_backbone)  # merging used copies
    loaded.model.components[0].unmerge()
    loaded.model.invalidate_class_cache()
    assert torch.equal(loaded.logits(pixels), reference)


def test_lora_bad_selections_are_usage_errors(tiny_backbone):
    assert make_method_config("lora", {"projections": "[q,v,out]"}).projections == ["q", "v", "out"]  # --set form
    with pytest.raises(UsageError, match="projections"):
        make_method_config("lora", {"projections": ["q", "x"]})
    with pytest.raises(UsageError, match="lora image blocks: bad block"):
        AdaptedCLIP(tiny_backbone, make_method_config("lora", {"blocks": "x"}), CLASSES, TEMPLATES)
    with pytest.raises(UsageError, match="no attention projections found"):
        AdaptedCLIP(tiny_backbone, make_method_config("lora", {"blocks": "none"}), CLASSES, TEMPLATES)


def test_lora_on_a_hugging_face_text_tower(hf_backbone):
    text = hf_backbone.model.text.transformer
    keys = list(hf_backbone.model.state_dict())
    reference = hf_backbone.encode_prompts(CLASSES, TEMPLATES)
    config = make_method_config("lora", {"towers": "text", "projections": ["q", "k", "v", "out"]})
    model = AdaptedCLIP(hf_backbone, config, CLASSES, TEMPLATES).eval()
    layer = text.encoder.layer[1].attention
    wrapped = [layer.self.query, layer.self.key, layer.self.value, layer.output.dense]
    assert all(type(m).__name__ == "LinearWrapper" for m in wrapped)
    assert list(hf_backbone.model.state_dict()) == keys
    assert model.n_trainable() == 2 * 4 * 2 * (48 + 48)
    with torch.no_grad():
        torch.testing.assert_close(model.class_features(), reference, rtol=0, atol=1e-6)
        _randomize(model)
        assert not torch.allclose(model.class_features(), reference, atol=1e-3)
        changed = model.class_features()
        model.components[0].merge()
        model.invalidate_class_cache()
        torch.testing.assert_close(model.class_features(), changed, rtol=0, atol=1e-5)
    model.detach_components()
    assert all(type(m) is nn.Linear for m in (layer.self.query, layer.output.dense))
    torch.testing.assert_close(hf_backbone.encode_prompts(CLASSES, TEMPLATES), reference, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ CoOp


@pytest.mark.parametrize("which", ["open_clip", "hugging_face"])
def test_coop_phrase_context_reproduces_the_frozen_text_tower(which, request):
    """With the context set to the embeddings of "a photo of a", CoOp's class features are the frozen
    tower's features of "a photo of a {class}."."""
    backbone = request.getfixturevalue("tiny_backbone" if which == "open_clip" else "hf_backbone")
    model = AdaptedCLIP(backbone, make_method_config("coop", {"init": "a photo of a"}), CLASSES, TEMPLATES)
    component = model.components[0]
    assert component.n_ctx == 4 and component.prompts(["cat"]) == ["a photo of a cat."]
    with torch.no_grad():
        reference = backbone.encode_prompts(CLASSES, ["a photo of a {}."])
        torch.testing.assert_close(model.class_features(), reference, rtol=0, atol=1e-6)
        component.ctx.add_(0.05 * torch.randn(component.ctx.shape, generator=torch.Generator().manual_seed(0)))
        model.invalidate_class_cache()
        assert not torch.allclose(model.class_features(), reference, atol=1e-4)


def test_coop_trains_only_the_context(tiny_backbone):
    model = AdaptedCLIP(tiny_backbone, make_method_config("coop", {"n_ctx": 4}), CLASSES, TEMPLATES)
    width = tiny_backbone.model.token_embedding.embedding_dim
    assert model.n_trainable() == 4 * width and model.image_tower_frozen and not model.text_tower_frozen
    assert model.components[0].prompts(["cat"]) == ["X X X X cat."]
    assert 0.01 < model.components[0].ctx.std().item() < 0.03  # N(0, 0.02^2)
    model.train()
    loss, _ = model.training_loss(torch.tensor([0, 1, 2, 0]), pixels=_pixels())
    loss.backward()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())
    assert model.components[0].ctx.grad.abs().sum() > 0


def test_coop_learns_keeps_the_backbone_and_round_trips(dataset, tiny_backbone, zero_shot_accuracy, tmp_path):
    before = _state(tiny_backbone)
    adapter = adaclip.fit(
        dataset,
        method="coop",
        backbone=tiny_backbone,
        epochs=40,
        lr=0.05,
        seed=0,
        n_ctx=4,
        config={"train": {"optimizer": "adamw"}},
    )
    accuracy = adapter.evaluate(dataset).accuracy
    assert accuracy >= zero_shot_accuracy + 0.3, (zero_shot_accuracy, accuracy)
    assert _same_state(before, tiny_backbone)
    path = adapter.save(tmp_path / "coop.adaclip")
    loaded = adaclip.load(path, backbone=tiny_backbone)
    assert list(loaded.model.adapter_state()) == ["components.0.ctx"]
    pixels = _pixels(8, seed=3)
    assert torch.equal(loaded.logits(pixels), adapter.logits(pixels))
    with loaded.classes(["purple triangle", "red circle"]):  # class-agnostic: any names
        assert loaded.logits(pixels).shape == (8, 2)


def test_coop_refuses_prompts_longer_than_the_context_and_unknown_towers(tiny_backbone):
    with pytest.raises(UsageError, match="context length"):
        AdaptedCLIP(tiny_backbone, make_method_config("coop"), CLASSES, TEMPLATES).class_features()  # 16 + name > 16
    from adaclip.backbone import Backbone
    from adaclip.methods.coop import token_embedding_layer

    class NoText(nn.Module):
        def __init__(self):
            super().__init__()
            self.text = nn.Linear(2, 2)
            self.logit_scale = nn.Parameter(torch.zeros(()))

    fake = Backbone(NoText(), tiny_backbone.tokenizer, tiny_backbone.preprocess, tiny_backbone.identity, "cpu", "fp32")
    with pytest.raises(UsageError, match="coop does not support this text tower yet"):
        token_embedding_layer(fake)


# ------------------------------------------------------------------------------------------ Tip-Adapter


def test_tip_adapter_builds_its_cache_and_round_trips_bit_exact(dataset, tiny_backbone, zero_shot_accuracy, tmp_path):
    adapter = adaclip.fit(dataset, method="tip-adapter", backbone=tiny_backbone, seed=0, val_split=0, search=False)
    head = adapter.model.head
    n_train = adapter.metadata.data.n_train
    assert head.cache_keys.shape == (n_train, tiny_backbone.embed_dim) and adapter.trainable_params == 0
    torch.testing.assert_close(head.cache_keys.norm(dim=-1), torch.ones(n_train))
    assert torch.equal(head.cache_values.sum(dim=0), torch.full((4,), n_train / 4))  # one-hot, balanced classes
    assert (head.alpha.item(), head.beta.item()) == (1.0, 5.5)
    assert adapter.metadata.training.epochs == 0
    accuracy = adapter.evaluate(dataset).accuracy
    assert accuracy >= zero_shot_accuracy + 0.3, (zero_shot_accuracy, accuracy)
    # logits are zero-shot + alpha * exp(-beta (1 - f K^T)) V
    pixels = _pixels(6, seed=4)
    features = adapter.model.image_features(pixels)
    zero_shot = tiny_backbone.logit_scale * features @ adapter.model.class_features().t()
    cache = torch.exp(-5.5 * (1 - features @ head.cache_keys.t())) @ head.cache_values
    torch.testing.assert_close(adapter.logits(pixels), zero_shot + cache)
    path = adapter.save(tmp_path / "tip.adaclip")
    loaded = adaclip.load(path, backbone=tiny_backbone)
    for name, tensor in adapter.model.adapter_state().items():
        assert torch.equal(loaded.model.adapter_state()[name], tensor), name
    assert torch.equal(loaded.logits(pixels), adapter.logits(pixels))
    with pytest.raises(UsageError, match="tied to the 4 classes"):
        loaded.model.set_classes(["a", "b"])


def test_tip_adapter_searches_alpha_beta_on_validation(dataset, tiny_backbone):
    reference = {"search_units": "reference", "search_scale": (7.0, 3.0), "leave_one_out": False}
    adapter = adaclip.fit(dataset, method="tip-adapter", backbone=tiny_backbone, seed=0, val_split=0.25, **reference)
    head = adapter.model.head
    alpha, beta = head.alpha.item(), head.beta.item()
    assert any(abs(beta - b) < 1e-6 for b in grid(7.0, 200).tolist())  # the reference's absolute grid
    assert any(abs(alpha - a) < 1e-6 for a in grid(3.0, 20).tolist())
    # the chosen pair is at least as good on the validation images as the paper's defaults
    val = prepare_training_data(dataset, seed=0, val_split=0.25).val
    assert len(val) == adapter.metadata.data.n_val > 0
    encoded = encode_images(adapter.model, val, tiny_backbone.eval_transform())

    def val_accuracy() -> float:
        predictions = adapter.model.logits_from_features(encoded.features).argmax(-1)
        return float((predictions == encoded.labels).float().mean())

    searched = val_accuracy()
    assert adapter.metadata.training.val_accuracy == pytest.approx(searched)
    head.alpha.fill_(1.0)
    head.beta.fill_(5.5)
    assert searched >= val_accuracy()


def test_tip_adapter_scaled_search_runs_without_validation(dataset, tiny_backbone, zero_shot_accuracy):
    """The default search is in backbone-independent units and, for plain Tip-Adapter, also scores each
    training image leave-one-out, so it runs (and beats zero-shot) without a validation set."""
    adapter = adaclip.fit(dataset, method="tip-adapter", backbone=tiny_backbone, seed=0, val_split=0)
    head = adapter.model.head
    assert (head.alpha.item(), head.beta.item()) != (1.0, 5.5)  # searched, not the configured defaults
    assert adapter.evaluate(dataset / "test").accuracy >= zero_shot_accuracy + 0.3
    # the stored values are absolute: a copy of the head with them gives the same logits as the file
    features = adapter.model.image_features(_pixels(4, seed=7))
    classes = adapter.model.class_features()
    expected = (
        tiny_backbone.logit_scale * features @ classes.t()
        + head.alpha * torch.exp(-head.beta * (1 - features @ head.cache_keys.t())) @ head.cache_values
    )
    torch.testing.assert_close(adapter.model.logits_from_features(features), expected)
    # Tip-Adapter-F searches before fine-tuning (keys = training features, leave-one-out) and trains at the
    # values found; after fine-tuning its keys have seen the training images, so without validation images
    # nothing more is searched. With search_init=false it trains and stays at the configured values.
    tip_f = adaclip.fit(dataset, method="tip-adapter", backbone=tiny_backbone, val_split=0, finetune=True, epochs=1)
    plain = (head.alpha.item(), head.beta.item())
    assert (tip_f.model.head.alpha.item(), tip_f.model.head.beta.item()) == pytest.approx(plain, rel=1e-6)
    tip_f = adaclip.fit(
        dataset, method="tip-adapter", backbone=tiny_backbone, val_split=0, finetune=True, epochs=1, search_init=False
    )
    assert (tip_f.model.head.alpha.item(), tip_f.model.head.beta.item()) == (1.0, 5.5)


def test_tip_adapter_f_fine_tunes_the_keys(dataset, tiny_backbone, tmp_path):
    config = make_method_config("tip-adapter", {"finetune": True})
    assert config.train.epochs == 20 and make_method_config("tip-adapter").train.epochs == 0
    adapter = adaclip.fit(
        dataset, method="tip-adapter", backbone=tiny_backbone, seed=0, val_split=0, finetune=True, epochs=5
    )
    head = adapter.model.head
    assert isinstance(head.cache_keys, nn.Parameter) and adapter.trainable_params == head.cache_keys.numel()
    assert adapter.metadata.training.steps == 5
    assert not torch.allclose(head.cache_keys.norm(dim=-1), torch.ones(len(head.cache_keys)))  # moved
    loaded = adaclip.load(adapter.save(tmp_path / "tip-f.adaclip"), backbone=tiny_backbone)
    assert isinstance(loaded.model.head.cache_keys, nn.Parameter)
    pixels = _pixels(6, seed=5)
    assert torch.equal(loaded.logits(pixels), adapter.logits(pixels))


def test_tip_adapter_zero_alpha_is_zero_shot(dataset, tiny_backbone):
    adapter = adaclip.fit(dataset, method="tip-adapter", backbone=tiny_backbone, val_split=0, alpha=0.0, search=False)
    zero_shot = AdaptedCLIP(tiny_backbone, make_method_config("zeroshot"), adapter.class_names, TEMPLATES)
    pixels = _pixels(6, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(adapter.logits(pixels), zero_shot(pixels), rtol=0, atol=1e-6)


def test_partial_train_overrides_keep_the_methods_recipe():
    """`--epochs 3` (or `--set train.lr=...`) changes that field only: the rest stays the method's recipe."""
    adaring = make_method_config("adaring", {"train": {"epochs": 3}}).train
    assert (adaring.epochs, adaring.lr, adaring.weight_decay) == (3, 1e-2, 1e-4)
    probe = make_method_config("linear-probe", {"train": {"lr": 0.1}}).train
    assert (probe.lr, probe.batch_size, probe.epochs, probe.warmup_epochs) == (0.1, 64, 20, 0)
    # a complete recipe (as stored in adapter files) round-trips unchanged
    config = make_method_config("adaring", {"train": {"epochs": 3}})
    assert make_method_config("adaring", config.model_dump(mode="json")) == config
    lora = make_method_config("lora", {"train": {"epochs": 3}}).train
    assert (lora.epochs, lora.lr, lora.weight_decay, lora.min_crop_scale) == (3, 2e-4, 1e-2, 0.08)
    assert lora.iterations_per_shot is None  # an explicit epoch count replaces CLIP-LoRA's iteration budget
    reference = make_method_config("lora", {}).train
    assert (reference.iterations_per_shot, reference.batch_size, reference.warmup_epochs) == (500, 32, 0)
    coop = make_method_config("coop", {"train": {"lr": 0.01}}).train
    assert (coop.optimizer, coop.lr, coop.epochs) == ("sgd", 0.01, 50)
    assert coop.epochs_by_shots == {1: 50, 2: 100, 8: 200}  # CoOp's scripts
    assert make_method_config("coop", {"train": {"epochs": 7}}).train.epochs_by_shots is None
    tip_f = make_method_config("tip-adapter", {"finetune": True, "train": {"lr": 1e-4}}).train
    assert (tip_f.epochs, tip_f.batch_size, tip_f.lr) == (20, 256, 1e-4)


def test_iteration_budget_counts_steps_per_shot(dataset, tiny_backbone):
    """CLIP-LoRA's budget: iterations x shots optimiser steps, whatever the batch and epoch sizes; the last
    epoch stops inside itself, and the run still ends with a validation pass."""
    adapter = adaclip.fit(
        dataset,
        method="lora",
        backbone=tiny_backbone,
        shots=5,
        batch_size=8,
        val_split="auto",
        config={"train": {"iterations_per_shot": 2, "feature_cache": "off"}},
    )
    record = adapter.metadata.training
    # 5 shots x 4 classes = 20 images, 3 steps per epoch; 2 x 5 = 10 steps = 3 full epochs + 1 step
    assert (record.steps, record.epochs, len(record.history)) == (10, 4, 4)
    assert record.history[-1]["val_accuracy"] is not None


def test_training_budget_follows_the_reference_schedules():
    from adaclip.training import training_budget

    coop = make_method_config("coop").train
    # (epochs, steps) for 10 classes, 4 steps per epoch: CoOp 50 / 100 / 200 epochs at 1 / 4 / 16 shots
    assert [training_budget(coop, 10 * s, s, 10, 4) for s in (1, 2, 4, 8, 16)] == [
        (50, 200),
        (100, 400),
        (100, 400),
        (200, 800),
        (200, 800),
    ]
    lora = make_method_config("lora").train
    assert training_budget(lora, 160, 16, 10, 5) == (1600, 8000)  # CLIP-LoRA: 500 x 16 iterations
    assert training_budget(lora, 40, None, 10, 2) == (1000, 2000)  # full data: shots = images per class
    plain = make_method_config("rada").train
    assert training_budget(plain, 160, 16, 10, 5) == (plain.epochs, plain.epochs * 5)
