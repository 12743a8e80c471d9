"""Backbone weights: where the files of a pretrained tag or a Hugging Face Hub repo are, whether they
can be had now, and the fingerprint of a local checkpoint.

A cached file is used offline. Otherwise the weights' host is probed for a few seconds before a download
is allowed, so an unreachable hub fails fast with a one-line message saying how to get the weights,
instead of open_clip's minute of retries.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from .errors import BackboneUnavailableError, UsageError, arg, first_line

HF_HUB_PREFIX = "hf-hub:"  # open_clip's prefix for models (config + weights) in a Hugging Face Hub repo
NETWORK_PROBE_SECONDS = 3.0


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ open_clip tags


def resolve_pretrained_tag(name: str, tag: str, cache_dir: str | None) -> tuple[str, dict[str, Any]]:
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
    blocked, where = _download_blocked(tag_cfg)
    if blocked:
        raise BackboneUnavailableError(
            f"cannot get {name}/{tag} weights: {blocked} and they are not in the cache ({cache_dir or where})",
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


# ------------------------------------------------------------------------------------------ hf-hub repos


def hub_files(repo_id: str, revision: str | None, cache_dir: str | None, *, need_weights: bool):
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
    what = f"{HF_HUB_PREFIX}{repo_id}" + (f" (revision {revision})" if revision else "")
    blocked, where = _download_blocked({"hf_hub": repo_id})
    if blocked:
        missing = "its weights are" if config else "it is"
        raise BackboneUnavailableError(
            f"cannot get {what}: {blocked} and {missing} not in the cache ({cache_dir or where})",
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
            f"cannot download {what} ({first_line(exc)})",
            fix="check the repo id and revision: an open_clip model repo has open_clip_config.json and weights",
        ) from None
    return config, weights


# ------------------------------------------------------------------------------------------ network probing


def _download_blocked(tag_cfg: dict) -> tuple[str | None, str]:
    """(why a download of these weights cannot happen now, or None; the cache location it would use).
    HF_HUB_OFFLINE is honoured without probing; otherwise the host gets a few seconds to answer."""
    host, port, where = _weights_host(tag_cfg)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set", where
    if not host_reachable(host, port):
        return f"{host} is unreachable", where
    return None, where


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
