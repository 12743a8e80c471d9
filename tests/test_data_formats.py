"""Every kind of DATA (class folders, CSV/JSONL manifests, Hugging Face imagefolder metadata, WebDataset
shards) indexes to the same labelled images and round-trips fit -> eval -> predict on real images
(sample_data's Fashion-MNIST PNGs); hostile manifests and broken members are refused or counted."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from adaclip.data import (
    iter_input_paths,
    open_data,
    prepare_eval_data,
    prepare_training_data,
    read_image_folder,
    read_manifest,
)
from adaclip.errors import InputError

SAMPLE = Path(__file__).parent.parent / "sample_data"
CLASSES = ["bag", "sneaker", "trouser"]
N_TRAIN, N_TEST = 6, 3  # per class


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """images/{train,test}/<class>/*.png: a few real sample_data images per class."""
    root = tmp_path_factory.mktemp("formats") / "images"
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for src in sorted((SAMPLE / split / name).glob("*.png"))[:n]:
                shutil.copy(src, root / split / name / src.name)
    return root


def rows_of(images: Path, base: Path) -> list[dict]:
    """(path relative to `base`, label, split) for every image under `images`."""
    out = []
    for path in sorted(images.rglob("*.png")):
        split, label = path.parent.parent.name, path.parent.name
        out.append({"path": path.relative_to(base).as_posix(), "label": label, "split": split})
    return out


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([row[c] for c in columns])
    return path


def write_shards(
    images: Path, pattern: str, n_shards: int, label: str = "cls", extra: dict | None = None
) -> list[Path]:
    """WebDataset shards of every image under `images` (sorted), dealt round-robin into shards."""
    paths = sorted(images.rglob("*.png"))
    shards = [Path(pattern.format(i)) for i in range(n_shards)]
    tars = [tarfile.open(s, "w") for s in shards]
    for i, path in enumerate(paths):
        key = f"s{i:05d}"
        name = path.parent.name
        value = {"cls": str(CLASSES.index(name)), "txt": name, "json": json.dumps({"label": name})}[label]
        members = {f"{key}.png": path.read_bytes(), f"{key}.{label}": value.encode()}
        members.update({f"{key}.{k}": v for k, v in (extra or {}).get(path.name, {}).items()})
        for member, data in members.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tars[i % n_shards].addfile(info, io.BytesIO(data))
    for tar in tars:
        tar.close()
    return shards


@pytest.fixture(scope="module")
def kinds(images: Path) -> dict[str, tuple[str, str, dict]]:
    """{kind: (training DATA, evaluation DATA, open_data options)} over the same images."""
    base = images.parent
    rows = rows_of(images, base)
    csv_manifest = write_csv(base / "all.csv", rows, ["path", "label", "split"])
    jsonl = base / "train.jsonl"  # custom column names, no split column
    jsonl.write_text(
        "".join(json.dumps({"file": r["path"], "y": r["label"]}) + "\n" for r in rows if r["split"] == "train")
    )
    test_csv = write_csv(base / "test.csv", [r for r in rows if r["split"] == "test"], ["path", "label"])
    hf = base / "hf"  # Hugging Face imagefolder: one metadata.csv per split folder
    for split in ("train", "test"):
        shutil.copytree(images / split, hf / split)
        split_rows = rows_of(hf / split, hf / split)
        for r in split_rows:
            r["file_name"] = r["path"]
        write_csv(hf / split / "metadata.csv", split_rows, ["file_name", "label"])
    write_shards(images / "train", str(base / "train-{:06d}.tar"), 2)
    write_shards(images / "test", str(base / "test-{:06d}.tar"), 1)
    names = base / "classes.txt"  # .cls holds class indices; their names come from a class file
    names.write_text("\n".join(CLASSES) + "\n")
    return {
        "folder": (str(images), str(images), {}, None),
        "csv": (str(csv_manifest), str(csv_manifest), {}, None),
        "jsonl": (str(jsonl), str(test_csv), {"path_column": "file", "label_column": "y"}, None),
        "hf-metadata": (str(hf), str(hf), {}, None),
        "shards": (str(base / "train-{000000..000001}.tar"), str(base / "test-000000.tar"), {}, str(names)),
    }


@pytest.mark.parametrize("kind", ["folder", "csv", "jsonl", "hf-metadata", "shards"])
def test_every_kind_indexes_to_the_same_images(kinds, kind):
    train_spec, test_spec, options, classes = kinds[kind]
    training = prepare_training_data(open_data(train_spec, **options), classes_file=classes, val_split=0)
    assert training.class_names == CLASSES
    assert training.folders == (["0", "1", "2"] if kind == "shards" else CLASSES)
    assert len(training.train) == N_TRAIN * len(CLASSES)
    counts = [sum(im.label == c for im in training.train) for c in range(len(CLASSES))]
    assert counts == [N_TRAIN] * len(CLASSES)
    # the same bytes under each label as in the class folders
    folder = read_image_folder(Path(kinds["folder"][0]) / "train")
    by_label = {c: sorted(im.path.read_bytes() for im in folder.images if im.label == c) for c in range(3)}
    for c in range(3):
        got = sorted(_bytes(im) for im in training.train if im.label == c)
        assert got == by_label[c]
    test_options = {} if kind == "jsonl" else options  # the jsonl run is evaluated on a plain CSV
    evaluation = prepare_eval_data(open_data(test_spec, **test_options), classes)
    assert evaluation.folders == training.folders and len(evaluation.images) == N_TEST * len(CLASSES)


def _bytes(image) -> bytes:
    return image.span.read() if image.span is not None else image.path.read_bytes()


def test_few_shot_sampling_is_the_same_on_every_kind(kinds):
    """One rule for all kinds: the same seed picks the same images (by content) wherever they live."""
    chosen = {}
    for kind, (train_spec, _, options, classes) in kinds.items():
        training = prepare_training_data(
            open_data(train_spec, **options), classes_file=classes, shots=2, seed=3, val_split=0
        )
        chosen[kind] = sorted(_bytes(im) for im in training.train)
        assert len(training.train) == 2 * len(CLASSES)
    # kinds that keep the class-folder file names sort like the folder; shards are sorted by their own keys
    assert chosen["csv"] == chosen["folder"] == chosen["hf-metadata"] == chosen["jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["csv", "jsonl", "hf-metadata", "shards"])
def test_round_trip_fit_eval_predict(kinds, kind, tiny_backbone, tmp_path):
    import adaclip

    train_spec, test_spec, options, classes = kinds[kind]
    adapter = adaclip.fit(
        open_data(train_spec, **options),
        "linear-probe",
        backbone=tiny_backbone,
        classes=classes,
        epochs=1,
        val_split=0,
        seed=0,
    )
    assert adapter.class_names == CLASSES
    assert adapter.metadata.data.n_train == N_TRAIN * len(CLASSES)
    path = adapter.save(tmp_path / f"{kind}.adaclip")
    loaded = adaclip.load(path, backbone=tiny_backbone)
    test_options = {} if kind == "jsonl" else options
    report = loaded.evaluate(open_data(test_spec, **test_options))
    assert report.n_images == N_TEST * len(CLASSES) and report.skipped_images == 0
    # predict labels every image DATA lists, whatever its split (csv, hf: train and test)
    predictions = list(loaded.iter_predict(iter_input_paths([test_spec]), top_k=1))
    listed = (N_TRAIN + N_TEST) * len(CLASSES) if kind in ("csv", "hf-metadata") else N_TEST * len(CLASSES)
    assert len(predictions) == listed
    assert all(p.error is None and p.label in adapter.class_names for p in predictions)
    if kind == "shards":
        assert [p.path for p in predictions] == [f"{test_spec}/s{i:05d}.png" for i in range(listed)]


# --------------------------------------------------------------------------------------- hostile input


def test_manifest_path_outside_its_folder_is_refused_unless_allowed(images, tmp_path):
    outside = tmp_path / "m"
    outside.mkdir()
    rows = rows_of(images, images.parent)
    for r in rows:
        r["path"] = "../" + r["path"]  # escapes m/
    manifest = write_csv(outside / "m.csv", rows, ["path", "label"])
    with pytest.raises(InputError, match=r"line 2 of the manifest .*climbs out.*allow_absolute"):
        read_manifest(manifest)
    assert len(read_manifest(manifest, allow_absolute=True).labelled_set(None).images) == len(rows)
    absolute = write_csv(
        outside / "abs.csv", [{"path": str(images / "train/bag/x.png"), "label": "bag"}], ["path", "label"]
    )
    with pytest.raises(InputError, match="is absolute"):
        read_manifest(absolute)
    with pytest.raises(InputError, match="is absolute"):
        list(iter_input_paths([str(absolute)]))  # predict checks the whole file before the first path


def test_manifest_escape_is_exit_2_on_the_command_line(images, tmp_path):
    from .test_cli import TINY_ARGS, cli

    (tmp_path / "m").mkdir()
    manifest = write_csv(
        tmp_path / "m" / "m.csv",
        [dict(r, path="../../" + r["path"]) for r in rows_of(images, images.parent)],
        ["path", "label"],
    )
    result = cli("fit", str(manifest), "-m", "linear-probe", "-o", str(tmp_path / "x.adaclip"), *TINY_ARGS)
    assert result.exit_code == 2
    assert "line 2 of the manifest" in result.output and "--allow-absolute" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x.adaclip").exists()


def test_bad_rows_are_skipped_counted_and_named(images, caplog):
    base = images.parent
    good = rows_of(images / "train", base)
    text = "path,label,split\n" + "".join(f"{r['path']},{r['label']},train\n" for r in good)
    text += ",bag,train\n"  # empty path (line n+2)
    text += f"{good[0]['path']},,train\n"  # empty label
    text += f"{good[0]['path']},bag,holdout\n"  # unknown split
    text += "only-one-field\n"  # too few fields
    manifest = base / "bad.csv"
    manifest.write_text(text)
    with caplog.at_level("WARNING", logger="adaclip"):
        index = read_manifest(manifest)
    assert index.n_bad == 4
    assert len(index.by_split["train"]) == len(good)
    first_bad = len(good) + 2
    assert [line for line, _ in index.bad_rows] == [first_bad, first_bad + 1, first_bad + 2, first_bad + 3]
    assert f"skipped line {first_bad} of {manifest}: empty path" in caplog.text
    jsonl = base / "bad.jsonl"
    jsonl.write_text('{"path": "train/bag/a.png", "label": "bag"}\n{"path": "x.png"}\nnot json\n[1]\n')
    bad = read_manifest(jsonl)
    assert bad.n_bad == 3 and len(bad.labelled_set(None).images) == 1


def test_missing_column_names_the_option(images):
    manifest = write_csv(images.parent / "cols.csv", rows_of(images, images.parent), ["path", "label"])
    with pytest.raises(InputError, match=r"no 'file' column .*columns: 'path', 'label'.*path_column"):
        read_manifest(manifest, path_column="file")


def test_missing_listed_file_is_skipped_when_decoded(images, tiny_backbone, tmp_path):
    """Indexing does not look files up (a million rows index in seconds); a missing one is skipped and
    counted where it is decoded, as an unreadable file in a folder is."""
    import adaclip

    rows = rows_of(images / "test", images.parent) + [{"path": "test/bag/missing.png", "label": "bag"}]
    manifest = write_csv(images.parent / "missing.csv", rows, ["path", "label"])
    adapter = adaclip.zero_shot_adapter(CLASSES, backbone=tiny_backbone)
    report = adapter.evaluate(manifest)
    assert report.skipped_images == 1 and report.n_images == len(rows) - 1


def test_undecodable_tar_member_is_skipped_and_counted(images, tiny_backbone, tmp_path, caplog):
    import adaclip

    broken = sorted((images / "test").rglob("*.png"))[0].name
    shard = write_shards(images / "test", str(tmp_path / "t-{:06d}.tar"), 1, extra={broken: {"txt": b"x"}})[0]
    # corrupt one image member in place (same size, garbage bytes): found by the indexing pass, then
    # skipped where it is decoded
    data = bytearray(shard.read_bytes())
    folder = open_data(str(shard))
    assert folder.kind == "shards"
    evaluation = prepare_eval_data(folder)
    span = evaluation.images[0].span
    data[span.offset : span.offset + span.size] = b"\0" * span.size
    shard.write_bytes(bytes(data))
    # a sample without a label member is skipped while indexing, and named
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("orphan.png")
        payload = sorted((images / "test").rglob("*.png"))[1].read_bytes()
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with caplog.at_level("WARNING", logger="adaclip"):
        evaluation = prepare_eval_data(str(shard))
    assert len(evaluation.images) == N_TEST * len(CLASSES) and evaluation.skipped == 1
    assert "orphan: no usable label" in caplog.text
    adapter = adaclip.zero_shot_adapter(CLASSES, backbone=tiny_backbone)
    report = adapter.evaluate(evaluation)
    assert report.skipped_images == 1 and report.n_images == N_TEST * len(CLASSES) - 1
    predictions = adapter.predict(str(shard), top_k=1)  # predict needs no label: the orphan is predicted
    errors = [p for p in predictions if p.error]
    assert len(predictions) == N_TEST * len(CLASSES) + 1 and len(errors) == 1
    assert errors[0].path == f"{shard}/s00000.png"


def test_shard_labels_from_json_and_txt(images, tmp_path):
    for label in ("json", "txt"):
        shard = write_shards(images / "test", str(tmp_path / f"{label}-{{:06d}}.tar"), 1, label=label)[0]
        folder = prepare_eval_data(str(shard))
        assert folder.folders == CLASSES and folder.class_names == CLASSES
        assert [sum(im.label == c for im in folder.images) for c in range(3)] == [N_TEST] * 3


def test_compressed_shards_are_refused_for_training_with_the_fix(images, tmp_path):
    shard = write_shards(images / "test", str(tmp_path / "c-{:06d}.tar"), 1)[0]
    gz = tmp_path / "c.tar.gz"
    import gzip

    gz.write_bytes(gzip.compress(shard.read_bytes()))
    with pytest.raises(InputError, match="decompress"):
        prepare_eval_data(str(gz))


def test_dispatch(images, kinds, tmp_path):
    assert open_data(kinds["folder"][0]).kind == "folder"
    assert open_data(kinds["csv"][0]).kind == "manifest"
    assert open_data(kinds["hf-metadata"][0]).kind == "manifest"
    assert open_data(kinds["shards"][0]).kind == "shards"
    assert open_data(str(tmp_path / "nothing-here")).kind == "folder"
    with pytest.raises(InputError, match="data folder not found"):
        prepare_training_data(str(tmp_path / "nothing-here"))
    with pytest.raises(InputError, match="shard"):
        prepare_training_data(str(tmp_path / "x-{000000..000003}.tar"))


@pytest.mark.parametrize("kind", ["csv", "shards"])
def test_tta_reads_manifests_and_shards_and_scores_with_their_labels(kinds, kind, tiny_backbone):
    import adaclip

    _, test_spec, options, classes = kinds[kind]
    names = CLASSES
    adapter = adaclip.zero_shot_adapter(names, backbone=tiny_backbone)
    if kind == "shards":  # .cls labels are indices: the adapter must know the classes by those keys
        adapter.metadata.class_folders = ["0", "1", "2"]
    result = adapter.tta(open_data(test_spec, **options), mode="episodic", views=4, labels="folders", seed=0)
    listed = (N_TRAIN + N_TEST) * len(CLASSES) if kind == "csv" else N_TEST * len(CLASSES)
    assert len(result.predictions) == listed
    assert all(p.error is None for p in result.predictions)
    assert all(p.true_label in names for p in result.predictions)
    if kind == "shards":
        assert result.predictions[0].path == f"{test_spec}/s00000.png"


@pytest.mark.parametrize("kind", ["folder", "csv", "hf-metadata", "shards"])
def test_compare_protocol_reads_every_kind(kinds, kind):
    from adaclip.comparison import make_protocol

    train_spec, _, options, classes = kinds[kind]
    protocol = make_protocol(open_data(train_spec, **options), shots=2, classes=classes)
    assert protocol.class_names == CLASSES
    if kind == "shards":  # no test split: a fixed 20% of each class is held out
        assert len(protocol.test) == 3 and len(protocol.pool) == (N_TRAIN - 1) * len(CLASSES)
    else:  # the test split
        assert len(protocol.test) == N_TEST * len(CLASSES) and len(protocol.pool) == N_TRAIN * len(CLASSES)
    assert len(protocol.training_data(0).train) == 2 * len(CLASSES)


@pytest.mark.slow
def test_cli_round_trip_with_column_options_and_allow_absolute(kinds, images, tmp_path, monkeypatch):
    """fit -> eval -> predict on the command line: a JSONL manifest with its own column names, then a
    manifest of absolute paths that only --allow-absolute reads."""
    from .test_cli import TINY_ARGS, cli

    train_spec, test_spec, _, _ = kinds["jsonl"]
    out = tmp_path / "m.adaclip"
    columns = ["--path-column", "file", "--label-column", "y"]
    fit = cli(
        "fit",
        train_spec,
        "-m",
        "linear-probe",
        "--epochs",
        "1",
        "--val-split",
        "0",
        "-o",
        str(out),
        *columns,
        *TINY_ARGS,
    )
    assert fit.exit_code == 0, fit.output
    evaluation = cli("eval", str(out), test_spec, "--format", "json", "--device", "cpu")
    assert evaluation.exit_code == 0, evaluation.output
    assert json.loads(evaluation.stdout)["n_images"] == N_TEST * len(CLASSES)
    absolute = write_csv(
        tmp_path / "abs.csv",
        [{"path": str(p), "label": p.parent.name} for p in sorted((images / "test").rglob("*.png"))],
        ["path", "label"],
    )
    refused = cli("predict", str(out), str(absolute), "--format", "jsonl", "--device", "cpu")
    assert refused.exit_code == 2 and "--allow-absolute" in refused.output
    allowed = cli("predict", str(out), str(absolute), "--format", "jsonl", "--allow-absolute", "--device", "cpu")
    assert allowed.exit_code == 0, allowed.output
    assert len(allowed.stdout.splitlines()) == N_TEST * len(CLASSES)
    monkeypatch.chdir(tmp_path)  # the adapter's default name is made in the working folder
    shards = cli(
        "fit", kinds["shards"][0], "-m", "linear-probe", "--epochs", "1", "--classes", kinds["shards"][3], *TINY_ARGS
    )
    assert shards.exit_code == 0, shards.output
    assert (tmp_path / "train.linear-probe.adaclip").exists()  # named after the pattern, not "{000000..000001}"
