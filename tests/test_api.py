"""The Python API end to end on a tiny random-weight backbone: fit, save, load, predict, evaluate."""

from __future__ import annotations

import pytest
import torch

import adaclip
from adaclip.errors import AdapterFileError, InputError, UsageError
from adaclip.methods import make_method_config
from adaclip.model import AdaptedCLIP

from .conftest import TINY


def test_zero_shot_is_deterministic_and_needs_no_training(dataset, tiny_backbone):
    first = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone, seed=3)
    second = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone, seed=3)
    pixels = torch.stack([tiny_backbone.eval_transform()(adaclip.images.load_image(p)) for p in _some_images(dataset)])
    assert torch.equal(first.logits(pixels), second.logits(pixels))
    assert first.metadata.training.epochs == 0 and first.trainable_params == 0
    # logits are CLIP's: scale * cosine(image, class prompt)
    feats = torch.nn.functional.normalize(tiny_backbone.encode_image(pixels), dim=-1)
    text = tiny_backbone.encode_prompts(first.class_names, first.metadata.templates)
    assert torch.allclose(first.logits(pixels), tiny_backbone.logit_scale * feats @ text.t(), atol=1e-5)


def _some_images(dataset, n=6):
    return sorted((dataset / "test").rglob("*.png"))[:n]


def test_fit_save_load_predict_round_trip(dataset, tiny_backbone, tmp_path):
    adapter = adaclip.fit(dataset, method="linear-probe", backbone=tiny_backbone, epochs=3, lr=1e-2, seed=0)
    path = adapter.save(tmp_path / "probe.adaclip")
    loaded = adaclip.load(path, backbone=tiny_backbone)
    pixels = torch.stack([tiny_backbone.eval_transform()(adaclip.images.load_image(p)) for p in _some_images(dataset)])
    assert torch.equal(adapter.logits(pixels), loaded.logits(pixels))
    saved = adapter.model.adapter_state()
    restored = loaded.model.adapter_state()
    assert saved.keys() == restored.keys()
    assert all(torch.equal(saved[k], restored[k]) for k in saved)
    # saving the loaded adapter again gives a byte-identical file
    again = loaded.save(tmp_path / "again.adaclip")
    assert again.read_bytes() == path.read_bytes()
    predictions = loaded.predict(_some_images(dataset), top_k=2)
    assert [p.label for p in predictions] == [adapter.class_names[i] for i in adapter.logits(pixels).argmax(-1)]
    assert all(len(p.top_k) == 2 and p.top_k[0][1] >= p.top_k[1][1] for p in predictions)


def test_linear_probe_learns_the_task(dataset, tiny_backbone):
    zero_shot = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone).evaluate(dataset)
    probe = adaclip.fit(dataset, method="linear-probe", backbone=tiny_backbone, epochs=20, lr=1e-2, seed=0)
    report = probe.evaluate(dataset)
    history = probe.metadata.training.history
    assert history[-1]["loss"] < history[0]["loss"] * 0.7
    assert report.accuracy >= 0.8 and report.accuracy >= zero_shot.accuracy + 0.3
    assert report.n_images == 24 and len(report.confusion) == 4
    assert sum(map(sum, report.confusion)) == 24


def test_backbone_untouched_by_training(dataset, tiny_backbone):
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    adaclip.fit(dataset, method="linear-probe", backbone=tiny_backbone, epochs=2, lr=1e-2)
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_wrong_backbone_is_refused(dataset, tiny_backbone, other_backbone, tmp_path):
    path = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone).save(tmp_path / "zs.adaclip")
    with pytest.raises(AdapterFileError, match="does not match"):
        adaclip.load(path, backbone=other_backbone)


def test_save_refuses_to_overwrite_without_force(dataset, tiny_backbone, tmp_path):
    adapter = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone)
    path = adapter.save(tmp_path / "a.adaclip")
    original = path.read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        adapter.save(path)
    assert path.read_bytes() == original
    adapter.save(path, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.adaclip"]  # no temp file left behind


def test_evaluate_new_class_names_needs_a_class_agnostic_method(dataset, tiny_backbone, tmp_path):
    from .conftest import make_folder

    other = make_folder(
        tmp_path / "other",
        2,
        seed=5,
        classes={"pink_dot": ((250, 150, 200), "circle"), "grey_bar": ((128, 128, 128), "stripes")},
    )
    zero_shot = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone)
    assert zero_shot.evaluate(other).n_images == 4  # scored among the new names
    probe = adaclip.fit(dataset, method="linear-probe", backbone=tiny_backbone, epochs=1)
    with pytest.raises(InputError, match="trained on"):
        probe.evaluate(other)
    # a subset of the training classes is fine for any method
    subset = tmp_path / "subset"
    (subset / "red_circle").mkdir(parents=True)
    for image in sorted((dataset / "test" / "red_circle").iterdir())[:2]:
        (subset / "red_circle" / image.name).write_bytes(image.read_bytes())
    report = probe.evaluate(subset)
    assert report.n_images == 2 and len(report.per_class) == 4


