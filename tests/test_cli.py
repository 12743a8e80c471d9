"""The CLI through Typer's runner (and one real subprocess): outputs, formats, exit codes, messages."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from subprocess import PIPE

import pytest
from typer.testing import CliRunner

from adaclip.cli import app

from .cli_run import run_cli, start_cli
from .conftest import TINY

runner = CliRunner()
TINY_ARGS = ["--backbone", TINY, "--pretrained", "none", "--device", "cpu"]


def cli(*args: str, stdin: str | None = None):
    result = runner.invoke(app, list(args), input=stdin)
    return result


@pytest.fixture(scope="module")
def probe_file(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "probe.adaclip"
    result = cli("fit", str(dataset), "-m", "linear-probe", "-o", str(out), "--epochs", "3", "--lr", "0.01", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    return out


def test_fit_json_summary_and_file(dataset, tmp_path):
    out = tmp_path / "zs.adaclip"
    result = cli("fit", str(dataset), "-m", "zeroshot", "-o", str(out), "--format", "json", *TINY_ARGS)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["output"] == str(out) and out.exists()
    assert summary["method"] == "zeroshot" and summary["trainable_params"] == 0
    assert summary["classes"] == 4 and summary["train_images"] == 44
    assert "random weights" in result.stderr  # logs go to stderr, never into the JSON


def test_fit_refuses_to_overwrite_before_training(dataset, tmp_path):
    out = tmp_path / "exists.adaclip"
    out.write_bytes(b"precious")
    result = cli("fit", str(dataset), "-m", "zeroshot", "-o", str(out), *TINY_ARGS)
    assert result.exit_code == 2
    assert "already exists" in result.stderr and "--force" in result.stderr
    assert out.read_bytes() == b"precious"


def test_predict_formats(probe_file, dataset):
    folder = str(dataset / "test" / "red_circle")
    as_jsonl = cli("predict", str(probe_file), folder, "--format", "jsonl", "--top-k", "2")
    assert as_jsonl.exit_code == 0, as_jsonl.output
    lines = [json.loads(line) for line in as_jsonl.stdout.splitlines()]
    assert len(lines) == 6 and all(len(r["top_k"]) == 2 for r in lines)
    assert all(r["path"].endswith(".png") and 0 <= r["score"] <= 1 for r in lines)
    as_csv = cli("predict", str(probe_file), folder, "--format", "csv", "--top-k", "2")
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout)))
    assert [r["path"] for r in rows] == [r["path"] for r in lines]
    assert set(rows[0]) == {"path", "label", "score", "label_2", "score_2"}
    as_json = cli("predict", str(probe_file), folder, "--format", "json")
    assert [r["label"] for r in json.loads(as_json.stdout)] == [r["label"] for r in lines]
    as_table = runner.invoke(app, ["predict", str(probe_file), folder], env={"COLUMNS": "300"})
    assert as_table.exit_code == 0
    assert all(r["path"] in as_table.stdout and r["label"] in as_table.stdout for r in lines)


def test_predict_paths_from_stdin_and_bad_files(probe_file, dataset, tmp_path):
    bad = tmp_path / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    good = sorted((dataset / "test" / "blue_stripes").iterdir())[:2]
    stdin = "\n".join([str(good[0]), str(bad), str(good[1])]) + "\n"
    result = cli("predict", str(probe_file), "-", "--format", "jsonl", stdin=stdin)
    assert result.exit_code == 0, result.output
    paths = [json.loads(line)["path"] for line in result.stdout.splitlines()]
    assert paths == [str(good[0]), str(good[1])]
    assert "corrupt.jpg" in result.stderr and "skipped 1" in result.stderr


def test_eval_json_report(probe_file, dataset):
    result = cli("eval", str(probe_file), str(dataset), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_images"] == 24 and 0 <= report["accuracy"] <= 1
    assert len(report["per_class"]) == 4 and len(report["confusion"]) == 4
    assert {"accuracy", "macro_f1", "per_class", "confusion"} <= set(report)
    table = cli("eval", str(probe_file), str(dataset))
    assert "accuracy" in table.stdout and "confusion" in table.stdout


def test_info_of_file_and_of_method(probe_file):
    result = cli("info", str(probe_file), "--format", "json")
    meta = json.loads(result.stdout)
    assert meta["method"] == "linear-probe" and meta["backbone"]["name"] == TINY
    assert meta["training"]["epochs"] == 3 and meta["seed"] == 0
    described = cli("info", "--method", "linear-probe", "--backbone", TINY, "--num-classes", "5", "--format", "json")
    assert described.exit_code == 0, described.output
    assert json.loads(described.stdout)["trainable_params"] == 5 * 32 + 5


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["predict", "missing.adaclip", "x.png"], 2, "adapter file not found: missing.adaclip"),
        (["eval", "missing.adaclip", "."], 2, "adapter file not found"),
        (["fit", "/no/such/folder", "-m", "zeroshot"], 2, "data folder not found: /no/such/folder"),
        (
            ["fit", ".", "-m", "no-such-method", "-o", "/tmp/adaclip-never.adaclip"],
            2,
            "unknown method 'no-such-method'",
        ),
        (["info"], 2, "give an adapter file"),
        (["predict", "x.adaclip", "y.png", "--format", "xml"], 2, "unknown --format 'xml'"),
    ],
)
def test_bad_input_exit_codes_and_one_line_messages(args, code, message):
    result = cli(*args)
    assert result.exit_code == code
    assert message in result.stderr
    assert "Traceback" not in result.output and len(result.stderr.strip().splitlines()) == 1


def test_empty_folder_one_class_and_bad_class_file(tmp_path, dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = cli("fit", str(empty), "-m", "zeroshot", *TINY_ARGS)
    assert result.exit_code == 2 and "no class folders found" in result.stderr
    one = tmp_path / "one" / "cats"
    one.mkdir(parents=True)
    (one / "a.png").write_bytes((dataset / "train" / "red_circle" / "img_000.png").read_bytes())
    result = cli("fit", str(tmp_path / "one"), "-m", "zeroshot", *TINY_ARGS)
    assert result.exit_code == 2 and "only 1 class" in result.stderr
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"red_circle": "red", "purple_blob": "purple"}))
    result = cli("fit", str(dataset), "-m", "zeroshot", "--classes", str(names), *TINY_ARGS)
    assert result.exit_code == 2 and "purple_blob" in result.stderr


def test_wrong_backbone_checkpoint_is_refused(dataset, tiny_backbone, tmp_path):
    import torch

    trained_on = tmp_path / "weights_a.pt"
    torch.save(tiny_backbone.model.state_dict(), trained_on)
    other = tmp_path / "weights_b.pt"
    torch.save({k: v + 0.01 for k, v in tiny_backbone.model.state_dict().items()}, other)
    out = tmp_path / "zs.adaclip"
    fit = cli("fit", str(dataset), "-m", "zeroshot", "-o", str(out), "-b", TINY, "-p", str(trained_on))
    assert fit.exit_code == 0, fit.output
    remembered = cli("predict", str(out), str(dataset / "test"), "-f", "jsonl")  # the recorded path, sha256-checked
    assert remembered.exit_code == 0 and len(remembered.stdout.splitlines()) == 24
    assert str(trained_on) in remembered.stderr
    changed = trained_on.read_bytes()
    trained_on.write_bytes(other.read_bytes())  # same path, other weights: the sha256 refuses them
    swapped = cli("predict", str(out), str(dataset / "test"))
    assert swapped.exit_code == 2 and "does not match: checkpoint sha256" in swapped.stderr
    trained_on.unlink()
    no_weights = cli("predict", str(out), str(dataset / "test"))
    assert no_weights.exit_code == 2 and "pass --pretrained" in no_weights.stderr
    assert f"no longer at {trained_on}" in no_weights.stderr
    trained_on.write_bytes(changed)
    wrong = cli("predict", str(out), str(dataset / "test"), "-p", str(other))
    assert wrong.exit_code == 2
    assert "does not match: checkpoint sha256" in wrong.stderr
    right = cli("predict", str(out), str(dataset / "test"), "-p", str(trained_on), "-f", "jsonl")
    assert right.exit_code == 0 and len(right.stdout.splitlines()) == 24


def test_debug_shows_traceback(capsys):
    """--debug (anywhere on the line) adds the traceback to the one-line error; without it, one line."""
    from adaclip.cli import main

    for extra, traceback_shown in ((["--debug"], True), ([], False)):
        with pytest.raises(SystemExit) as exit_info:
            main(["predict", "missing.adaclip", "x.png", *extra])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert ("Traceback (most recent call last)" in err) is traceback_shown, err
        assert err.strip().splitlines()[-1].startswith("error: ") and "missing.adaclip" in err
        if traceback_shown:
            assert "AdapterFileError" in err  # the exception itself, not only the message
        else:
            assert len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_real_subprocess_round_trip(dataset, tmp_path):
    out = tmp_path / "zs.adaclip"
    fit = run_cli("fit", dataset, "-m", "zeroshot", "-o", out, "-f", "json", *TINY_ARGS, timeout=300)
    assert fit.returncode == 0, fit.stderr
    assert json.loads(fit.stdout)["output"] == str(out)
    bad = run_cli("eval", out, tmp_path / "nowhere", timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: data folder not found: {tmp_path / 'nowhere'}"


@pytest.mark.slow
def test_closed_pipe_exits_quietly_with_0(probe_file, dataset):
    """`adaclip predict ... | head -1`: the reader leaves early; exit 0 with nothing on stderr but logs."""
    folder = str(dataset / "test")
    process = start_cli(
        "predict", probe_file, *[folder] * 6, "-f", "jsonl", "-q", "--batch-size", "2", stdout=PIPE, stderr=PIPE
    )
    first = process.stdout.readline()
    process.stdout.close()
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0, stderr
    assert json.loads(first)["path"] and stderr == ""


def test_predict_on_only_missing_paths_prints_no_empty_table(probe_file, tmp_path):
    result = cli("predict", str(probe_file), str(tmp_path / "missing.jpg"))
    assert result.exit_code == 2 and result.stdout == ""


def test_help_paragraphs_reflow_to_the_terminal(monkeypatch):
    result = run_cli("fit", "--help", env={"COLUMNS": "200"}, timeout=60)
    assert "a crash, the same command with --resume finishes" in result.stdout  # one line, not broken mid-sentence


def test_summary_tables_round_for_people(probe_file):
    result = cli("export", str(probe_file), "--format", "onnx", "-o", "/nonexistent/x.onnx")
    assert result.exit_code == 2  # the output folder is checked before anything is written
    from adaclip.output import _summary_cell

    assert [_summary_cell(v).plain for v in (461.53, 2.0, 0.12345)] == ["461.53", "2", "0.1235"]


def test_help_shows_placeholders_in_angle_brackets_literally():
    """Help is markdown, where <class> reads as an HTML tag and vanished ("root//")."""
    result = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "200"})
    assert "root/<class>/<image>" in result.stdout and "(default: <data name>.<method>.adaclip)" in result.stdout
    result = runner.invoke(app, ["report", "--help"], env={"COLUMNS": "200"})
    assert "(default: <adapter>.report.html)" in result.stdout


def test_an_option_group_gives_every_command_that_names_it_its_options(probe_file, tmp_path):
    """LoadOptions is declared once; predict, eval, tta and report all take its options, and a value
    given on the command line reaches the load (a bad --precision is refused by it)."""
    from typer.main import get_command

    from adaclip.cli.options import LoadOptions

    commands = get_command(app).commands
    wanted = {"--pretrained", "--device", "--precision", "--cache-dir"}
    assert len(LoadOptions.parameters()) == len(wanted)
    for name in ("predict", "eval", "tta", "report"):
        declared = {opt for param in commands[name].params for opt in param.opts}
        assert wanted <= declared, name
    result = cli("predict", str(probe_file), str(tmp_path), "--precision", "fp8")
    assert result.exit_code == 2 and "fp8" in result.stderr
