"""`adaclip compare` / `adaclip.compare`: one protocol for every method, the leaderboard and its formats,
the recommendation by validation (never test), failed rows, too few images, --out-dir/--resume and
Ctrl-C, and agreement with `fit` + `evaluate` and with benchmarks.accuracy."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import adaclip
from adaclip.cli import app
from adaclip.comparison import (
    COLUMNS,
    ComparisonInterrupted,
    RunResult,
    build_leaderboard,
    default_methods,
    images_needed,
    make_protocol,
)

from .conftest import PALETTE, TINY, make_folder

runner = CliRunner()
TINY_ARGS = ["--backbone", TINY, "--pretrained", "none", "--device", "cpu"]
FAST = {"linear-probe": {"train": {"epochs": 2}}}


@pytest.fixture(scope="module")
def board_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("compare") / "runs"


@pytest.fixture(scope="module")
def board(dataset, tiny_backbone, board_dir):
    """Three methods x two seeds on the tiny backbone, kept in an out_dir."""
    return adaclip.compare(
        dataset,
        ["zeroshot", "linear-probe", "tip-adapter"],
        seeds=[1, 2],
        backbone=tiny_backbone,
        config=FAST,
        out_dir=board_dir,
    )


def test_default_methods_leave_out_whole_backbone_fine_tuning():
    methods = default_methods()
    assert "full-ft" not in methods and "rada-ft" not in methods
    assert {"zeroshot", "linear-probe", "adaring", "rada", "tip-adapter", "coop", "lora"} <= set(methods)


def test_leaderboard_rows_aggregate_every_seed(board):
    assert {r.method for r in board.rows} == {"zeroshot", "linear-probe", "tip-adapter"}
    assert [(r.method, r.seed) for r in board.runs] == [
        (m, s) for s in (1, 2) for m in ("zeroshot", "linear-probe", "tip-adapter")
    ]
    for row in board.rows:
        mine = [r for r in board.runs if r.method == row.method]
        accuracies = [r.accuracy for r in mine]
        assert row.runs == 2 and row.failed == 0
        assert row.accuracy == pytest.approx(sum(accuracies) / 2)
        assert row.accuracy_std == pytest.approx(abs(accuracies[0] - accuracies[1]) / 2**0.5)
        assert row.val_accuracy == pytest.approx(sum(r.val_accuracy for r in mine) / 2)
        assert row.trainable_params == mine[0].trainable_params
        assert row.adapter_bytes == Path(mine[0].adapter_path).stat().st_size
        assert row.fit_seconds > 0 and row.predict_images_per_second > 0
    assert board.row("zeroshot").trainable_params == 0
    assert board.row("linear-probe").trainable_params > 0
    # best test accuracy first
    assert [r.accuracy for r in board.rows] == sorted((r.accuracy for r in board.rows), reverse=True)
    assert board.protocol["test"] == "test/ folder" and board.protocol["test_images"] == 24


def test_runs_train_on_what_fit_draws_and_score_as_evaluate_does(board, dataset, tiny_backbone):
    """The protocol is fit's own: fit with the same seed trains on the same images and, scored by
    Adapter.evaluate on test/, gives the same numbers (shared encodings change nothing)."""
    run = next(r for r in board.runs if r.method == "linear-probe" and r.seed == 2)
    adapter = adaclip.fit(dataset, "linear-probe", backbone=tiny_backbone, seed=2, config=FAST["linear-probe"])
    report = adapter.evaluate(dataset / "test")
    assert run.accuracy == pytest.approx(report.accuracy, abs=1e-9)
    assert run.macro_f1 == pytest.approx(report.macro_f1, abs=1e-9)
    assert run.val_accuracy == pytest.approx(adapter.metadata.training.val_accuracy, abs=1e-9)
    assert run.trainable_params == adapter.trainable_params


def test_best_adapter_is_the_validation_winner(board, board_dir):
    ok = [r for r in board.rows if r.failed == 0]
    winner = max(ok, key=lambda r: (round(r.val_accuracy, 6), -(r.trainable_params or 0)))
    assert board.recommended == winner.method
    assert "validation" in board.reason and "test images were not used" in board.reason
    best_run = max((r for r in board.runs if r.method == winner.method), key=lambda r: (r.val_accuracy or 0.0, -r.seed))
    assert board.best_adapter == str(board_dir / "best.adaclip")
    assert (board_dir / "best.adaclip").read_bytes() == Path(best_run.adapter_path).read_bytes()
    for run in board.runs:  # every adapter kept
        assert Path(run.adapter_path).parent == board_dir / "runs" and Path(run.adapter_path).exists()
    saved = json.loads((board_dir / "compare.json").read_text())
    assert saved["recommended"] == board.recommended
    assert [r["method"] for r in saved["leaderboard"]] == [r.method for r in board.rows]


def _run(method, seed, test, val, params=100) -> RunResult:
    return RunResult(method, seed, accuracy=test, val_accuracy=val, trainable_params=params, macro_f1=test)


def test_recommendation_follows_validation_never_test(dataset):
    """A method that wins on test but loses on validation is not recommended."""
    protocol = make_protocol(dataset)
    runs = [_run("test-winner", 1, 0.99, 0.50), _run("val-winner", 1, 0.60, 0.90), _run("failing", 1, None, None)]
    runs[2].status, runs[2].error = "failed", "RuntimeError: boom"
    board = build_leaderboard(runs, ["test-winner", "val-winner", "failing"], protocol, [1])
    assert board.rows[0].method == "test-winner"  # the table is ordered by test accuracy...
    assert board.recommended == "val-winner"  # ...the recommendation by validation
    assert "0.900" in board.reason and "next: test-winner 0.500" in board.reason
    # a tie on validation goes to fewer trainable parameters
    tie = [_run("big", 1, 0.7, 0.9, params=1000), _run("small", 1, 0.6, 0.9, params=10)]
    assert build_leaderboard(tie, ["big", "small"], protocol, [1]).recommended == "small"
    # without validation (val_split=0) nothing is recommended, and the reason says why
    blind = build_leaderboard([_run("a", 1, 0.7, None)], ["a"], protocol, [1])
    assert blind.recommended is None and "no method has a validation accuracy" in blind.reason


def make_fit_fail(monkeypatch, method: str, error: Exception) -> None:
    """compare's fit raises `error` for `method` and fits every other method for real."""
    import adaclip.api

    real_fit = adaclip.api.fit

    def fit(data, name, **kwargs):
        if name == method:
            raise error
        return real_fit(data, name, **kwargs)

    monkeypatch.setattr(adaclip.api, "fit", fit)


