"""Reports a person would rather look at: one self-contained HTML file (no network, images inline).

    adaclip report pets.adaclip ./pets -o report.html      # one adapter, scored on a labelled folder
    adaclip compare ./pets --report report.html            # the leaderboard, plus the recommended run

Sections: leaderboard and accuracy-vs-trainable-parameters scatter (compare only), confusion-matrix
heat map, per-class accuracy bars, training and validation curves from the adapter's history, and a
gallery of the most confident mistakes. Plots are drawn by matplotlib (the `adaclip[report]` extra);
`png=True` also writes each plot as a PNG file beside the HTML.

One file on purpose (over 400 lines): each section is a short matplotlib function plus its HTML, and
they share the page's template and styles; splitting them would scatter one page across modules.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, UsageError

if TYPE_CHECKING:
    from .comparison import Leaderboard

MAX_MISTAKES = 12
THUMBNAIL = 96
SECTIONS = ("leaderboard", "scatter", "confusion", "per-class", "curves", "mistakes")


@dataclass
class Mistake:
    path: str
    true_label: str
    predicted: str
    confidence: float


@dataclass
class Evaluation:
    """What the per-class sections show about one adapter on one labelled set."""

    title: str
    class_names: list[str]
    confusion: list[list[int]]
    history: list[dict[str, Any]]
    mistakes: list[Mistake]
    accuracy: float
    n_images: int


@dataclass
class Report:
    html: Path
    pngs: list[Path] = field(default_factory=list)


def most_confident_mistakes(
    paths: Sequence[str],
    truth: Sequence[int],
    predicted: Sequence[int],
    confidence: Sequence[float],
    class_names: Sequence[str],
    limit: int = MAX_MISTAKES,
) -> list[Mistake]:
    wrong = [i for i in range(len(truth)) if truth[i] != predicted[i]]
    wrong.sort(key=lambda i: (-confidence[i], paths[i]))
    return [
        Mistake(paths[i], class_names[truth[i]], class_names[predicted[i]], float(confidence[i])) for i in wrong[:limit]
    ]


# ------------------------------------------------------------------------------------------ inputs


def evaluate_for_report(adapter, data: str | Path, *, classes_file=None, batch_size: int = 64, workers=None):
    """Score an adapter on a labelled folder (its test/ split when it has one) for the report."""
    import torch

    from .data import prepare_eval_data
    from .inference import encode_images, logits_in_batches
    from .metrics import classification_report

    folder = prepare_eval_data(data, classes_file)
    label_map, class_names = adapter._align_classes(folder.folders, folder.class_names)
    with adapter.classes(class_names):
        encoded = encode_images(
            adapter.model, folder.images, adapter.backbone.eval_transform(), batch_size=batch_size, workers=workers
        )
        if len(encoded.labels) == 0:
            raise InputError("no readable images to report on", path=folder.root)
        probabilities = logits_in_batches(adapter.model, encoded.features).float().softmax(dim=-1).cpu()
    confidence, predicted = probabilities.max(dim=-1)
    truth = [label_map[i] for i in encoded.labels.tolist()]
    paths = [str(folder.images[i].path) for i in encoded.indices.tolist()]
    report = classification_report(torch.tensor(truth), predicted, class_names)
    training = adapter.metadata.training
    return Evaluation(
        title=f"{adapter.method} on {folder.root}",
        class_names=list(class_names),
        confusion=report.confusion,
        history=list(training.history) if training else [],
        mistakes=most_confident_mistakes(paths, truth, predicted.tolist(), confidence.tolist(), class_names),
        accuracy=report.accuracy,
        n_images=report.n_images,
    )


def adapter_only(adapter) -> Evaluation:
    """Without data: only what the adapter file itself records (its training history)."""
    training = adapter.metadata.training
    return Evaluation(
        title=f"{adapter.method} ({adapter.source_name or 'adapter'})",
        class_names=list(adapter.class_names),
        confusion=[],
        history=list(training.history) if training else [],
        mistakes=[],
        accuracy=float("nan"),
        n_images=0,
    )


def evaluation_of_best_run(board: Leaderboard) -> Evaluation | None:
    """The recommended method's run (its seed with the best validation accuracy) on the test images."""
    runs = [r for r in board.runs if r.method == board.recommended and r.status == "ok"]
    if not runs:
        return None
    run = max(runs, key=lambda r: (r.val_accuracy or 0.0, -r.seed))
    paths = [board.test_paths[i] for i in run.test_index]
    truth = [board.test_labels[i] for i in run.test_index]
    return Evaluation(
        title=f"{run.method} (seed {run.seed}), recommended, on the test images",
        class_names=list(board.class_names),
        confusion=run.confusion,
        history=run.history,
        mistakes=most_confident_mistakes(paths, truth, run.test_predicted, run.test_confidence, board.class_names),
        accuracy=run.accuracy or 0.0,
        n_images=len(run.test_index),
    )


