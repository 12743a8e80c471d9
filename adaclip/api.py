"""The library's entry points: `fit` trains an adapter, `load` reads one, `zero_shot_adapter` makes one
with nothing trained. They return an `Adapter` (adaclip.adapter); `adaclip.compare` is in adaclip.comparison.

import adaclip
adapter = adaclip.fit("images/", method="linear-probe", backbone="lite", shots=16)
adapter.save("pets.adaclip")
adapter = adaclip.load("pets.adaclip")
adapter.predict(["cat.jpg"], top_k=3)
adapter.evaluate("images/test")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import torch

from .adapter import Adapter
from .adapter_file import (
    AdapterMetadata,
    DataRecord,
    check_writable_metadata,
    created_at_now,
    read_adapter_file,
    read_adapter_header,
)
from .backbone import DEFAULT_BACKBONE, DEFAULT_PRETRAINED, Backbone, create_backbone
from .checks import check_count, check_seed
from .data import TrainingData, check_class_names, check_classes_readable, prepare_training_data, read_name_list
from .device import select_device
from .distributed import context_from_env, device_for_rank, init_distributed
from .errors import AdapterFileError, InputError, UsageError, arg
from .files import check_output_path
from .methods import make_method_config, method_config_class, recorded_method_config
from .model import AdaptedCLIP
from .templates import resolve_templates
from .training import CheckpointPolicy, EpochCallback, StepCallback, train
from .ui import log


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
    metadata = adapter_metadata(model, seed=seed, data=training_data)
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
    model = AdaptedCLIP(backbone_obj, make_method_config("zeroshot"), list(class_names), template_list)
    return Adapter(model, adapter_metadata(model, seed=0))


def adapter_metadata(model: AdaptedCLIP, *, seed: int, data: TrainingData | None = None) -> AdapterMetadata:
    """What the file of a newly made adapter records about `model` (created now): its backbone, method
    and settings, classes, templates, preprocessing and trainable-parameter count, the `seed` it was
    made with, and, when it was trained, the training images `data` it was trained on. Every writer of a
    new adapter (fit, zero_shot_adapter, the speed benchmark) builds its metadata here."""
    return AdapterMetadata(
        created_at=created_at_now(),
        backbone=model.backbone.identity,
        method=model.config.name,
        method_config=model.config.model_dump(mode="json"),
        class_names=list(model.class_names),
        class_folders=data.folders if data is not None else None,
        templates=list(model.templates),
        preprocess=model.backbone.preprocess,
        seed=seed,
        trainable_params=model.n_trainable(),
        data=DataRecord(**data.describe()) if data is not None else None,
    )


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
    config = recorded_method_config(header.method, header.method_config)
    dist_ctx = context_from_env()
    if dist_ctx.enabled:  # torchrun: one GPU per local rank; rank 0 reports for all (adaclip.sharding)
        device = device_for_rank(dist_ctx, select_device(device))
        if not dist_ctx.is_main:
            log.configure(quiet=True)
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
