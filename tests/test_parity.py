"""Reference parity: each method's formula written again from its paper / reference code in a few lines
of plain torch (not calling adaclip's functions), run on small fixed inputs, and compared with adaclip.
These are the tests that catch an inverted mask or a different normalisation, which accuracy tests on
toy data cannot see."""

from __future__ import annotations

import math

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
