"""`adaclip compare`: which method does best on *my* images, under one protocol for every method.

    board = adaclip.compare("images/", methods=["zeroshot", "linear-probe", "adaring"], seeds=[1, 2])
    print(board.recommended, board.reason)

The protocol (the same for every method, so rows can be compared):

* test images: `test/` when the folder has one, else a fixed stratified hold-out (20% of each class,
  independent of the seeds) that no method sees while training, searching or early-stopping;
* training images: with `shots=K`, K per class drawn by the seed from the training pool (the very
  images `adaclip fit --shots K --seed s` draws); without, the whole pool less validation;
* validation images, from the training data only: `val/` when present, else chosen from the training
  pool by the very rule `adaclip fit` uses (`data.split_training_pool`: with shots, images that were
  not sampled as shots; without, 10% of each class held out). Everything a method tunes, searches or
  early-stops on is this set, and the recommended method is chosen on it, never on the test set;
  `val_split=0` turns validation off (no recommendation then; benchmarks.accuracy does this);
* the same seeds for every method; a seed fixes sampling, initialisation, order and augmented views
  (views are drawn per (seed, epoch, image), so two methods with the same crop recipe see the same
  crops);
* methods whose image tower stays frozen share one encoding per (image, view), training and test.

With `base_to_new=True` methods train on the first half of the classes (sorted folder order; or pass
the base class folders as a list) and are scored on those classes' test images (base) and,
class-agnostic methods only, on the other classes' test images among their names (new: never trained
on) and on every test image among every name (all).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .data import (
    FEW_SHOT_VAL_PER_CLASS,
    ImageFolder,
    LabelledImage,
    TrainingData,
    check_val_split,
    files_digest,
    holdout_count,
    read_sets,
    split_training_pool,
    stratified_holdout,
)
from .errors import AdaclipError, InputError, UsageError
from .inference import SharedEncodings, encode_images, logits_in_batches, sharing_frozen_encodings
from .metrics import classification_report
from .ui import log, progress

TEST_FRACTION = 0.2  # without test/: held out per class for testing
TEST_SPLIT_SEED = 20_240_601  # the test hold-out does not move with the run seeds
RESULTS_FILE = "compare.json"
PROTOCOL_FILE = "protocol.json"  # written before the first run: a resumed comparison must match it
BEST_FILE = "best.adaclip"


class ComparisonInterrupted(AdaclipError):
    """Ctrl-C during compare: the runs finished so far are kept (with an out_dir, on disk)."""

    exit_code = 130


# ------------------------------------------------------------------------------------------ protocol


@dataclass
class Protocol:
    """The images every method of one comparison trains, validates and is tested on."""

    root: Path
    folders: list[str]  # every class folder (base classes first under base-to-new)
    class_names: list[str]
    pool: list[LabelledImage]  # training pool, less the test hold-out (labels index `folders`)
    val_folder: list[LabelledImage] | None  # from val/, when present
    test: list[LabelledImage]
    test_source: str
    shots: int | None
    val_split: float | str = "auto"
    n_base: int = 0  # classes trained on: all, or the base classes under base-to-new
    base_to_new: bool = False
    _training: dict[int, TrainingData] = field(default_factory=dict, repr=False)

    def describe(self) -> dict[str, Any]:
        return {
            "data": str(self.root),
            "classes": len(self.folders),
            "base_classes": self.folders[: self.n_base] if self.base_to_new else None,
            "shots": self.shots,
            "training_pool": len(self.pool),
            "validation": self.val_source,
            "test": self.test_source,
            "test_images": len(self.test),
            "base_to_new": self.base_to_new,
        }

    @property
    def val_source(self) -> str:
        return self.training_data(0).val_source  # the rule's own words; the same for every seed

    def training_data(self, seed: int) -> TrainingData:
        """Training and validation images for one seed (base classes only under base-to-new), chosen by
        the product's split rule, so `compare` and `fit --shots K --seed s` train on the same images."""
        if seed not in self._training:
            n = self.n_base
            folder = ImageFolder(self.root, self.folders[:n], self.class_names[:n], [])
            pool = [im for im in self.pool if im.label < n]
            val = None if self.val_folder is None else [im for im in self.val_folder if im.label < n]
            self._training[seed] = split_training_pool(
                folder, pool, val, shots=self.shots, seed=seed, val_split=self.val_split
            )
        return self._training[seed]