# ------------------------------------------------------------------------------------------ plots


PNG_SECTIONS = ("scatter", "confusion", "per-class", "curves")


def png_path(report: Path, key: str) -> Path:
    """Where `--png` writes one plot: beside the HTML, <stem>-<section>.png."""
    return report.with_name(f"{report.stem}-{key}.png")


def require_matplotlib() -> None:
    """Fail with the install hint (exit 2) before any work when the report extra is missing."""
    _pyplot()


def check_report_paths(
    report: Path | None, force: bool, inputs: Sequence[Path], option: str = "-o", png: bool = False
) -> None:
    """Before any work: the report (and with `png` its PNG files) can be written, nothing the user has
    is overwritten without `force`, and matplotlib is installed (`compare --report`, `report`)."""
    from .files import check_output_path

    if report is None:
        return
    require_matplotlib()
    check_output_path(report, force=force, inputs=inputs, what="report file", option=option)
    for key in PNG_SECTIONS if png else ():
        check_output_path(png_path(report, key), force=force, inputs=inputs, what="plot file", option=option)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            "reports need matplotlib, which is not installed", fix="pip install 'adaclip[report]'"
        ) from None
    matplotlib.use("Agg", force=True)  # files only: never open a window
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return buffer.getvalue()


def plot_confusion(evaluation: Evaluation) -> bytes:
    plt = _pyplot()
    names = evaluation.class_names
    k = len(names)
    size = min(12.0, 3.0 + 0.45 * k)
    figure, ax = plt.subplots(figsize=(size + 1.5, size))
    counts = evaluation.confusion
    rows = [sum(r) or 1 for r in counts]
    share = [[c / rows[i] for c in r] for i, r in enumerate(counts)]
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = range(k)
    ax.set_xticks(ticks, names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if counts[i][j]:
                    ax.text(j, i, str(counts[i][j]), ha="center", va="center", fontsize=7,
                            color="white" if share[i][j] > 0.5 else "black")  # fmt: skip
    figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_title("confusion matrix (rows: true class)")
    return _png(figure)


def per_class_accuracy(evaluation: Evaluation) -> list[float | None]:
    return [(row[i] / sum(row)) if sum(row) else None for i, row in enumerate(evaluation.confusion)]


def plot_per_class(evaluation: Evaluation) -> bytes:
    plt = _pyplot()
    names = evaluation.class_names
    accuracy = per_class_accuracy(evaluation)
    figure, ax = plt.subplots(figsize=(7.5, max(2.5, 0.32 * len(names) + 1)))
    values = [a if a is not None else 0.0 for a in accuracy]
    order = sorted(range(len(names)), key=lambda i: values[i])
    ax.barh([names[i] for i in order], [values[i] for i in order], color="#3b75af")
    for y, i in enumerate(order):
        ax.text(values[i] + 0.01, y, "no images" if accuracy[i] is None else f"{values[i]:.2f}", va="center",
                fontsize=8)  # fmt: skip
    ax.axvline(evaluation.accuracy, color="#c44e52", linestyle="--", label=f"overall {evaluation.accuracy:.3f}")
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("per-class accuracy")
    return _png(figure)


def plot_curves(history: list[dict[str, Any]]) -> bytes:
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    figure, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 3.4))
    loss_ax.plot(epochs, [h.get("loss") for h in history], marker="o", markersize=3, color="#3b75af")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_title("training loss")
    acc_ax.plot(epochs, [h.get("train_accuracy") for h in history], marker="o", markersize=3, label="training")
    val = [h.get("val_accuracy") for h in history]
    if any(v is not None for v in val):
        acc_ax.plot(epochs, [math.nan if v is None else v for v in val], marker="s", markersize=3, label="validation")
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_ylim(0, 1.02)
    acc_ax.legend(fontsize=8)
    acc_ax.set_title("training and validation accuracy")
    figure.tight_layout()
    return _png(figure)


