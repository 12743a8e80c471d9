"""Test-time adaptation of RAda's mask on unlabeled images (`adaclip tta`, `Adapter.tta`).

- `settings`: TTASettings, TDASettings and each mode's defaults;
- `objectives`: entropy, confident selection, marginal entropy, the online loss;
- `views`: TPT's seeded views of an image (episodic);
- `tda`: TDA's caches;
- `run`: the run itself, which returns an adapted model (the Adapter wraps it).

Only the mask network adapts; both encoders stay frozen, so each image is encoded once (no grad) and
every adaptation step runs the mask network alone. Labels are never used for adapting; when they are
known (class sub-folders or a CSV) they only score the predictions.

Where the mask comes from:
  - an adapter whose head is RAda's mask (rada, rada-ft, adaring+rada: their methods declare `has_mask`):
    its trained mask;
  - an adapter with CLIP's cosine head (zeroshot, full-ft, adaring): a fresh mask at identity (zero
    out-projection, other projections drawn from `seed`), so adaptation starts exactly at the adapter's
    own predictions; the adapted file's method becomes the method's declared `masked_variant`
    (zeroshot -> rada, full-ft -> rada-ft, adaring -> adaring+rada); a head that adds scores of its own
    on top (AdaRing's training cache) keeps them, with the mask in place of the cosine head under it
    (`Head.with_classifier`);
  - any other head (linear-probe scores with its own weight matrix, not with class features; its method
    declares `can_hold_mask = False`): refused, because the mask is defined on the rational matrix of
    image and class *features*.

Modes:
  - episodic (the TPT protocol, which the paper's test-time comparison implies; the paper's objective is
    not public; Shu et al., NeurIPS 2022, github.com/azshue/TPT): per image, `views - 1` random resized
    crops (area 8-100%, TPT's RandomResizedCrop) + flips and the original view; the `confident_fraction`
    most confident views (lowest entropy) are selected once, before the first step, and kept for every
    step (TPT's `selected_idx`); the entropy of their averaged probability is minimised for `steps` AdamW
    steps (weight decay 0.01, TPT's AdamW default; lr 5e-4, a tenth of TPT's: a named deviation, see
    adaclip.tta.settings); the prediction is made on the original view with the
    updated mask; then the mask and the optimiser are reset. Each image's views are drawn from a
    generator seeded with `seed` and the image's pixels, so an image's result does not depend on its
    position or name in the folder, and different images get different crops.
  - online (adaclip's choice; no reset): the images are adapted on in batches, in a seeded random order
    (a folder sorted by class would otherwise feed batches of one class), with the information-
    maximisation objective of SHOT (Liang et al., ICML 2020, github.com/tim-learn/SHOT): mean entropy of
    the (`confident_fraction` most confident of the) batch's predictions, minus `diversity_weight` (1, as
    SHOT) times the entropy of the batch's mean prediction (high only when predictions spread over the
    classes; `diversity_momentum` > 0 is adaclip's variant on a running mean), plus `anchor_weight` times
    KL(p_start || p), adaclip's addition, which keeps predictions near those of the starting mask.
    Each batch is predicted right after its update; results come out in folder order.
  - tda (a baseline, training-free: Karmanov et al., "Efficient Test-Time Adaptation of Vision-Language
    Models", CVPR 2024; our implementation): nothing is optimised. Over the stream (same seeded order as
    online), a positive cache keeps, per predicted class, the `positive_capacity` lowest-entropy image
    features, and a negative cache keeps features of moderately uncertain images (entropy in nats divided
    by log2(K), as the reference code computes it, inside `negative_entropy`) with a mask of the classes
    whose probability lies strictly inside `negative_mask` (0.03 < p < 1: the reference's mask_threshold).
    Logits = the adapter's own logits + a_pos * exp(-b_pos (1 - f.K_pos)) V_pos
    - a_neg * exp(-b_neg (1 - f.K_neg)) V_neg (tests/test_parity.py checks this against the reference's
    formulas). One view per image (TDA's ImageNet setting adds AugMix views). The cache lives for the
    stream only: there is no adapted file to write. Works on any adapter.

Defaults. Episodic: TPT's settings (64 views, the 10% most confident, one AdamW step, weight decay
0.01) but lr 5e-4 where TPT's prompt takes 5e-3. Online: lr 1e-3, one step per batch of 32, diversity
and anchor weights 1. What they do on corrupted Fashion-MNIST is measured by `python -m benchmarks.tta`
(docs/benchmarks.md).
"""

from .objectives import confident, confident_rows, entropy, marginal_entropy, online_loss
from .run import TestTimeAdaptation, TTAResult, check_adaptable, list_tta_images, output_method, run_tta
from .settings import TDASettings, TTASettings, make_tta_settings
from .tda import TDACache
from .views import episodic_views, view_seed

__all__ = [
    "TDACache",
    "TDASettings",
    "TTAResult",
    "TTASettings",
    "TestTimeAdaptation",
    "check_adaptable",
    "confident",
    "confident_rows",
    "entropy",
    "episodic_views",
    "list_tta_images",
    "make_tta_settings",
    "marginal_entropy",
    "online_loss",
    "output_method",
    "run_tta",
    "view_seed",
]
