"""open_clip backbones: every open_clip model name (with a pretrained tag, a local checkpoint or random
weights) and `hf-hub:ORG/NAME` repos, built through open_clip's own factory.

What adaclip adds on top: weights that fail fast when they cannot be had (adaclip.weights), a record of
exactly which weights were used (the identity adapter files keep), and quiet open_clip logging.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackboneUnavailableError, UsageError, arg, first_line
from ..identity import BackboneIdentity
from ..transforms import preprocess_from_open_clip
from ..ui import log
from ..weights import HF_HUB_PREFIX, file_sha256, hub_files, resolve_pretrained_tag
from .encoder import Backbone
from .registry import DEFAULT_PRETRAINED, register_backbone


@register_backbone(other_names=True)
def create_open_clip(
    name: str, pretrained: str | None, *, device: torch.device, precision: str, cache_dir: str | None
) -> Backbone:
    """An open_clip model name with a pretrained tag, a local checkpoint file, or `none`."""
    import open_clip

    _register_extra_model_configs()
    if name not in open_clip.list_models():
        raise UsageError(
            f"unknown backbone {name!r}",
            fix=f"see `python -c 'import open_clip; print(open_clip.list_models())'`, or use {arg('backbone', 'lite')}",
        )
    pretrained = pretrained or "none"
    create_kwargs: dict[str, Any] = {}
    checkpoint_sha = checkpoint_hint = None
    if pretrained.lower() == "none":
        pretrained = "none"
        log.warning(f"{name}: random weights ({arg('pretrained', 'none')}); predictions are meaningless")
        weights: str | None = None
    elif Path(pretrained).expanduser().is_file():
        path = Path(pretrained).expanduser()
        weights = str(path)
        checkpoint_sha = file_sha256(path)
        checkpoint_hint = str(path.resolve())
        pretrained = path.name
    else:
        weights, create_kwargs = resolve_pretrained_tag(name, pretrained, cache_dir)

    try:
        # Random weights (`none`) are seeded, so every process builds the same "random" backbone and
        # adapters trained on it stay loadable.
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(
                name, pretrained=weights, device=device, cache_dir=cache_dir, **create_kwargs
            )
    except BackboneUnavailableError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise BackboneUnavailableError(
            f"cannot load {name} weights from {pretrained!r} ({first_line(exc)})",
            fix="check that the checkpoint is an open_clip state dict for this model",
        ) from None
    tokenizer = open_clip.get_tokenizer(name)
    return wrap_model(model, tokenizer, name, pretrained, checkpoint_sha, checkpoint_hint, device, precision)


@register_backbone(prefix=HF_HUB_PREFIX)
def create_from_hub(
    name: str, pretrained: str | None, *, device: torch.device, precision: str, cache_dir: str | None
) -> Backbone:
    """`hf-hub:org/name`, as open_clip reads it: the repo's open_clip_config.json and its weights
    (open_clip_model.safetensors, else open_clip_pytorch_model.bin). `pretrained` is a revision of the
    repo (default: main), or `none` for random weights on the repo's architecture. Files in the Hugging
    Face cache load offline; otherwise the hub is probed for a few seconds before downloading. The
    identity records the commit the files came from, so predict/eval load exactly those files again."""
    import open_clip

    repo_id = name[len(HF_HUB_PREFIX) :]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise UsageError(
            f"{name!r} is not a Hugging Face Hub model id",
            fix=f"use {arg('backbone', 'hf-hub:ORG/NAME')}, e.g. hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K",
        )
    if pretrained and Path(pretrained).expanduser().is_file():
        raise UsageError(
            f"{arg('pretrained', pretrained)} does not apply to an hf-hub backbone: its weights come from the repo",
            fix=f"omit {arg('pretrained')}, or give a revision of {repo_id}",
        )
    random_weights = pretrained is not None and pretrained.lower() == "none"
    default = pretrained in (None, "", "default", DEFAULT_PRETRAINED)  # the API's default tag means "main"
    revision = None if default or random_weights else pretrained
    config_path, weights_path = hub_files(repo_id, revision, cache_dir, need_weights=not random_weights)
    snapshot = Path(config_path).parent  # .../snapshots/<commit>/: the files of one commit
    if random_weights:
        log.warning(f"{name}: random weights ({arg('pretrained', 'none')}); predictions are meaningless")
    try:
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            # open_clip's local-dir form reads the same config file its hf-hub form downloads; weights
            # are loaded explicitly (open_clip's hub path warns and goes on without them when missing).
            model = open_clip.create_model(
                f"local-dir:{snapshot}", load_weights=False, pretrained_text=False, device=device
            )
            if weights_path is not None:
                open_clip.load_checkpoint(model, weights_path)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{snapshot}")
    except (RuntimeError, KeyError, ValueError, OSError, TypeError) as exc:
        raise BackboneUnavailableError(
            f"cannot build {name} from its files ({first_line(exc)})",
            path=snapshot,
            fix="check that the repo is an open_clip model (open_clip_config.json with model_cfg, and its weights)",
        ) from None
    return wrap_model(
        model, tokenizer, name, "none" if random_weights else snapshot.name, None, None, device, precision
    )


def wrap_model(
    model: nn.Module,
    tokenizer: Callable,
    name: str,
    pretrained: str,
    checkpoint_sha: str | None,
    checkpoint_hint: str | None,
    device: torch.device,
    precision: str,
) -> Backbone:
    """An open_clip model (weights loaded) as a Backbone, with the identity adapter files record."""
    preprocess = preprocess_from_open_clip(model.visual.preprocess_cfg)
    identity = BackboneIdentity(
        name=name,
        pretrained=pretrained,
        checkpoint_sha256=checkpoint_sha,
        checkpoint_hint=checkpoint_hint,
        embed_dim=_embed_dim(model, device, preprocess.size),
        image_size=preprocess.size,
    )
    return Backbone(model, tokenizer, preprocess, identity, device, precision)


def _embed_dim(model: nn.Module, device: torch.device, size: int) -> int:
    text_projection = getattr(model, "text_projection", None)
    if isinstance(text_projection, torch.Tensor):
        return int(text_projection.shape[-1])
    with torch.no_grad():
        return int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])


def _register_extra_model_configs() -> None:
    """Model configs from ADACLIP_MODEL_CONFIGS (folders or JSON files, os.pathsep-separated): custom
    architectures become backbone names without editing open_clip."""
    import open_clip

    for entry in filter(None, os.environ.get("ADACLIP_MODEL_CONFIGS", "").split(os.pathsep)):
        if not Path(entry).exists():
            raise UsageError("ADACLIP_MODEL_CONFIGS names a path that does not exist", path=entry)
        open_clip.add_model_config(entry)


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs through the root logger (e.g. 'No pretrained weights loaded'); adaclip says what
    matters itself, on stderr, once."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*QuickGELU.*")
            yield
    finally:
        root.setLevel(level)
