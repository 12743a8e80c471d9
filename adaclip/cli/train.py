"""The training commands: `fit` (one method, one adapter file) and `compare` (methods x seeds, a
leaderboard)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from ..defaults import DEFAULT_METHOD
from ..errors import UsageError
from ..ui import log
from .base import command
from .options import (
    EVAL_FORMATS,
    GROUP,
    SUMMARY_FORMATS,
    BackboneOptions,
    CacheDirOpt,
    ClassNamesOpt,
    DataOptions,
    DeviceOpt,
    FeatureCacheOptions,
    ImageFolderArg,
    PrecisionOpt,
    TemplatesOpt,
    WorkersOpt,
    check_format,
    complete_from,
    complete_method,
    format_option,
    parse_settings,
    parse_val_split,
    read_config_file,
)


@command()
def fit(
    data: Path = ImageFolderArg,
    method: str = typer.Option(
        DEFAULT_METHOD, "--method", "-m", help="Method to train; see `adaclip methods`.", autocompletion=complete_method
    ),
    output: Path | None = typer.Option(
        None, "--output", "-o", help="Adapter file to write (default: \\<data name>.\\<method>.adaclip)."
    ),
    backbone: BackboneOptions = GROUP,
    reading: DataOptions = GROUP,
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
    features: FeatureCacheOptions = GROUP,
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
        autocompletion=lambda incomplete: complete_from(["tensorboard", "mlflow"], incomplete),
    ),
    tracker_dir: Path | None = typer.Option(
        None,
        "--tracker-dir",
        help="The tracker's local store (default ./runs for tensorboard; ./mlruns, holding mlflow.db, for mlflow).",
    ),
    fmt: str = format_option("table", SUMMARY_FORMATS),
) -> None:
    """Train an adapter on a labelled image folder and write it to one `.adaclip` file.

    Progress is checkpointed to OUTPUT.ckpt after every epoch; after Ctrl-C or a crash, the same
    command with --resume finishes with the adapter an uninterrupted run would have written. Under
    `torchrun --nproc-per-node N -m adaclip fit ...` the global batch is split across the processes.

    Examples:

        adaclip fit ./pets --method adaring --shots 16 -o pets.adaclip

        adaclip fit ./pets --method rada --backbone lite --set train.epochs=5 --format json
    """
    from ..api import fit as fit_adapter
    from ..checkpoint import check_checkpoint_path
    from ..distributed import context_from_env
    from ..files import checked_output
    from ..methods import deep_merge
    from ..views import fit_summary, write_fit_summary

    check_format(fmt, SUMMARY_FORMATS)
    source = reading.source(data)
    output = output or Path(f"{source.stem or 'adapter'}.{method.replace('+', '-')}.adaclip")
    main_rank = context_from_env().is_main
    # Checked and locked before anything is read or built; a second fit to the same -o fails here.
    with checked_output(output, force=force, inputs=[data], lock=main_rank):
        overrides = deep_merge(read_config_file(config), parse_settings(settings))
        checkpoint = check_checkpoint_path(output, resume=resume, force=force)
        run_logs = []
        if main_rank and (log_jsonl or tracker):
            from ..tracking import open_run_logs

            params = {"method": method, "backbone": backbone.name, "seed": seed, "shots": shots, **overrides}
            run_logs = open_run_logs(
                jsonl=log_jsonl,
                tracker=tracker,
                tracker_dir=tracker_dir,
                run_name=output.name,
                params=params,
                force=force,
            )
        try:
            with features.using():
                adapter = fit_adapter(
                    source,
                    method,
                    **backbone.as_kwargs(),
                    shots=shots,
                    epochs=epochs,
                    batch_size=batch_size,
                    lr=lr,
                    seed=seed,
                    classes=classes,
                    templates=templates,
                    val_split=parse_val_split(val_split),
                    device=device,
                    precision=precision,
                    config=overrides,
                    workers=workers,
                    cache_dir=cache_dir,
                    checkpoint=checkpoint,
                    checkpoint_every=checkpoint_every,
                    resume=resume,
                    deterministic=deterministic,
                    **_callbacks(run_logs),
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
        summary = fit_summary(adapter, path)
        for run_log in run_logs:
            run_log.close(summary)
        write_fit_summary(summary, fmt)


def _callbacks(run_logs) -> dict[str, Any]:
    """`fit`'s callbacks that hand each step's and each epoch's record to the run logs (none: none)."""
    if not run_logs:
        return {}

    def on_step_end(record: dict) -> None:
        for run_log in run_logs:
            run_log.log_step(record)

    def on_epoch_end(epoch: int, record: dict) -> None:
        for run_log in run_logs:
            run_log.log_epoch(record)

    return {"on_epoch_end": on_epoch_end, "on_step_end": on_step_end}


def _method_settings(items: list[str]) -> dict[str, Any]:
    settings = parse_settings(items)
    for key, value in settings.items():
        if not isinstance(value, dict):
            raise UsageError(f"--set {key}=...: name the method first", fix="e.g. --set rada.train.epochs=5")
    return settings


def _seed_list(seeds: str) -> list[int]:
    try:
        return [int(s) for s in seeds.replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"--seeds expects integers, got {seeds!r}", fix="e.g. --seeds 1 2 3") from None


@command()
def compare(
    data: Path = ImageFolderArg,
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
    backbone: BackboneOptions = GROUP,
    reading: DataOptions = GROUP,
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
    fmt: str = format_option("table", EVAL_FORMATS),
    device: str = DeviceOpt,
    precision: str = PrecisionOpt,
    workers: int | None = WorkersOpt,
    batch_size: int = typer.Option(64, "--batch-size", help="Images per forward pass when encoding."),
    cache_dir: str | None = CacheDirOpt,
    features: FeatureCacheOptions = GROUP,
) -> None:
    """Which method is best on your images: fit each method with each seed under one protocol, score
    them on test/ (or a held-out split no method sees), and print a leaderboard.

    Validation comes from the training images only; the recommended method is the one with the best
    validation accuracy, never chosen on the test images. A failing method gets a failed row.

    Examples:

        adaclip compare ./pets --methods zeroshot,linear-probe,adaring --seeds 1 2 --report pets.html

        adaclip compare ./pets --shots 16 --out-dir runs/ --resume --format json
    """
    from ..comparison import compare as run_compare
    from ..report import check_report_paths
    from ..views import announce_run, write_leaderboard

    check_format(fmt, EVAL_FORMATS)
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    seed_list = _seed_list(seeds)
    if resume and out_dir is None:
        raise UsageError("--resume needs --out-dir (where the finished runs are kept)")
    if png and report is None:
        raise UsageError("--png needs --report")
    check_report_paths(report, force, [data], "--report", png)
    with features.using():
        board = run_compare(
            reading.source(data),
            method_list,
            seeds=seed_list,
            shots=shots,
            **backbone.as_kwargs(),
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
            on_run=announce_run,
        )
    if report is not None:
        from ..report import evaluation_of_best_run, write_report

        written = write_report(
            report, evaluation=evaluation_of_best_run(board), board=board, title="adaclip compare", png=png
        )
        log.info(f"report: {written.html}" + "".join(f", {p}" for p in written.pngs))
    if board.best_adapter:
        log.info(f"best adapter: {board.best_adapter}")
    write_leaderboard(board, fmt)
