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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import AdaclipError, UsageError
from ..ui import log, progress
from .leaderboard import COLUMNS, Leaderboard, LeaderboardRow, build_leaderboard
from .protocol import TEST_FRACTION, TEST_SPLIT_SEED, Protocol, images_needed, make_protocol
from .runs import Comparison, RunResult
from .store import RunStore

__all__ = [
    "COLUMNS",
    "TEST_FRACTION",
    "TEST_SPLIT_SEED",
    "Comparison",
    "ComparisonInterrupted",
    "Leaderboard",
    "LeaderboardRow",
    "Protocol",
    "RunResult",
    "build_leaderboard",
    "compare",
    "default_methods",
    "images_needed",
    "make_protocol",
]


class ComparisonInterrupted(AdaclipError):
    """Ctrl-C during compare: the runs finished so far are kept (with an out_dir, on disk)."""

    exit_code = 130


def default_methods() -> list[str]:
    """Every registered method except those that fine-tune the whole backbone (on request only)."""
    from ..methods import list_methods, method_config_class

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
    from ..backbone import Backbone, create_backbone
    from ..methods import method_config_class

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
        from ..methods import make_method_config

        make_method_config(method, settings)  # invalid settings fail before any work
    protocol = make_protocol(data, shots=shots, classes=classes, base_to_new=base_to_new, val_split=val_split)
    if out_dir is not None and Path(out_dir).resolve().is_relative_to(Path(data).resolve()):
        # its runs/ folder would read as a class folder in the next comparison of DATA
        raise UsageError("--out-dir is inside the data folder", path=out_dir, fix="write it elsewhere")
    store = RunStore(Path(out_dir), resume=resume, force=force) if out_dir is not None else None
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
