"""One test-time adaptation run (see adaclip.tta for the modes): `TestTimeAdaptation` streams predictions
and gives the adapted model; `run_tta` runs it over a folder. The run knows models, not Adapters: the
Adapter (adaclip.adapter) makes an adapter of the adapted model.

One file over 400 lines on purpose: the episodic, online and tda modes share the image stream, the
per-process split (adaclip.sharding), the label bookkeeping and the record; split by mode, each module
would restate them."""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..adapter_file import created_at_now
from ..data import StreamingImageDataset, labelled_items, list_images, make_loader, open_data, open_item
from ..distributed import SINGLE
from ..errors import InputError, UsageError
from ..files import IMAGE_EXTENSIONS
from ..labels import resolve_labels
from ..methods import make_method_config, method_registry
from ..methods.rada import RationalMaskHead
from ..model import AdaptedCLIP
from ..predictions import Prediction, top_prediction
from ..sharding import active_context, map_in_order
from ..ui import log, progress
from .objectives import confident_rows, marginal_entropy, online_loss
from .settings import TTASettings, make_tta_settings
from .tda import TDACache
from .views import episodic_views

if TYPE_CHECKING:
    from ..adapter import Adapter


@dataclass
class TTAResult:
    """What a TTA run produced: predictions in input order, the adapted model, and how it went."""

    predictions: list[Prediction]
    model: AdaptedCLIP | None  # None when no registered method adds the mask to the source's (lora, coop)
    n_images: int
    skipped: int
    seconds: float
    labelled: int = 0
    accuracy: float | None = None
    accuracy_before: float | None = None  # the same adapter without adaptation, same images
    record: dict[str, Any] = field(default_factory=dict)
    adapter: Adapter | None = None  # `model` as an Adapter, with the run in its history (set by Adapter.tta)

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")


# ------------------------------------------------------------------------------------------ checks


def output_method(model: AdaptedCLIP) -> str:
    """The method name of the file TTA writes for this model's adapter (UsageError when there is none):
    what its method declares as `masked_variant`."""
    method = type(model.config)
    if not method.has_mask:
        check_adaptable(model)
    target = method.masked_variant
    if target is None or target not in method_registry():
        raise UsageError(
            f"no registered method adds RAda's mask to {method.name!r}, so the adapted file cannot be written",
            fix=f"run without -o (predictions only), or start from {_starts_that_write()}",
        )
    return target


def check_adaptable(model: AdaptedCLIP) -> None:
    """Refuse a method whose scores a mask cannot weigh (its method's `can_hold_mask`)."""
    method = type(model.config)
    if not method.can_hold_mask:
        raise UsageError(
            f"test-time adaptation needs a method that scores image against class features; "
            f"{method.name!r} uses its own classifier weights",
            fix=f"start from {_starts_that_write()}",
        )


def _starts_that_write() -> str:
    """'a zeroshot, rada or ... adapter': the methods whose adapted file TTA can write."""
    registry = method_registry()
    names = sorted(name for name, method in registry.items() if method.masked_variant in registry)
    return f"a {', '.join(names[:-1])} or {names[-1]} adapter"