def _sorted(images: Sequence[LabelledImage]) -> list[LabelledImage]:
    return sorted(images, key=lambda im: (im.label, str(im.path)))


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def make_protocol(
    data: str | Path,
    *,
    shots: int | None = None,
    classes: str | Path | None = None,
    base_to_new: bool | Sequence[str] = False,
    val_split: float | str = "auto",
    test_fraction: float = TEST_FRACTION,
) -> Protocol:
    """Index the folder and fix the splits; too few images per class is an error naming how many."""
    if shots is not None and shots < 1:
        raise InputError(f"--shots must be at least 1, got {shots}")
    val_split = check_val_split(val_split)
    if not 0 < test_fraction < 1:
        raise UsageError(f"test_fraction must be in (0, 1), got {test_fraction}")
    sets = read_sets(data, classes)
    train_folder = sets.train
    n_classes = len(train_folder.folders)
    if n_classes < 2 or (base_to_new and n_classes < 4):
        need = 4 if base_to_new else 2
        raise InputError(
            f"found {n_classes} class(es); {'base-to-new ' if base_to_new else ''}compare needs at least {need}",
            path=train_folder.root,
        )
    val_folder = list(sets.val.images) if sets.val is not None else None
    test_folder = list(sets.test.images) if sets.test is not None else None
    _check_enough_images(train_folder, shots, val_split, has_val=val_folder is not None, carved_test=not test_folder)
    pool = list(train_folder.images)
    if test_folder is not None:
        test, test_source = test_folder, "test/ folder"
    else:
        pool, test = stratified_holdout(pool, test_fraction, TEST_SPLIT_SEED, n_classes)
        test_source = f"{test_fraction:.0%} of each class held out, the same for every seed and method"
    folders, names = train_folder.folders, train_folder.class_names
    n_base = n_classes
    if base_to_new:
        base = list(folders[: math.ceil(n_classes / 2)]) if base_to_new is True else list(base_to_new)
        unknown = [f for f in base if f not in folders]
        if unknown or not 0 < len(set(base)) < n_classes:
            raise UsageError(
                f"base classes must be some, not all, of the class folders (unknown: {unknown[:5]})",
                fix=f"e.g. {list(folders[: n_classes // 2])}",
            )
        # base classes first: a label below n_base is a base class
        order = [folders.index(f) for f in base] + [i for i, f in enumerate(folders) if f not in base]
        new_label = {old: new for new, old in enumerate(order)}
        folders, names = [folders[i] for i in order], [names[i] for i in order]
        pool, test = _relabel(pool, new_label), _relabel(test, new_label)
        val_folder = None if val_folder is None else _relabel(val_folder, new_label)
        n_base = len(base)
    return Protocol(
        root=train_folder.root,
        folders=list(folders),
        class_names=list(names),
        pool=pool,
        val_folder=val_folder,
        test=_sorted(test),
        test_source=test_source,
        shots=shots,
        val_split=val_split,
        n_base=n_base,
        base_to_new=bool(base_to_new),
    )


def _relabel(images: list[LabelledImage], new_label: dict[int, int]) -> list[LabelledImage]:
    return [replace(im, label=new_label[im.label]) for im in images]


def images_needed(shots: int | None, val_split: float | str, *, has_val: bool, carved_test: bool) -> tuple[int, str]:
    """(images per class the training folder needs, how they add up): shots (or 1) to train, validation
    images (CoOp's min(shots, 4) with shots, else 1) unless val/ exists or validation is off, and with
    no test/ enough that the fixed hold-out takes at least one."""
    parts = [f"{shots} to train" if shots else "1 to train"]
    n_val = 0
    if not has_val and val_split != 0:
        n_val = min(shots, FEW_SHOT_VAL_PER_CLASS) if shots and val_split == "auto" else 1
        parts.append(f"{n_val} for validation")
    need = (shots or 1) + n_val
    if not carved_test:
        return need, " + ".join(parts)
    total = need + 1
    while total - _held_out(total) < need:  # the smallest folder that leaves `need` after the hold-out
        total += 1
    parts.append(f"{_held_out(total)} held out for testing (no test/ folder)")
    return total, " + ".join(parts)


