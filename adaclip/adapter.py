"""The user-facing objects: `Adapter` (a backbone + trained method + metadata) and `fit` / `load`.

import adaclip
adapter = adaclip.fit("images/", method="linear-probe", backbone="lite", shots=16)
adapter.save("pets.adaclip")
adapter = adaclip.load("pets.adaclip")
adapter.predict(["cat.jpg"], top_k=3)
adapter.evaluate("images/test")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from PIL import Image

from .adapter_file import (
    AdapterMetadata,
    DataRecord,
    check_writable_metadata,
    created_at_now,
    read_adapter_file,
    read_adapter_header,
    write_adapter_file,
)
from .backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, Backbone, create_backbone
from .checks import check_count, check_seed
from .data import (
    ImageFolder,
    TrainingData,
    check_class_names,
    check_classes_readable,
    iter_input_paths,
    prepare_eval_data,
    prepare_training_data,
    read_name_list,
)
from .device import select_device
from .distributed import context_from_env, device_for_rank, init_distributed
from .errors import AdapterFileError, InputError, UsageError, arg
from .files import check_output_path
from .inference import encode_images, logits_in_batches, stream_predictions
from .methods import make_method_config, method_config_class
from .metrics import ClassificationReport, classification_report
from .model import AdaptedCLIP
from .templates import resolve_templates
from .training import CheckpointPolicy, EpochCallback, StepCallback, train
from .ui import log

if TYPE_CHECKING:
    from .tta import TTAResult


@dataclass
class Prediction:
    """One image's result: best label and score, and the top-k (label, probability) pairs."""

    path: str | None
    label: str | None
    score: float | None
    class_index: int | None
    top_k: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None
    true_label: str | None = None  # set when the caller knows the answer (e.g. `tta --labels`)

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"path": self.path, "label": self.label, "score": self.score}
        record["top_k"] = [{"label": label, "score": score} for label, score in self.top_k]
        if self.true_label is not None:
            record["true_label"] = self.true_label
        if self.error:
            record["error"] = self.error
        return record


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

    def info(self) -> dict[str, Any]:
        """The metadata plus the parameter breakdown, as plain data."""
        document = self.metadata.model_dump(mode="json")
        document["parameter_breakdown"] = self.model.parameter_breakdown()
        return document

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
        if "merged" not in type(config).model_fields:
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
        for item in stream_predictions(self.model, paths, transform, batch_size=batch_size):
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
        k = max(1, min(top_k, len(probs)))
        scores, indices = probs.topk(k)
        names = self.model.class_names
        pairs = [(names[i], round(float(s), 6)) for s, i in zip(scores.tolist(), indices.tolist(), strict=True)]
        return Prediction(path, pairs[0][0], pairs[0][1], int(indices[0]), pairs)

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

        return run_tta(
            self, folder, labels=labels, top_k=top_k, mode=mode, steps=steps, views=views, lr=lr, seed=seed, **settings
        )

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
            encoded = encode_images(
                self.model,
                folder.images,
                self.backbone.eval_transform(),
                batch_size=batch_size,
                workers=workers,
                description="evaluating",
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
            report.predictions = []
            for row, index, true_index in zip(probabilities, encoded.indices.tolist(), truth.tolist(), strict=True):
                scores, best = row.topk(max(1, min(top_k, len(class_names))))
                report.predictions.append(
                    {
                        "path": str(folder.images[index].path),
                        "true_label": class_names[true_index],
                        "label": class_names[int(best[0])],
                        "correct": int(best[0]) == true_index,
                        "score": round(float(scores[0]), 6),
                        "top_k": [
                            {"label": class_names[int(i)], "score": round(float(v), 6)}
                            for v, i in zip(scores.tolist(), best.tolist(), strict=True)
                        ],
                    }
                )
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


# ------------------------------------------------------------------------------------------ fit / load


def fit(
    data: str | Path | TrainingData,
    method: str = "adaring",
    *,
    backbone: str | Backbone = DEFAULT_BACKBONE,
    pretrained: str | None = DEFAULT_PRETRAINED,
    shots: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    classes: str | Path | None = None,
    templates: str | list[str] | None = "default",
    val_split: float | Literal["auto"] = "auto",
    device: str | None = None,
    precision: str = "auto",
    config: dict[str, Any] | None = None,
    workers: int | None = None,
    cache_dir: str | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    deterministic: bool = False,
    on_epoch_end: EpochCallback | None = None,
    on_step_end: StepCallback | None = None,
    **settings: Any,
) -> Adapter:
    """Train `method` on the image folder `data` and return the adapter (save it with `.save(path)`).

    Method settings (see `adaclip info --method NAME`) come as keyword arguments or a `config` dict,
    e.g. `fit(data, "adaring", ranks=[2, 4])` or `config={"train": {"weight_decay": 0.01}}`;
    `epochs`, `batch_size` and `lr` override the method's training recipe.

    `data` may also be a prepared `TrainingData` (its own train and validation images, as `compare`
    chooses them); then `classes`, `shots` and `val_split` must be left at their defaults.

    `checkpoint` is a file to save resumable state to after every epoch (and every `checkpoint_every`
    steps); `resume=True` continues from it. Under torchrun, every process calls fit() and gets the same
    adapter; only rank 0 should save it (`adaclip fit` does this).
    """
    # Everything that can be refused is refused here, before the backbone is built or a step is taken.
    check_seed(seed)
    check_count(workers, "--workers", minimum=0, optional=True)
    created_at_now()  # a SOURCE_DATE_EPOCH that is not a time fails now, not at save
    if checkpoint is not None:
        check_output_path(checkpoint, force=True)
    overrides = _merge_train_overrides({**(config or {}), **settings}, epochs=epochs, batch_size=batch_size, lr=lr)
    method_config = make_method_config(method, overrides)
    template_list = resolve_templates(templates)
    if isinstance(data, TrainingData):
        if classes is not None or shots is not None or val_split != "auto":
            raise UsageError("classes, shots and val_split are already chosen in the TrainingData given")
        training_data = data
    else:
        training_data = prepare_training_data(data, classes_file=classes, shots=shots, seed=seed, val_split=val_split)
    for note in training_data.notes:
        log.warning(note)
    check_classes_readable(training_data)
    dist_ctx = context_from_env()
    if not dist_ctx.is_main:
        log.configure(quiet=True)  # one voice: rank 0 reports for all processes
    if isinstance(backbone, Backbone):
        backbone_obj = backbone
    else:
        torch_device = device_for_rank(dist_ctx, select_device(device))
        backbone_obj = create_backbone(
            backbone, pretrained, device=torch_device, precision=precision, cache_dir=cache_dir
        )
    init_distributed(dist_ctx, backbone_obj.device)
    if deterministic:
        use_deterministic_algorithms()
    model = AdaptedCLIP(backbone_obj, method_config, training_data.class_names, template_list, seed=seed)
    log.info(
        f"{method}: {len(training_data.train)} training images, {len(training_data.class_names)} classes, "
        f"{model.n_trainable():,} trainable parameters, validation: {training_data.val_source}"
    )
    policy = None
    if checkpoint is not None:
        fingerprint = {
            "method": method,
            "method_config": method_config.model_dump(mode="json"),
            "seed": seed,
            "files_digest": training_data.files_digest,
            "class_names": training_data.class_names,
            "templates": template_list,
            "backbone": backbone_obj.identity.model_dump(mode="json", exclude={"checkpoint_hint"}),
        }
        policy = CheckpointPolicy(Path(checkpoint), checkpoint_every, resume, fingerprint)
    elif resume:
        raise UsageError("resume needs a checkpoint path")
    metadata = AdapterMetadata(
        created_at=created_at_now(),
        backbone=backbone_obj.identity,
        method=method,
        method_config=method_config.model_dump(mode="json"),
        class_names=training_data.class_names,
        class_folders=training_data.folders,
        templates=template_list,
        preprocess=backbone_obj.preprocess,
        seed=seed,
        trainable_params=model.n_trainable(),
        data=DataRecord(**training_data.describe()),
    )
    check_writable_metadata(metadata)  # what the file records must encode: known now, not after training
    outcome = train(
        model,
        training_data,
        seed=seed,
        workers=workers,
        dist_ctx=dist_ctx,
        checkpoint=policy,
        on_epoch_end=on_epoch_end,
        on_step_end=on_step_end,
    )
    # Some heads create their parameters while training (Tip-Adapter-F's cache keys): count them after.
    metadata = metadata.model_copy(
        update={"created_at": created_at_now(), "training": outcome.record, "trainable_params": model.n_trainable()}
    )
    return Adapter(model, metadata, fit_seconds=outcome.seconds)


def use_deterministic_algorithms() -> None:
    """Ask torch for deterministic kernels (CUDA needs a cuBLAS workspace setting for that)."""
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


def _merge_train_overrides(config: dict[str, Any] | None, **train_values: Any) -> dict[str, Any]:
    merged = dict(config or {})
    chosen = {k: v for k, v in train_values.items() if v is not None}
    if chosen:
        merged["train"] = {**(merged.get("train") or {}), **chosen}
    return merged


def zero_shot_adapter(
    class_names: list[str] | str | Path,
    *,
    backbone: str | Backbone = DEFAULT_BACKBONE,
    pretrained: str | None = DEFAULT_PRETRAINED,
    templates: str | list[str] | None = "default",
    device: str | None = None,
    precision: str = "auto",
    cache_dir: str | None = None,
) -> Adapter:
    """A zero-shot adapter for a list of class names (or a class file): nothing trained, a valid file."""
    if isinstance(class_names, (str, Path)):
        class_names = read_name_list(Path(class_names))
    check_class_names(list(class_names), "the class list")
    if len(class_names) < 2:
        raise InputError("zero-shot classification needs at least 2 class names")
    backbone_obj = (
        backbone
        if isinstance(backbone, Backbone)
        else create_backbone(backbone, pretrained, device=device, precision=precision, cache_dir=cache_dir)
    )
    template_list = resolve_templates(templates)
    config = make_method_config("zeroshot")
    model = AdaptedCLIP(backbone_obj, config, list(class_names), template_list)
    metadata = AdapterMetadata(
        created_at=created_at_now(),
        backbone=backbone_obj.identity,
        method="zeroshot",
        method_config=config.model_dump(mode="json"),
        class_names=list(class_names),
        templates=template_list,
        preprocess=backbone_obj.preprocess,
        seed=0,
        trainable_params=0,
    )
    return Adapter(model, metadata)


def weights_source(header: AdapterMetadata, path: Path, pretrained: str | None = None) -> str:
    """Where the backbone weights of an adapter come from: `pretrained` if given, else the recorded tag,
    or for a local checkpoint the file where it was trained (its sha256 is checked once loaded).
    Raises before any weights are read when that file is gone."""
    if pretrained is not None:
        return pretrained
    if not header.backbone.checkpoint_sha256:
        return header.backbone.pretrained
    hint = header.backbone.checkpoint_hint
    if not (hint and Path(hint).is_file()):
        where = f", no longer at {hint}" if hint else ""
        raise AdapterFileError(
            f"this adapter was trained on a local checkpoint ({header.backbone.pretrained}{where})",
            path=path,
            fix=f"pass {arg('pretrained', '/path/to/that/checkpoint')}",
        )
    log.info(f"backbone weights: {hint}, where the adapter was trained (its sha256 is checked)")
    return hint


def load(
    path: str | Path,
    *,
    backbone: Backbone | None = None,
    pretrained: str | None = None,
    device: str | None = None,
    precision: str = "auto",
    cache_dir: str | None = None,
) -> Adapter:
    """Read an adapter file, build its backbone (or check the given one matches) and restore its state.

    `pretrained` replaces the recorded weights source (e.g. a local copy of the same checkpoint); a
    checkpoint file must have the same sha256 as the one the adapter was trained with.
    """
    path = Path(path)
    header = read_adapter_header(path)
    method_config_class(header.method)  # unknown method -> clear error before any heavy work
    config = make_method_config(header.method, header.method_config)
    if backbone is None:
        source = weights_source(header, path, pretrained)
        backbone = create_backbone(
            header.backbone.name, source, device=device, precision=precision, cache_dir=cache_dir
        )
    problem = header.backbone.mismatch(backbone.identity)
    if problem:
        raise AdapterFileError(
            f"adapter was trained on {header.backbone.describe()} but the backbone given does not match: {problem}",
            path=path,
            fix="use the backbone and weights the adapter was trained with",
        )
    metadata, tensors = read_adapter_file(path)
    with log.warnings_as_detail():  # what building the method warns about was said when it was fitted
        model = AdaptedCLIP(backbone, config, metadata.class_names, metadata.templates, seed=metadata.seed)
    model.adapt_to_state(tensors)
    expected = model.adapter_state()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise AdapterFileError(
            f"adapter tensors do not fit {metadata.method} on this backbone "
            f"(missing: {missing[:3]}, unexpected: {unexpected[:3]})",
            path=path,
        )
    for name, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise AdapterFileError(
                f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}",
                path=path,
            )
        if tensor.dtype != expected[name].dtype:
            raise AdapterFileError(f"tensor {name} is {tensor.dtype}, expected {expected[name].dtype}", path=path)
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return Adapter(model, metadata, source_name=path.name)
