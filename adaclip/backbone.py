"""Backbones: one factory turns a model name + pretrained tag (or checkpoint file) into a frozen CLIP.

`create_backbone("ViT-B-16", "openai")` wraps open_clip's own factory and adds what adaclip needs on
top: weights that fail fast when they cannot be had (no minute of hub retries), a record of exactly
which weights were used (for adapter files), the device and precision policy, and the image
transforms. `create_backbone("lite")` builds the embedded offline backbone (adaclip.lite).

The backbone is always frozen and in eval mode: methods add their trainable parts around it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import socket
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import transforms as T

from .defaults import DEFAULT_BACKBONE, DEFAULT_PRETRAINED
from .errors import BackboneUnavailableError, UsageError, arg
from .identity import BackboneIdentity, PreprocessConfig
from .ui import log

LITE_NAME = "lite"
HF_HUB_PREFIX = "hf-hub:"  # open_clip's prefix for models (config + weights) in a Hugging Face Hub repo
NETWORK_PROBE_SECONDS = 3.0

Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass
class Towers:
    """The two encoders as module subtrees, for methods that inject into them."""

    image: nn.Module
    text: nn.Module


class Backbone:
    """A frozen CLIP-style dual encoder with its tokenizer, transforms, device and precision."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        preprocess: PreprocessConfig,
        identity: BackboneIdentity,
        device: torch.device,
        precision: str,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.identity = identity
        self.device = device
        self.precision = precision
        # Which AdaptedCLIP's components apply to the pass running now (see Component.active); None
        # outside a model's pass, so the backbone used directly is always the plain frozen model.
        self.active_token: object | None = None
        model.requires_grad_(False)
        model.eval()
        # Frozen: a plain float, so no method can train it by accident.
        self.logit_scale = float(model.logit_scale.detach().exp().clamp(max=100.0).item())

    # --- properties -------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.identity.name

    @property
    def embed_dim(self) -> int:
        return self.identity.embed_dim

    @property
    def towers(self) -> Towers:
        text = getattr(self.model, "text", None)
        if text is None:  # open_clip's CLIP keeps the text tower's parts on the model itself
            text = self.model.transformer
        return Towers(image=self.model.visual, text=text)

    # --- encoding ---------------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("bf16", "fp16") and self.device.type in ("cuda", "cpu"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised float32 image embeddings (B, D)."""
        with self.autocast():
            return self.model.encode_image(pixels.to(self.device, non_blocking=True)).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised float32 text embeddings (N, D)."""
        with self.autocast():
            return self.model.encode_text(tokens.to(self.device)).float()

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts)

    def encode_prompts(self, class_names: list[str], templates: list[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised class embeddings (K, D): each class's template embeddings averaged (CLIP's ensemble).

        Gradients flow when the text tower carries trainable parts; callers use no_grad otherwise.
        """
        prompts = [template.format(name) for name in class_names for template in templates]
        chunks = []
        for start in range(0, len(prompts), batch_size):
            tokens = self.tokenize(prompts[start : start + batch_size])
            chunks.append(F.normalize(self.encode_text(tokens), dim=-1))
        per_prompt = torch.cat(chunks).view(len(class_names), len(templates), -1)
        return F.normalize(per_prompt.mean(dim=1), dim=-1)

    # --- transforms -------------------------------------------------------------------------------

    def eval_transform(self) -> Callable:
        return image_transform(self.preprocess, train=False)

    def train_transform(self, min_scale: float = 0.5) -> Callable:
        return image_transform(self.preprocess, train=True, min_scale=min_scale)

    def sample_image(self) -> torch.Tensor:
        """A (1, 3, H, W) zero image on the device: for shape probes."""
        size = self.preprocess.size
        return torch.zeros(1, 3, size, size, device=self.device)


# ------------------------------------------------------------------------------------------ transforms

_INTERPOLATION = {
    "bicubic": T.InterpolationMode.BICUBIC,
    "bilinear": T.InterpolationMode.BILINEAR,
    "nearest": T.InterpolationMode.NEAREST,
}