def _held_out(n: int) -> int:
    """How many of a class's n images the test hold-out (stratified_holdout at TEST_FRACTION) takes."""
    return holdout_count(n, TEST_FRACTION)


def _check_enough_images(folder: ImageFolder, shots, val_split, *, has_val: bool, carved_test: bool) -> None:
    need, how = images_needed(shots, val_split, has_val=has_val, carved_test=carved_test)
    counts = [len(group) for group in folder.per_class()]
    short = [(f, c) for f, c in zip(folder.folders, counts, strict=True) if c < need]
    if short:
        listed = ", ".join(f"{f!r} has {c}" for f, c in short[:5])
        more = f" and {len(short) - 5} more" if len(short) > 5 else ""
        raise InputError(
            f"too few images per class: compare needs {need} per class ({how}); {listed}{more}",
            path=folder.root,
            fix="add images" + (" or lower --shots" if shots else "") + ("" if carved_test else " to train/"),
        )


# ------------------------------------------------------------------------------------------ one run


@dataclass
class RunResult:
    """One method at one seed: its scores on the test images, or why it failed."""

    method: str
    seed: int
    status: str = "ok"  # ok | failed
    error: str | None = None
    accuracy: float | None = None  # on the test images (base classes under base-to-new)
    macro_f1: float | None = None
    new_accuracy: float | None = None  # base-to-new: new classes among new names
    all_accuracy: float | None = None  # base-to-new: every test image among every class
    val_accuracy: float | None = None
    trainable_params: int | None = None
    fit_seconds: float | None = None
    predict_images_per_second: float | None = None
    test_seconds: float | None = None  # scoring the test images (shared encodings at their cost)
    adapter_bytes: int | None = None
    adapter_path: str | None = None
    image_tower_frozen: bool | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion: list[list[int]] = field(default_factory=list)
    # per readable test image (positions in Protocol.test): what the main score predicted, how surely
    test_index: list[int] = field(default_factory=list)
    test_predicted: list[int] = field(default_factory=list)
    test_confidence: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, document: dict[str, Any]) -> RunResult:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in document.items() if k in known})


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, AdaclipError):
        return exc.one_line()
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:300]


