"""The `adaclip` command: a thin Typer layer over the library.

Each command parses options, calls the Python API, and writes results to stdout in the chosen format.
Errors become one line on stderr and an exit code (0 ok, 1 runtime failure, 2 bad usage or input);
`--debug` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from ._version import __version__
from .checks import check_count
from .errors import AdaclipError, UsageError, use_cli_names
from .output import FORMATS, flatten, key_value_table, printable, stdout_console, write_json, write_records
from .ui import log

app = typer.Typer(
    name="adaclip",
    help=(
        "Adapt a pretrained CLIP model to your own images.\n\n"
        "Typical use: adaclip fit ./images --method adaring -o pets.adaclip, then "
        "adaclip predict pets.adaclip photo.jpg, or adaclip eval pets.adaclip ./images/test."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # docstring paragraphs reflow to the terminal width (no mid-sentence breaks)
    context_settings={"help_option_names": ["-h", "--help"]},
)

MAX_SKIP_WARNINGS = 20
EXPORT_FORMATS = ("adaclip", "open_clip", "peft", "onnx")  # adaclip.interop.EXPORT_FORMATS (imports torch)
_GLOBAL_FLAGS = ("--debug", "--quiet", "-q", "--verbose", "-v")
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the adaclip version and exit."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (accepted anywhere on the line)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail on stderr."),
) -> None:
    _state["debug"] = debug or bool(os.environ.get("ADACLIP_DEBUG"))
    use_cli_names()
    log.configure(quiet=quiet, verbose=verbose)
    if quiet:
        from .ui import set_progress

        set_progress(False)


def command(*args: Any, heavy: bool | Callable[[dict[str, Any]], bool] = True, **kwargs: Any):
    """`app.command` plus adaclip's error policy: an AdaclipError becomes one line on stderr and its
    exit code; anything unexpected becomes one line and exit 1; --debug re-raises for the traceback.

    A `heavy` command (or one whose options make `heavy(options)` true) imports torch, torchvision and
    open_clip before its body, while Ctrl-C still ends the process at once (see adaclip._interrupt);
    from its body on, Ctrl-C raises KeyboardInterrupt."""

    def decorate(function):
        @functools.wraps(function)
        def run(*fargs: Any, **fkwargs: Any):
            from ._interrupt import import_heavy_modules, interrupts_raise

            if heavy(fkwargs) if callable(heavy) else heavy:
                import_heavy_modules()
            interrupts_raise()
            try:
                return function(*fargs, **fkwargs)
            except AdaclipError as exc:
                if _state["debug"]:
                    traceback.print_exc()
                log.error(exc.one_line())
                raise typer.Exit(exc.exit_code) from None
            except KeyboardInterrupt:
                log.error("interrupted")
                raise typer.Exit(130) from None
            except BrokenPipeError:
                # The reader went away (`| head`): stop quietly with 0, as shell tools do. Click would
                # turn it into exit 1; later writes (and the flush at exit) go to /dev/null.
                _silence_stdout()
                raise typer.Exit(0) from None
            except (typer.Exit, typer.Abort):
                raise
            except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
                if _state["debug"]:
                    raise
                first = (str(exc).strip().splitlines() or [""])[0]
                log.error(f"unexpected {type(exc).__name__}: {first} (rerun with --debug for the traceback)")
                raise typer.Exit(1) from None

        return app.command(*args, **kwargs)(run)

    return decorate


# Shell completion (`adaclip --install-completion`) runs the program on every TAB: these read names
# without importing torch (method names from source, backbone names from open_clip's config files).


def _complete_from(names: list[str], incomplete: str) -> list[str]:
    return [name for name in names if name.startswith(incomplete)]


def complete_method(incomplete: str) -> list[str]:
    from .method_catalog import builtin_method_names

    return _complete_from(builtin_method_names(), incomplete)


def complete_backbone(incomplete: str) -> list[str]:
    import importlib.util

    names = ["lite", "hf-hub:"]  # hf-hub:ORG/NAME, an open_clip model repo on the Hugging Face Hub
    spec = importlib.util.find_spec("open_clip")
    for location in (spec.submodule_search_locations or []) if spec else []:
        names += sorted(p.stem for p in (Path(location) / "model_configs").glob("*.json"))
    return _complete_from(names, incomplete)


def _format_option(default: str, allowed: tuple[str, ...] = FORMATS) -> Any:
    return typer.Option(
        default,
        "--format",
        "-f",
        help=f"Output format on stdout: {', '.join(allowed)}.",
        autocompletion=lambda incomplete: _complete_from(list(allowed), incomplete),
    )


def _check_format(fmt: str, allowed: tuple[str, ...] = FORMATS) -> str:
    if fmt not in allowed:
        raise UsageError(f"unknown --format {fmt!r}", fix=f"use one of: {', '.join(allowed)}")
    return fmt


BackboneOpt = typer.Option(
    None,
    "--backbone",
    "-b",
    help="open_clip model name, hf-hub:org/name, or `lite` (embedded, offline). Default ViT-B-16.",
    autocompletion=complete_backbone,
)
PretrainedOpt = typer.Option(
    None,
    "--pretrained",
    "-p",
    help="open_clip pretrained tag, a local checkpoint file, or `none` (random weights); a revision for hf-hub:.",
)
# the training commands' (fit, compare) class-name and prompt options
ClassNamesOpt = typer.Option(
    None, "--classes", help="Class display names: one per line, JSON list, or JSON {folder: name}."
)
TemplatesOpt = typer.Option(
    "default", "--templates", help="Prompt templates: default, ensemble, or a file (one per line, with {})."
)
DeviceOpt = typer.Option("auto", "--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps.")
PrecisionOpt = typer.Option("auto", "--precision", help="auto (bf16 autocast on cuda, else fp32), fp32, bf16, fp16.")
CacheDirOpt = typer.Option(None, "--cache-dir", help="Where pretrained weights are cached / looked up.")
BatchOpt = typer.Option(64, "--batch-size", help="Images per forward pass.")
AdapterWeightsOpt = typer.Option(
    None, "--pretrained", "-p", help="Where the adapter's backbone weights are, if not the recorded tag."
)


def parse_settings(items: list[str]) -> dict[str, Any]:
    """`--set key=value` items -> nested dict; values are JSON when they parse (numbers, lists, true)."""
    settings: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise UsageError(f"--set expects key=value, got {item!r}", fix="e.g. --set ranks=[2,4] --set train.lr=1e-3")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = settings
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"--set {key}: {part} is not a group of settings")
        node[parts[-1]] = value
    return settings


def _read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError("config file not found", path=path) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"config file is not readable JSON ({exc})", path=path) from None
    if not isinstance(document, dict):
        raise UsageError("config file must hold a JSON object of method settings", path=path)
    return document


def _backbone_choice(backbone: str | None, pretrained: str | None) -> dict[str, str | None]:
    """The backbone options of fit and compare: ViT-B-16 with OpenAI's weights unless told otherwise
    (lite has no pretrained tag)."""
    if pretrained is None:
        pretrained = None if backbone == "lite" else "openai"
    return {"backbone": backbone or "ViT-B-16", "pretrained": pretrained}


def _parse_val_split(value: str) -> float | str:
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError:
        raise UsageError(f"--val-split must be 'auto' or a fraction, got {value!r}") from None


# ------------------------------------------------------------------------------------------ fit


@command()
def fit(
    data: Path = typer.Argument(
        ..., help="Image folder: root/<class>/<image>, or root/{train,val,test}/<class>/<image>."
    ),
    method: str = typer.Option(
        "adaring", "--method", "-m", help="Method to train; see `adaclip methods`.", autocompletion=complete_method
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Adapter file to write (default: <folder>.<method>.adaclip)."
    ),
    backbone: str | None = BackboneOpt,
    pretrained: str | None = PretrainedOpt,
    shots: int | None = typer.Option(None, "--shots", help="Few-shot: sample K training images per class (seeded)."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the method's epochs."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Override the method's batch size."),
    lr: float | None = typer.Option(None, "--lr", help="Override the method's learning rate."),
    seed: int = typer.Option(0, "--seed", help="Fixes sampling, initialisation, augmentation and order."),
    classes: Path | None = ClassNamesOpt,
    templates: str = TemplatesOpt,
    val_split: str = typer.Option(
        "auto", "--val-split", help="Validation: auto, 0 (none), or a fraction held out per class."
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="Method setting key=value (repeatable), e.g. --set ranks=[2,4]."
    ),
    config: Path | None = typer.Option(None, "--config", help="JSON file of method settings (--set wins)."),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    workers: int | None = typer.Option(
        None, "--workers", help="Image decoding processes (default: cores-1; 0 on 2 cores)."
    ),
    cache_dir: str | None = CacheDirOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite the output file if it exists."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from OUTPUT.ckpt."),
    checkpoint_every: int | None = typer.Option(
        None, "--checkpoint-every", help="Also checkpoint every N steps (always after each epoch)."
    ),
    keep_checkpoint: bool = typer.Option(False, "--keep-checkpoint", help="Keep OUTPUT.ckpt after success."),
    deterministic: bool = typer.Option(False, "--deterministic", help="Deterministic kernels (slower on GPU)."),
    log_jsonl: Path | None = typer.Option(
        None,
        "--log-jsonl",
        help=(
            'Also write one JSON object per step and per epoch to FILE ("event": "step" or "epoch"; '
            "loss, lr, accuracy, images/s)."
        ),
    ),
    tracker: str | None = typer.Option(
        None,
        "--tracker",
        help="Also log to tensorboard or mlflow (extras adaclip[tensorboard] / adaclip[mlflow]).",
        autocompletion=lambda incomplete: _complete_from(["tensorboard", "mlflow"], incomplete),
    ),
    tracker_dir: Path | None = typer.Option(
        None,
        "--tracker-dir",
        help="The tracker's local store (default ./runs for tensorboard; ./mlruns, holding mlflow.db, for mlflow).",
    ),
    fmt: str = _format_option("table", ("table", "json")),
) -> None:
    """Train an adapter on a labelled image folder and write it to one `.adaclip` file.

    Progress is checkpointed to OUTPUT.ckpt after every epoch; after Ctrl-C or a crash, the same
    command with --resume finishes with the adapter an uninterrupted run would have written. Under
    `torchrun --nproc-per-node N -m adaclip fit ...` the global batch is split across the processes.

    Examples:

        adaclip fit ./pets --method adaring --shots 16 -o pets.adaclip

        adaclip fit ./pets --method rada --backbone lite --set train.epochs=5 --format json
    """
    from .api import fit as fit_adapter
    from .checkpoint import checkpoint_path_for
    from .distributed import context_from_env
    from .methods import deep_merge

    _check_format(fmt, ("table", "json"))
    output = output or Path(f"{data.resolve().name or 'adapter'}.{method.replace('+', '-')}.adaclip")
    main_rank = context_from_env().is_main
    # Checked and locked before anything is read or built; a second fit to the same -o fails here.
    with _claimed_output(output, force=force, inputs=[data], lock=main_rank):
        overrides = deep_merge(_read_config_file(config), parse_settings(settings))
        checkpoint = checkpoint_path_for(output)
        if checkpoint.is_dir():
            raise UsageError("the checkpoint path is a folder", path=checkpoint, fix="choose another -o")
        if checkpoint.exists() and not resume and not force:
            raise UsageError(
                "a checkpoint of an interrupted run exists",
                path=checkpoint,
                fix="add --resume to continue it, or --force",
            )
        run_logs = []
        if main_rank and (log_jsonl or tracker):
            from .tracking import open_run_logs

            params = {"method": method, "backbone": backbone or "ViT-B-16", "seed": seed, "shots": shots, **overrides}
            run_logs = open_run_logs(
                jsonl=log_jsonl,
                tracker=tracker,
                tracker_dir=tracker_dir,
                run_name=output.name,
                params=params,
                force=force,
            )
        try:
            adapter = _fit_with_logs(
                fit_adapter,
                run_logs,
                data,
                method,
                **_backbone_choice(backbone, pretrained),
                shots=shots,
                epochs=epochs,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                classes=classes,
                templates=templates,
                val_split=_parse_val_split(val_split),
                device=device,
                precision=precision,
                config=overrides,
                workers=workers,
                cache_dir=cache_dir,
                checkpoint=checkpoint,
                checkpoint_every=checkpoint_every,
                resume=resume,
                deterministic=deterministic,
            )
        except BaseException:
            for run_log in run_logs:
                run_log.close(None)
            raise
        if not main_rank:
            return  # under torchrun only rank 0 writes and reports
        path = adapter.save(output, force=force)
        if not keep_checkpoint:
            checkpoint.unlink(missing_ok=True)
        meta = adapter.metadata
        training = meta.training
        summary = {
            "output": str(path),
            "method": meta.method,
            "backbone": meta.backbone.describe(),
            "classes": len(meta.class_names),
            "train_images": meta.data.n_train if meta.data else None,
            "val_images": meta.data.n_val if meta.data else None,
            "trainable_params": meta.trainable_params,
            "parameter_breakdown": adapter.model.parameter_breakdown(),
            "epochs": training.epochs if training else 0,
            "steps": training.steps if training else 0,
            "final_loss": training.final_loss if training else None,
            "val_accuracy": training.val_accuracy if training else None,
            "skipped_images": training.skipped_images if training else 0,
            "seconds": round(adapter.fit_seconds or 0.0, 2),
            "file_bytes": path.stat().st_size,
            "seed": meta.seed,
        }
        for run_log in run_logs:
            run_log.close(summary)
        if fmt == "json":
            write_json(summary)
        else:
            shown = {k: v for k, v in summary.items() if k != "parameter_breakdown"}
            stdout_console().print(key_value_table(shown.items(), title="adaclip fit"))


def _claimed_output(output: Path | None, *, force: bool, inputs: list[Path], lock: bool = True):
    """Check an output path before any work, then hold its lock while the command produces it (the
    shared check of every command that writes a file; no -o: nothing to check)."""
    import contextlib

    from .files import check_output_path, claim_output

    if output is None:
        return contextlib.nullcontext()
    check_output_path(output, force=force, inputs=inputs)
    return claim_output(output) if lock else contextlib.nullcontext(output)


def _fit_with_logs(fit_adapter, run_logs, *args, **kwargs):
    """`fit_adapter(*args, **kwargs)` with each step's and each epoch's record handed to the run logs."""
    if not run_logs:
        return fit_adapter(*args, **kwargs)

    def on_step_end(record: dict) -> None:
        for run_log in run_logs:
            run_log.log_step(record)

    def on_epoch_end(epoch: int, record: dict) -> None:
        for run_log in run_logs:
            run_log.log_epoch(record)

    return fit_adapter(*args, on_epoch_end=on_epoch_end, on_step_end=on_step_end, **kwargs)


# ------------------------------------------------------------------------------------------ predict


@command()
def predict(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file."),
    inputs: list[str] = typer.Argument(
        ..., metavar="PATH...", help="Image files, folders, globs, or - to read paths from stdin."
    ),
    top_k: int = typer.Option(5, "--top-k", "-k", help="How many labels to report per image."),
    fmt: str = _format_option("table"),
    batch_size: int = BatchOpt,
    classes: Path | None = typer.Option(
        None,
        "--classes",
        help="Score these class names instead (one per line or JSON list; class-agnostic methods).",
    ),
    pretrained: str | None = AdapterWeightsOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    cache_dir: str | None = CacheDirOpt,
) -> None:
    """Label images with an adapter. Unreadable images are reported on stderr and skipped.

    Examples:

        adaclip predict pets.adaclip photo.jpg ./more_photos "shots/*.png"

        find /data -name '*.jpg' | adaclip predict pets.adaclip - --format jsonl > labels.jsonl
    """
    from .api import load
    from .data import iter_input_paths, read_name_list

    _check_format(fmt)
    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    check_count(batch_size, "--batch-size")
    class_names = read_name_list(classes) if classes else None  # a bad class list fails before loading
    adapter = load(adapter_path, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir)
    counts = {"ok": 0, "skipped": 0}
    predictions = adapter.iter_predict(iter_input_paths(inputs), top_k=top_k, batch_size=batch_size)
    with adapter.classes(class_names):
        write_records(
            prediction_records(predictions, fmt, counts),
            fmt,
            prediction_columns(fmt, top_k),
            title=f"{adapter.method} predictions",
        )
    log.info(
        f"predicted {counts['ok']} images" + (f", skipped {counts['skipped']} unreadable" if counts["skipped"] else "")
    )
    if counts["ok"] == 0:
        raise UsageError("no readable images among the inputs")


def prediction_columns(fmt: str, top_k: int, *, true_label: bool = False) -> list[str]:
    """Columns of prediction records (predict, tta): tables put the runners-up in one column."""
    columns = ["path", "label", "score"]
    if fmt == "table":  # narrow enough for a terminal
        columns += ["runners-up"] if top_k > 1 else []
    else:
        columns += [c for i in range(2, top_k + 1) for c in (f"label_{i}", f"score_{i}")]
    return columns + (["true_label"] if true_label else [])


def prediction_records(predictions, fmt: str, counts: dict[str, int]):
    """Prediction objects -> records for `write_records`; unreadable images are warned about and counted."""
    for prediction in predictions:
        if prediction.error:
            counts["skipped"] += 1
            if counts["skipped"] <= MAX_SKIP_WARNINGS:
                log.warning(f"skipped unreadable image {printable(prediction.path)}: {prediction.error}")
            elif counts["skipped"] == MAX_SKIP_WARNINGS + 1:
                log.warning("more unreadable images: only their count is reported from here on")
            continue
        counts["ok"] += 1
        if fmt in ("json", "jsonl"):
            yield prediction.to_dict()
        else:
            flat = {"path": prediction.path, "label": prediction.label, "score": prediction.score}
            for rank, (label, score) in enumerate(prediction.top_k[1:], start=2):
                flat[f"label_{rank}"], flat[f"score_{rank}"] = label, score
            flat["runners-up"] = ", ".join(f"{label} {score:.3f}" for label, score in prediction.top_k[1:])
            flat["true_label"] = prediction.true_label
            yield flat


# ------------------------------------------------------------------------------------------ eval


@command("eval")
def evaluate(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file."),
    data: Path = typer.Argument(..., help="Labelled folder (uses test/ or val/ when the folder has splits)."),
    classes: Path | None = typer.Option(None, "--classes", help="Class display names for the folder's classes."),
    fmt: str = _format_option("table", ("table", "json", "csv")),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON report to FILE."),
    predictions_file: Path | None = typer.Option(
        None, "--predictions", help="Write one JSON line per image (path, true label, top-k) to FILE.jsonl."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite --output / --predictions files."),
    batch_size: int = BatchOpt,
    workers: int | None = typer.Option(None, "--workers", help="Image decoding processes."),
    pretrained: str | None = AdapterWeightsOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    cache_dir: str | None = CacheDirOpt,
) -> None:
    """acc1, acc5, mean per-class recall and macro-F1 (CLIP_benchmark's key names in JSON), per-class
    scores and the confusion matrix on a labelled folder.

    Examples:

        adaclip eval pets.adaclip ./pets --format json -o pets-eval.json

        adaclip eval pets.adaclip ./pets --format csv --predictions per-image.jsonl
    """
    from .adapter_file import read_adapter_header
    from .api import load
    from .data import prepare_eval_data

    _check_format(fmt, ("table", "json", "csv"))
    from .files import check_output_path

    for path, option in ((output, "--output"), (predictions_file, "--predictions")):
        if path is not None:
            check_output_path(path, force=force, inputs=[adapter_path, data], option=option)
    read_adapter_header(adapter_path)  # a missing or broken adapter, and bad data, fail before the backbone is built
    check_count(batch_size, "--batch-size")
    check_count(workers, "--workers", minimum=0, optional=True)
    folder = prepare_eval_data(data, classes)
    adapter = load(adapter_path, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir)
    started = time.perf_counter()
    report = adapter.evaluate(folder, batch_size=batch_size, workers=workers, keep_predictions=bool(predictions_file))
    seconds = time.perf_counter() - started
    document = {"adapter": str(adapter_path), "method": adapter.method, "data": str(data), **report.to_dict()}
    document["seconds"] = round(seconds, 2)
    if output is not None:
        with open(output, "w", encoding="utf-8") as handle:
            write_json(document, handle)
    if predictions_file is not None:
        with open(predictions_file, "w", encoding="utf-8") as handle:
            write_records(report.predictions or [], "jsonl", [], out=handle)
    if fmt == "json":
        write_json(document)
        return
    if fmt == "csv":
        row = {
            "adapter": str(adapter_path),
            "method": adapter.method,
            "data": str(data),
            **report.metrics,
            "images": report.n_images,
            "skipped": report.skipped_images,
        }
        write_records([row], "csv", list(row))
        return
    from rich.table import Table

    console = stdout_console()
    console.print(
        key_value_table(
            [
                ("method", adapter.method),
                ("images", report.n_images),
                ("accuracy (acc1)", report.accuracy),
                ("top-5 accuracy (acc5)", report.top5_accuracy),
                ("mean per-class recall", report.mean_per_class_recall),
                ("macro F1", report.macro_f1),
                ("skipped", report.skipped_images),
            ],
            title="adaclip eval",
        )
    )
    table = Table(title="per class")
    for column in ("class", "support", "accuracy", "precision", "F1"):
        table.add_column(column)
    for score in report.per_class:
        table.add_row(
            score.name,
            str(score.support),
            *("-" if v is None else f"{v:.3f}" for v in (score.accuracy, score.precision, score.f1)),
        )
    console.print(table)
    names = [s.name for s in report.per_class]
    if len(names) <= 20:
        confusion = Table(title="confusion (rows: true, columns: predicted)")
        confusion.add_column("")
        for i in range(len(names)):
            confusion.add_column(str(i))
        for i, row in enumerate(report.confusion):
            confusion.add_row(f"{i} {names[i]}", *map(str, row))
        console.print(confusion)


# ------------------------------------------------------------------------------------------ tta


@command()
def tta(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file (zeroshot, rada, ...)."),
    folder: Path = typer.Argument(..., metavar="FOLDER", help="Folder of unlabeled images (searched recursively)."),
    mode: str = typer.Option(
        "episodic",
        "--mode",
        help="episodic: adapt per image, then reset (TPT); online: adapt on the stream; tda: training-free caches.",
    ),
    steps: int = typer.Option(1, "--steps", help="Optimiser steps per image (episodic) or per batch (online)."),
    views: int = typer.Option(64, "--views", help="Episodic: views per image, the original included."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 5e-3 episodic, 1e-3 online)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Online: images per adaptation step."),
    seed: int = typer.Option(0, "--seed", help="Fixes the views and a fresh mask's initialisation."),
    labels: bool = typer.Option(
        False, "--labels", help="Score predictions against class sub-folder names (never used to adapt)."
    ),
    labels_csv: Path | None = typer.Option(
        None, "--labels-csv", help="Score predictions against a CSV of file,label (paths relative to FOLDER)."
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="Other setting key=value, e.g. --set diversity_weight=2 --set mask.softmax=row."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the adapted adapter to this file."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file if it exists."),
    top_k: int = typer.Option(5, "--top-k", "-k", help="How many labels to report per image."),
    fmt: str = _format_option("table"),
    pretrained: str | None = AdapterWeightsOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    cache_dir: str | None = CacheDirOpt,
) -> None:
    """Label-free test-time adaptation of RAda's mask on a folder; prints predictions like `predict`.

    Adapters without a mask (zeroshot, full-ft) start from a fresh mask at identity. Speed (images/s)
    and, with --labels or --labels-csv, accuracy before and after adaptation go to stderr.

    Examples:

        adaclip tta pets.adaclip ./new_photos --format jsonl > labels.jsonl

        adaclip tta zs.adaclip ./shifted --mode online --labels-csv shifted_labels.csv -o shifted.adaclip
    """
    from .api import load
    from .labels import resolve_labels
    from .tta import TestTimeAdaptation, list_tta_images, make_tta_settings, output_method

    _check_format(fmt)
    if top_k < 1:
        raise UsageError("--top-k must be at least 1")
    if labels and labels_csv:
        raise UsageError("give --labels or --labels-csv, not both")
    with _claimed_output(output, force=force, inputs=[folder, adapter_path]):
        tta_settings = make_tta_settings(
            **parse_settings(settings), mode=mode, steps=steps, views=views, lr=lr, batch_size=batch_size, seed=seed
        )
        images = list_tta_images(folder)  # bad input fails before the backbone is built
        adapter = load(adapter_path, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir)
        if output is not None:
            if tta_settings.mode == "tda":
                raise UsageError("--mode tda keeps no adapter state to write", fix="drop -o")
            output_method(adapter.model)  # refuse before adapting, not after
        truth = resolve_labels(
            adapter.class_names, adapter.metadata.class_folders, folder, images, "folders" if labels else labels_csv
        )
        run = TestTimeAdaptation(adapter.model, tta_settings, source=adapter_path.name)
        counts = {"ok": 0, "skipped": 0}
        write_records(
            prediction_records(run.run(images, truth, top_k=top_k), fmt, counts),
            fmt,
            prediction_columns(fmt, top_k, true_label=truth is not None),
            title=f"tta ({tta_settings.mode}) predictions",
        )
        log.info(run.summary_line())
        if counts["ok"] == 0:
            raise UsageError("no readable images in the folder", path=folder)
        if output is not None:
            path = adapter.adapted(run.adapted_model(), run.record()).save(output, force=force)
            log.info(f"wrote {path}")


# ------------------------------------------------------------------------------------------ compare


def _check_report_target(report: Path | None, force: bool, inputs: list[Path], option: str, png: bool) -> None:
    """Before any training: the report (and with --png its PNG files) can be written, nothing the user
    has is overwritten without --force, and matplotlib is installed."""
    from .files import check_output_path

    if report is None:
        return
    from .report import PNG_SECTIONS, png_path, require_matplotlib

    require_matplotlib()
    check_output_path(report, force=force, inputs=inputs, what="report file", option=option)
    for key in PNG_SECTIONS if png else ():
        check_output_path(png_path(report, key), force=force, inputs=inputs, what="plot file", option=option)


def _method_settings(items: list[str]) -> dict[str, Any]:
    settings = parse_settings(items)
    for key, value in settings.items():
        if not isinstance(value, dict):
            raise UsageError(f"--set {key}=...: name the method first", fix="e.g. --set rada.train.epochs=5")
    return settings


@command()
def compare(
    data: Path = typer.Argument(
        ..., help="Image folder: root/<class>/<image>, or root/{train,val,test}/<class>/<image>."
    ),
    methods: str | None = typer.Option(
        None,
        "--methods",
        "-m",
        help="Comma-separated methods (default: every one but those that fine-tune the whole backbone).",
    ),
    seeds: str = typer.Option("1,2,3", "--seeds", help="Seeds, e.g. --seeds 1 2 3 (every method gets the same)."),
    shots: int | None = typer.Option(
        None, "--shots", help="K training images per class, drawn as `fit --shots K --seed s` draws them."
    ),
    base_to_new: bool = typer.Option(
        False, "--base-to-new", help="Train on the first half of the classes; also score the other half (new)."
    ),
    backbone: str | None = BackboneOpt,
    pretrained: str | None = PretrainedOpt,
    classes: Path | None = ClassNamesOpt,
    templates: str = TemplatesOpt,
    settings: list[str] = typer.Option(
        [], "--set", help="Setting of one method, METHOD.key=value (repeatable), e.g. --set rada.train.epochs=5."
    ),
    out_dir: Path | None = typer.Option(
        None, "--out-dir", help="Keep every adapter, the results and best.adaclip in this folder."
    ),
    resume: bool = typer.Option(False, "--resume", help="With --out-dir: skip finished runs, continue the rest."),
    force: bool = typer.Option(False, "--force", help="Start --out-dir over; overwrite --report."),
    report: Path | None = typer.Option(None, "--report", help="Also write an HTML report (needs adaclip[report])."),
    png: bool = typer.Option(False, "--png", help="With --report: each plot as a PNG beside it."),
    fmt: str = _format_option("table", ("table", "json", "csv")),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    workers: int | None = typer.Option(None, "--workers", help="Image decoding processes."),
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass when encoding."),
    cache_dir: str | None = CacheDirOpt,
) -> None:
    """Which method is best on your images: fit each method with each seed under one protocol, score
    them on test/ (or a held-out split no method sees), and print a leaderboard.

    Validation comes from the training images only; the recommended method is the one with the best
    validation accuracy, never chosen on the test images. A failing method gets a failed row.

    Examples:

        adaclip compare ./pets --methods zeroshot,linear-probe,adaring --seeds 1 2 --report pets.html

        adaclip compare ./pets --shots 16 --out-dir runs/ --resume --format json
    """
    from .comparison import COLUMNS
    from .comparison import compare as run_compare

    _check_format(fmt, ("table", "json", "csv"))
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    try:
        seed_list = [int(s) for s in seeds.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--seeds expects integers, got {seeds!r}", fix="e.g. --seeds 1 2 3") from None
    if resume and out_dir is None:
        raise UsageError("--resume needs --out-dir (where the finished runs are kept)")
    if png and report is None:
        raise UsageError("--png needs --report")
    _check_report_target(report, force, [data], "--report", png)

    def announce(result, number: int, total: int) -> None:
        if result.status == "ok":
            log.info(
                f"[{number}/{total}] {result.method} seed {result.seed}: accuracy {result.accuracy:.3f}, "
                f"validation {'-' if result.val_accuracy is None else f'{result.val_accuracy:.3f}'} "
                f"({result.fit_seconds:.1f} s)"
            )
        else:
            log.warning(f"[{number}/{total}] {result.method} seed {result.seed} failed: {result.error}")

    board = run_compare(
        data,
        method_list,
        seeds=seed_list,
        shots=shots,
        **_backbone_choice(backbone, pretrained),
        classes=classes,
        templates=templates,
        base_to_new=base_to_new,
        out_dir=out_dir,
        resume=resume,
        force=force,
        config=_method_settings(settings),
        device=device,
        precision=precision,
        workers=workers,
        batch_size=batch_size,
        cache_dir=cache_dir,
        on_run=announce,
    )
    if report is not None:
        from .report import evaluation_of_best_run, write_report

        written = write_report(
            report, evaluation=evaluation_of_best_run(board), board=board, title="adaclip compare", png=png
        )
        log.info(f"report: {written.html}" + "".join(f", {p}" for p in written.pngs))
    if board.best_adapter:
        log.info(f"best adapter: {board.best_adapter}")
    if fmt == "json":
        write_json(board.to_dict(runs=True))
        return
    if fmt == "csv":
        write_records(board.records(), "csv", COLUMNS)
        log.info(f"recommended: {board.recommended or 'none'} ({board.reason})")
        return
    write_records(_leaderboard_rows(board), "table", _leaderboard_columns(board), title="adaclip compare", compact=True)
    console = stdout_console()
    for row in board.rows:
        if row.failed:
            console.print(
                f"failed: {row.method} ({row.failed} of {row.runs + row.failed} runs): {row.error}", markup=False
            )
    console.print(f"recommended: {board.recommended or 'none'} ({board.reason})", markup=False)


def _leaderboard_columns(board) -> list[str]:
    new = ["new acc"] if any(r.new_accuracy is not None for r in board.rows) else []
    return ["method", "accuracy", "F1", *new, "val acc", "params", "fit s", "img/s", "file", "runs"]


def _leaderboard_rows(board):
    """The leaderboard as people read it (the meaning of each column: README, compare)."""

    def with_std(mean, std):
        if mean is None:
            return None
        return f"{mean:.3f}" + (f"±{std:.3f}" if std is not None else "")

    def size(n):
        return None if n is None else (f"{n / 1024:.1f}K" if n < 1024**2 else f"{n / 1024**2:.1f}M")

    for row in board.rows:
        yield {
            "method": row.method + (" *" if row.method == board.recommended else ""),
            "accuracy": with_std(row.accuracy, row.accuracy_std),
            "F1": None if row.macro_f1 is None else f"{row.macro_f1:.3f}",
            "new acc": with_std(row.new_accuracy, row.new_accuracy_std),
            "val acc": None if row.val_accuracy is None else f"{row.val_accuracy:.3f}",
            "params": None if row.trainable_params is None else f"{row.trainable_params:,}",
            "fit s": None if row.fit_seconds is None else f"{row.fit_seconds:.1f}",
            "img/s": None if row.predict_images_per_second is None else f"{row.predict_images_per_second:.0f}",
            "file": size(row.adapter_bytes),
            "runs": f"{row.runs}/{row.runs + row.failed}",
        }


# ------------------------------------------------------------------------------------------ report


@command("report")
def report_command(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file."),
    data: Path | None = typer.Argument(
        None, metavar="[DATA]", help="Labelled folder to score on (its test/ split when it has splits)."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="HTML file to write (default: <adapter>.report.html)."
    ),
    png: bool = typer.Option(False, "--png", help="Also write each plot as a PNG beside the HTML."),
    classes: Path | None = typer.Option(None, "--classes", help="Class display names for the folder's classes."),
    force: bool = typer.Option(False, "--force", help="Overwrite the report file if it exists."),
    fmt: str = _format_option("table", ("table", "json")),
    batch_size: int = BatchOpt,
    workers: int | None = typer.Option(None, "--workers", help="Image decoding processes."),
    pretrained: str | None = AdapterWeightsOpt,
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    cache_dir: str | None = CacheDirOpt,
) -> None:
    """One self-contained HTML report of an adapter (no network; images inline): confusion matrix,
    per-class accuracy, training and validation curves, and the most confident mistakes.

    Example:

        adaclip report pets.adaclip ./pets -o pets.html --png
    """
    from .adapter_file import read_adapter_header
    from .api import load
    from .data import prepare_eval_data
    from .report import adapter_only, evaluate_for_report, write_report

    _check_format(fmt, ("table", "json"))
    output = output or adapter_path.with_name(adapter_path.stem + ".report.html")
    _check_report_target(output, force, [adapter_path] + ([data] if data else []), "-o", png)
    read_adapter_header(adapter_path)  # a broken adapter or bad data fails before the backbone is built
    if data is not None:
        prepare_eval_data(data, classes)
    adapter = load(adapter_path, pretrained=pretrained, device=device, precision=precision, cache_dir=cache_dir)
    evaluation = (
        evaluate_for_report(adapter, data, classes_file=classes, batch_size=batch_size, workers=workers)
        if data is not None
        else adapter_only(adapter)
    )
    written = write_report(output, evaluation=evaluation, title=f"adaclip report: {adapter_path.name}", png=png)
    summary = {"report": str(written.html), "png": [str(p) for p in written.pngs]}
    if data is not None:
        summary["accuracy"] = evaluation.accuracy
        summary["images"] = evaluation.n_images
    if fmt == "json":
        write_json(summary)
    else:
        stdout_console().print(key_value_table(summary.items(), title="adaclip report"))


# ------------------------------------------------------------------------------------------ info


@command(heavy=lambda options: options.get("adapter_path") is None)  # `info FILE` needs no torch
def info(
    adapter_path: Path | None = typer.Argument(None, metavar="[ADAPTER]", help="An .adaclip file to describe."),
    method: str | None = typer.Option(
        None,
        "--method",
        "-m",
        help="Without ADAPTER: describe this method on a backbone.",
        autocompletion=complete_method,
    ),
    backbone: str | None = BackboneOpt,
    pretrained: str = typer.Option(
        "none", "--pretrained", "-p", help="Without ADAPTER: weights (parameter counts need none)."
    ),
    num_classes: int = typer.Option(10, "--num-classes", help="Without ADAPTER: classes for class-dependent heads."),
    settings: list[str] = typer.Option([], "--set", help="Without ADAPTER: method setting key=value."),
    fmt: str = _format_option("table", ("table", "json")),
    device: str = typer.Option("cpu", "--device", help="Device for building the method (cpu is enough)."),
) -> None:
    """Describe an adapter file, or a method's trainable parameters on a backbone.

    Examples:

        adaclip info pets.adaclip

        adaclip info --method adaring --backbone ViT-B-16 --pretrained none --format json
    """
    _check_format(fmt, ("table", "json"))
    if adapter_path is not None:
        from .adapter_file import read_adapter_header

        document = read_adapter_header(adapter_path).model_dump(mode="json")
        document["file_bytes"] = adapter_path.stat().st_size
    elif method is not None:
        document = _describe_method(
            method, backbone or "ViT-B-16", pretrained, num_classes, parse_settings(settings), device
        )
    else:
        raise UsageError("give an adapter file, or --method NAME to describe a method", fix="adaclip info --help")
    if fmt == "json":
        write_json(document)
    else:
        stdout_console().print(key_value_table(flatten(document), title="adaclip info"))


def _describe_method(method: str, backbone_name: str, pretrained: str, num_classes: int, settings, device) -> dict:
    from .backbone import create_backbone
    from .methods import make_method_config
    from .model import AdaptedCLIP

    config = make_method_config(method, settings)
    backbone = create_backbone(backbone_name, pretrained, device=device)
    model = AdaptedCLIP(backbone, config, [f"class {i}" for i in range(num_classes)], ["a photo of a {}."])
    breakdown = model.parameter_breakdown()
    return {
        "method": method,
        "summary": type(config).summary,
        "backbone": backbone.identity.describe(),
        "trainable_params": sum(breakdown.values()),
        "parameter_breakdown": breakdown,
        "class_agnostic": type(config).class_agnostic,
        "config": config.model_dump(mode="json"),
    }


@command()
def export(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file."),
    output: Path = typer.Option(
        ..., "--output", "-o", help="File to write (a folder for --format peft; ONNX also writes OUTPUT.json)."
    ),
    target: str = typer.Option(
        "adaclip",
        "--format",
        "-f",
        help="adaclip (with --merged), open_clip (state dict), peft (LoRA folder) or onnx (image classifier).",
        autocompletion=lambda incomplete: _complete_from(list(EXPORT_FORMATS), incomplete),
    ),
    merged: bool = typer.Option(
        False, "--merged", help="--format adaclip: store per-layer matrices (AdaRing): predict skips reconstruction."
    ),
    pretrained: str | None = AdapterWeightsOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
    summary_fmt: str = typer.Option(
        "table",
        "--summary",
        help="How the summary is printed on stdout: table or json.",
        autocompletion=lambda incomplete: _complete_from(["table", "json"], incomplete),
    ),
) -> None:
    """Write an adapter in another form: merged, or for open_clip, Hugging Face PEFT or ONNX Runtime.

    --format open_clip folds LoRA / full fine-tuning into the weights; load the file with
    open_clip.create_model_and_transforms(NAME, pretrained=FILE). --format peft writes LoRA as a PEFT
    adapter folder. --format onnx bakes the image tower, the method and its classes into one graph
    (pixels -> logits). With --merged, AdaRing's tensor rings are expanded into the per-layer matrices
    they encode, so loading and predicting pay no reconstruction cost.

    Examples:

        adaclip export pets.adaclip --merged -o pets.merged.adaclip

        adaclip export pets-lora.adaclip --format open_clip -o pets.safetensors

        adaclip export pets.adaclip --format onnx -o pets.onnx
    """
    from .api import load

    if target not in EXPORT_FORMATS:
        raise UsageError(f"unknown --format {target!r}", fix=f"use one of: {', '.join(EXPORT_FORMATS)}")
    _check_format(summary_fmt, ("table", "json"))
    if target == "adaclip" and not merged:
        raise UsageError("nothing to do", fix="pass --merged, or --format open_clip, peft or onnx")
    if merged and target != "adaclip":
        raise UsageError("--merged applies to --format adaclip only")
    # PEFT writes a folder of its own layout; every other target is one file, checked and locked here.
    claimed = _claimed_output(None if target == "peft" else output, force=force, inputs=[adapter_path])
    with claimed:
        adapter = load(adapter_path, pretrained=pretrained, device="cpu", precision="fp32")
        if target == "adaclip":
            path = adapter.merged().save(output, force=force)
            summary = {"format": "adaclip", "output": str(path), "merged": True, "output_bytes": path.stat().st_size}
        else:
            from . import interop

            writer = {"open_clip": interop.export_open_clip, "peft": interop.export_peft, "onnx": interop.export_onnx}
            summary = writer[target](adapter, output, force=force)
    summary = {"input": str(adapter_path), "input_bytes": adapter_path.stat().st_size, **summary}
    if summary_fmt == "json":
        write_json(summary)
    else:
        stdout_console().print(key_value_table(summary.items(), title="adaclip export"))


@command()
def serve(
    adapters: list[str] = typer.Argument(
        ..., metavar="ADAPTER...", help="Adapter files to serve: PATH (named by its file name) or NAME=PATH."
    ),
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on. The default is this machine only; 0.0.0.0 is everyone."
    ),
    port: int = typer.Option(8000, "--port", help="TCP port (0: any free port, printed at start)."),
    token_file: Path | None = typer.Option(
        None, "--token-file", help="File whose first line is a bearer token every request must send (not /healthz)."
    ),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest request body in MiB (413 past it)."),
    max_images: int = typer.Option(32, "--max-images", help="Images in one request (413 past it)."),
    max_pixels: int = typer.Option(25_000_000, "--max-pixels", help="Largest image, width x height (413 past it)."),
    max_classes: int = typer.Option(256, "--max-classes", help="Class names one request may ask to score."),
    max_batch: int = typer.Option(32, "--max-batch", help="Images encoded in one forward pass."),
    batch_wait_ms: float = typer.Option(
        5.0, "--batch-wait-ms", help="How long a request waits for others to batch with."
    ),
    queue_size: int = typer.Option(128, "--queue-size", help="Images admitted at once; past it, 503 + Retry-After."),
    request_timeout: float = typer.Option(30.0, "--request-timeout", help="Seconds a request may wait (503 past it)."),
    max_connections: int = typer.Option(512, "--max-connections", help="Open connections before uvicorn answers 503."),
    pretrained: Path | None = typer.Option(
        None,
        "--pretrained",
        "-p",
        help="Local checkpoint for adapters trained on one, if not where they were trained (sha256-checked).",
    ),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    cache_dir: str | None = CacheDirOpt,
) -> None:
    """Serve adapters over HTTP: POST /v1/classify, GET /v1/adapters, /healthz, /readyz, /metrics.

    Adapters on the same backbone share one copy of it; `adapter=all` answers every frozen-tower adapter
    (zeroshot, linear-probe, tip-adapter, coop, rada) from one image encoding. Adapter files are read at
    start and again on SIGHUP (`kill -HUP PID`), never from a request. Needs `pip install 'adaclip\\[serve]'`.

    Examples:

        adaclip serve pets.adaclip birds=./models/birds.adaclip --port 8000

        curl -F image=@cat.jpg 'http://127.0.0.1:8000/v1/classify?adapter=pets&top_k=3'
    """
    plan = _serve_plan(**locals())  # only the parameters so far
    from .serve import run_server

    run_server(
        plan.specs,
        plan.settings,
        host=host,
        port=port,
        token=plan.token,
        max_connections=max_connections,
        log_level="warning" if log.level == 0 else "info",
        **plan.load_options,
    )


class _ServePlan:
    """What `adaclip serve`'s options amount to, checked: shared by the command and the ASGI factory."""

    def __init__(self, specs, settings, token, load_options, given):
        self.specs, self.settings, self.token = specs, settings, token
        self.load_options: dict[str, Any] = load_options
        self.given: set[str] = given  # the options given on the command line (not defaults)


def _serve_plan(*, given: set[str] | None = None, **options: Any) -> _ServePlan:
    """Check every option and name every adapter file before anything heavy is loaded."""
    try:
        from .serve import make_settings, parse_adapter_specs
        from .serve.security import is_loopback, read_token_file
    except ImportError as exc:
        raise UsageError(
            f"adaclip serve needs the serve extra ({exc.name} is missing)", fix="pip install 'adaclip[serve]'"
        ) from None

    o = options
    settings = make_settings(
        max_upload_mb=o["max_upload_mb"],
        max_images=o["max_images"],
        max_pixels=o["max_pixels"],
        max_classes=o["max_classes"],
        max_batch=o["max_batch"],
        batch_wait_ms=o["batch_wait_ms"],
        queue_size=o["queue_size"],
        request_timeout_s=o["request_timeout"],
    )
    if not 0 <= o["port"] <= 65535:
        raise UsageError(f"--port must be 0 to 65535, got {o['port']}")
    if o["max_connections"] < 1:
        raise UsageError("--max-connections must be at least 1")
    token = read_token_file(o["token_file"]) if o["token_file"] is not None else None
    pretrained = o["pretrained"]
    if pretrained is not None and not pretrained.is_file():
        raise UsageError("checkpoint file not found", path=pretrained, fix="give the checkpoint file (--pretrained)")
    specs = parse_adapter_specs(o["adapters"])  # names and files are checked before anything heavy
    if not is_loopback(o["host"]) and token is None:
        log.warning(f"listening on {o['host']} without --token-file: anyone who can reach this port can use the API")
    load_options = {
        "pretrained": str(pretrained) if pretrained is not None else None,
        "device": o["device"],
        "precision": o["precision"],
        "cache_dir": o["cache_dir"],
    }
    return _ServePlan(specs, settings, token, load_options, given or set())


def serve_plan(args: list[str]) -> _ServePlan:
    """`adaclip serve ARGS...` parsed and checked as the command does, without serving (for
    adaclip.serve.asgi); `--host` and the like are parsed and checked but are the caller's to use."""
    from typer.main import get_command

    use_cli_names()  # messages name --options, as the command's do
    command = get_command(app).commands["serve"]  # type: ignore[attr-defined]
    try:
        context = command.make_context("adaclip serve", list(args))
    except typer.Exit:
        raise UsageError("asked for help: give adapter files and options") from None
    except typer.TyperException as exc:  # typer's own click: a bad or unknown option, a missing argument
        raise UsageError(exc.format_message()) from None  # type: ignore[attr-defined]
    given = {
        f"--{name.replace('_', '-')}" for name in context.params if context.get_parameter_source(name).name != "DEFAULT"
    }
    return _serve_plan(given=given, **context.params)


@command(heavy=False)
def methods(fmt: str = _format_option("table", ("table", "json"))) -> None:
    """List the available methods."""
    from .method_catalog import builtin_methods

    _check_format(fmt, ("table", "json"))
    records = [{"method": m.name, "class_agnostic": m.class_agnostic, "summary": m.summary} for m in builtin_methods()]
    write_records(records, fmt if fmt == "json" else "table", ["method", "class_agnostic", "summary"], title="methods")


@command(heavy=False)
def version() -> None:
    """Print the adaclip version."""
    typer.echo(__version__)


# ------------------------------------------------------------------------------------------ entry


def _hoist_global_flags(argv: list[str]) -> list[str]:
    """Accept --debug/--quiet/--verbose anywhere (before `--`) by moving them before the command."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in _GLOBAL_FLAGS]
    rest = [a for a in argv[:end] if a not in _GLOBAL_FLAGS]
    return flags + rest + argv[end:]


def _join_seed_values(argv: list[str]) -> list[str]:
    """`--seeds 1 2 3` (as the research scripts take it) -> `--seeds 1,2,3` (one option value)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--seeds":
            values = []
            while i + 1 < len(argv) and argv[i + 1].lstrip("-").replace(",", "").isdigit():
                values.append(argv[i + 1])
                i += 1
            if values:
                out.append(",".join(values))
        elif argv[i] == "--":
            out.extend(argv[i + 1 :])
            break
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    from ._interrupt import exit_130_until_started, forget_caught_interrupt

    exit_130_until_started()  # until a command's body starts (see `command`)
    argv = _join_seed_values(_hoist_global_flags(list(sys.argv[1:] if argv is None else argv)))
    try:
        app(args=argv, prog_name="adaclip")
    except KeyboardInterrupt:  # outside a command's own handling (writing its output): still one line
        log.error("interrupted")
        sys.exit(130)
    except BrokenPipeError:
        _silence_stdout()
        sys.exit(0)
    finally:
        forget_caught_interrupt()  # every way out is an exit code, never CPython's death by SIGINT


def _silence_stdout() -> None:
    """After the reader of stdout went away: further writes go to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (a test runner's buffer)
        pass
