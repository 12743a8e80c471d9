"""CoOp (`--method coop`): a learned prompt context shared by all classes (Zhou et al., IJCV 2022).

The prompt of class c is "X X ... X {c}." whose n_ctx context tokens "X" are not words but learned
vectors in the text tower's token-embedding space (github.com/KaiyangZhou/CoOp: 16 tokens, one
context for all classes, class name at the end, random N(0, 0.02^2) start, or the embeddings of a
phrase such as "a photo of a"). Everything else is the frozen text tower, run unchanged.

How: while CoOp computes class features, a forward hook on the tower's token-embedding layer replaces
the embeddings at the context positions with the learned vectors; positional embeddings, attention
masks, pooling and projection are the tower's own. That works for open_clip's CLIP (its own
`token_embedding`), open_clip text transformers in custom-tower models, and Hugging Face text towers
(`get_input_embeddings()`, e.g. the `lite` backbone's MiniLM).

Template ensembles do not apply: the learned context replaces the template (`--templates` is recorded
in the adapter file but unused). The context does not depend on the classes, so a trained adapter
scores new class names too (class-agnostic).

Recipe (CoOp's configs/trainers/CoOp, Dassl defaults): SGD, lr 2e-3, momentum 0.9, weight decay 5e-4,
batch 32, cosine decay after one warm-up epoch, random resized crops (scale 0.08-1) and flips.
CoOp warms up at a constant 1e-5; adaclip's loop warms up linearly. Epochs as CoOp's scripts (COOP.md):
50 at 1 shot, 100 at 2-4 shots, 200 from 8 shots on (`train.epochs_by_shots`; `--epochs N` replaces it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..errors import UsageError
from .base import Component, MethodConfig, Parts, TrainConfig
from .contexts import BuildContext
from .registry import register_method

if TYPE_CHECKING:
    from ..backbone import Backbone


@register_method
class CoOpConfig(MethodConfig):
    name: ClassVar[str] = "coop"
    summary: ClassVar[str] = "learned prompt context shared by all classes (CoOp)"

    n_ctx: int = Field(16, ge=1, description="number of learned context tokens (ignored when `init` is set)")
    init: str | None = Field(
        None,
        description="a phrase (e.g. 'a photo of a') whose token embeddings start the context; its token "
        "count replaces n_ctx. None: random N(0, init_std^2)",
    )
    init_std: float = Field(0.02, gt=0, description="std of the random context initialisation")
    train: TrainConfig = TrainConfig(
        epochs=50,
        epochs_by_shots={1: 50, 2: 100, 8: 200},
        optimizer="sgd",
        lr=2e-3,
        momentum=0.9,
        weight_decay=5e-4,
        batch_size=32,
        warmup_epochs=1,
        min_crop_scale=0.08,
    )

    def build(self, ctx: BuildContext) -> Parts:
        return Parts(components=[PromptContext(self, ctx.backbone)])


def token_embedding_layer(backbone: Backbone) -> nn.Embedding:
    """The text tower's token-embedding layer, or a UsageError for towers CoOp does not know."""
    model = backbone.model
    text = getattr(model, "text", None)
    if text is None and isinstance(getattr(model, "token_embedding", None), nn.Embedding):
        return model.token_embedding  # open_clip CLIP: the text tower's parts live on the model
    if isinstance(getattr(text, "token_embedding", None), nn.Embedding):
        return text.token_embedding  # open_clip TextTransformer (CustomTextCLIP, CoCa)
    hf_model = getattr(text, "transformer", None)
    if hf_model is not None and hasattr(hf_model, "get_input_embeddings"):
        layer = hf_model.get_input_embeddings()  # Hugging Face text tower (open_clip HFTextEncoder)
        if isinstance(layer, nn.Embedding):
            return layer
    raise UsageError(
        f"coop does not support this text tower yet ({type(text or model).__name__})",
        fix="use a backbone with an open_clip or Hugging Face text tower, or another method",
    )