def list_tta_images(folder: str | Path) -> list[Path]:
    if open_data(folder).kind != "folder":  # a manifest or shards: their images, in their order
        return [item for item, _ in labelled_items(folder)]
    folder = Path(folder)
    if not folder.exists():
        raise InputError("folder not found", path=folder)
    if not folder.is_dir():
        raise InputError("not a folder", path=folder, fix="give a folder of images (searched recursively)")
    images = list_images(folder)
    if not images:
        raise InputError(
            "no images found", path=folder, fix=f"supported extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return images


class TestTimeAdaptation:
    """One TTA run over a list of images, starting from an adapter's `model` (left unchanged). `run()`
    yields predictions in input order (streamable); afterwards `adapted_model()` gives a model with the
    final mask and `record()` the run's entry for the adapted file's history. `source` names the
    adapter's file, for that record."""

    __test__ = False  # not a pytest class

    def __init__(self, model: AdaptedCLIP, settings: TTASettings, *, source: str | None = None):
        self.source_model = model
        self.source_name = source
        self.settings = settings
        self.ctx = SINGLE  # run() joins torchrun's processes, if any
        self.n_images = 0
        self.skipped = 0
        self.seconds = 0.0
        self.correct = 0
        self.correct_before = 0
        self.labelled = 0
        if settings.mode == "tda":  # training-free: the adapter as it is, plus caches
            self.start = "none"
            self.model = model
            self.model.eval()
            return
        check_adaptable(model)
        if model.config.has_mask:
            self.start = "adapter"
            start_head = copy.deepcopy(model.head)
            config = model.config
        else:
            self.start = "identity"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)
                start_head = model.head.with_classifier(RationalMaskHead(model.backbone.embed_dim, settings.mask))
            config = None  # decided when the file is written
        start_head.requires_grad_(True)
        self.model: AdaptedCLIP = model.with_head(start_head, config or model.config)
        self.model.eval()
        self.head = start_head
        self._start_state = {k: v.detach().clone() for k, v in start_head.state_dict().items()}
        self._frozen_start = copy.deepcopy(start_head).requires_grad_(False) if settings.mode == "online" else None
        self.optimizer = self._new_optimizer()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.AdamW(self.head.parameters(), lr=s.effective_lr, weight_decay=s.effective_weight_decay)

    def _reset(self) -> None:
        self.head.load_state_dict(self._start_state)
        self.optimizer = self._new_optimizer()

    # --- running ----------------------------------------------------------------------------------

    def run(self, images: list[Path], truth: list[int | None] | None = None, *, top_k: int = 5) -> Iterator[Prediction]:
        """Adapt on `images` and yield one Prediction per image (unreadable ones with `error`)."""
        started = time.perf_counter()
        self.ctx = active_context(self.model.backbone.device)
        modes = {"episodic": self._episodic_across, "online": self._online, "tda": self._tda}
        steps = modes[self.settings.mode](images)
        try:
            with progress(f"tta ({self.settings.mode})", total=len(images)) as advance:
                for index, path, probs, before in steps:
                    advance(1)
                    yield self._record(index, path, probs, before, truth, top_k)
        finally:
            self.seconds += time.perf_counter() - started
            self.model.eval()

    def _record(self, index, path, probs, before, truth, top_k) -> Prediction:
        if probs is None:
            self.skipped += 1
            return Prediction(str(path), None, None, None, error=before)
        self.n_images += 1
        prediction = top_prediction(str(path), probs, self.source_model.class_names, top_k)
        if truth is not None and truth[index] is not None:
            self.labelled += 1
            self.correct += int(prediction.class_index == truth[index])
            self.correct_before += int(before == truth[index])
            prediction.true_label = self.model.class_names[truth[index]]
        return prediction

    def _class_features(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.class_features()

    def _episodic(self, images: list[Path]):
        backbone = self.model.backbone
        scale = backbone.logit_scale
        eval_transform = backbone.eval_transform()
        augment = backbone.train_transform(self.settings.min_crop_scale)
        fraction = self.settings.effective_confident_fraction
        class_features = self._class_features()
        for index, path in enumerate(images):
            try:
                image = open_item(path)
                pixels = episodic_views(image, self.settings.seed, self.settings.views, eval_transform, augment)
            except Exception as exc:  # noqa: BLE001 - one unreadable image must not end the run
                yield index, path, None, getattr(exc, "reason", f"{type(exc).__name__}: {exc}")
                continue
            with torch.no_grad():
                features = self.model.image_features(pixels)  # (V, D), encoders frozen: once per image
            before, kept = None, None
            for step in range(self.settings.steps):
                logits = self.head(features, class_features, scale).logits  # (V, K)
                if step == 0:  # TPT selects the confident views once, before the first step, and keeps them
                    before = int(logits[0].argmax())
                    kept = confident_rows(logits, fraction)
                loss = marginal_entropy(logits if kept is None else logits[kept])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            with torch.no_grad():
                probs = self.head(features[:1], class_features, scale).logits.float().softmax(dim=-1)[0].cpu()
            self._reset()
            yield index, path, probs, before

    def _episodic_across(self, images: list[Path]):
        """Episodic TTA is per image (reset after each), so under torchrun rank r simply takes images
        r, r+N, ... (a round of N images at a time, gathered in order; adaclip.sharding)."""
        if not self.ctx.enabled:
            yield from self._episodic(images)
            return

        def adapt_part(part: list[tuple[int, Path]]) -> list[tuple]:
            return [(part[i][0], *rest) for i, *rest in self._episodic([path for _, path in part])]

        for results in map_in_order(images, 1, adapt_part, self.ctx):
            yield from results

    def _encoded_batches(self, paths: list[Path]):
        """(positions, paths, features, skipped) per batch of `batch_size` paths, in order. Under
        torchrun each process encodes its batches of every round and every process gets all of them
        (adaclip.sharding), so the steps that follow run on every rank as in one process."""
        transform = self.model.backbone.eval_transform()

        def encode(part: list[Path]) -> Iterator[tuple]:
            dataset = StreamingImageDataset(part, transform)
            for batch in make_loader(dataset, batch_size=self.settings.batch_size, workers=0):
                features = None
                if len(batch.labels):
                    with torch.no_grad():
                        features = self.model.image_features(batch.pixels)
                yield batch.indices.tolist(), batch.paths, features, batch.skipped

        if not self.ctx.enabled:
            yield from encode(paths)
            return

        def encode_part(part: list[tuple[int, Path]]) -> list[tuple]:
            (positions, names, features, skipped), *_ = encode([path for _, path in part])
            return [
                (
                    [part[i][0] for i in positions],
                    names,
                    None if features is None else features.cpu(),
                    [s._replace(index=part[s.index][0]) for s in skipped],
                )
            ]

        device = self.model.backbone.device
        for results in map_in_order(paths, self.settings.batch_size, encode_part, self.ctx):
            for positions, names, features, skipped in results:
                yield positions, names, None if features is None else features.to(device), skipped

    def _stream(self, images: list[Path], predict_batch):
        """Feed the images in a seeded random order (a folder sorted by class would otherwise arrive
        one class at a time), batch by batch, to `predict_batch(features) -> (probs, before)`; yield the
        results back in folder order as soon as all earlier ones are done."""
        order = list(range(len(images)))
        if self.settings.shuffle:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.settings.seed)).tolist()
        pending: dict[int, tuple] = {}
        next_index = 0
        for positions, paths, features, skipped in self._encoded_batches([images[i] for i in order]):
            results = [(s.index, Path(s.path), None, s.reason) for s in skipped]
            if features is not None:
                probs, before = predict_batch(features)
                results += [
                    (index, Path(path), probs[row], before[row])
                    for row, (index, path) in enumerate(zip(positions, paths, strict=True))
                ]
            for position, path, probs, before in results:
                pending[order[position]] = (order[position], path, probs, before)
            while next_index in pending:
                yield pending.pop(next_index)
                next_index += 1

    def _online(self, images: list[Path]):
        scale = self.model.backbone.logit_scale
        class_features = self._class_features()
        running = None

        def adapt_and_predict(features: torch.Tensor):
            nonlocal running
            with torch.no_grad():
                start_logits = self._frozen_start(features, class_features, scale).logits
            for _ in range(self.settings.steps):
                logits = self.head(features, class_features, scale).logits
                loss, marginal = online_loss(logits, start_logits, self.settings, running)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            running = marginal
            with torch.no_grad():
                probs = self.head(features, class_features, scale).logits.float().softmax(dim=-1).cpu()
            return probs, start_logits.argmax(dim=-1).tolist()

        yield from self._stream(images, adapt_and_predict)

    def _tda(self, images: list[Path]):
        cache = TDACache(len(self.model.class_names), self.settings.tda)

        def predict(features: torch.Tensor):
            with torch.no_grad():
                logits = self.model.logits_from_features(features).float()
            adjusted = torch.stack([cache.observe_and_adjust(f, row) for f, row in zip(features, logits, strict=True)])
            return adjusted.softmax(dim=-1).cpu(), logits.argmax(dim=-1).tolist()

        yield from self._stream(images, predict)

    # --- results ----------------------------------------------------------------------------------

    def record(self) -> dict[str, Any]:
        """The entry appended to the adapted file's `tta` history."""
        s = self.settings
        entry: dict[str, Any] = {"mode": s.mode, "seed": s.seed}
        if s.mode != "tda":
            entry.update(steps=s.steps, lr=s.effective_lr, confident_fraction=s.effective_confident_fraction)
        entry.update(
            {
                "n_images": self.n_images,
                "skipped_images": self.skipped,
                "started_from": self.start,
                "source": self.source_name,
                "source_method": self.source_model.config.name,
                "created_at": created_at_now(),
            }
        )
        if s.mode == "episodic":
            entry.update(views=s.views, min_crop_scale=s.min_crop_scale, weight_decay=s.effective_weight_decay)
        elif s.mode == "online":
            entry.update(
                batch_size=s.batch_size,
                diversity_weight=s.diversity_weight,
                diversity_momentum=s.diversity_momentum,
                anchor_weight=s.anchor_weight,
            )
        else:
            entry.update(batch_size=s.batch_size, tda=s.tda.model_dump(mode="json"))
        if self.labelled:
            entry.update(
                labelled=self.labelled,
                accuracy=round(self.correct / self.labelled, 6),
                accuracy_before=round(self.correct_before / self.labelled, 6),
            )
        return entry

    def adapted_model(self) -> AdaptedCLIP:
        """A new model with the current mask (episodic: the starting mask), as the method TTA's adapted
        file is saved as. It shares the backbone and components with the source model, which is left
        unchanged. `Adapter.adapted(model, record)` makes it an adapter."""
        if self.settings.mode == "tda":
            raise UsageError("tda keeps its caches for the stream only: there is no adapted adapter to write")
        method = output_method(self.source_model)
        if self.start == "adapter":
            config = self.model.config
        else:
            source_config = self.source_model.config.model_dump(mode="json")
            config = make_method_config(method, {**source_config, "mask": self.settings.mask.model_dump(mode="json")})
        head = copy.deepcopy(self.head).requires_grad_(True)
        model = self.source_model.with_head(head, config)
        model.eval()
        return model

    def result(self, predictions: list[Prediction]) -> TTAResult:
        try:
            adapted = self.adapted_model()
        except UsageError as exc:  # e.g. lora + mask: predictions are fine, there is just no method to save as
            log.info(f"no adapted adapter: {exc.one_line()}")
            adapted = None
        record = self.record()
        return TTAResult(
            predictions=predictions,
            model=adapted,
            n_images=self.n_images,
            skipped=self.skipped,
            seconds=self.seconds,
            labelled=self.labelled,
            accuracy=record.get("accuracy"),
            accuracy_before=record.get("accuracy_before"),
            record=record,
        )

    def summary_line(self) -> str:
        rate = self.n_images / self.seconds if self.seconds > 0 else float("inf")
        text = f"tta {self.settings.mode}: {self.n_images} images in {self.seconds:.1f}s ({rate:.2f} images/s)" + (
            f", skipped {self.skipped} unreadable" if self.skipped else ""
        )
        if self.labelled:
            text += (
                f"; accuracy {self.correct / self.labelled:.4f} on {self.labelled} labelled images"
                f" (without adaptation {self.correct_before / self.labelled:.4f})"
            )
        return text


def run_tta(
    model: AdaptedCLIP,
    folder: str | Path,
    *,
    class_folders: list[str] | None = None,
    source: str | None = None,
    labels: str | Path | dict | None = None,
    top_k: int = 5,
    **settings: Any,
) -> TTAResult:
    """Adapt the mask of an adapter's `model` on the images under `folder` (recursive); see `Adapter.tta`.
    `class_folders` (the adapter's training folders) let labels name classes by folder."""
    images = list_tta_images(folder)
    truth = resolve_labels(model.class_names, class_folders, folder, images, labels)
    run = TestTimeAdaptation(model, make_tta_settings(**settings), source=source)
    predictions = list(run.run(images, truth, top_k=top_k))
    log.info(run.summary_line())
    return run.result(predictions)