def test_a_failing_method_is_a_failed_row_while_the_others_finish(dataset, tiny_backbone, monkeypatch):
    make_fit_fail(monkeypatch, "linear-probe", RuntimeError("boom\nsecond line never shown"))
    board = adaclip.compare(dataset, ["linear-probe", "zeroshot"], seeds=[1], backbone=tiny_backbone)
    failed = board.row("linear-probe")
    assert failed.runs == 0 and failed.failed == 1 and failed.accuracy is None
    assert failed.error == "RuntimeError: boom"
    assert board.row("zeroshot").runs == 1 and board.row("zeroshot").accuracy is not None
    assert board.recommended == "zeroshot"
    assert board.rows[-1].method == "linear-probe"  # failed rows last


def test_cli_failed_row_in_table_and_json(dataset, monkeypatch):
    make_fit_fail(monkeypatch, "linear-probe", ValueError("cannot train here"))
    args = ["compare", str(dataset), "-m", "zeroshot,linear-probe", "--seeds", "1", *TINY_ARGS]
    table = runner.invoke(app, args)
    assert table.exit_code == 0, table.output
    assert "failed" in table.stdout and "ValueError: cannot train here" in table.stdout
    assert "recommended: zeroshot" in table.stdout
    assert "linear-probe seed 1 failed: ValueError: cannot train here" in table.stderr
    document = json.loads(runner.invoke(app, [*args, "--format", "json"]).stdout)
    row = next(r for r in document["leaderboard"] if r["method"] == "linear-probe")
    assert row["failed"] == 1 and row["error"] == "ValueError: cannot train here"


