"""`Adapter`: a backbone + a method's trained parts + the metadata of its file, ready to predict,
evaluate, adapt further at test time, or save. `adaclip.fit` and `adaclip.load` (adaclip.api) make one.

adapter = adaclip.load("pets.adaclip")
adapter.predict(["cat.jpg"], top_k=3)
adapter.evaluate("images/test")
adapter.save("copy.adaclip")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image

from .adapter_file import AdapterMetadata, created_at_now, write_adapter_file
from .backbone import Backbone
from .checks import check_count
from .data import ImageFolder, iter_input_paths, prepare_eval_data
from .errors import InputError, UsageError
from .inference import encode_images_across, logits_in_batches, stream_predictions
from .methods import method_config_class
from .metrics import ClassificationReport, classification_report
from .model import AdaptedCLIP
from .predictions import Prediction, labelled_record, top_prediction
from .sharding import active_context
from .ui import log

if TYPE_CHECKING:
    from .tta import TTAResult


class Adapter:
    """A backbone with a method's trained parts, ready to predict, evaluate, adapt further, or save."""

    def __init__(
        self,
        model: AdaptedCLIP,
        metadata: AdapterMetadata,
        *,
        fit_seconds: float | None = None,
        source_name: str | None = None,
    ):
        self.model = model
        self.metadata = metadata
        self.fit_seconds = fit_seconds
        self.source_name = source_name  # the file name it was loaded from, if any
        model.eval()

    # --- description ------------------------------------------------------------------------------

    @property
    def method(self) -> str:
        return self.metadata.method

    @property
    def backbone(self) -> Backbone:
        return self.model.backbone

    @property
    def class_names(self) -> list[str]:
        return list(self.model.class_names)

    @property
    def trainable_params(self) -> int:
        return self.metadata.trainable_params

    # --- persistence ------------------------------------------------------------------------------

    def save(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the `.adaclip` file atomically (refuses to overwrite unless `force`)."""
        return write_adapter_file(path, self.model.adapter_state(), self.metadata, force=force)

    def merge(self) -> Adapter:
        """Precompute what inference can reuse (e.g. AdaRing's per-layer matrices). Returns self."""
        for component in self.model.components:
            component.merge()
        return self

    def merged(self) -> Adapter:
        """A new adapter whose file stores the merged form (e.g. AdaRing's per-layer matrices instead of
        tensor rings): larger, but predict never reconstructs. Predictions are unchanged."""
        config = self.model.config
        if not config.has_merged_form:
            raise UsageError(f"method {self.method!r} has no merged form", fix="export without --merged")
        if config.merged:
            return self
        states = [c.merged_state() for c in self.model.components]
        if all(state is None for state in states):
            raise UsageError(f"method {self.method!r} has nothing to merge")
        merged_config = config.model_copy(update={"merged": True})
        model = AdaptedCLIP(
            self.backbone, merged_config, self.model.class_names, self.model.templates, seed=self.metadata.seed
        )
        state = self.model.adapter_state()
        for index, component_state in enumerate(states):
            if component_state is not None:
                prefix = f"components.{index}."
                state = {k: v for k, v in state.items() if not k.startswith(prefix)}
                state.update({prefix + k: v for k, v in component_state.items()})
        model.adapt_to_state(state)
        model.load_state_dict(state, strict=True)
        metadata = self.metadata.model_copy(update={"method_config": merged_config.model_dump(mode="json")})
        return Adapter(model, metadata)

    # --- prediction -------------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) for preprocessed pixels (use `backbone.eval_transform()`)."""
        self.model.eval()
        return self.model(pixels.to(self.backbone.device))

    def predict(
        self,
        images: str | Path | Image.Image | Sequence[str | Path | Image.Image],
        *,
        top_k: int = 5,
        batch_size: int = 64,
    ) -> list[Prediction]:
        """Predict labels for image paths, folders, globs or PIL images (unreadable files get `error`)."""
        check_count(batch_size, "--batch-size")
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        pil = [im for im in images if isinstance(im, Image.Image)]
        if pil and len(pil) == len(images):
            transform = self.backbone.eval_transform()
            results = []
            for start in range(0, len(pil), batch_size):
                pixels = torch.stack([transform(im.convert("RGB")) for im in pil[start : start + batch_size]])
                probs = self.logits(pixels).float().softmax(dim=-1).cpu()
                results.extend(self._prediction(None, row, top_k) for row in probs)
            return results
        if pil:
            raise UsageError("pass either PIL images or paths, not a mix")
        return list(self.iter_predict(iter_input_paths([str(p) for p in images]), top_k=top_k, batch_size=batch_size))

    def iter_predict(self, paths: Iterable[Path], *, top_k: int = 5, batch_size: int = 64) -> Iterator[Prediction]:
        """Stream predictions in input order with bounded memory; unreadable images yield an error record."""
        check_count(batch_size, "--batch-size")
        return self._iter_predict(paths, top_k, batch_size)

    def _iter_predict(self, paths: Iterable[Path], top_k: int, batch_size: int) -> Iterator[Prediction]:
        transform = self.backbone.eval_transform()
        ctx = active_context(self.backbone.device)  # under torchrun: this process's share, all gathered
        for item in stream_predictions(self.model, paths, transform, batch_size=batch_size, ctx=ctx):
            if item.probabilities is None:
                yield Prediction(item.path, None, None, None, error=item.error)
            else:
                yield self._prediction(item.path, item.probabilities, top_k)

    @torch.no_grad()
    def predict_features(
        self, features: torch.Tensor, *, top_k: int | Sequence[int] = 5, paths: Sequence[str | None] | None = None
    ) -> list[Prediction]:
        """Predictions for image features already encoded with `model.image_features` (a per-image
        `top_k` may be given). The server encodes once and feeds every frozen-tower adapter this way."""
        self.model.eval()
        probs = self.model.logits_from_features(features).float().softmax(dim=-1).cpu()
        ks = [top_k] * len(probs) if isinstance(top_k, int) else list(top_k)
        names = [None] * len(probs) if paths is None else list(paths)
        return [self._prediction(path, row, k) for path, row, k in zip(names, probs, ks, strict=True)]

    def _prediction(self, path: str | None, probs: torch.Tensor, top_k: int) -> Prediction:
        return top_prediction(path, probs, self.model.class_names, top_k)

    @contextlib.contextmanager
    def classes(self, class_names: list[str] | None) -> Iterator[None]:
        """Temporarily score a different class list (class-agnostic methods)."""
        if class_names is None or list(class_names) == self.model.class_names:
            yield
            return
        original = self.model.class_names
        self.model.set_classes(class_names)
        try:
            yield
        finally:
            self.model.set_classes(original)

    # --- test-time adaptation ----------------------------------------------------------------------

    def tta(
        self,
        folder: str | Path,
        *,
        mode: Literal["episodic", "online", "tda"] = "episodic",
        steps: int = 1,
        views: int = 64,
        lr: float | None = None,
        seed: int = 0,
        labels: str | Path | dict[str, str] | None = None,
        top_k: int = 5,
        **settings: Any,
    ) -> TTAResult:
        """Label-free test-time adaptation of RAda's mask on the images under `folder` (recursive).

        `mode="episodic"`: TPT protocol per image (`views` views, the most confident 10%, entropy of their
        mean, `steps` steps, reset after each image). `mode="online"`: adapts batch by batch without reset,
        guarded against collapse (see adaclip.tta). `mode="tda"`: the training-free TDA baseline (caches of
        test features over the stream; works on any adapter; `result.adapter` is None). Adapters without a
        mask (zeroshot, full-ft) start from
        a fresh identity mask. `labels` ("folders", a CSV of file,label, or a {path: label} dict) only score
        the predictions. Returns predictions in folder order and `result.adapter`, a new Adapter with the
        adapted mask (save it with `.save(path)`; None for methods no registered method combines with
        the mask, e.g. lora); this adapter is left unchanged. Other settings:
        `confident_fraction`, `batch_size`, `min_crop_scale`, `diversity_weight`, `anchor_weight`, `mask`.
        """
        from .tta import run_tta

        result = run_tta(
            self.model,
            folder,
            class_folders=self.metadata.class_folders,
            source=self.source_name,
            labels=labels,
            top_k=top_k,
            mode=mode,
            steps=steps,
            views=views,
            lr=lr,
            seed=seed,
            **settings,
        )
        if result.model is not None:
            result.adapter = self.adapted(result.model, result.record)
        return result

    def adapted(self, model: AdaptedCLIP, tta_record: dict[str, Any]) -> Adapter:
        """A new Adapter around `model`, a test-time-adapted copy of this adapter's model (see
        adaclip.tta), with `tta_record` added to its history. This adapter is left unchanged."""
        metadata = self.metadata.model_copy(deep=True)
        metadata.method = model.config.name
        metadata.method_config = model.config.model_dump(mode="json")
        metadata.trainable_params = model.n_trainable()
        metadata.created_at = created_at_now()
        metadata.tta = [*metadata.tta, tta_record]
        return Adapter(model, metadata)

    # --- evaluation -------------------------------------------------------------------------------

    def evaluate(
        self,
        data: str | Path | ImageFolder,
        *,
        classes_file: str | Path | None = None,
        batch_size: int = 64,
        workers: int | None = None,
        keep_predictions: bool = False,
        top_k: int = 5,
    ) -> ClassificationReport:
        """Accuracy (acc1), top-5 accuracy (acc5), mean per-class recall, macro-F1, per-class scores and
        confusion matrix on a labelled folder (`report.metrics` has CLIP_benchmark's key names). With
        `keep_predictions`, `report.predictions` holds one record per image (path, true label, top_k).

        The folder's classes may be a subset of the adapter's (scored among all adapter classes), or,
        for class-agnostic methods, entirely new class names (scored among the folder's classes).
        """
        check_count(batch_size, "--batch-size")
        check_count(workers, "--workers", minimum=0, optional=True)
        folder = data if isinstance(data, ImageFolder) else prepare_eval_data(data, classes_file)
        label_map, class_names = self._align_classes(folder.folders, folder.class_names)
        with self.classes(class_names):
            encoded = encode_images_across(
                self.model,
                folder.images,
                self.backbone.eval_transform(),
                batch_size=batch_size,
                workers=workers,
                description="evaluating",
                ctx=active_context(self.backbone.device),
            )
            if len(encoded.labels) == 0:
                raise InputError("no readable images to evaluate", path=folder.root)
            logits = logits_in_batches(self.model, encoded.features).float().cpu()
        predictions = logits.argmax(dim=-1)
        truth = torch.tensor([label_map[i] for i in encoded.labels.tolist()])
        report = classification_report(truth, predictions, class_names, scores=logits)
        report.skipped_images = len(encoded.skipped)
        if keep_predictions:
            probabilities = logits.softmax(dim=-1)
            report.predictions = [
                labelled_record(str(folder.images[index].path), row, true_index, class_names, top_k)
                for row, index, true_index in zip(probabilities, encoded.indices.tolist(), truth.tolist(), strict=True)
            ]
        return report

    def _align_classes(self, folders: list[str], names: list[str]) -> tuple[list[int], list[str]]:
        """Map a labelled folder's classes onto the classes to score among."""
        own_folders = self.metadata.class_folders or []
        if folders == own_folders or (not own_folders and names == self.model.class_names):
            return list(range(len(folders))), self.model.class_names
        if own_folders and set(folders) <= set(own_folders):
            position = {f: i for i, f in enumerate(own_folders)}
            return [position[f] for f in folders], self.model.class_names
        if not method_config_class(self.method).class_agnostic:
            raise InputError(
                f"the folder's classes are not the {len(own_folders or self.model.class_names)} classes "
                f"this {self.method} adapter was trained on",
                fix="evaluate on folders named like the training classes",
            )
        log.info(f"scoring among the folder's {len(names)} class names (new to this adapter)")
        return list(range(len(folders))), names