class Comparison:
    """Runs methods one (method, seed) at a time under one `Protocol`, sharing the backbone and the
    frozen-tower encodings between runs. `compare()` drives it; benchmarks.accuracy calls `run`."""

    def __init__(
        self,
        protocol: Protocol,
        backbone,
        *,
        templates: str | list[str] | None = "default",
        workers: int | None = None,
        batch_size: int = 64,
        config: dict[str, dict[str, Any]] | None = None,
        shared: SharedEncodings | None = None,
    ):
        self.protocol = protocol
        self.backbone = backbone
        self.templates = templates
        self.workers = workers
        self.batch_size = batch_size
        self.config = config or {}  # method -> settings
        self.shared = shared or SharedEncodings()

    def run(self, method: str, seed: int, *, adapter_path: Path | None = None, resume: bool = False) -> RunResult:
        """Fit `method` with `seed`, score it on the test images; a failure is returned, not raised
        (except Ctrl-C). With `adapter_path` the adapter is kept there (checkpointed beside it)."""
        from .api import fit
        from .checkpoint import checkpoint_path_for
        from .training import TrainingInterrupted

        result = RunResult(method, seed)
        scratch = None
        try:
            with sharing_frozen_encodings(self.shared) as shared:
                reused_before = shared.reused_seconds
                started = time.perf_counter()
                checkpoint = checkpoint_path_for(adapter_path) if adapter_path is not None else None
                adapter = fit(
                    self.protocol.training_data(seed),
                    method,
                    backbone=self.backbone,
                    seed=seed,
                    templates=self.templates,
                    config=self.config.get(method),
                    workers=self.workers,
                    checkpoint=checkpoint,
                    resume=resume and checkpoint is not None and checkpoint.exists(),
                )
                # as if the run had encoded what it reused: every row pays for its own features
                result.fit_seconds = time.perf_counter() - started + shared.reused_seconds - reused_before
                self._score(adapter, result)
            if adapter_path is None:
                scratch = Path(tempfile.mkdtemp(prefix="adaclip-compare-"))
                path = adapter.save(scratch / f"{method}.adaclip")
            else:
                path = adapter.save(adapter_path, force=True)
                checkpoint.unlink(missing_ok=True)
                result.adapter_path = str(path)
            result.adapter_bytes = path.stat().st_size
            result.trainable_params = adapter.trainable_params
            result.image_tower_frozen = adapter.model.image_tower_frozen
            training = adapter.metadata.training
            result.val_accuracy = training.val_accuracy if training else None
            result.history = list(training.history) if training else []
        except KeyboardInterrupt:
            raise
        except TrainingInterrupted:
            raise KeyboardInterrupt from None  # fit turned Ctrl-C into its own message; compare has its own
        except Exception as exc:  # noqa: BLE001 - one failing method must not end the comparison
            result = RunResult(method, seed, status="failed", error=_one_line(exc))
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
        return result

    def _test_features(self, adapter) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        """(features, labels, positions in protocol.test, seconds it took to encode them)."""
        started = time.perf_counter()
        reused = self.shared.reused_seconds
        with sharing_frozen_encodings(self.shared):
            encoded = encode_images(
                adapter.model,
                self.protocol.test,
                adapter.backbone.eval_transform(),
                batch_size=self.batch_size,
                workers=self.workers,
                description="encoding test images",
            )
        seconds = time.perf_counter() - started + self.shared.reused_seconds - reused
        if len(encoded.labels) == 0:
            raise InputError("no readable test images", path=self.protocol.root)
        return encoded.features, encoded.labels.cpu(), encoded.indices.cpu(), seconds

    def _score(self, adapter, result: RunResult) -> None:
        protocol = self.protocol
        features, labels, positions, encode_seconds = self._test_features(adapter)
        n_base = protocol.n_base
        started = time.perf_counter()
        base_rows = labels < n_base
        base_names = protocol.class_names[:n_base]
        with adapter.classes(base_names):
            logits = logits_in_batches(adapter.model, features[base_rows.to(features.device)]).float().cpu()
        head_seconds = time.perf_counter() - started
        probabilities = logits.softmax(dim=-1)
        confidence, predicted = probabilities.max(dim=-1)
        truth = labels[base_rows]
        report = classification_report(truth, predicted, base_names)
        result.accuracy = report.accuracy
        result.macro_f1 = report.macro_f1
        result.per_class = [asdict(score) for score in report.per_class]
        result.confusion = report.confusion
        result.test_index = positions[base_rows].tolist()
        result.test_predicted = predicted.tolist()
        result.test_confidence = [round(float(c), 5) for c in confidence]
        n_scored = int(base_rows.sum())
        result.predict_images_per_second = n_scored / max(1e-9, encode_seconds * n_scored / len(labels) + head_seconds)
        result.test_seconds = encode_seconds + head_seconds
        if protocol.base_to_new:
            from .methods import method_config_class

            if method_config_class(adapter.method).class_agnostic:
                result.new_accuracy = _accuracy_among(
                    adapter, features, labels, protocol.class_names, range(n_base, len(protocol.folders))
                )
                result.all_accuracy = _accuracy_among(
                    adapter, features, labels, protocol.class_names, range(len(protocol.folders))
                )


def _accuracy_among(adapter, features, labels, names: list[str], classes: range) -> float:
    """Accuracy on the test images of `classes`, each scored among those classes' names only."""
    rows = (labels >= classes.start) & (labels < classes.stop)
    with adapter.classes([names[i] for i in classes]):
        predicted = logits_in_batches(adapter.model, features[rows.to(features.device)]).argmax(dim=-1).cpu()
    return float((predicted == labels[rows] - classes.start).float().mean())


# ------------------------------------------------------------------------------------------ leaderboard


@dataclass
class LeaderboardRow:
    """One method over its seeds (means; std over seeds where there are several)."""

    method: str
    runs: int
    failed: int
    accuracy: float | None
    accuracy_std: float | None
    macro_f1: float | None
    new_accuracy: float | None
    new_accuracy_std: float | None
    val_accuracy: float | None
    trainable_params: int | None
    fit_seconds: float | None
    predict_images_per_second: float | None
    adapter_bytes: int | None
    error: str | None = None

    def record(self) -> dict[str, Any]:
        return asdict(self)


