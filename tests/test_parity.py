"""Reference parity: each method's formula written again from its paper / reference code in a few lines
of plain torch (not calling adaclip's functions), run on small fixed inputs, and compared with adaclip.
These are the tests that catch an inverted mask or a different normalisation, which accuracy tests on
toy data cannot see."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------ TDA
# Reference: github.com/kdiAAA/TDA, tda_runner.py (update_cache, compute_cache_logits, run_test_tda) and
# utils.py (get_entropy: entropy in nats divided by log2(K); softmax_entropy), ImageNet config.


def reference_tda(features, logits, pos=(3, 2.0, 5.0), neg=(2, 0.117, 1.0), band=(0.2, 0.5), mask=(0.03, 1.0)):
    """TDA over a stream, one image at a time; returns the final logits and both caches."""
    n_classes = logits.shape[1]
    pos_cache, neg_cache, out = {}, {}, []

    def update(cache, pred, item, capacity):
        if pred in cache:
            if len(cache[pred]) < capacity:
                cache[pred].append(item)
            elif item[1] < cache[pred][-1][1]:
                cache[pred][-1] = item
            cache[pred] = sorted(cache[pred], key=lambda x: x[1])
        else:
            cache[pred] = [item]

    def cache_logits(f, cache, alpha, beta, negative):
        keys, values = [], []
        for c in sorted(cache):
            for item in cache[c]:
                keys.append(item[0])
                values.append(
                    ((item[2] > mask[0]) & (item[2] < mask[1])).float()
                    if negative
                    else F.one_hot(torch.tensor(c), n_classes).float()
                )
        keys, values = torch.stack(keys).t(), torch.stack(values)
        return alpha * ((-1) * (beta - beta * (f @ keys))).exp() @ values

    for f, z in zip(features, logits, strict=True):
        loss = -(z.softmax(0) * z.log_softmax(0)).sum()  # nats
        prop_entropy = float(loss / math.log2(n_classes))
        prob_map, pred = z.softmax(0), int(z.argmax())
        update(pos_cache, pred, [f, float(loss)], pos[0])
        if band[0] < prop_entropy < band[1]:
            update(neg_cache, pred, [f, float(loss), prob_map], neg[0])
        final = z.clone()
        if pos_cache:
            final += cache_logits(f, pos_cache, pos[1], pos[2], False)
        if neg_cache:
            final -= cache_logits(f, neg_cache, neg[1], neg[2], True)
        out.append(final)
    return torch.stack(out), pos_cache, neg_cache


def tda_stream(seed=0, n=60, dim=8, n_classes=5):
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    # temperatures from very sure to very unsure, so every cache rule is exercised
    temperatures = torch.linspace(0.3, 8.0, n)[torch.randperm(n, generator=g)][:, None]
    logits = torch.randn(n, n_classes, generator=g) * temperatures
    return features, logits


def test_tda_matches_reference():
    from adaclip.tta import TDACache, TDASettings

    features, logits = tda_stream()
    expected, pos_cache, neg_cache = reference_tda(features, logits)
    cache = TDACache(logits.shape[1], TDASettings())
    got = torch.stack([cache.observe_and_adjust(f, z) for f, z in zip(features, logits, strict=True)])
    assert len(neg_cache) >= 2 and sum(len(v) for v in pos_cache.values()) >= 8  # the stream exercises both
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    for ours, theirs in ((cache.positive, pos_cache), (cache.negative, neg_cache)):
        for c in range(logits.shape[1]):
            assert [e[1].tolist() for e in ours[c]] == [item[0].tolist() for item in theirs.get(c, [])]
    # negative values: the reference's mask of classes with 0.03 < p < 1 (the ones "not it" but possible)
    for c, items in neg_cache.items():
        for entry, item in zip(cache.negative[c], items, strict=True):
            assert entry[2].tolist() == ((item[2] > 0.03) & (item[2] < 1.0)).float().tolist()


# ------------------------------------------------------------------------------------------ Tip-Adapter
# Reference: github.com/gaopengcuhk/Tip-Adapter, main.py (run_tip_adapter) and utils.py (search_hp).


def reference_tip_logits(features, clip_weights, cache_keys, cache_values, alpha, beta):
    affinity = features @ cache_keys  # keys stored (D, N) as in build_cache_model
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
    return 100.0 * features @ clip_weights + cache_logits * alpha


def reference_search_hp(search_scale, search_step, cache_keys, cache_values, features, labels, clip_weights):
    beta_list = [i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])]
    alpha_list = [i * (search_scale[1] - 0.1) / search_step[1] + 0.1 for i in range(search_step[1])]
    best_acc, best_beta, best_alpha = 0, 0, 0
    for beta in beta_list:
        for alpha in alpha_list:
            tip_logits = reference_tip_logits(features, clip_weights, cache_keys, cache_values, alpha, beta)
            acc = float((tip_logits.argmax(1) == labels).float().mean())
            if acc > best_acc:
                best_acc, best_beta, best_alpha = acc, beta, alpha
    return best_beta, best_alpha


def reference_grid_points(search_scale, search_step):
    """(beta, alpha) in search_hp's order: beta outer, alpha inner."""
    betas = [i * (search_scale[0] - 0.1) / search_step[0] + 0.1 for i in range(search_step[0])]
    alphas = [i * (search_scale[1] - 0.1) / search_step[1] + 0.1 for i in range(search_step[1])]
    return [(beta, alpha) for beta in betas for alpha in alphas]


