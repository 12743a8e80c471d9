"""How each command's result looks on stdout (and its progress lines on stderr): predictions, the fit
and export summaries, evaluation tables, the leaderboard, the method list.

adaclip.output knows formats (tables, JSON, JSONL, CSV, escaping) and nothing of adaclip's results;
this module knows the results (Prediction, EvalReport, Leaderboard, Adapter metadata) and turns them
into output's records and tables, so a command calls one function here and formats nothing itself.
It imports no torch: result objects arrive from the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .output import flatten, key_value_table, printable, stdout_console, write_json, write_records
from .ui import log

MAX_SKIP_WARNINGS = 20

# ------------------------------------------------------------------------------ summaries


def write_summary(document: dict[str, Any], fmt: str, title: str, *, hide: Iterable[str] = (), nested=False) -> None:
    """One result as JSON, or as a key-value table for people (`hide`: keys only JSON carries;
    `nested`: dotted keys for nested values)."""
    if fmt == "json":
        write_json(document)
        return
    shown = {k: v for k, v in document.items() if k not in set(hide)}
    pairs = flatten(shown) if nested else shown.items()
    stdout_console().print(key_value_table(pairs, title=title))


def fit_summary(adapter, path: Path) -> dict[str, Any]:
    """What `fit` reports about the adapter it wrote to `path` (also the run logs' final record)."""
    meta = adapter.metadata
    training = meta.training
    return {
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


def write_fit_summary(summary: dict[str, Any], fmt: str) -> None:
    write_summary(summary, fmt, "adaclip fit", hide=("parameter_breakdown",))


def write_methods(methods, fmt: str) -> None:
    """`adaclip methods`: MethodSummary objects (adaclip.method_catalog)."""
    records = [{"method": m.name, "class_agnostic": m.class_agnostic, "summary": m.summary} for m in methods]
    write_records(records, fmt if fmt == "json" else "table", ["method", "class_agnostic", "summary"], title="methods")


# ------------------------------------------------------------------------------ predictions


def prediction_columns(fmt: str, top_k: int, *, true_label: bool = False) -> list[str]:
    """Columns of prediction records (predict, tta): tables put the runners-up in one column."""
    columns = ["path", "label", "score"]
    if fmt == "table":  # narrow enough for a terminal
        columns += ["runners-up"] if top_k > 1 else []
    else:
        columns += [c for i in range(2, top_k + 1) for c in (f"label_{i}", f"score_{i}")]
    return columns + (["true_label"] if true_label else [])


def prediction_records(predictions, fmt: str, counts: dict[str, int]) -> Iterator[dict[str, Any]]:
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


def write_predictions(predictions, fmt: str, top_k: int, *, title: str, true_label: bool = False) -> dict[str, int]:
    """Write predictions as they come (jsonl and csv stream); returns how many were written ("ok") and
    how many images were unreadable ("skipped")."""
    counts = {"ok": 0, "skipped": 0}
    write_records(
        prediction_records(predictions, fmt, counts),
        fmt,
        prediction_columns(fmt, top_k, true_label=true_label),
        title=title,
    )
    return counts


def predicted_line(counts: dict[str, int]) -> str:
    skipped = counts["skipped"]
    return f"predicted {counts['ok']} images" + (f", skipped {skipped} unreadable" if skipped else "")


# ------------------------------------------------------------------------------ evaluation


def eval_document(adapter_path: Path, method: str, data: Path, report, seconds: float) -> dict[str, Any]:
    """`eval`'s JSON report (also written to --output)."""
    document = {"adapter": str(adapter_path), "method": method, "data": str(data), **report.to_dict()}
    document["seconds"] = round(seconds, 2)
    return document


def write_eval_files(document: dict[str, Any], report, output: Path | None, predictions: Path | None) -> None:
    """`eval --output` (the JSON report) and `--predictions` (one JSON line per image)."""
    if output is not None:
        with open(output, "w", encoding="utf-8") as handle:
            write_json(document, handle)
    if predictions is not None:
        with open(predictions, "w", encoding="utf-8") as handle:
            write_records(report.predictions or [], "jsonl", [], out=handle)


def write_eval(document: dict[str, Any], report, fmt: str) -> None:
    """An EvalReport (adaclip.metrics) as JSON (`document`), one CSV row, or tables for people."""
    if fmt == "json":
        write_json(document)
        return
    if fmt == "csv":
        row = {
            **{key: document[key] for key in ("adapter", "method", "data")},
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
                ("method", document["method"]),
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


# ------------------------------------------------------------------------------ compare


def announce_run(result, number: int, total: int) -> None:
    """`compare`'s line on stderr as each run (a RunResult) finishes."""
    if result.status == "ok":
        log.info(
            f"[{number}/{total}] {result.method} seed {result.seed}: accuracy {result.accuracy:.3f}, "
            f"validation {'-' if result.val_accuracy is None else f'{result.val_accuracy:.3f}'} "
            f"({result.fit_seconds:.1f} s)"
        )
    else:
        log.warning(f"[{number}/{total}] {result.method} seed {result.seed} failed: {result.error}")


def write_leaderboard(board, fmt: str) -> None:
    """A Leaderboard (adaclip.comparison): every run as JSON, one CSV row per method, or the table for
    people with the failed methods and the recommendation under it."""
    recommended = f"recommended: {board.recommended or 'none'} ({board.reason})"
    if fmt == "json":
        write_json(board.to_dict(runs=True))
        return
    if fmt == "csv":
        from .comparison import COLUMNS

        write_records(board.records(), "csv", COLUMNS)
        log.info(recommended)
        return
    write_records(leaderboard_rows(board), "table", leaderboard_columns(board), title="adaclip compare", compact=True)
    console = stdout_console()
    for row in board.rows:
        if row.failed:
            console.print(
                f"failed: {row.method} ({row.failed} of {row.runs + row.failed} runs): {row.error}", markup=False
            )
    console.print(recommended, markup=False)


def leaderboard_columns(board) -> list[str]:
    new = ["new acc"] if any(r.new_accuracy is not None for r in board.rows) else []
    return ["method", "accuracy", "F1", *new, "val acc", "params", "fit s", "img/s", "file", "runs"]


def leaderboard_rows(board) -> Iterator[dict[str, Any]]:
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