def test_unreadable_images_are_skipped_and_counted(dataset, tiny_backbone, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dataset / "train", data)
    (data / "red_circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (data / "green_square" / "empty.jpg").write_bytes(b"")
    adapter = adaclip.fit(data, method="linear-probe", backbone=tiny_backbone, epochs=1, val_split=0)
    assert adapter.metadata.training.skipped_images == 2
    report = adapter.evaluate(data)
    assert report.skipped_images == 2 and report.n_images == 48
    predictions = adapter.predict(data / "red_circle")
    assert sum(p.error is not None for p in predictions) == 1 and len(predictions) == 13


def test_method_config_validation():
    with pytest.raises(UsageError, match="unknown method"):
        make_method_config("nope")
    with pytest.raises(UsageError, match="train.lr"):
        make_method_config("linear-probe", {"train": {"lr": -1}})
    with pytest.raises(UsageError, match="bogus"):
        make_method_config("linear-probe", {"bogus": 1})


def test_parameter_init_depends_on_seed_only(tiny_backbone):
    config = make_method_config("linear-probe")
    a = AdaptedCLIP(tiny_backbone, config, ["a", "b"], ["{}"], seed=1)
    torch.rand(100)  # global RNG use in between must not matter
    b = AdaptedCLIP(tiny_backbone, config, ["a", "b"], ["{}"], seed=1)
    assert all(torch.equal(a.adapter_state()[k], b.adapter_state()[k]) for k in a.adapter_state())


def test_backbone_name_is_recorded(dataset, tiny_backbone):
    adapter = adaclip.fit(dataset, method="zeroshot", backbone=tiny_backbone)
    assert adapter.metadata.backbone.name == TINY
    assert adapter.metadata.backbone.pretrained == "none"


def test_library_users_silence_and_redirect_adaclip_logging(dataset, tiny_backbone, capfd, caplog):
    """adaclip logs through `logging` ("adaclip" logger): setLevel silences it, and handing its records
    to the root logger routes them through the application's configuration."""
    import logging

    logger = logging.getLogger("adaclip")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    try:
        adaclip.fit(dataset, "zeroshot", backbone=tiny_backbone)
        assert "zeroshot: 44 training images" in capfd.readouterr().err  # on by default, on stderr

        logger.setLevel(logging.ERROR)
        adaclip.fit(dataset, "zeroshot", backbone=tiny_backbone)
        assert capfd.readouterr().err == ""

        logger.setLevel(logging.INFO)
        logger.handlers.clear()
        logger.propagate = True
        with caplog.at_level(logging.INFO, logger="adaclip"):
            adaclip.fit(dataset, "zeroshot", backbone=tiny_backbone)
        assert capfd.readouterr().err == ""  # not on stderr any more: the application's handlers have it
        assert any(r.name == "adaclip" and "44 training images" in r.getMessage() for r in caplog.records)
    finally:
        logger.setLevel(level)
        logger.handlers[:] = handlers
        logger.propagate = propagate


def test_progress_can_be_turned_off(monkeypatch):
    from adaclip import ui

    monkeypatch.delenv("ADACLIP_NO_PROGRESS", raising=False)
    monkeypatch.setattr(ui.stderr_console, "_force_terminal", True)
    assert ui.progress_enabled()
    adaclip.set_progress(False)
    try:
        assert not ui.progress_enabled()
        with ui.progress("x", 3) as advance:
            advance()  # a no-op, nothing drawn
    finally:
        adaclip.set_progress(True)


def test_api_errors_name_the_api_argument(dataset, tiny_backbone, tmp_path):
    """In Python the fix names `pretrained=`, not the CLI's --pretrained (tests/test_cli.py checks that)."""
    from adaclip.errors import _surface

    cli_state = _surface["cli"]
    _surface["cli"] = False
    try:
        with pytest.raises(adaclip.UsageError) as caught:
            adaclip.create_backbone(TINY, "no-such-tag", device="cpu")
        assert "pretrained='none'" in caught.value.one_line() and "--pretrained" not in caught.value.one_line()
    finally:
        _surface["cli"] = cli_state


def test_lora_on_lite_warns_at_fit_not_on_every_load(dataset, tmp_path, capfd):
    adapter = adaclip.fit(dataset, "lora", backbone="lite", pretrained=None, epochs=0, device="cpu")
    assert "no attention layer to adapt" in capfd.readouterr().err  # EfficientNet: said once, when fitting
    path = adapter.save(tmp_path / "lite-lora.adaclip")
    adaclip.load(path, device="cpu")
    assert "no attention layer" not in capfd.readouterr().err