COLUMNS = [
    "method",
    "accuracy",
    "accuracy_std",
    "macro_f1",
    "new_accuracy",
    "new_accuracy_std",
    "val_accuracy",
    "trainable_params",
    "fit_seconds",
    "predict_images_per_second",
    "adapter_bytes",
    "runs",
    "failed",
    "error",
]


@dataclass
class Leaderboard:
    """What `compare` found: a row per method (best test accuracy first), every run, the recommended
    method (by validation accuracy, never test) and why."""

    rows: list[LeaderboardRow]
    runs: list[RunResult]
    protocol: dict[str, Any]
    seeds: list[int]
    recommended: str | None
    reason: str
    best_adapter: str | None = None
    test_paths: list[str] = field(default_factory=list)  # Protocol.test, for the report's gallery
    test_labels: list[int] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)  # the classes scored (base under base-to-new)
    notes: list[str] = field(default_factory=list)

    def row(self, method: str) -> LeaderboardRow:
        return next(r for r in self.rows if r.method == method)

    def records(self) -> list[dict[str, Any]]:
        return [r.record() for r in self.rows]

    def to_dict(self, *, runs: bool = False) -> dict[str, Any]:
        document = {
            "protocol": self.protocol,
            "seeds": self.seeds,
            "recommended": self.recommended,
            "reason": self.reason,
            "best_adapter": self.best_adapter,
            "leaderboard": self.records(),
            "notes": self.notes,
        }
        if runs:
            document["runs"] = [_summary(r) for r in self.runs]
        return document


