"""Scale and reliability: multi-process training, resume, interrupts, determinism, hostile input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import adaclip
from adaclip.adapter_file import read_adapter_file, write_adapter_file
from adaclip.errors import AdapterFileError
from adaclip.training import TrainingInterrupted

from .cli_run import run_cli, start_cli
from .conftest import TINY, make_folder

RING = {"blocks": "all", "ranks": [2, 4]}
TINY_CLI = ["-b", TINY, "-p", "none", "--device", "cpu"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_adapter_file(path)[1]


# ------------------------------------------------------------------------------------------ resume


def test_resume_after_interrupt_gives_the_uninterrupted_adapter(dataset, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    common = dict(method="adaring", backbone=tiny_backbone, epochs=3, lr=1e-2, seed=4, val_split=0, **RING)
    reference = adaclip.fit(dataset, **common).save(tmp_path / "reference.adaclip")

    checkpoint = tmp_path / "run.adaclip.ckpt"

    def stop_after_first_epoch(epoch, entry):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        adaclip.fit(dataset, checkpoint=checkpoint, on_epoch_end=stop_after_first_epoch, **common)
    assert info.value.exit_code == 130 and checkpoint.exists()
    resumed = adaclip.fit(dataset, checkpoint=checkpoint, resume=True, **common)
    assert resumed.metadata.training.resumed
    path = resumed.save(tmp_path / "resumed.adaclip")
    reference_tensors, resumed_tensors = _tensors(reference), _tensors(path)
    assert all(torch.equal(reference_tensors[k], resumed_tensors[k]) for k in reference_tensors)
    assert (
        resumed.metadata.training.history[1:]
        == adaclip.load(reference, backbone=tiny_backbone).metadata.training.history[1:]
    )


def test_resume_mid_epoch_from_step_checkpoint(dataset, tiny_backbone, tmp_path, monkeypatch):
    """Interrupted right after a mid-epoch checkpoint: resuming skips exactly the batches already done."""
    import adaclip.training as training

    common = dict(method="linear-probe", backbone=tiny_backbone, epochs=2, lr=1e-2, seed=1, batch_size=8, val_split=0)
    reference = adaclip.fit(dataset, **common)
    checkpoint = tmp_path / "mid.ckpt"
    real_save = training.save_checkpoint
    saves = []

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        saves.append(kwargs["position"].step_in_epoch)
        if len(saves) == 2:  # the second step checkpoint of epoch 1 (steps 2 and 4 of 6)
            raise KeyboardInterrupt

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(TrainingInterrupted):
        adaclip.fit(dataset, checkpoint=checkpoint, checkpoint_every=2, **common)
    assert saves == [2, 4]
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    resumed = adaclip.fit(dataset, checkpoint=checkpoint, checkpoint_every=2, resume=True, **common)
    expected, got = reference.model.adapter_state(), resumed.model.adapter_state()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert resumed.metadata.training.history == reference.metadata.training.history


def test_resume_refuses_a_checkpoint_of_another_run(dataset, tiny_backbone, tmp_path):
    checkpoint = tmp_path / "a.ckpt"
    adaclip.fit(dataset, "linear-probe", backbone=tiny_backbone, epochs=1, checkpoint=checkpoint)
    with pytest.raises(adaclip.UsageError, match="different run.*seed"):
        adaclip.fit(
            dataset, "linear-probe", backbone=tiny_backbone, epochs=1, seed=9, checkpoint=checkpoint, resume=True
        )
    with pytest.raises(adaclip.UsageError, match="no checkpoint"):
        adaclip.fit(dataset, "linear-probe", backbone=tiny_backbone, checkpoint=tmp_path / "none.ckpt", resume=True)


@pytest.mark.slow
def test_ctrl_c_during_cli_fit_keeps_checkpoint_and_says_how_to_resume(dataset, tmp_path):
    out = tmp_path / "long.adaclip"
    checkpoint = tmp_path / "long.adaclip.ckpt"
    command = ["fit", dataset, "-m", "linear-probe", "-o", out]
    # stderr goes to a file, not a pipe: a child blocked on a full pipe (one log line per epoch) would
    # test the pipe, not the interrupt. PYTHONFAULTHANDLER lets SIGABRT dump every thread if it hangs.
    # The child starts with SIGINT at its default (start_cli): a test run started in the background
    # inherits SIGINT ignored, and Python then never raises KeyboardInterrupt (this test timed out twice).
    log_path = tmp_path / "fit-stderr.log"
    with log_path.open("w") as log_file:
        process = start_cli(
            *command,
            *["--epochs", "100000", "--val-split", "0", *TINY_CLI],
            stdout=subprocess.DEVNULL,
            stderr=log_file,
            env={"PYTHONFAULTHANDLER": "1"},
        )
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    if not checkpoint.exists():
        process.kill()
        process.wait()
        pytest.fail(f"no checkpoint after 120 s; stderr ends:\n{log_path.read_text()[-4000:]}")
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack to the log
        process.wait(timeout=30)
        pytest.fail(f"fit still running 60 s after SIGINT; stderr ends:\n{log_path.read_text()[-8000:]}")
    stderr = log_path.read_text()
    assert process.returncode == 130, stderr[-4000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert checkpoint.exists() and not out.exists()  # no partial adapter under the final name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    again = run_cli(*command, *TINY_CLI)
    assert again.returncode == 2 and "--resume" in again.stderr  # a new run does not silently discard it


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.slow
def test_same_seed_gives_byte_identical_adapter_files(dataset, tmp_path):
    paths = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.adaclip"
        run = run_cli(
            *["fit", dataset, "-m", "adaring", "-o", out, "--epochs", "2", "--seed", "11"],
            *["--set", "blocks=all", "--set", "ranks=[2]", *TINY_CLI],
            env={"SOURCE_DATE_EPOCH": "1700000000"},
            timeout=300,
        )
        assert run.returncode == 0, run.stderr
        paths.append(out)
    assert paths[0].read_bytes() == paths[1].read_bytes()


# ------------------------------------------------------------------------------------------ distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "method, settings", [("adaring", ["--set", "blocks=all", "--set", "ranks=[2]"]), ("linear-probe", [])]
)
@pytest.mark.slow
def test_two_gloo_processes_match_one_process(dataset, tmp_path, method, settings):
    """torchrun with 2 CPU processes (global batch 8 = 2 x 4) ends where 1 process with batch 8 ends."""
    common = [
        "fit",
        str(dataset),
        "-m",
        method,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--seed",
        "3",
        *settings,
        *TINY_CLI,
    ]
    single = tmp_path / "single.adaclip"
    run = run_cli(*common, "-o", single, timeout=300)
    assert run.returncode == 0, run.stderr
    double = tmp_path / "double.adaclip"
    run = run_cli(
        *["--nnodes", "1", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", _free_port()],
        *["-m", "adaclip", *common, "-o", double, "-f", "json"],
        entry=["-m", "torch.distributed.run"],
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert len([line for line in run.stdout.splitlines() if line.startswith("{")]) == 1  # rank 0 reports once
    one, two = _tensors(single), _tensors(double)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
    meta_one = adaclip.adapter_file.read_adapter_header(single).training
    meta_two = adaclip.adapter_file.read_adapter_header(double).training
    assert meta_one.steps == meta_two.steps
    assert meta_two.history[-1]["loss"] == pytest.approx(meta_one.history[-1]["loss"], rel=1e-4)


# ------------------------------------------------------------------------------------------ hostile files


def test_adapter_with_wrong_dtype_or_shape_is_refused(dataset, tiny_backbone, tmp_path):
    adapter = adaclip.fit(dataset, "linear-probe", backbone=tiny_backbone, epochs=1)
    good = adapter.save(tmp_path / "good.adaclip")
    meta, tensors = read_adapter_file(good)
    half = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    write_adapter_file(tmp_path / "half.adaclip", half, meta)
    with pytest.raises(AdapterFileError, match="expected torch.float32"):
        adaclip.load(tmp_path / "half.adaclip", backbone=tiny_backbone)
    wide = {k: torch.zeros(*(s + 1 for s in v.shape)) if v.ndim else v for k, v in tensors.items()}
    write_adapter_file(tmp_path / "wide.adaclip", wide, meta)
    with pytest.raises(AdapterFileError, match="shape"):
        adaclip.load(tmp_path / "wide.adaclip", backbone=tiny_backbone)
    missing = dict(list(tensors.items())[1:])
    write_adapter_file(tmp_path / "missing.adaclip", missing, meta)
    with pytest.raises(AdapterFileError, match="missing"):
        adaclip.load(tmp_path / "missing.adaclip", backbone=tiny_backbone)


def _hostile_folder(root: Path, good_source: Path) -> dict[str, int]:
    """A class folder full of trouble; returns how many images should decode and how many not."""
    bad = root / "trouble"
    bad.mkdir(parents=True)
    shutil.copy(good_source, bad / "fine.png")
    (bad / "zero.png").write_bytes(b"")
    (bad / "truncated.png").write_bytes(good_source.read_bytes()[:60])
    Image.new("L", (10_000, 10_000)).save(bad / "hundred_megapixels.png")  # decodes: under the 120 MP guard
    Image.new("L", (12_000, 12_000)).save(bad / "too_big.png")  # 144 MP: refused by the guard
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(bad / "animated.gif", save_all=True, append_images=frames[1:])
    Image.fromarray((torch.arange(256, dtype=torch.int32).view(16, 16) * 200).numpy().astype("uint16")).save(
        bad / "deep.png"
    )
    Image.new("CMYK", (16, 16), (0, 200, 200, 0)).save(bad / "print.jpg")
    Image.new("RGB", (16, 16), (9, 9, 9)).save(bad / "really_png.jpg", format="PNG")
    os.symlink(bad, bad / "loop")  # a directory symlink back to itself
    os.symlink(bad / "does-not-exist.png", bad / "dangling.png")
    name = os.fsdecode(b"caf\xe9_latin1.png")  # not valid UTF-8
    shutil.copy(good_source, bad / name)
    locked = bad / "locked.png"
    shutil.copy(good_source, locked)
    locked.chmod(0)
    unreadable_by_permissions = os.geteuid() != 0  # root reads it anyway
    good = 8 - (1 if unreadable_by_permissions else 0)
    return {"good": good, "bad": 12 - good}


@pytest.mark.slow
def test_hostile_images_are_skipped_and_counted(dataset, tiny_backbone, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(dataset / "train", data)
    expected = _hostile_folder(data, dataset / "train" / "red_circle" / "img_000.png")
    adapter = adaclip.fit(data, "linear-probe", backbone=tiny_backbone, epochs=1, val_split=0)
    assert adapter.metadata.training.skipped_images == expected["bad"]
    report = adapter.evaluate(data)
    assert report.n_images == 48 + expected["good"] and report.skipped_images == expected["bad"]
    predictions = adapter.predict(data / "trouble")
    assert sum(p.error is None for p in predictions) == expected["good"]
    assert sum(p.error is not None for p in predictions) == expected["bad"]


def test_predict_cli_with_non_utf8_names_writes_valid_output(dataset, tiny_backbone, tmp_path):
    from typer.testing import CliRunner

    from adaclip.cli import app

    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(dataset / "test" / "red_circle" / "img_000.png", folder / os.fsdecode(b"\xff\xfename.png"))
    model = adaclip.fit(dataset, "zeroshot", backbone=tiny_backbone).save(tmp_path / "zs.adaclip")
    shown = "\\xff\\xfename.png"  # the undecodable bytes, as visible escapes
    for fmt in ("jsonl", "csv", "table"):
        result = CliRunner().invoke(app, ["predict", str(model), str(folder), "-f", fmt], env={"COLUMNS": "300"})
        assert result.exit_code == 0, result.output
        text = json.loads(result.stdout)["path"] if fmt == "jsonl" else result.stdout
        assert shown in text
    assert json.loads(CliRunner().invoke(app, ["predict", str(model), str(folder), "-f", "json"]).stdout)[0]["label"]


# ------------------------------------------------------------------------------------------ odd data


@pytest.mark.slow
def test_tiny_classes_empty_classes_and_thousands_of_classes(tiny_backbone, tmp_path):
    rng_classes = {"only_one": ((200, 30, 30), "circle"), "two_of_us": ((30, 200, 30), "square")}
    make_folder(tmp_path / "small", 1, seed=0, classes={"only_one": rng_classes["only_one"]})
    make_folder(tmp_path / "small", 2, seed=1, classes={"two_of_us": rng_classes["two_of_us"]})
    (tmp_path / "small" / "nobody_here").mkdir()
    adapter = adaclip.fit(tmp_path / "small", "linear-probe", backbone=tiny_backbone, epochs=1, val_split=0)
    assert adapter.class_names == ["nobody here", "only one", "two of us"]
    assert adapter.metadata.data.n_train == 3

    many = tmp_path / "many"
    source = Image.new("RGB", (8, 8), (10, 20, 30))
    for i in range(5000):
        folder = many / f"class_{i:04d}"
        folder.mkdir(parents=True)
        source.save(folder / "a.png")
    import tracemalloc

    tracemalloc.start()
    zero_shot = adaclip.fit(many, "zeroshot", backbone=tiny_backbone, val_split=0)
    predictions = zero_shot.predict([many / "class_0001" / "a.png", many / "class_4999" / "a.png"], top_k=3)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(zero_shot.class_names) == 5000 and all(len(p.top_k) == 3 for p in predictions)
    assert peak < 200 * 2**20  # Python-side allocations stay bounded (tensors are small: 5000 x 32)


def test_predict_streams_lazily(dataset, tiny_backbone):
    """Results arrive before the input ends: only about one batch of paths is read ahead."""
    adapter = adaclip.fit(dataset, "zeroshot", backbone=tiny_backbone)
    image = sorted((dataset / "test" / "blue_stripes").iterdir())[0]
    consumed = 0

    def endless():
        nonlocal consumed
        while True:
            consumed += 1
            yield image

    stream = adapter.iter_predict(endless(), batch_size=16)
    first = [next(stream) for _ in range(5)]
    assert all(p.label for p in first) and consumed <= 32


@pytest.mark.slow
def test_predict_10000_stdin_paths_keeps_going_past_bad_files(dataset, tiny_backbone, tmp_path):
    model = adaclip.fit(dataset, "zeroshot", backbone=tiny_backbone).save(tmp_path / "zs.adaclip")
    good = sorted((dataset / "test").rglob("*.png"))[:10]
    lines = [str(good[i % 10]) if i % 1000 == 0 else str(tmp_path / f"missing_{i}.png") for i in range(10_000)]
    run = run_cli(
        "predict", model, "-", "-f", "jsonl", "--batch-size", "256", input="\n".join(lines) + "\n", timeout=600
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert len(run.stdout.splitlines()) == 10
    assert "skipped 9990" in run.stderr and run.stderr.count("warning: skipped unreadable") == 20


def test_indexing_opens_no_image(tmp_path, monkeypatch):
    from adaclip.data import prepare_training_data

    for c in range(4):
        folder = tmp_path / f"c{c}"
        folder.mkdir()
        for i in range(500):
            (folder / f"{i}.jpg").write_bytes(b"")  # not even valid: indexing must not look inside

    def refuse(*args, **kwargs):
        raise AssertionError("an image was opened while indexing")

    monkeypatch.setattr(Image, "open", refuse)
    data = prepare_training_data(tmp_path, shots=16, seed=0)
    assert len(data.train) == 64 and len(data.val) == 4 * 4  # min(shots, 4) per class not sampled as shots
