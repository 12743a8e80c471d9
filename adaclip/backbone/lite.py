"""The `lite` backbone's builder: the embedded, offline dual encoder of adaclip.lite."""

from __future__ import annotations

import torch

from ..errors import BackboneUnavailableError, UsageError, arg
from ..identity import BackboneIdentity
from ..transforms import PreprocessConfig
from .encoder import Backbone
from .registry import DEFAULT_PRETRAINED, register_backbone

LITE_NAME = "lite"


@register_backbone(name=LITE_NAME)
def create_lite(
    name: str, pretrained: str | None, *, device: torch.device, precision: str, cache_dir: str | None
) -> Backbone:
    """The embedded backbone. Its only "pretrained" value is the version of the shipped heads (an adapter
    file records it); other values are refused rather than silently ignored. It reads no cache."""
    try:
        from ..lite import LITE_INFO, build_lite_model
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
