"""The Backbone object: a frozen CLIP-style dual encoder with its tokenizer, preprocessing, device and
precision. It is always frozen and in eval mode: methods add their trainable parts around it."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import autocast
from ..identity import BackboneIdentity
from ..transforms import PreprocessConfig, image_transform


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
        self.text_padding_id = _masked_padding_id(model)

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
        return autocast(self.device, self.precision)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised float32 image embeddings (B, D)."""
        with self.autocast():
            return self.model.encode_image(pixels.to(self.device, non_blocking=True)).float()

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised float32 text embeddings (N, D)."""
        if self.text_padding_id is not None:
            tokens = without_padding_columns(tokens, self.text_padding_id)
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


def _masked_padding_id(model: nn.Module) -> int | None:
    """The padding token id of a text tower that masks attention and pooling by it (open_clip's
    HFTextEncoder, e.g. lite's MiniLM), else None. Towers with a fixed-length causal mask and positional
    table (OpenAI CLIP's) take the tokens as they are."""
    try:
        from open_clip.hf_model import HFTextEncoder
    except ImportError:
        return None
    text = getattr(model, "text", None)
    return text.config.pad_token_id if isinstance(text, HFTextEncoder) else None


def without_padding_columns(tokens: torch.Tensor, padding_id: int) -> torch.Tensor:
    """`tokens` cut after the last column holding a real token in some row. The tower masks padding out
    of attention and pooling, so the embeddings are the same up to float rounding, and a prompt of 12
    tokens no longer pays for the tokenizer's 64 (docs/benchmarks.md: "lite's text tower without the
    padding columns")."""
    real = (tokens != padding_id).any(dim=0).nonzero()
    return tokens[:, : int(real[-1]) + 1] if len(real) else tokens