@pytest.mark.slow
def test_cli_formats_carry_the_same_leaderboard(dataset):
    from adaclip.cli import _join_seed_values

    # `--seeds 3 4`, as the research scripts take it, is one option value by the time Typer parses it
    assert _join_seed_values(["compare", "d", "--seeds", "3", "4", "-m", "x"]) == [
        "compare", "d", "--seeds", "3,4", "-m", "x"
    ]  # fmt: skip
    args = ["compare", str(dataset), "-m", "zeroshot,tip-adapter", "--seeds", "3,4", *TINY_ARGS]
    as_json = runner.invoke(app, [*args, "--format", "json"])
    assert as_json.exit_code == 0, as_json.output
    document = json.loads(as_json.stdout)
    assert document["seeds"] == [3, 4]
    assert set(document) >= {"protocol", "recommended", "reason", "leaderboard", "runs"}
    assert set(document["leaderboard"][0]) == set(COLUMNS)
    assert len(document["runs"]) == 4
    as_csv = runner.invoke(app, [*args, "--format", "csv"])
    assert as_csv.exit_code == 0, as_csv.output
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert list(rows[0]) == COLUMNS
    for row, record in zip(rows, document["leaderboard"], strict=True):
        assert row["method"] == record["method"]
        assert float(row["accuracy"]) == pytest.approx(record["accuracy"])
        assert float(row["val_accuracy"]) == pytest.approx(record["val_accuracy"])
        assert int(row["trainable_params"]) == record["trainable_params"]
    assert "recommended:" in as_csv.stderr and "recommended" not in as_csv.stdout
    table = runner.invoke(app, args)
    assert table.exit_code == 0
    for method in ("zeroshot", "tip-adapter"):
        assert method in table.stdout
    assert f"recommended: {document['recommended']}" in table.stdout


def test_too_few_images_says_how_many_per_class_before_any_work(tmp_path, monkeypatch):
    import adaclip.backbone

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone must not be built for bad input")

    monkeypatch.setattr(adaclip.backbone, "create_backbone", no_backbone)
    flat = make_folder(tmp_path / "flat", 6, seed=3)  # no test/: compare holds 20% out itself
    result = runner.invoke(app, ["compare", str(flat), "--shots", "4", *TINY_ARGS])
    assert result.exit_code == 2, result.output
    # 4 to train + min(4, 4) for validation + the test hold-out of a 10-image class (2) = 10
    assert "compare needs 10 per class (4 to train + 4 for validation + 2 held out for testing" in result.stderr
    assert "'red_circle' has 6" in result.stderr and "Traceback" not in result.output
    assert images_needed(4, "auto", has_val=False, carved_test=True)[0] == 10
    assert images_needed(16, "auto", has_val=False, carved_test=False)[0] == 20
    assert images_needed(16, 0, has_val=False, carved_test=False)[0] == 16
    assert images_needed(None, "auto", has_val=True, carved_test=False)[0] == 1
    with pytest.raises(adaclip.InputError, match="needs 3 per class"):
        adaclip.compare(make_folder(tmp_path / "two", 2, seed=4), ["zeroshot"], seeds=[1])


def test_held_out_split_is_fixed_and_never_trained_on(tmp_path):
    flat = make_folder(tmp_path / "flat", 10, seed=5)
    protocol = make_protocol(flat)
    again = make_protocol(flat)
    test = {im.path for im in protocol.test}
    assert test == {im.path for im in again.test} and len(test) == 4 * 2  # 20% of 10 per class
    for seed in (1, 2, 3):
        data = protocol.training_data(seed)
        assert not test & {im.path for im in data.train} and not test & {im.path for im in data.val}
        assert data.val and not {im.path for im in data.val} & {im.path for im in data.train}


