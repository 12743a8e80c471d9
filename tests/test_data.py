from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image

from adaclip.data import (
    class_name_from_folder,
    find_splits,
    iter_input_paths,
    list_images,
    prepare_eval_data,
    prepare_training_data,
    read_image_folder,
)
from adaclip.errors import InputError


def touch_image(path: Path, colour=(10, 20, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def simple_folder(root: Path, counts: dict[str, int]) -> Path:
    for name, n in counts.items():
        for i in range(n):
            touch_image(root / name / f"{i:02d}.png")
    return root


def test_class_names_from_folders():
    assert class_name_from_folder("golden_retriever") == "golden retriever"
    assert class_name_from_folder("t-shirt") == "t shirt"
    assert class_name_from_folder("a__b--c") == "a b c"


def test_folder_classes_sorted_hidden_and_non_images_ignored(tmp_path):
    simple_folder(tmp_path, {"zebra": 2, "ant_eater": 3})
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    touch_image(tmp_path / "zebra" / ".hidden.png")
    touch_image(tmp_path / ".cache" / "x.png")
    folder = read_image_folder(tmp_path)
    assert folder.folders == ["ant_eater", "zebra"]
    assert folder.class_names == ["ant eater", "zebra"]
    assert [im.label for im in folder.images] == [0, 0, 0, 1, 1]
    assert all(im.path.suffix == ".png" and not im.path.name.startswith(".") for im in folder.images)


def test_class_file_formats(tmp_path):
    data = simple_folder(tmp_path / "d", {"a": 1, "b": 1})
    lines = tmp_path / "names.txt"
    lines.write_text("Apple\nBanana\n")
    assert read_image_folder(data, lines).class_names == ["Apple", "Banana"]
    as_list = tmp_path / "names.json"
    as_list.write_text(json.dumps(["x", "y"]))
    assert read_image_folder(data, as_list).class_names == ["x", "y"]
    as_map = tmp_path / "map.json"
    as_map.write_text(json.dumps({"b": "Banana"}))
    assert read_image_folder(data, as_map).class_names == ["a", "Banana"]


def test_class_file_errors_name_the_problem(tmp_path):
    data = simple_folder(tmp_path / "d", {"a": 1, "b": 1})
    unknown = tmp_path / "map.json"
    unknown.write_text(json.dumps({"a": "A", "cherry": "C"}))
    with pytest.raises(InputError, match="cherry"):
        read_image_folder(data, unknown)
    short = tmp_path / "short.txt"
    short.write_text("only one\n")
    with pytest.raises(InputError, match="1 names but the data has 2"):
        read_image_folder(data, short)
    with pytest.raises(InputError, match="not found"):
        read_image_folder(data, tmp_path / "missing.txt")


def test_empty_and_flat_folders_are_refused(tmp_path):
    with pytest.raises(InputError, match="no class folders"):
        read_image_folder(tmp_path)
    touch_image(tmp_path / "loose.png")
    with pytest.raises(InputError, match="one sub-folder per class"):
        read_image_folder(tmp_path)
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(InputError, match="no images found"):
        read_image_folder(tmp_path)


def test_one_class_is_refused_for_training(tmp_path):
    simple_folder(tmp_path, {"only": 3})
    with pytest.raises(InputError, match="only 1 class"):
        prepare_training_data(tmp_path)


def test_splits_detected_only_when_all_subfolders_are_splits(tmp_path):
    simple_folder(tmp_path / "s" / "train", {"a": 2, "b": 2})
    simple_folder(tmp_path / "s" / "test", {"a": 1, "b": 1})
    assert set(find_splits(tmp_path / "s")) == {"train", "test"}
    simple_folder(tmp_path / "c", {"train": 2, "cat": 2})  # a class literally called train
    assert find_splits(tmp_path / "c") == {}
    assert prepare_eval_data(tmp_path / "s").root.name == "test"
    # an extra folder beside the splits (unlabeled images for tta) does not hide them
    simple_folder(tmp_path / "s", {"shifted": 2})
    assert set(find_splits(tmp_path / "s")) == {"train", "test"}
    data = prepare_training_data(tmp_path / "s")
    assert data.root.name == "train" and any("shifted" in note for note in data.notes)


def test_few_shot_sampling_is_reproducible_and_seed_dependent(tmp_path):
    simple_folder(tmp_path, {"a": 20, "b": 20, "c": 3})
    first = prepare_training_data(tmp_path, shots=4, seed=7)
    again = prepare_training_data(tmp_path, shots=4, seed=7)
    other = prepare_training_data(tmp_path, shots=4, seed=8)
    assert first.sampled_files == again.sampled_files
    assert first.files_digest == again.files_digest
    assert first.sampled_files != other.sampled_files
    assert first.files_digest != other.files_digest
    per_class = [sum(im.label == k for im in first.train) for k in range(3)]
    assert per_class == [4, 4, 3]
    assert any("fewer than 4" in note for note in first.notes)
    # auto validation (CoOp's convention): min(shots, 4) per class of the images not sampled, disjoint
    # from training; class c's 3 images were all sampled, so it has none
    assert [sum(im.label == k for im in first.val) for k in range(3)] == [4, 4, 0]
    assert not {im.path for im in first.val} & {im.path for im in first.train}
    assert [im.path for im in first.val] == [im.path for im in again.val]
    one = prepare_training_data(tmp_path, shots=1, seed=7)
    assert [sum(im.label == k for im in one.val) for k in range(3)] == [1, 1, 1]
    assert one.val_source == "min(shots, 4) per class not sampled as shots"
    # the validation draw does not move the shots: the same seed samples the same training images
    assert prepare_training_data(tmp_path, shots=4, seed=7, val_split=0).sampled_files == first.sampled_files


def test_val_split_fraction_and_val_folder(tmp_path):
    simple_folder(tmp_path / "flat", {"a": 10, "b": 10})
    data = prepare_training_data(tmp_path / "flat", val_split=0.2, seed=0)
    assert (len(data.train), len(data.val)) == (16, 4)
    none = prepare_training_data(tmp_path / "flat", val_split=0.0)
    assert (len(none.train), len(none.val)) == (20, 0)
    simple_folder(tmp_path / "split" / "train", {"a": 3, "b": 3})
    simple_folder(tmp_path / "split" / "val", {"a": 2, "b": 2})
    with_val = prepare_training_data(tmp_path / "split")
    assert (len(with_val.train), len(with_val.val), with_val.val_source) == (6, 4, "val/ folder")
    simple_folder(tmp_path / "bad" / "train", {"a": 2, "b": 2})
    simple_folder(tmp_path / "bad" / "val", {"a": 1, "z": 1})
    with pytest.raises(InputError, match="class folders differ"):
        prepare_training_data(tmp_path / "bad")


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loops_do_not_recurse_forever(tmp_path):
    simple_folder(tmp_path, {"a": 2})
    os.symlink(tmp_path, tmp_path / "a" / "loop")
    images = list_images(tmp_path / "a")
    assert len(images) == 2


def test_predict_inputs_files_folders_globs_and_stdin(tmp_path):
    simple_folder(tmp_path, {"a": 2, "b": 1})
    single = tmp_path / "a" / "00.png"
    paths = list(iter_input_paths([str(single), str(tmp_path / "b"), str(tmp_path / "a" / "*.png")]))
    assert paths[0] == single and len(paths) == 1 + 1 + 2
    streamed = list(iter_input_paths(["-"], stdin=[f"{single}\n", "\n", f"{tmp_path / 'b' / '00.png'}\n"]))
    assert [p.name for p in streamed] == ["00.png", "00.png"]
    with pytest.raises(InputError, match="no such file"):
        list(iter_input_paths([str(tmp_path / "missing.png")]))
    with pytest.raises(InputError, match="matched no files"):
        list(iter_input_paths([str(tmp_path / "*.jpeg")]))
