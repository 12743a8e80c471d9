"""The labelling commands: `predict` (an adapter on images) and `tta` (adapt it, without labels, to a
folder while labelling it)."""

from __future__ import annotations

from pathlib import Path

import typer

from ..checks import check_count
from ..errors import UsageError
from ..ui import log
from .base import command, only_rank_zero_writes
from .options import (
    GROUP,
    BatchOpt,
    DataOptions,
    LoadOptions,
    TopKOpt,
    check_format,
    check_top_k,
    format_option,
    parse_settings,
)


@command()
def predict(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file."),
    inputs: list[str] = typer.Argument(
        ...,
        metavar="PATH...",
        help="Image files, folders, globs, manifests (.csv/.jsonl), WebDataset shards, or - to read paths from stdin.",
    ),
    top_k: int = TopKOpt,
    fmt: str = format_option("table"),
    batch_size: int = BatchOpt,
    classes: Path | None = typer.Option(
        None,
        "--classes",
        help="Score these class names instead (one per line or JSON list; class-agnostic methods).",
    ),
    reading: DataOptions = GROUP,
    loading: LoadOptions = GROUP,
) -> None:
    """Label images with an adapter. Unreadable images are reported on stderr and skipped.

    Examples:

        adaclip predict pets.adaclip photo.jpg ./more_photos "shots/*.png"

        find /data -name '*.jpg' | adaclip predict pets.adaclip - --format jsonl > labels.jsonl
    """
    from ..api import load
    from ..data import iter_input_paths, read_name_list
    from ..views import predicted_line, write_predictions

    check_format(fmt)
    check_top_k(top_k)
    check_count(batch_size, "--batch-size")
    class_names = read_name_list(classes) if classes else None  # a bad class list fails before loading
    only_rank_zero_writes()
    adapter = load(adapter_path, **loading.as_kwargs())
    paths = iter_input_paths(inputs, path_column=reading.path_column, allow_absolute=reading.allow_absolute)
    predictions = adapter.iter_predict(paths, top_k=top_k, batch_size=batch_size)
    with adapter.classes(class_names):
        counts = write_predictions(predictions, fmt, top_k, title=f"{adapter.method} predictions")
    log.info(predicted_line(counts))
    if counts["ok"] == 0:
        raise UsageError("no readable images among the inputs")


@command()
def tta(
    adapter_path: Path = typer.Argument(..., metavar="ADAPTER", help="An .adaclip file (zeroshot, rada, ...)."),
    folder: Path = typer.Argument(
        ..., metavar="FOLDER", help="Folder of unlabeled images (searched recursively), a manifest, or shards."
    ),
    mode: str = typer.Option(
        "episodic",
        "--mode",
        help="episodic: adapt per image, then reset (TPT); online: adapt on the stream; tda: training-free caches.",
    ),
    steps: int = typer.Option(1, "--steps", help="Optimiser steps per image (episodic) or per batch (online)."),
    views: int = typer.Option(64, "--views", help="Episodic: views per image, the original included."),
    lr: float | None = typer.Option(None, "--lr", help="AdamW learning rate (default 5e-4 episodic, 1e-3 online)."),
    batch_size: int = typer.Option(32, "--batch-size", help="Online: images per adaptation step."),
    seed: int = typer.Option(0, "--seed", help="Fixes the views and a fresh mask's initialisation."),
    labels: bool = typer.Option(
        False,
        "--labels",
        help="Score predictions against class sub-folder names, or DATA's own labels (never used to adapt).",
    ),
    labels_csv: Path | None = typer.Option(
        None, "--labels-csv", help="Score predictions against a CSV of file,label (paths relative to FOLDER)."
    ),
    settings: list[str] = typer.Option(
        [], "--set", help="Other setting key=value, e.g. --set diversity_weight=2 --set mask.softmax=row."
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write the adapted adapter to this file."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output file if it exists."),
    top_k: int = TopKOpt,
    fmt: str = format_option("table"),
    reading: DataOptions = GROUP,
    loading: LoadOptions = GROUP,
) -> None:
    """Label-free test-time adaptation of RAda's mask on a folder; prints predictions like `predict`.

    Adapters without a mask (zeroshot, full-ft) start from a fresh mask at identity. Speed (images/s)
    and, with --labels or --labels-csv, accuracy before and after adaptation go to stderr.

    Examples:

        adaclip tta pets.adaclip ./new_photos --format jsonl > labels.jsonl

        adaclip tta zs.adaclip ./shifted --mode online --labels-csv shifted_labels.csv -o shifted.adaclip
    """
    from ..api import load
    from ..files import checked_output
    from ..labels import resolve_labels
    from ..tta import TestTimeAdaptation, list_tta_images, make_tta_settings, output_method
    from ..views import write_predictions

    check_format(fmt)
    check_top_k(top_k)
    if labels and labels_csv:
        raise UsageError("give --labels or --labels-csv, not both")
    main_rank = only_rank_zero_writes()
    with checked_output(output, force=force, inputs=[folder, adapter_path], lock=main_rank):
        tta_settings = make_tta_settings(
            **parse_settings(settings), mode=mode, steps=steps, views=views, lr=lr, batch_size=batch_size, seed=seed
        )
        folder = reading.source(folder)
        images = list_tta_images(folder)  # bad input fails before the backbone is built
        adapter = load(adapter_path, **loading.as_kwargs())
        if output is not None:
            if tta_settings.mode == "tda":
                raise UsageError("--mode tda keeps no adapter state to write", fix="drop -o")
            output_method(adapter.model)  # refuse before adapting, not after
        truth = resolve_labels(
            adapter.class_names, adapter.metadata.class_folders, folder, images, "folders" if labels else labels_csv
        )
        run = TestTimeAdaptation(adapter.model, tta_settings, source=adapter_path.name)
        counts = write_predictions(
            run.run(images, truth, top_k=top_k),
            fmt,
            top_k,
            title=f"tta ({tta_settings.mode}) predictions",
            true_label=truth is not None,
        )
        log.info(run.summary_line())
        if counts["ok"] == 0:
            raise UsageError("no readable images in the folder", path=folder)
        if output is not None and main_rank:
            path = adapter.adapted(run.adapted_model(), run.record()).save(output, force=force)
            log.info(f"wrote {path}")