def searched_tip_head(inputs, steps, ties):
    """A Tip-Adapter head on `inputs` after its search on the reference grid with tie rule `ties`."""
    from adaclip.methods import FeatureSet, make_method_config
    from adaclip.methods.tip_adapter import TipAdapterHead

    keys, train_labels, val, val_labels, clip_weights = inputs
    settings = {"search_units": "reference", "search_scale": (7.0, 3.0), "search_steps": steps, "leave_one_out": False}
    head = TipAdapterHead(4, keys.shape[1], make_method_config("tip-adapter", settings | {"search_ties": ties}))
    head.fit_training_features(FeatureSet(keys, train_labels))
    found = head.calibrate(FeatureSet(val, val_labels), clip_weights, 100.0)
    return head, found


def tip_inputs(seed=0, n_classes=4, shots=3, n_val=24, dim=16):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, dim, generator=g), dim=-1)

    def around(labels, noise):
        return F.normalize(centres[labels] + noise * torch.randn(len(labels), dim, generator=g), dim=-1)

    train_labels = torch.arange(n_classes).repeat_interleave(shots)
    val_labels = torch.arange(n_classes).repeat(n_val // n_classes)
    # class text features only loosely aligned with the image clusters, so the cache has work to do
    clip_weights = F.normalize(centres + 1.2 * torch.randn(n_classes, dim, generator=g), dim=-1)
    return around(train_labels, 0.6), train_labels, around(val_labels, 0.6), val_labels, clip_weights


def test_tip_adapter_logits_and_search_match_reference():
    from adaclip.methods import FeatureSet, make_method_config
    from adaclip.methods.tip_adapter import TipAdapterHead

    keys, train_labels, val, val_labels, clip_weights = tip_inputs()
    config = make_method_config(
        "tip-adapter",
        {"search_units": "reference", "search_scale": (7.0, 3.0), "search_steps": (50, 10), "leave_one_out": False},
    )
    head = TipAdapterHead(4, keys.shape[1], config)
    head.fit_training_features(FeatureSet(keys, train_labels))
    values = F.one_hot(train_labels, 4).float()
    # the forward pass at the paper's ImageNet values
    expected = reference_tip_logits(val, clip_weights.t(), keys.t(), values, 1.0, 5.5)
    torch.testing.assert_close(head(val, clip_weights, 100.0).logits, expected, atol=1e-5, rtol=0)
    # the search: the same (beta, alpha) as search_hp on the same validation features
    head.calibrate(FeatureSet(val, val_labels), clip_weights, 100.0)
    beta, alpha = reference_search_hp((7.0, 3.0), (50, 10), keys.t(), values, val, val_labels, clip_weights.t())
    assert (beta, alpha) != (0.1, 0.1)  # the search moved: the inputs discriminate between grid points
    assert head.beta.item() == pytest.approx(beta, abs=1e-6) and head.alpha.item() == pytest.approx(alpha, abs=1e-6)
    expected = reference_tip_logits(val, clip_weights.t(), keys.t(), values, alpha, beta)
    torch.testing.assert_close(head(val, clip_weights, 100.0).logits, expected, atol=1e-5, rtol=0)


def test_tip_adapter_scaled_search_is_the_reference_search_in_rescaled_units():
    """search_units="scaled" is the reference procedure on a grid whose betas are multiples of
    1 / median(1 - f.k) and whose alphas are multiples of the zero-shot / cache logit spread ratio."""
    from adaclip.methods import FeatureSet, make_method_config
    from adaclip.methods.tip_adapter import TipAdapterHead

    keys, train_labels, val, val_labels, clip_weights = tip_inputs(seed=1)
    values = F.one_hot(train_labels, 4).float()
    steps = (40, 8)
    config = make_method_config(
        "tip-adapter", {"search_scale": (10.0, 10.0), "search_steps": steps, "leave_one_out": False}
    )
    head = TipAdapterHead(4, keys.shape[1], config)
    head.fit_training_features(FeatureSet(keys, train_labels))
    head.calibrate(FeatureSet(val, val_labels), clip_weights, 100.0)
    # the same search written out: grid points in rescaled units, scored as search_hp scores them
    zero_shot = 100.0 * val @ clip_weights.t()
    beta_unit = 1.0 / float((1 - val @ keys.t()).median())
    best = (-1.0, None, None)
    for i in range(steps[0]):
        beta = (0.1 + i * (10.0 - 0.1) / steps[0]) * beta_unit
        cache = ((-1) * (beta - beta * (val @ keys.t()))).exp() @ values
        ratio = float(zero_shot.std(dim=1).mean() / cache.std(dim=1).mean())
        for j in range(steps[1]):
            alpha = (0.1 + j * (10.0 - 0.1) / steps[1]) * ratio
            acc = float(((zero_shot + alpha * cache).argmax(1) == val_labels).float().mean())
            if acc > best[0]:
                best = (acc, beta, alpha)
    assert head.beta.item() == pytest.approx(best[1], rel=1e-5)
    assert head.alpha.item() == pytest.approx(best[2], rel=1e-5)


def test_tip_adapter_search_ties_by_loss_takes_the_tied_point_of_lowest_cross_entropy():
    """search_ties="loss": of the grid points with the most correct validation images, the one whose
    scores have the lowest mean cross-entropy; "first" keeps the reference's first in grid order."""
    inputs = tip_inputs(seed=2, n_val=8)
    keys, train_labels, val, val_labels, clip_weights = inputs
    values = F.one_hot(train_labels, 4).float()
    steps = (12, 6)
    chosen = {}
    for ties in ("first", "loss"):
        head, _ = searched_tip_head(inputs, steps, ties)
        chosen[ties] = (head.beta.item(), head.alpha.item())
    # every grid point scored independently: (correct, cross-entropy)
    points = []
    for beta, alpha in reference_grid_points((7.0, 3.0), steps):
        logits = reference_tip_logits(val, clip_weights.t(), keys.t(), values, alpha, beta)
        correct = int((logits.argmax(1) == val_labels).sum())
        loss = float(-logits.log_softmax(1)[torch.arange(len(val_labels)), val_labels].mean())
        points.append((correct, loss, beta, alpha))
    most = max(p[0] for p in points)
    tied = [p for p in points if p[0] == most]
    assert len(tied) > 1  # the inputs make the tie rule matter
    first, lowest = tied[0], min(tied, key=lambda p: p[1])
    assert first != lowest
    assert chosen["first"] == pytest.approx((first[2], first[3]), abs=1e-6)
    assert chosen["loss"] == pytest.approx((lowest[2], lowest[3]), abs=1e-6)


def test_tip_adapter_search_ties_by_training_images_left_out_one_at_a_time():
    """search_ties="training": validation images decide; among grid points with equally many of them
    right, the most training images right when each is scored without its own cache entry; then the
    first in grid order."""
    inputs = tip_inputs(seed=7, shots=4, n_val=8)
    keys, train_labels, val, val_labels, clip_weights = inputs
    values = F.one_hot(train_labels, 4).float()
    steps = (12, 6)
    head, found = searched_tip_head(inputs, steps, "training")
    # written out: validation correct, then leave-one-out training correct, per grid point in grid order
    points = []
    for beta, alpha in reference_grid_points((7.0, 3.0), steps):
        logits = reference_tip_logits(val, clip_weights.t(), keys.t(), values, alpha, beta)
        on_val = int((logits.argmax(1) == val_labels).sum())
        on_train = 0
        for k in range(len(keys)):
            others = torch.cat([keys[:k], keys[k + 1 :]])
            rest = torch.cat([values[:k], values[k + 1 :]])
            row = reference_tip_logits(keys[k : k + 1], clip_weights.t(), others.t(), rest, alpha, beta)
            on_train += int(row.argmax(1).item() == train_labels[k].item())
        points.append((on_val, on_train, beta, alpha))
    best_val = max(p[0] for p in points)
    tied = [p for p in points if p[0] == best_val]
    expected = max(tied, key=lambda p: p[1])  # max keeps the first of equals
    assert len(tied) > 1 and expected != tied[0]  # the validation images tie; the training images decide
    assert (head.beta.item(), head.alpha.item()) == pytest.approx((expected[2], expected[3]), abs=1e-6)
    assert found["searched_images"] == len(val_labels)  # only validation images are counted


# ------------------------------------------------------------------------------------------ LoRA
# Reference: github.com/MaxZanella/CLIP-LoRA, loralib/layers.py: W' = W + scaling * B @ A with
# scaling = alpha / sqrt(r), on q, k, v of every attention layer of both encoders.


def test_lora_matches_merged_reference_weights(dataset, tiny_backbone):
    import adaclip
    from adaclip.backbone import create_backbone

    template = "a photo of a {}."
    adapter = adaclip.fit(
        dataset, method="lora", backbone=tiny_backbone, shots=2, epochs=1, val_split=0, templates=[template]
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in adapter.model.named_parameters():
            if name.endswith("lora_B"):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=g))  # a visible update everywhere
    adapter.model.eval()
    reference = create_backbone("adaclip-test-vit", "none", device="cpu").model  # fresh, identical weights
    reference.eval()
    rank, alpha = 2, 1.0
    state = adapter.model.adapter_state()
    towers = {"image": reference.visual.transformer.resblocks, "text": reference.transformer.resblocks}
    merged = 0
    with torch.no_grad():
        for tower, blocks in towers.items():
            for index, block in enumerate(blocks):
                d = block.attn.embed_dim
                for slot, proj in enumerate("qkv"):
                    prefix = f"components.0.lora.{tower}.{index}.{proj}"
                    delta = state[f"{prefix}.lora_B"] @ state[f"{prefix}.lora_A"] * (alpha / math.sqrt(rank))
                    block.attn.in_proj_weight[slot * d : (slot + 1) * d] += delta
                    merged += 1
    assert merged == 3 * (len(towers["image"]) + len(towers["text"]))
    pixels = torch.rand(3, 3, 32, 32, generator=g)
    tokens = tiny_backbone.tokenize([template.format(name) for name in adapter.class_names])
    with torch.no_grad():
        image = F.normalize(reference.encode_image(pixels), dim=-1)
        text = F.normalize(reference.encode_text(tokens), dim=-1)
        expected = reference.logit_scale.exp() * image @ text.t()
        got = adapter.logits(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ CoOp
# Reference: github.com/KaiyangZhou/CoOp, trainers/coop.py: prompt = [SOS] ctx_1..ctx_M name "." [EOS]
# (class token at the end), TextEncoder = prompts + positional_embedding -> transformer -> ln_final ->
# the EOT token's output @ text_projection; logits = logit_scale * normalised image @ normalised text.


def test_coop_matches_reference_prompt_learner(dataset, tiny_backbone):
    import adaclip
    from adaclip.backbone import create_backbone

    adapter = adaclip.fit(dataset, method="coop", backbone=tiny_backbone, shots=2, epochs=1, val_split=0, n_ctx=4)
    g = torch.Generator().manual_seed(4)
    ctx = 0.5 * torch.randn(4, tiny_backbone.model.token_embedding.embedding_dim, generator=g)
    with torch.no_grad():
        adapter.model.components[0].ctx.copy_(ctx)
    adapter.model.invalidate_class_cache()
    adapter.model.eval()
    clip = create_backbone("adaclip-test-vit", "none", device="cpu").model
    clip.eval()
    tokens = tiny_backbone.tokenize([f"X X X X {name}." for name in adapter.class_names])
    with torch.no_grad():
        embedded = clip.token_embedding(tokens)
        prompts = torch.cat([embedded[:, :1], ctx.expand(len(tokens), -1, -1), embedded[:, 5:]], dim=1)
        x = prompts + clip.positional_embedding
        x = clip.transformer(x, attn_mask=clip.attn_mask)
        x = clip.ln_final(x)
        text = x[torch.arange(len(tokens)), tokens.argmax(dim=-1)] @ clip.text_projection
        pixels = torch.rand(3, 3, 32, 32, generator=g)
        image = F.normalize(clip.encode_image(pixels), dim=-1)
        expected = clip.logit_scale.exp() * image @ F.normalize(text, dim=-1).t()
        got = adapter.logits(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------ RAda
# Reference: github.com/khufia/RAda, eft/trainers/rada.py (SimpleMultiheadAttention, CustomCLIP.forward,
# LInfLoss), computed the long way: q1, q2 repeated, every K x K joint softmax (times K) materialised.


def reference_rada(mha: dict, image_features, text_features, logit_scale, heads=8, t=1.0):
    def linear(name, x):
        return x @ mha[f"{name}.weight"].t() + mha[f"{name}.bias"]

    f, h = image_features.unsqueeze(1), text_features.unsqueeze(0)
    it = f * h
    b, k, d = it.shape
    scale = logit_scale
    q1, q2 = f.repeat(1, k, 1), h.repeat(b, 1, 1)
    query1, query2 = math.sqrt(scale) * q1, math.sqrt(scale) * q2
    query3 = key = value = scale * it
    hd = d // heads

    def split(x):
        return x.view(b, k, heads, hd).transpose(1, 2)

    q1, q2, q3 = split(linear("q_proj1", query1)), split(linear("q_proj2", query2)), split(linear("q_proj3", query3))
    kk, v = split(linear("k_proj", key)), split(linear("v_proj", value))
    maps = []
    for q in (q1, q2, q3):
        w = (q @ kk.transpose(-2, -1)) / (hd**0.5)
        maps.append(F.softmax(w.reshape(b, heads, -1) / t, dim=-1).view(b, heads, k, k) * k)
    out = ((maps[0] + maps[1] + maps[2]) / 3 @ v).transpose(1, 2).reshape(b, k, d)
    mask = torch.relu(torch.ones_like(out) + linear("out_proj", out))
    logits = scale * (mask * it).sum(dim=-1)
    linf = (mask - 1).abs().view(b, -1).max(dim=1)[0].mean()
    return logits, linf


def test_rada_matches_reference_attention():
    from adaclip.methods.rada import RationalMaskConfig, RationalMaskHead

    torch.manual_seed(0)
    d, n_images, n_classes = 32, 3, 5
    head = RationalMaskHead(d, RationalMaskConfig(alpha=1.0)).double()
    with torch.no_grad():
        head.out_proj.weight.normal_(0, 0.05)  # trained-looking: the mask is no longer the identity
        head.out_proj.bias.normal_(0, 0.05)
    g = torch.Generator().manual_seed(1)
    f = F.normalize(torch.randn(n_images, d, generator=g, dtype=torch.float64), dim=-1)
    h = F.normalize(torch.randn(n_classes, d, generator=g, dtype=torch.float64), dim=-1)
    state = {k: v.detach() for k, v in head.state_dict().items()}
    expected, linf = reference_rada(state, f, h, 30.0)
    head.train()
    out = head(f, h, 30.0)
    torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss_terms["mask_reg"], 1.0 * linf, atol=1e-7, rtol=0)
    assert float((expected - 30.0 * f @ h.t()).abs().max()) > 1e-2  # the mask does change the logits


# ------------------------------------------------------------------------------------------ TPT (episodic)
# Reference: github.com/azshue/TPT, tpt_classification.py: select_confident_samples (lowest-entropy
# int(0.1 * V) views, chosen at step 0 and kept), avg_entropy, torch.optim.AdamW(params, lr) (weight
# decay 0.01 by default), prediction on the original view, state and optimiser reset per image.


def test_episodic_tta_matches_reference_tpt_loop(dataset, tmp_path, tiny_backbone):
    import copy

    from PIL import Image

    import adaclip
    from adaclip.tta import TestTimeAdaptation, make_tta_settings

    Image.new("RGB", (40, 40), (200, 30, 30)).save(tmp_path / "a.png")
    adapter = adaclip.fit(dataset, method="rada", backbone=tiny_backbone, epochs=1, val_split=0)
    settings = make_tta_settings(mode="episodic", views=64, steps=4, lr=0.02)
    run = TestTimeAdaptation(adapter.model, settings)
    g = torch.Generator().manual_seed(5)
    view_features = F.normalize(torch.randn(64, tiny_backbone.embed_dim, generator=g), dim=-1)
    run.model.image_features = lambda pixels: view_features  # fixed views: the parity is of the loop
    start = copy.deepcopy(run.head)
    predicted = list(run.run([tmp_path / "a.png"]))[0]

    class_features = adapter.model.class_features().detach()
    scale = tiny_backbone.logit_scale
    model = copy.deepcopy(start)
    optimizer = torch.optim.AdamW(model.parameters(), 0.02)
    selected_idx = None
    for _ in range(4):
        output = model(view_features, class_features, scale).logits
        if selected_idx is not None:
            output = output[selected_idx]
        else:
            batch_entropy = -(output.softmax(1) * output.log_softmax(1)).sum(1)
            selected_idx = torch.argsort(batch_entropy, descending=False)[: int(batch_entropy.size()[0] * 0.1)]
            output = output[selected_idx]
        logits = output - output.logsumexp(dim=-1, keepdim=True)
        avg_logits = logits.logsumexp(dim=0) - math.log(logits.shape[0])
        avg_logits = torch.clamp(avg_logits, min=torch.finfo(avg_logits.dtype).min)
        loss = -(avg_logits * torch.exp(avg_logits)).sum(dim=-1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        expected = model(view_features[:1], class_features, scale).logits.softmax(dim=-1)[0]
    scores = torch.tensor([score for _, score in predicted.top_k])
    torch.testing.assert_close(scores, expected.sort(descending=True).values[: len(scores)], atol=1e-5, rtol=0)
    assert not torch.allclose(expected, start(view_features[:1], class_features, scale).logits.softmax(-1)[0])


# ------------------------------------------------------------------------------------------ SHOT (online)
# Reference: github.com/tim-learn/SHOT, object/image_target.py: entropy_loss = mean(Entropy(softmax));
# msoftmax = softmax.mean(0); entropy_loss -= sum(-msoftmax * log(msoftmax + eps)); weight ent_par = 1.


def test_online_objective_is_shots_information_maximisation():
    from adaclip.tta import make_tta_settings, online_loss

    g = torch.Generator().manual_seed(6)
    logits = (3 * torch.randn(16, 5, generator=g)).requires_grad_(True)
    settings = make_tta_settings(mode="online", anchor_weight=0.0)
    ours, _ = online_loss(logits, logits.detach(), settings, None)
    # a later batch: the marginal is still this batch's own mean, not a running one
    ours_later, _ = online_loss(logits, logits.detach(), settings, torch.full((5,), 0.2))
    reference = logits.detach().clone().requires_grad_(True)
    softmax_out = reference.softmax(dim=1)
    entropy_loss = torch.mean(-(softmax_out * torch.log(softmax_out + 1e-5)).sum(dim=1))
    msoftmax = softmax_out.mean(dim=0)
    entropy_loss = entropy_loss - torch.sum(-msoftmax * torch.log(msoftmax + 1e-5))
    torch.testing.assert_close(ours, entropy_loss, atol=1e-4, rtol=0)  # SHOT's eps 1e-5 inside the logs
    torch.testing.assert_close(ours_later, ours, atol=1e-6, rtol=0)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    (grad_reference,) = torch.autograd.grad(entropy_loss, reference)
    torch.testing.assert_close(grad_ours, grad_reference, atol=1e-4, rtol=0)