def _summary(run: RunResult) -> dict[str, Any]:
    """A run without its per-image lists (those stay in the out_dir's files)."""
    skip = {"test_index", "test_predicted", "test_confidence", "per_class", "confusion", "history"}
    return {k: v for k, v in run.to_dict().items() if k not in skip}


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _std(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.stdev(present) if len(present) > 1 else None


def build_leaderboard(runs: list[RunResult], methods: list[str], protocol: Protocol, seeds: list[int]) -> Leaderboard:
    rows = []
    for method in methods:
        mine = [r for r in runs if r.method == method]
        if not mine:
            continue
        ok = [r for r in mine if r.status == "ok"]
        failed = [r for r in mine if r.status != "ok"]
        rows.append(
            LeaderboardRow(
                method=method,
                runs=len(ok),
                failed=len(failed),
                accuracy=_mean([r.accuracy for r in ok]),
                accuracy_std=_std([r.accuracy for r in ok]),
                macro_f1=_mean([r.macro_f1 for r in ok]),
                new_accuracy=_mean([r.new_accuracy for r in ok]),
                new_accuracy_std=_std([r.new_accuracy for r in ok]),
                val_accuracy=_mean([r.val_accuracy for r in ok]),
                trainable_params=ok[0].trainable_params if ok else None,
                fit_seconds=_mean([r.fit_seconds for r in ok]),
                predict_images_per_second=_mean([r.predict_images_per_second for r in ok]),
                adapter_bytes=ok[0].adapter_bytes if ok else None,
                error=failed[0].error if failed else None,
            )
        )
    rows.sort(key=lambda r: (r.accuracy is None, -(r.accuracy or 0.0), r.method))
    recommended, reason = _recommend(rows, protocol)
    return Leaderboard(
        rows=rows,
        runs=runs,
        protocol=protocol.describe(),
        seeds=list(seeds),
        recommended=recommended,
        reason=reason,
        test_paths=[str(im.path) for im in protocol.test],
        test_labels=[im.label for im in protocol.test],
        class_names=protocol.class_names[: protocol.n_base],
    )


def _recommend(rows: list[LeaderboardRow], protocol: Protocol) -> tuple[str | None, str]:
    """Highest mean validation accuracy over the seeds; a tie goes to fewer trainable parameters, then
    to the method name (never to the rows' order, which is by test accuracy). Test scores are not
    looked at. A method with a failed seed is not recommended."""
    candidates = [r for r in rows if r.val_accuracy is not None and r.failed == 0]
    if not candidates:
        return None, "no method has a validation accuracy (no validation images, or every method failed)"
    ranked = sorted(candidates, key=lambda r: (-round(r.val_accuracy, 6), r.trainable_params or 0, r.method))
    best = ranked[0]
    reason = (
        f"highest mean validation accuracy, {best.val_accuracy:.3f} over {best.runs} seed(s) "
        f"(validation: {protocol.val_source}; the test images were not used to choose)"
    )
    if len(ranked) > 1:
        second = ranked[1]
        tied = round(second.val_accuracy, 6) == round(best.val_accuracy, 6)
        reason += f"; next: {second.method} {second.val_accuracy:.3f}"
        if tied:
            reason += f" (a tie, broken by fewer trainable parameters: {best.trainable_params or 0:,})"
    return best.method, reason


# ------------------------------------------------------------------------------------------ compare()


def default_methods() -> list[str]:
    """Every registered method except those that fine-tune the whole backbone (on request only)."""
    from .methods import list_methods, method_config_class

    return [m for m in list_methods() if not method_config_class(m).tunes_whole_backbone]


def compare(
    data: str | Path,
    methods: Sequence[str] | None = None,
    *,
    seeds: Sequence[int] = (1, 2, 3),
    shots: int | None = None,
    backbone: str | Any = "ViT-B-16",
    pretrained: str | None = "openai",
    classes: str | Path | None = None,
    templates: str | list[str] | None = "default",
    base_to_new: bool | Sequence[str] = False,
    val_split: float | str = "auto",
    out_dir: str | Path | None = None,
    resume: bool = False,
    force: bool = False,
    config: dict[str, dict[str, Any]] | None = None,
    device: str | None = None,
    precision: str = "auto",
    workers: int | None = None,
    batch_size: int = 64,
    cache_dir: str | None = None,
    on_run: Callable[[RunResult, int, int], None] | None = None,
) -> Leaderboard:
    """Run `methods` x `seeds` on the folder `data` under one protocol (module docstring) and return
    the leaderboard. `out_dir` keeps every adapter, the runs' results and `best.adaclip`; `resume`
    skips the runs it already holds and continues an interrupted one from its checkpoint. A method
    that fails gets a failed row with the reason; Ctrl-C raises ComparisonInterrupted, keeping finished
    runs in `out_dir`. `config` maps a method to its settings (as `fit(config=...)`)."""
    from .backbone import Backbone, create_backbone
    from .methods import method_config_class

    chosen = list(methods) if methods else default_methods()
    for method in chosen:
        method_config_class(method)  # unknown names fail before any work
    if len(set(chosen)) != len(chosen):
        raise UsageError("a method is listed twice", fix="name each method once")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError("give one or more distinct seeds")
    for method, settings in (config or {}).items():
        if method not in chosen:
            raise UsageError(f"settings given for {method!r}, which is not compared")
        from .methods import make_method_config

        make_method_config(method, settings)  # invalid settings fail before any work
    protocol = make_protocol(data, shots=shots, classes=classes, base_to_new=base_to_new, val_split=val_split)
    if out_dir is not None and Path(out_dir).resolve().is_relative_to(Path(data).resolve()):
        # its runs/ folder would read as a class folder in the next comparison of DATA
        raise UsageError("--out-dir is inside the data folder", path=out_dir, fix="write it elsewhere")
    store = _RunStore(Path(out_dir), resume=resume, force=force) if out_dir is not None else None
    if store is not None:
        identity = (
            (backbone, pretrained)
            if isinstance(backbone, str)
            else (backbone.identity.name, backbone.identity.pretrained)
        )
        store.check_protocol(protocol, {"backbone": identity, "templates": templates, "config": config})
    backbone_obj = (
        backbone
        if isinstance(backbone, Backbone)
        else create_backbone(backbone, pretrained, device=device, precision=precision, cache_dir=cache_dir)
    )
    comparison = Comparison(
        protocol, backbone_obj, templates=templates, workers=workers, batch_size=batch_size, config=config
    )
    plan = [(method, seed) for seed in seeds for method in chosen]  # seed outermost: every method early
    runs: list[RunResult] = []
    log.info(
        f"compare: {len(chosen)} method(s) x {len(seeds)} seed(s) on {protocol.describe()['data']}; "
        f"validation: {protocol.val_source}; test: {len(protocol.test)} images ({protocol.test_source})"
    )
    try:
        with progress("compare", total=len(plan)) as advance:
            for number, (method, seed) in enumerate(plan, 1):
                result = store.finished(method, seed) if store is not None and resume else None
                if result is None:
                    path = store.adapter_path(method, seed) if store is not None else None
                    result = comparison.run(method, seed, adapter_path=path, resume=resume)
                    if store is not None and result.status == "ok":
                        store.save_run(result)
                runs.append(result)
                advance(1, run=f"{method} seed {seed}")
                if on_run is not None:
                    on_run(result, number, len(plan))
    except KeyboardInterrupt:
        kept = f"; {len(runs)} finished run(s) kept in {store.root} (rerun with --resume)" if store else ""
        raise ComparisonInterrupted(f"interrupted after {len(runs)} of {len(plan)} runs{kept}") from None
    board = build_leaderboard(runs, chosen, protocol, seeds)
    if store is not None:
        board.best_adapter = store.keep_best(board)
        store.save_leaderboard(board)
    return board


class _RunStore:
    """out_dir/: runs/<method>-seed<seed>.{adaclip,json}, compare.json, best.adaclip."""

    def __init__(self, root: Path, *, resume: bool, force: bool):
        if root.exists() and not root.is_dir():
            raise UsageError("--out-dir is not a folder", path=root)
        earlier = (root / RESULTS_FILE).exists() or (root / PROTOCOL_FILE).exists()
        if earlier and not (resume or force):
            raise UsageError(
                "the output folder holds an earlier comparison", path=root, fix="pass --resume to finish it, or --force"
            )
        (root / "runs").mkdir(parents=True, exist_ok=True)
        self.root = root
        self.force = force

    def _stem(self, method: str, seed: int) -> Path:
        return self.root / "runs" / f"{method.replace('+', '-')}-seed{seed}"

    def adapter_path(self, method: str, seed: int) -> Path:
        return self._stem(method, seed).with_suffix(".adaclip")

    def check_protocol(self, protocol: Protocol, settings: dict[str, Any]) -> None:
        """A resumed comparison must use the same splits and settings, or its rows would not be
        comparable; --force starts over (earlier run records are dropped, not resumed)."""
        marker = self.root / PROTOCOL_FILE
        document = json.loads(
            json.dumps(
                {
                    "protocol": protocol.describe(),
                    "test_digest": files_digest(protocol.test, protocol.root),
                    "settings": settings,
                },
                default=str,
            )
        )
        if self.force:
            for record in (self.root / "runs").glob("*.json"):
                record.unlink()
        elif marker.exists():
            try:
                earlier = json.loads(marker.read_text())
            except ValueError:
                earlier = None
            if earlier != document:
                raise UsageError(
                    "the output folder holds runs of a different protocol (data, shots, splits or settings differ)",
                    path=self.root,
                    fix="use another --out-dir, or --force to start over",
                )
        marker.write_text(json.dumps(document, indent=2) + "\n")

    def finished(self, method: str, seed: int) -> RunResult | None:
        record = self._stem(method, seed).with_suffix(".json")
        if not record.exists() or not self.adapter_path(method, seed).exists():
            return None
        try:
            return RunResult.from_dict(json.loads(record.read_text()))
        except (OSError, ValueError, TypeError):
            return None  # a torn record: run it again

    def save_run(self, result: RunResult) -> None:
        path = self._stem(result.method, result.seed).with_suffix(".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result.to_dict()) + "\n")
        tmp.replace(path)

    def keep_best(self, board: Leaderboard) -> str | None:
        """Copy the recommended method's adapter (its seed with the best validation accuracy)."""
        if board.recommended is None:
            return None
        mine = [r for r in board.runs if r.method == board.recommended and r.adapter_path]
        if not mine:
            return None
        best = max(mine, key=lambda r: (r.val_accuracy or 0.0, -r.seed))
        target = self.root / BEST_FILE
        shutil.copyfile(best.adapter_path, target.with_suffix(".tmp"))
        target.with_suffix(".tmp").replace(target)
        return str(target)

    def save_leaderboard(self, board: Leaderboard) -> None:
        path = self.root / RESULTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(board.to_dict(runs=True), indent=2) + "\n")
        tmp.replace(path)
