"""Baselines as methods: LoRA (CLIP-LoRA), CoOp and Tip-Adapter(-F) on tiny random-weight backbones."""

from __future__ import annotations

from adaclip.methods import make_method_config


def test_partial_train_overrides_keep_the_methods_recipe():
    """`--epochs 3` (or `--set train.lr=...`) changes that field only: the rest stays the method's recipe."""
    adaring = make_method_config("adaring", {"train": {"epochs": 3}}).train
    assert (adaring.epochs, adaring.lr, adaring.weight_decay) == (3, 2e-3, 1e-4)
    probe = make_method_config("linear-probe", {"train": {"lr": 0.1}}).train
    assert (probe.lr, probe.batch_size, probe.epochs, probe.warmup_epochs) == (0.1, 64, 20, 0)
    # a complete recipe (as stored in adapter files) round-trips unchanged
    config = make_method_config("adaring", {"train": {"epochs": 3}})
    assert make_method_config("adaring", config.model_dump(mode="json")) == config