def plot_scatter(board: Leaderboard) -> bytes:
    plt = _pyplot()
    rows = [r for r in board.rows if r.accuracy is not None]
    figure, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in rows:
        x = max(1, row.trainable_params or 0)  # zero-shot trains nothing: drawn at 1 on the log axis
        colour = "#c44e52" if row.method == board.recommended else "#3b75af"
        ax.errorbar(x, row.accuracy, yerr=row.accuracy_std or 0.0, fmt="o", color=colour, capsize=3)
        ax.annotate(row.method, (x, row.accuracy), textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log; 0 drawn at 1)")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title("accuracy vs trainable parameters (red: recommended)")
    ax.grid(True, alpha=0.3)
    return _png(figure)


# ------------------------------------------------------------------------------------------ HTML


def _thumbnail(path: str) -> str | None:
    from PIL import Image

    from .errors import UnreadableImageError
    from .images import load_image

    try:
        image = load_image(path)
    except UnreadableImageError:
        return None
    scale = THUMBNAIL / max(image.size)
    resample = Image.Resampling.NEAREST if scale >= 2 else Image.Resampling.BICUBIC  # small images stay crisp
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), resample)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: .2em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { padding: .3em .7em; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.recommended td { background: #fdeeee; font-weight: 600; }
.note { color: #555; font-size: .92em; }
img.plot { max-width: 100%; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; }
.gallery figure { margin: 0; width: 130px; font-size: .8em; text-align: center; }
.gallery img { width: 96px; height: 96px; object-fit: contain; background: #f4f4f4; image-rendering: pixelated; }
.wrong { color: #b02a2a; }
"""


def _img(data: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _section(key: str, title: str, body: str) -> str:
    return f'<section id="{key}">\n<h2>{html.escape(title)}</h2>\n{body}\n</section>'


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return html.escape(str(value))


def _leaderboard_table(board: Leaderboard) -> str:
    has_new = any(r.new_accuracy is not None for r in board.rows)
    heads = ["method", "accuracy", "macro-F1"] + (["new-class acc."] if has_new else [])
    heads += ["val. accuracy", "trainable params", "fit s", "predict img/s", "adapter bytes", "runs", "failed"]
    lines = ["<table>", "<tr>" + "".join(f"<th>{h}</th>" for h in heads) + "</tr>"]
    for row in board.rows:
        accuracy = _fmt(row.accuracy) + (f" &plusmn; {row.accuracy_std:.3f}" if row.accuracy_std is not None else "")
        cells = [html.escape(row.method), accuracy, _fmt(row.macro_f1)]
        if has_new:
            cells.append(
                _fmt(row.new_accuracy)
                + (f" &plusmn; {row.new_accuracy_std:.3f}" if row.new_accuracy_std is not None else "")
            )
        cells += [
            _fmt(row.val_accuracy),
            _fmt(row.trainable_params),
            _fmt(row.fit_seconds, 1),
            _fmt(row.predict_images_per_second, 1),
            _fmt(row.adapter_bytes),
            _fmt(row.runs),
            _fmt(row.failed) + (f' <span class="wrong">{html.escape(row.error)}</span>' if row.error else ""),
        ]
        css = ' class="recommended"' if row.method == board.recommended else ""
        lines.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    lines.append("</table>")
    protocol = board.protocol
    lines.append(
        f'<p class="note">Recommended: <b>{html.escape(board.recommended or "none")}</b>: '
        f"{html.escape(board.reason)}.</p>"
        f'<p class="note">Seeds {", ".join(map(str, board.seeds))}; shots: {_fmt(protocol.get("shots"))}; '
        f"validation: {html.escape(str(protocol.get('validation')))}; test: {_fmt(protocol.get('test_images'))} "
        f"images ({html.escape(str(protocol.get('test')))}). Fit seconds count shared frozen-tower encodings "
        "at their cost; predict img/s includes decoding and encoding.</p>"
    )
    return "\n".join(lines)


def _gallery(mistakes: list[Mistake]) -> str:
    if not mistakes:
        return '<p class="note">No mistakes on these images.</p>'
    figures = []
    for mistake in mistakes:
        data = _thumbnail(mistake.path)
        picture = (
            f'<img alt="{html.escape(Path(mistake.path).name)}" src="data:image/png;base64,{data}">'
            if data
            else "<div>(unreadable)</div>"
        )
        figures.append(
            f"<figure>{picture}<figcaption>true: <b>{html.escape(mistake.true_label)}</b><br>"
            f'<span class="wrong">predicted: {html.escape(mistake.predicted)}</span><br>'
            f"confidence {mistake.confidence:.2f}</figcaption></figure>"
        )
    return '<div class="gallery">\n' + "\n".join(figures) + "\n</div>"


def write_report(
    output: str | Path,
    *,
    evaluation: Evaluation | None,
    board: Leaderboard | None = None,
    title: str = "adaclip report",
    png: bool = False,
    force: bool = True,
) -> Report:
    """Write the HTML (and with `png` the plots as PNG files beside it: <stem>-<section>.png)."""
    output = Path(output)
    if not output.parent.resolve().is_dir():
        raise UsageError("report folder does not exist", path=output.parent)
    if output.exists() and not force:
        raise UsageError("report file already exists", path=output, fix="choose another -o or pass --force")
    plots: dict[str, bytes] = {}
    sections: list[str] = []
    if board is not None:
        sections.append(_section("leaderboard", "Leaderboard", _leaderboard_table(board)))
        plots["scatter"] = plot_scatter(board)
        sections.append(
            _section("scatter", "Accuracy vs trainable parameters", _img(plots["scatter"], "accuracy vs parameters"))
        )
    if evaluation is not None:
        heading = f'<p class="note">{html.escape(evaluation.title)}'
        if evaluation.n_images:
            heading += f": accuracy {evaluation.accuracy:.3f} on {evaluation.n_images} images"
        sections.append(heading + ".</p>")
        if evaluation.confusion:
            plots["confusion"] = plot_confusion(evaluation)
            plots["per-class"] = plot_per_class(evaluation)
            sections.append(_section("confusion", "Confusion matrix", _img(plots["confusion"], "confusion matrix")))
            sections.append(_section("per-class", "Per-class accuracy", _img(plots["per-class"], "per-class accuracy")))
        else:
            for key, name in (("confusion", "Confusion matrix"), ("per-class", "Per-class accuracy")):
                sections.append(_section(key, name, '<p class="note">Give a labelled folder to score on.</p>'))
        if evaluation.history:
            plots["curves"] = plot_curves(evaluation.history)
            body = _img(plots["curves"], "training and validation curves")
        else:
            body = '<p class="note">No training epochs recorded: this method trains in closed form or not at all.</p>'
        sections.append(_section("curves", "Training and validation curves", body))
        sections.append(
            _section(
                "mistakes",
                "Most confident mistakes",
                _gallery(evaluation.mistakes)
                if evaluation.confusion
                else '<p class="note">Give a labelled folder to see mistakes.</p>',
            )
        )
    document = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        # no page may fetch anything: the file is sent around as one attachment
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{html.escape(title)}</h1>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text(document, encoding="utf-8")
    tmp.replace(output)
    written = []
    if png:
        for key, data in plots.items():
            path = png_path(output, key)
            path.write_bytes(data)
            written.append(path)
    return Report(output, written)
