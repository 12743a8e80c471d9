"""What identifies a backbone and its preprocessing: plain pydantic records, kept apart from
adaclip.backbone so reading an adapter file's header (`adaclip info`) needs no torch."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class PreprocessConfig(BaseModel):
    """How images become model input; recorded in adapter files so predict matches training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bicubic", "bilinear", "nearest"] = "bicubic"
    resize_mode: Literal["shortest", "longest", "squash"] = "shortest"


class BackboneIdentity(BaseModel):
    """What must match between an adapter file and the backbone it is applied to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    pretrained: str  # an open_clip tag, "none", or a checkpoint file name
    checkpoint_sha256: str | None = None  # set when pretrained is a local file
    # Where that file was (absolute): a hint for predict/eval to find it again; the sha256 is the proof.
    # Not part of what must match.
    checkpoint_hint: str | None = None
    embed_dim: int
    image_size: int

    def describe(self) -> str:
        return f"{self.name}/{self.pretrained}"

    def mismatch(self, other: BackboneIdentity) -> str | None:
        """A sentence saying how `other` differs from this identity, or None when they match."""
        if self.name != other.name:
            return f"backbone {other.name!r} differs from {self.name!r}"
        if self.checkpoint_sha256 or other.checkpoint_sha256:
            if self.checkpoint_sha256 != other.checkpoint_sha256:
                return (
                    f"checkpoint sha256 {str(other.checkpoint_sha256)[:12]} differs from "
                    f"{str(self.checkpoint_sha256)[:12]}"
                )
        elif self.pretrained != other.pretrained:
            return f"pretrained weights {other.pretrained!r} differ from {self.pretrained!r}"
        if (self.embed_dim, self.image_size) != (other.embed_dim, other.image_size):
            return "embedding size or image size differs"
        return None