def test_bad_options_fail_before_work(dataset, tmp_path):
    for args, message in [
        (["--resume"], "--resume needs --out-dir"),
        (["--png"], "--png needs --report"),
        (["-m", "zeroshot,nope"], "unknown method 'nope'"),
        (["-m", "zeroshot,zeroshot"], "listed twice"),
        (["--seeds", "1,1"], "distinct seeds"),
        (["--seeds", "x"], "--seeds expects integers"),
        (["--set", "linear-probe.train.epochs=2"], "settings given for 'linear-probe'"),
    ]:
        methods = [] if args[0] == "-m" else ["-m", "zeroshot"]
        result = runner.invoke(app, ["compare", str(dataset), *methods, *args, *TINY_ARGS])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.stderr, (args, result.stderr)
    inside = runner.invoke(app, ["compare", str(dataset), "--out-dir", str(dataset / "runs"), *TINY_ARGS])
    assert inside.exit_code == 2 and "--out-dir is inside the data folder" in inside.stderr
    assert not (dataset / "runs").exists()
    kept = tmp_path / "r.html"
    kept.write_text("mine")
    result = runner.invoke(app, ["compare", str(dataset), "-m", "zeroshot", "--report", str(kept), *TINY_ARGS])
    assert result.exit_code == 2 and "report file already exists" in result.stderr
    assert kept.read_text() == "mine"


@pytest.mark.slow
def test_resume_skips_finished_runs_and_ctrl_c_keeps_them(dataset, tiny_backbone, tmp_path, monkeypatch):
    import adaclip.api

    real_fit = adaclip.api.fit
    fitted: list[tuple[str, int]] = []
    interrupts = [1]  # one Ctrl-C, in the 4th run

    def fit(data, method, **kwargs):
        if method == "tip-adapter" and kwargs["seed"] == 2 and interrupts:
            interrupts.pop()
            fitted.append(("stop", 0))
            raise KeyboardInterrupt
        fitted.append((method, kwargs["seed"]))
        return real_fit(data, method, **kwargs)

    monkeypatch.setattr(adaclip.api, "fit", fit)
    out = tmp_path / "runs"
    methods = ["zeroshot", "tip-adapter"]
    with pytest.raises(ComparisonInterrupted, match="interrupted after 3 of 4 runs; 3 finished run"):
        adaclip.compare(dataset, methods, seeds=[1, 2], backbone=tiny_backbone, out_dir=out)
    assert fitted == [("zeroshot", 1), ("tip-adapter", 1), ("zeroshot", 2), ("stop", 0)]
    kept = sorted(p.name for p in (out / "runs").iterdir())
    assert kept == [
        "tip-adapter-seed1.adaclip",
        "tip-adapter-seed1.json",
        "zeroshot-seed1.adaclip",
        "zeroshot-seed1.json",
        "zeroshot-seed2.adaclip",
        "zeroshot-seed2.json",
    ]
    before = (out / "runs" / "tip-adapter-seed1.adaclip").read_bytes()
    # without --resume (or --force) the folder is not reused
    with pytest.raises(adaclip.UsageError, match="earlier comparison|holds runs"):
        adaclip.compare(dataset, methods, seeds=[1, 2], backbone=tiny_backbone, out_dir=out)
    fitted.clear()
    board = adaclip.compare(dataset, methods, seeds=[1, 2], backbone=tiny_backbone, out_dir=out, resume=True)
    assert fitted == [("tip-adapter", 2)]  # only the unfinished run
    assert (out / "runs" / "tip-adapter-seed1.adaclip").read_bytes() == before
    assert all(r.status == "ok" for r in board.runs) and len(board.runs) == 4
    assert (out / "best.adaclip").exists()
    # a resumed comparison on other splits is refused
    with pytest.raises(adaclip.UsageError, match="different protocol"):
        adaclip.compare(dataset, methods, seeds=[1, 2], shots=2, backbone=tiny_backbone, out_dir=out, resume=True)