class PromptContext(Component):
    """The learned context vectors (n_ctx, width) and the prompts they are spliced into."""

    adapts_text_tower = True

    def __init__(self, config: CoOpConfig, backbone: Backbone):
        super().__init__()
        layer = token_embedding_layer(backbone)
        empty = backbone.tokenize([""])[0]
        self.pad_id = int(empty[-1])
        # leading special tokens (start of text / [CLS]) come before the context
        self.start = max(0, int((empty != self.pad_id).sum()) - 1)
        if config.init:
            self.prefix = " ".join(config.init.replace("_", " ").split())
            ids = self._content_ids(backbone, self.prefix)
            context = layer.weight.detach()[ids.to(layer.weight.device)].clone().float()
        else:
            self.prefix = " ".join(["X"] * config.n_ctx)
            ids = self._content_ids(backbone, self.prefix)
            if len(ids) != config.n_ctx:
                raise UsageError("coop: this tokenizer does not make one token of each placeholder 'X'")
            context = torch.randn(config.n_ctx, layer.embedding_dim) * config.init_std
        self.n_ctx = len(ids)
        if self.n_ctx == 0:
            raise UsageError("coop: the init phrase has no tokens", fix="--set init='a photo of a'")
        self.ctx = nn.Parameter(context)
        self._layer = [layer]  # a list hides the backbone's layer from registration
        self._tokens: tuple[tuple[str, ...], torch.Tensor] | None = None

    def _content_ids(self, backbone: Backbone, text: str) -> torch.Tensor:
        tokens = backbone.tokenize([text])[0]
        if int(tokens[-1]) != self.pad_id:
            raise UsageError(
                f"coop: a context of {text!r} leaves no room for class names in the text tower's context length "
                f"({len(tokens)} tokens)",
                fix="use fewer context tokens: --set n_ctx=4",
            )
        length = int((tokens != self.pad_id).sum())
        return tokens[self.start : length - 1]  # without the leading and trailing special tokens

    def prompts(self, class_names: list[str]) -> list[str]:
        return [f"{self.prefix} {name}." for name in class_names]

    def _prompt_tokens(self, backbone: Backbone, class_names: list[str]) -> torch.Tensor:
        key = tuple(class_names)
        if self._tokens is None or self._tokens[0] != key:
            prompts = self.prompts(class_names)
            tokens = backbone.tokenize(prompts)
            context = self._content_ids(backbone, self.prefix)
            for prompt, row in zip(prompts, tokens, strict=True):
                if not torch.equal(row[self.start : self.start + self.n_ctx], context):
                    raise UsageError(f"coop: cannot place the context in the tokens of {prompt!r}")
                if int(row[-1]) != self.pad_id:
                    raise UsageError(
                        f"coop: {self.n_ctx} context tokens + {prompt.split(' ', self.n_ctx)[-1]!r} reach the text "
                        f"tower's context length ({tokens.shape[1]} tokens)",
                        fix="use fewer context tokens: --set n_ctx=8",
                    )
            self._tokens = (key, tokens)
        return self._tokens[1]

    @contextlib.contextmanager
    def _spliced(self) -> Iterator[None]:
        """Within: the token-embedding layer's output carries the learned context at its positions."""
        start, end = self.start, self.start + self.n_ctx

        def splice(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            context = self.ctx.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
            return torch.cat([output[:, :start], context, output[:, end:]], dim=1)

        handle = self._layer[0].register_forward_hook(splice)
        try:
            yield
        finally:
            handle.remove()

    def class_features(self, backbone: Backbone, class_names: list[str], templates: list[str]) -> torch.Tensor:
        tokens = self._prompt_tokens(backbone, class_names)
        chunks = []
        with self._spliced():
            for first in range(0, len(tokens), 256):
                chunks.append(backbone.encode_text(tokens[first : first + 256]))
        return F.normalize(torch.cat(chunks), dim=-1)
