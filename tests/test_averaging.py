"""Gaussian-weighted averaging of the weights over epochs (`train.weight_averaging=gaussian`)."""

from __future__ import annotations

import math

import pytest
import torch

import adaclip
from adaclip.adapter_file import read_adapter_file
from adaclip.training import TrainingInterrupted
from adaclip.training.averaging import WeightAverage, averaging_weights

RING = {"blocks": "all", "ranks": [2, 4]}
AVERAGED = {"weight_averaging": "gaussian", "averaging_peak": 0.5, "averaging_spread": 0.4}


def _promptsrc_weights(epochs: int, mean: float, std: float) -> list[float]:
    """PromptSRC's GPA weights as its trainer computes them: the normal pdf at epochs 1..N, normalised."""
    pdf = [
        (1 / (std * math.sqrt(2 * math.pi))) * math.exp(-0.5 * ((a - mean) / std) ** 2) for a in range(1, epochs + 1)
    ]
    return [p / sum(pdf) for p in pdf]


@pytest.mark.parametrize(("epochs", "mean", "std"), [(20, 15, 1), (50, 30, 30), (50, 45, 5)])
def test_weights_match_promptsrc(epochs, mean, std):
    ours = averaging_weights(epochs, mean / epochs, std / epochs)
    assert ours == pytest.approx(_promptsrc_weights(epochs, mean, std), abs=1e-12)
    assert sum(ours) == pytest.approx(1.0)


def test_a_spread_far_below_one_epoch_keeps_the_nearest_epoch():
    assert averaging_weights(10, 0.76, 1e-4) == [0.0] * 7 + [1.0, 0.0, 0.0]  # all densities underflow; 8 is nearest 7.6


def test_fit_ends_with_the_weighted_average_of_each_epochs_weights(dataset, tiny_backbone, monkeypatch):
    snapshots: list[list[torch.Tensor]] = []
    original = WeightAverage.add_epoch

    def recording(self, epoch):
        snapshots.append([p.detach().clone() for p in self.params])
        original(self, epoch)

    monkeypatch.setattr(WeightAverage, "add_epoch", recording)
    common = dict(method="adaring", backbone=tiny_backbone, epochs=3, lr=1e-2, seed=2, val_split=0, **RING)
    averaged = adaclip.fit(dataset, config={"train": AVERAGED}, **common)
    assert len(snapshots) == 3
    weights = _promptsrc_weights(3, 0.5 * 3, 0.4 * 3)
    for index, param in enumerate(averaged.model.trainable_parameters()):
        expected = sum(w * snap[index] for w, snap in zip(weights, snapshots, strict=True))
        torch.testing.assert_close(param.detach(), expected, rtol=0, atol=1e-6)
    # averaging changes only where the run ends: without it the fit ends on the last epoch's weights,
    # which differ from the average
    last = adaclip.fit(dataset, config={"train": {"weight_averaging": "off"}}, **common)
    assert all(torch.equal(a, b) for a, b in zip(last.model.trainable_parameters(), snapshots[-1], strict=True))
    assert any(
        not torch.allclose(a, b) for a, b in zip(averaged.model.trainable_parameters(), snapshots[-1], strict=True)
    )
    assert averaged.metadata.method_config["train"]["weight_averaging"] == "gaussian"


def test_resume_with_averaging_gives_the_uninterrupted_adapter(dataset, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    common = dict(method="adaring", backbone=tiny_backbone, epochs=3, lr=1e-2, seed=4, val_split=0, **RING)
    reference = adaclip.fit(dataset, config={"train": AVERAGED}, **common).save(tmp_path / "reference.adaclip")
    checkpoint = tmp_path / "run.adaclip.ckpt"

    def stop_after_second_epoch(epoch, entry):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        adaclip.fit(
            dataset, config={"train": AVERAGED}, checkpoint=checkpoint, on_epoch_end=stop_after_second_epoch, **common
        )
    resumed = adaclip.fit(dataset, config={"train": AVERAGED}, checkpoint=checkpoint, resume=True, **common)
    path = resumed.save(tmp_path / "resumed.adaclip")
    expected, got = read_adapter_file(reference)[1], read_adapter_file(path)[1]
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_a_file_written_before_averaging_existed_loads_without_it(dataset, tiny_backbone, tmp_path):
    """An adapter file's recorded train settings are those of the adaclip that wrote it: a field it lacks
    (weight averaging, for files older than it) keeps the behaviour of that time, not today's recipe."""
    from adaclip.adapter_file import write_adapter_file

    adapter = adaclip.fit(
        dataset,
        method="adaring",
        backbone=tiny_backbone,
        epochs=1,
        seed=0,
        val_split=0,
        config={"train": {"weight_averaging": "off"}},
        **RING,
    )
    metadata, tensors = read_adapter_file(adapter.save(tmp_path / "new.adaclip"))
    old = metadata.model_copy(deep=True)
    for field in ("weight_averaging", "averaging_peak", "averaging_spread"):
        del old.method_config["train"][field]
    path = write_adapter_file(tmp_path / "old.adaclip", tensors, old)
    loaded = adaclip.load(path, backbone=tiny_backbone)
    assert loaded.model.config.train.weight_averaging == "off"
    assert loaded.model.config.text_consistency == adapter.model.config.text_consistency
    # a method setting added later with a default that changes behaviour: the file's time's value
    del old.method_config["training_cache"]
    for key in [k for k in tensors if k.startswith("head.")]:
        del tensors[key]
    older = adaclip.load(write_adapter_file(tmp_path / "older.adaclip", tensors, old), backbone=tiny_backbone)
    assert older.model.config.training_cache is False and type(older.model.head).__name__ == "CosineHead"
    # the cache's tie rule: files from before it existed searched with the first tied point
    del old.method_config["training_cache_ties"]
    old.method_config["training_cache"] = False
    assert (
        adaclip.load(
            write_adapter_file(tmp_path / "ties.adaclip", tensors, old), backbone=tiny_backbone
        ).model.config.training_cache_ties
        == "first"
    )
    assert adapter.model.config.training_cache_ties == "training"
    # a file that records averaging keeps it
    averaged = adaclip.fit(dataset, method="adaring", backbone=tiny_backbone, epochs=1, seed=0, val_split=0, **RING)
    again = adaclip.load(averaged.save(tmp_path / "averaged.adaclip"), backbone=tiny_backbone)
    assert again.model.config.train.weight_averaging == "gaussian"