def image_transform(cfg: PreprocessConfig, *, train: bool, min_scale: float = 0.5) -> Callable:
    """PIL RGB image -> normalised tensor. Training adds random resized crop + horizontal flip (the
    CoOp / CLIP-LoRA few-shot recipe); evaluation resizes and centre-crops like open_clip."""
    interp = _INTERPOLATION[cfg.interpolation]
    normalize = T.Normalize(cfg.mean, cfg.std)
    if train:
        return T.Compose(
            [
                T.RandomResizedCrop(cfg.size, scale=(min_scale, 1.0), interpolation=interp, antialias=True),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                normalize,
            ]
        )
    if cfg.resize_mode == "squash":
        resize: list = [T.Resize((cfg.size, cfg.size), interpolation=interp, antialias=True)]
    elif cfg.resize_mode == "longest":
        resize = [_ResizeLongestPad(cfg.size, interp)]
    else:
        resize = [T.Resize(cfg.size, interpolation=interp, antialias=True), T.CenterCrop(cfg.size)]
    return T.Compose([*resize, T.ToTensor(), normalize])


class _ResizeLongestPad:
    """Resize so the longest side fits, then pad to a square (open_clip's `longest` mode)."""

    def __init__(self, size: int, interp):
        self.size = size
        self.interp = interp

    def __repr__(self) -> str:  # parameters, not identity: equal transforms share encodings (inference)
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interp})"

    def __call__(self, img):
        w, h = img.size
        scale = self.size / max(w, h)
        img = T.functional.resize(img, [max(1, round(h * scale)), max(1, round(w * scale))], self.interp)
        w, h = img.size
        left, top = (self.size - w) // 2, (self.size - h) // 2
        return T.functional.pad(img, [left, top, self.size - w - left, self.size - h - top], fill=0)


# ------------------------------------------------------------------------------------------ device


def select_device(device: str | None = None) -> torch.device:
    """`auto` (or None) picks cuda, then mps, then cpu."""
    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}", fix="use auto, cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"{arg('device', device)} asked for, but CUDA is not available here", fix=f"use {arg('device', 'cpu')}"
        )
    return chosen


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on CUDA (fast, no loss scaling needed), fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise UsageError(f"unknown precision {precision!r}", fix="use auto, fp32, bf16 or fp16")
    if precision == "fp16" and device.type != "cuda":
        raise UsageError("fp16 needs a CUDA device", fix=f"use {arg('precision', 'fp32')} or bf16")
    return precision