def test_base_to_new_scores_new_classes_among_new_names(dataset, tiny_backbone):
    board = adaclip.compare(
        dataset,
        ["zeroshot", "tip-adapter"],
        seeds=[1],
        backbone=tiny_backbone,
        base_to_new=["red_circle", "yellow_cross"],
    )
    assert board.protocol["base_classes"] == ["red_circle", "yellow_cross"]
    assert board.class_names == ["red circle", "yellow cross"]
    zeroshot, tip = board.row("zeroshot"), board.row("tip-adapter")
    assert zeroshot.new_accuracy is not None  # class-agnostic
    assert tip.new_accuracy is None  # tied to its training classes
    run = next(r for r in board.runs if r.method == "zeroshot")
    assert len(run.test_index) == 12  # base-class test images only


@pytest.mark.slow
def test_lite_api_and_cli_agree(dataset, tmp_path):
    """The offline lite backbone, through the API and the CLI, on the same protocol and seed."""
    board = adaclip.compare(
        dataset, ["zeroshot", "linear-probe"], seeds=[1], backbone="lite", pretrained=None, config=FAST, device="cpu"
    )
    result = runner.invoke(
        app,
        ["compare", str(dataset), "-m", "zeroshot,linear-probe", "--seeds", "1", "--backbone", "lite",
         "--set", "linear-probe.train.epochs=2", "--format", "json", "--device", "cpu"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    for record in document["leaderboard"]:
        row = board.row(record["method"])
        assert record["accuracy"] == pytest.approx(row.accuracy, abs=1e-9)
        assert record["val_accuracy"] == pytest.approx(row.val_accuracy, abs=1e-9)
    assert board.row("linear-probe").accuracy > board.row("zeroshot").accuracy
    assert document["recommended"] == board.recommended == "linear-probe"


@pytest.mark.slow
def test_accuracy_benchmark_reports_the_leaderboard_numbers(dataset, tiny_backbone, tmp_path, monkeypatch):
    """benchmarks.accuracy is a user of compare: its few-shot records are compare's runs for the same
    protocol (shots, seeds, no validation, test/)."""
    import shutil

    import benchmarks.accuracy as bench

    data = tmp_path / "data"  # the bench's layout: train/, test/ and classes.json
    shutil.copytree(dataset, data)
    (data / "classes.json").write_text(json.dumps({name: name.replace("_", " ") for name in PALETTE}))
    monkeypatch.setattr(bench, "prepare_dataset", lambda: data)
    monkeypatch.setattr(bench, "replace_section", lambda *args: None)  # docs/ stay as they are
    monkeypatch.setattr(adaclip, "create_backbone", lambda *args, **kwargs: tiny_backbone)
    output = tmp_path / "accuracy.json"
    methods = ["zeroshot", "tip-adapter"]
    bench.main(["--backbone", TINY, "--methods", *methods, "--shots", "2", "--seeds", "1", "2",
                "--templates", "default", "--protocols", "few-shot", "--output", str(output)])  # fmt: skip
    records = json.loads(output.read_text())["few_shot"]
    board = adaclip.compare(
        data, methods, seeds=[1, 2], shots=2, val_split=0, classes=data / "classes.json", backbone=tiny_backbone
    )
    assert len(records) == 4
    for record in records:
        run = next(r for r in board.runs if (r.method, r.seed) == (record["method"], record["seed"]))
        assert record["accuracy"] == pytest.approx(run.accuracy, abs=1e-9)
        assert record["trainable_params"] == run.trainable_params
    for row in board.rows:
        mine = [r["accuracy"] for r in records if r["method"] == row.method]
        assert sum(mine) / len(mine) == pytest.approx(row.accuracy, abs=1e-9)


@pytest.mark.slow
def test_frozen_tower_methods_share_one_encoding_of_the_test_images(dataset, tiny_backbone, monkeypatch):
    import adaclip.inference

    real = adaclip.inference._encode_images
    encoded: list[int] = []

    def counting(model, images, *args, **kwargs):
        encoded.append(len(images))
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(adaclip.inference, "_encode_images", counting)
    board = adaclip.compare(dataset, ["zeroshot", "tip-adapter", "linear-probe"], seeds=[1, 2],
                            backbone=tiny_backbone, config=FAST)  # fmt: skip
    assert all(r.status == "ok" for r in board.runs)
    assert encoded.count(24) == 1  # 6 runs, every image tower frozen: the 24 test images encoded once


@pytest.mark.slow
def test_accuracy_benchmark_base_to_new_trains_on_its_base_classes(tiny_backbone, tmp_path, monkeypatch):
    """The bench's base-to-new through compare: trained on the 5 base folders only (in sorted folder
    order), new and all scored for class-agnostic methods."""
    import random

    import benchmarks.accuracy as bench

    from .conftest import draw

    data = tmp_path / "fmnist"
    rng = random.Random(0)
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 210, 40), (200, 40, 200)]
    for i, folder in enumerate(bench.FOLDERS):
        for split, n in (("train", 20), ("test", 2)):  # 16 shots + min(16, 4) for validation
            (data / split / folder).mkdir(parents=True)
            for j in range(n):
                draw(colours[i % 5], ("circle", "square")[i // 5], rng).save(data / split / folder / f"{j}.png")
    (data / "classes.json").write_text((bench.ROOT / "sample_data" / "classes.json").read_text())
    monkeypatch.setattr(bench, "prepare_dataset", lambda: data)
    monkeypatch.setattr(bench, "replace_section", lambda *args: None)
    monkeypatch.setattr(adaclip, "create_backbone", lambda *args, **kwargs: tiny_backbone)
    output = tmp_path / "b2n.json"
    bench.main(["--backbone", TINY, "--methods", "zeroshot", "tip-adapter", "--seeds", "1",
                "--templates", "default", "--protocols", "base-to-new", "--output", str(output)])  # fmt: skip
    records = {r["method"]: r for r in json.loads(output.read_text())["base_to_new"]}
    assert records["tip-adapter"]["new"] is None and records["tip-adapter"]["hm"] is None
    zeroshot = records["zeroshot"]
    assert None not in (zeroshot["base"], zeroshot["new"], zeroshot["all"])
    # zero-shot trains nothing: its base score is plain zero-shot among the 5 base names
    board = adaclip.compare(data, ["zeroshot"], seeds=[1], shots=16, val_split=0, classes=data / "classes.json",
                            base_to_new=sorted(bench.BASE), backbone=tiny_backbone)  # fmt: skip
    assert board.class_names == [json.loads((data / "classes.json").read_text())[f] for f in sorted(bench.BASE)]
    assert zeroshot["base"] == pytest.approx(board.row("zeroshot").accuracy)
    assert zeroshot["new"] == pytest.approx(board.row("zeroshot").new_accuracy)


def test_cli_ctrl_c_exits_130_in_one_line_keeping_finished_runs(dataset, tmp_path, monkeypatch):
    import adaclip.api

    real_fit = adaclip.api.fit

    def fit(data, method, **kwargs):
        if method == "tip-adapter":
            raise KeyboardInterrupt
        return real_fit(data, method, **kwargs)

    monkeypatch.setattr(adaclip.api, "fit", fit)
    out = tmp_path / "runs"
    result = runner.invoke(
        app, ["compare", str(dataset), "-m", "zeroshot,tip-adapter", "--seeds", "1", "--out-dir", str(out), *TINY_ARGS]
    )
    assert result.exit_code == 130, result.output
    assert "interrupted after 1 of 2 runs; 1 finished run(s) kept in" in result.stderr and "--resume" in result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    assert (out / "runs" / "zeroshot-seed1.adaclip").exists() and (out / "runs" / "zeroshot-seed1.json").exists()
