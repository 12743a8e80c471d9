"""The scoring commands: `eval` (metrics on a labelled folder) and `report` (the same as one HTML page
with plots)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from ..checks import check_count
from .base import command, only_rank_zero_writes
from .options import (
    EVAL_FORMATS,
    GROUP,
    SUMMARY_FORMATS,
    BatchOpt,
    DataOptions,
    EvalClassesOpt,
    FeatureCacheOptions,
    LoadOptions,
    WorkersOpt,
    check_format,
    format_option,
)


@command("eval")
def evaluate(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file."),
    data: Path = typer.Argument(
        ..., help="Labelled folder, manifest or shards (uses the test split, else val, when DATA has splits)."
    ),
    classes: Path | None = EvalClassesOpt,
    fmt: str = format_option("table", EVAL_FORMATS),
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON report to FILE."),
    predictions_file: Path | None = typer.Option(
        None, "--predictions", help="Write one JSON line per image (path, true label, top-k) to FILE.jsonl."
    ),
    force: bool = typer.Option(False, "--force", help="Overwrite --output / --predictions files."),
    batch_size: int = BatchOpt,
    workers: int | None = WorkersOpt,
    reading: DataOptions = GROUP,
    loading: LoadOptions = GROUP,
    features: FeatureCacheOptions = GROUP,
) -> None:
    """acc1, acc5, mean per-class recall and macro-F1 (CLIP_benchmark's key names in JSON), per-class
    scores and the confusion matrix on a labelled folder.

    Examples:

        adaclip eval pets.adaclip ./pets --format json -o pets-eval.json

        adaclip eval pets.adaclip ./pets --format csv --predictions per-image.jsonl
    """
    from ..adapter_file import read_adapter_header
    from ..api import load
    from ..data import prepare_eval_data
    from ..files import check_output_path
    from ..views import eval_document, write_eval, write_eval_files

    check_format(fmt, EVAL_FORMATS)
    for path, option in ((output, "--output"), (predictions_file, "--predictions")):
        if path is not None:
            check_output_path(path, force=force, inputs=[adapter_path, data], option=option)
    read_adapter_header(adapter_path)  # a missing or broken adapter, and bad data, fail before the backbone is built
    check_count(batch_size, "--batch-size")
    check_count(workers, "--workers", minimum=0, optional=True)
    folder = prepare_eval_data(reading.source(data), classes)
    main_rank = only_rank_zero_writes()
    adapter = load(adapter_path, **loading.as_kwargs())
    started = time.perf_counter()
    with features.using():
        report = adapter.evaluate(
            folder, batch_size=batch_size, workers=workers, keep_predictions=bool(predictions_file)
        )
    document = eval_document(adapter_path, adapter.method, data, report, time.perf_counter() - started)
    if not main_rank:
        return  # under torchrun every rank holds the report; rank 0 writes it
    write_eval_files(document, report, output, predictions_file)
    write_eval(document, report, fmt)


@command("report")
def report_command(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file."),
    data: Path | None = typer.Argument(
        None, metavar="[DATA]", help="Labelled folder, manifest or shards to score on (its test split, if any)."
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="HTML file to write (default: \\<adapter>.report.html)."
    ),
    png: bool = typer.Option(False, "--png", help="Also write each plot as a PNG beside the HTML."),
    classes: Path | None = EvalClassesOpt,
    force: bool = typer.Option(False, "--force", help="Overwrite the report file if it exists."),
    fmt: str = format_option("table", SUMMARY_FORMATS),
    batch_size: int = BatchOpt,
    workers: int | None = WorkersOpt,
    reading: DataOptions = GROUP,
    loading: LoadOptions = GROUP,
) -> None:
    """One self-contained HTML report of an adapter (no network; images inline): confusion matrix,
    per-class accuracy, training and validation curves, and the most confident mistakes.

    Example:

        adaclip report pets.adaclip ./pets -o pets.html --png
    """
    from ..adapter_file import read_adapter_header
    from ..api import load
    from ..data import prepare_eval_data
    from ..report import adapter_only, check_report_paths, evaluate_for_report, write_report
    from ..views import write_summary

    check_format(fmt, SUMMARY_FORMATS)
    output = output or adapter_path.with_name(adapter_path.stem + ".report.html")
    check_report_paths(output, force, [adapter_path] + ([data] if data else []), "-o", png)
    read_adapter_header(adapter_path)  # a broken adapter or bad data fails before the backbone is built
    source = reading.source(data) if data is not None else None
    if source is not None:
        prepare_eval_data(source, classes)
    adapter = load(adapter_path, **loading.as_kwargs())
    evaluation = (
        evaluate_for_report(adapter, source, classes_file=classes, batch_size=batch_size, workers=workers)
        if data is not None
        else adapter_only(adapter)
    )
    written = write_report(output, evaluation=evaluation, title=f"adaclip report: {adapter_path.name}", png=png)
    summary = {"report": str(written.html), "png": [str(p) for p in written.pngs]}
    if data is not None:
        summary["accuracy"] = evaluation.accuracy
        summary["images"] = evaluation.n_images
    write_summary(summary, fmt, "adaclip report")