# ------------------------------------------------------------------------------------------ factory


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    pretrained: str | None = DEFAULT_PRETRAINED,
    *,
    device: str | torch.device | None = None,
    precision: str = "auto",
    cache_dir: str | None = None,
) -> Backbone:
    """Build a frozen backbone.

    name:       any open_clip model name (`open_clip.list_models()`), `hf-hub:org/name` (an open_clip
                model repo on the Hugging Face Hub), or `lite` (embedded, offline).
    pretrained: an open_clip pretrained tag, a local checkpoint file, or `none` (random weights, for
                timing and tests); for `hf-hub:` names, a revision of the repo (default main) or `none`.
                Weights that are not cached fail within seconds when the hub is unreachable, with a
                message saying how to get them.
    """
    torch_device = device if isinstance(device, torch.device) else select_device(device)
    precision = resolve_precision(precision, torch_device)
    if name == LITE_NAME:
        return _create_lite(pretrained, torch_device, precision)
    if name.startswith(HF_HUB_PREFIX):
        return _create_from_hub(name, pretrained, torch_device, precision, cache_dir)

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
        weights, create_kwargs = _resolve_pretrained_tag(name, pretrained, cache_dir)

    try:
        # Random weights (`none`) are seeded, so every process builds the same "random" backbone and
        # adapters trained on it stay loadable.
        with _quiet_open_clip(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = open_clip.create_model(
                name, pretrained=weights, device=torch_device, cache_dir=cache_dir, **create_kwargs
            )
    except BackboneUnavailableError:
        raise
    except (RuntimeError, KeyError, ValueError, OSError) as exc:
        raise BackboneUnavailableError(
            f"cannot load {name} weights from {pretrained!r} ({_first_line(exc)})",
            fix="check that the checkpoint is an open_clip state dict for this model",
        ) from None
    tokenizer = open_clip.get_tokenizer(name)
    return _wrap(model, tokenizer, name, pretrained, checkpoint_sha, checkpoint_hint, torch_device, precision)


def _wrap(
    model: nn.Module,
    tokenizer: Callable,
    name: str,
    pretrained: str,
    checkpoint_sha: str | None,
    checkpoint_hint: str | None,
    torch_device: torch.device,
    precision: str,
) -> Backbone:
    """An open_clip model (weights loaded) as a Backbone, with the identity adapter files record."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else int(cfg["size"][0])
    preprocess = PreprocessConfig(
        size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"),
        resize_mode=cfg.get("resize_mode", "shortest"),
    )
    embed_dim = _embed_dim(model, torch_device, size)
    identity = BackboneIdentity(
        name=name,
        pretrained=pretrained,
        checkpoint_sha256=checkpoint_sha,
        checkpoint_hint=checkpoint_hint,
        embed_dim=embed_dim,
        image_size=size,
    )
    return Backbone(model, tokenizer, preprocess, identity, torch_device, precision)


def _create_from_hub(
    name: str, pretrained: str | None, device: torch.device, precision: str, cache_dir: str | None
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
    config_path, weights_path = _hub_files(repo_id, revision, cache_dir, need_weights=not random_weights)
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
            f"cannot build {name} from its files ({_first_line(exc)})",
            path=snapshot,
            fix="check that the repo is an open_clip model (open_clip_config.json with model_cfg, and its weights)",
        ) from None
    return _wrap(model, tokenizer, name, "none" if random_weights else snapshot.name, None, None, device, precision)


def _hub_files(repo_id: str, revision: str | None, cache_dir: str | None, *, need_weights: bool):
    """(config path, weights path or None) of an open_clip hub repo: from the cache, else downloaded
    when the hub answers within seconds; a one-line BackboneUnavailableError otherwise."""
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_CONFIG_NAME, HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    def cached(filename: str) -> str | None:
        found = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        return found if isinstance(found, str) and os.path.isfile(found) else None

    config = cached(HF_CONFIG_NAME)
    weights = next(filter(None, map(cached, (HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME))), None) if need_weights else None
    if config and (weights or not need_weights):
        return config, weights
    what = f"hf-hub:{repo_id}" + (f" (revision {revision})" if revision else "")
    hub_host, hub_port, where = _weights_host({"hf_hub": repo_id})
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not host_reachable(hub_host, hub_port):
        reason = "HF_HUB_OFFLINE is set" if offline else f"{hub_host} is unreachable"
        missing = "its weights are" if config else "it is"
        raise BackboneUnavailableError(
            f"cannot get {what}: {reason} and {missing} not in the cache ({cache_dir or where})",
            fix=(
                f"download it once on a machine with network (open_clip.create_model('hf-hub:{repo_id}')), "
                f"point {arg('cache_dir')} at a cache that has it, or use {arg('backbone', 'lite')}"
            ),
        )
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        config = download_pretrained_from_hf(repo_id, filename=HF_CONFIG_NAME, revision=revision, cache_dir=cache_dir)
        if need_weights:
            weights = download_pretrained_from_hf(repo_id, revision=revision, cache_dir=cache_dir)
    except (OSError, ValueError, RuntimeError) as exc:
        raise BackboneUnavailableError(
            f"cannot download {what} ({_first_line(exc)})",
            fix="check the repo id and revision: an open_clip model repo has open_clip_config.json and weights",
        ) from None
    return config, weights


def _register_extra_model_configs() -> None:
    """Model configs from ADACLIP_MODEL_CONFIGS (folders or JSON files, os.pathsep-separated): custom
    architectures become backbone names without editing open_clip."""
    import open_clip

    for entry in filter(None, os.environ.get("ADACLIP_MODEL_CONFIGS", "").split(os.pathsep)):
        if not Path(entry).exists():
            raise UsageError("ADACLIP_MODEL_CONFIGS names a path that does not exist", path=entry)
        open_clip.add_model_config(entry)


def _create_lite(pretrained: str | None, device: torch.device, precision: str) -> Backbone:
    """The embedded backbone. Its only "pretrained" value is the version of the shipped heads (an adapter
    file records it); other values are refused rather than silently ignored."""
    try:
        from .lite import LITE_INFO, build_lite_model
    except ImportError as exc:
        raise BackboneUnavailableError(str(exc), fix="pip install 'adaclip[lite]'") from None
    version = str(LITE_INFO["version"])
    if pretrained not in (None, "none", "default", DEFAULT_PRETRAINED, LITE_NAME, version):
        if str(pretrained).startswith("lite-"):
            raise BackboneUnavailableError(
                f"this adaclip ships lite heads {version!r}, not {pretrained!r}",
                fix="use the adaclip version that wrote the adapter, or refit it",
            )
        raise UsageError(
            f"{arg('pretrained', pretrained)} does not apply to the lite backbone", fix=f"omit {arg('pretrained')}"
        )
    model, tokenizer, cfg = build_lite_model(device=device)
    preprocess = PreprocessConfig(**cfg)
    identity = BackboneIdentity(
        name=LITE_NAME,
        pretrained=version,
        embed_dim=int(LITE_INFO["embed_dim"]),
        image_size=preprocess.size,
    )
    return Backbone(model, tokenizer, preprocess, identity, device, precision)


def _embed_dim(model: nn.Module, device: torch.device, size: int) -> int:
    text_projection = getattr(model, "text_projection", None)
    if isinstance(text_projection, torch.Tensor):
        return int(text_projection.shape[-1])
    with torch.no_grad():
        return int(model.encode_image(torch.zeros(1, 3, size, size, device=device)).shape[-1])


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ weights


def _resolve_pretrained_tag(name: str, tag: str, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
    """Find the weights for an open_clip tag without hanging: a cached file loads offline; otherwise the
    hub is probed for a few seconds before open_clip is allowed to download."""
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name, tag)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise UsageError(
            f"{tag!r} is neither a pretrained tag of {name} nor an existing file",
            fix=(
                f"tags for {name}: {', '.join(tags) or 'none'}; "
                f"or give a checkpoint path, or {arg('pretrained', 'none')}"
            ),
        )
    # Loading a cached file by path skips open_clip's hub call (which retries for about a minute
    # offline), so the tag's preprocessing and activation settings are passed along explicitly.
    tag_kwargs = {
        "force_quick_gelu": bool(tag_cfg.get("quick_gelu", False)),
        "force_preprocess_cfg": {
            k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if tag_cfg.get(k) is not None
        },
    }
    cached = _cached_weights(tag_cfg, cache_dir)
    if cached:
        return cached, tag_kwargs
    hub_host, hub_port, where = _weights_host(tag_cfg)
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or not host_reachable(hub_host, hub_port):
        reason = "HF_HUB_OFFLINE is set" if offline else f"{hub_host} is unreachable"
        raise BackboneUnavailableError(
            f"cannot get {name}/{tag} weights: {reason} and they are not in the cache ({cache_dir or where})",
            fix=(
                f"pass {arg('pretrained', '/path/to/checkpoint')}, point {arg('cache_dir')} at a cache that has "
                f"them, download them once on a machine with network, or use {arg('backbone', 'lite')}"
            ),
        )
    # Reachable: let open_clip download with its usual progress output.
    return tag, {}


def _cached_weights(tag_cfg: dict, cache_dir: str | None) -> str | None:
    if tag_cfg.get("file"):
        return tag_cfg["file"] if os.path.isfile(tag_cfg["file"]) else None
    hf_hub = tag_cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or "open_clip_pytorch_model.bin"
        # open_clip prefers a .safetensors sibling of the listed file; look for it first.
        if filename == "open_clip_pytorch_model.bin":
            candidates = ["open_clip_model.safetensors", filename]
        elif filename.endswith((".bin", ".pth")):
            candidates = [filename[:-4] + ".safetensors", filename]
        else:
            candidates = [filename]
        for candidate in dict.fromkeys(candidates):
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
        return None
    url = tag_cfg.get("url", "")
    if url:
        target = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(urlparse(url).path)
        return str(target) if target.is_file() else None
    return None


def _weights_host(tag_cfg: dict) -> tuple[str, int, str]:
    """(host, port, cache location) that a download of this tag would use."""
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import constants

        url = urlparse(os.environ.get("HF_ENDPOINT") or getattr(constants, "ENDPOINT", "https://huggingface.co"))
        where = constants.HF_HUB_CACHE
    else:
        url = urlparse(tag_cfg.get("url", ""))
        where = os.path.expanduser("~/.cache/clip")
    port = url.port or (80 if url.scheme == "http" else 443)
    return url.hostname or "huggingface.co", port, where


def host_reachable(host: str, port: int = 443, timeout: float = NETWORK_PROBE_SECONDS) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds (DNS included)."""
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout + 0.5)
    return bool(outcome and outcome[0])


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
