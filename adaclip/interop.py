"""Adapters in other libraries' formats (`adaclip export --format open_clip|peft|onnx`).

* open_clip: the adapted model as a plain open_clip state dict (safetensors) that
  `open_clip.create_model_and_transforms(NAME, pretrained=FILE)` loads. Only adapters whose trained
  parts fold exactly into the backbone's own weights qualify: LoRA (s * B A added to the projections),
  full fine-tuning (the weights themselves) and zero-shot, each with CLIP's cosine classifier. AdaRing's
  adapters read a LayerNorm of the block input, which no weight of an open_clip block can express, and
  learned heads (linear probe, Tip-Adapter, RAda's mask) or prompts (CoOp) live outside the model: those
  are refused, and `--format onnx` carries them instead.
* peft: a LoRA adapter as Hugging Face PEFT's `adapter_config.json` + `adapter_model.safetensors`, for
  `PeftModel.from_pretrained(open_clip_model, FOLDER)`. PEFT adapts an nn.MultiheadAttention's fused
  in_proj with one rank-R pair and its out_proj with another; adaclip's separate q/k/v updates of rank r
  become R = 3r blocks of that pair (A stacked, B block-diagonal: exactly the same update), the out_proj
  pair stays zero, and lora_alpha = s * R makes PEFT's alpha / R equal adaclip's scale s. Adapters that
  also adapt `out` are refused: PEFT 0.21 applies a MultiheadAttention out_proj update twice (measured).
* onnx: the image tower, the method's parts and its head with the class features computed once and
  baked in, as one graph pixels (B, 3, H, W) -> logits (B, K); a JSON file next to it holds the class
  names and preprocessing. Needs torch only (its TorchScript-based exporter).

None of these writers imports the receiving library; the tests check each file with the library itself.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import UsageError
from .files import atomic_write, check_output_path
from .methods import CosineHead
from .weights import HF_HUB_PREFIX

if TYPE_CHECKING:
    from .adapter import Adapter

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def _refuse(adapter: Adapter, target: str, why: str, fix: str = "use --format onnx") -> UsageError:
    return UsageError(f"{adapter.method} adapters cannot be exported as {target}: {why}", fix=fix)


def _require_open_clip_backbone(adapter: Adapter, target: str) -> None:
    if adapter.backbone.name == "lite":
        raise _refuse(adapter, target, "the lite backbone is not an open_clip model")


def _save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    contiguous = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, save(contiguous, metadata=metadata))


def _module_names(root: nn.Module) -> dict[int, str]:
    return {id(module): name for name, module in root.named_modules()}


# ------------------------------------------------------------------------------------------ open_clip


def folded_state_dict(adapter: Adapter) -> dict[str, torch.Tensor]:
    """The backbone's state dict with every trained update folded in (see the module docstring)."""
    from .methods.full_finetune import FullFineTune
    from .methods.lora import LoRAAdapters

    _require_open_clip_backbone(adapter, "open_clip")
    model = adapter.model
    if type(model.head) is not CosineHead:
        raise _refuse(adapter, "open_clip", f"its head ({type(model.head).__name__}) is not part of an open_clip model")
    backbone_model = adapter.backbone.model
    state = {k: v.detach().clone() for k, v in backbone_model.state_dict().items()}
    names = _module_names(backbone_model)
    for component in model.components:
        if isinstance(component, FullFineTune):
            continue  # the tuned weights are the backbone's own
        if not isinstance(component, LoRAAdapters):
            raise _refuse(adapter, "open_clip", f"{type(component).__name__} does not fold into open_clip's weights")
        with torch.no_grad():
            for wrapper, entry in component._entries:
                prefix = names[id(wrapper)]
                for key, weight in wrapper.merged_weights(entry.updates).items():
                    state[f"{prefix}.{key}"] = weight
    return state


def _uses_quick_gelu(model: nn.Module) -> bool:
    return any(type(m).__name__ == "QuickGELU" for m in model.modules())


def export_open_clip(adapter: Adapter, path: str | Path, *, force: bool = False) -> dict[str, Any]:
    path = Path(path)
    check_output_path(path, force=force)
    state = folded_state_dict(adapter)
    name = adapter.backbone.name
    kwargs = {"force_quick_gelu": True} if _uses_quick_gelu(adapter.backbone.model) else {}
    metadata = {"format": "pt", "open_clip_model": name, "adaclip_method": adapter.method}
    _save_safetensors(path, state, metadata)
    call_args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    if name.startswith(HF_HUB_PREFIX):
        # open_clip ignores `pretrained` for hub names (the repo's weights are loaded): load ours after.
        load_with = (
            f"model, _, preprocess = open_clip.create_model_and_transforms({name!r}{call_args}); "
            f"open_clip.load_checkpoint(model, {str(path)!r})"
        )
    else:
        load_with = f"open_clip.create_model_and_transforms({name!r}, pretrained={str(path)!r}{call_args})"
    return {
        "format": "open_clip",
        "output": str(path),
        "open_clip_model": name,
        "load_with": load_with,
        "tensors": len(state),
    }


# ------------------------------------------------------------------------------------------ peft


def peft_adapter(adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json document, adapter_model.safetensors tensors) for a LoRA adapter."""
    from .methods.lora import LoRAAdapters, MultiheadAttentionWrapper

    _require_open_clip_backbone(adapter, "peft")
    components = adapter.model.components
    if not (len(components) == 1 and isinstance(components[0], LoRAAdapters)):
        raise _refuse(adapter, "peft", "only LoRA adapters have a PEFT form", fix="use --format open_clip or onnx")
    lora = components[0]
    settings = lora.settings
    if "out" in settings.projections:
        # Measured with PEFT 0.21.2: its MultiheadAttention layer merges the out_proj update into the weight
        # and then merges it again (out_proj.merge), so its forward pass applies that update twice.
        raise _refuse(
            adapter,
            "peft",
            "PEFT applies an nn.MultiheadAttention out_proj update twice, so the out projection would not match",
            fix="use --format open_clip (exact), or a LoRA adapter without the out projection",
        )
    r = settings.rank
    big_r = 3 * r
    names = _module_names(adapter.backbone.model)
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    for wrapper, entry in lora._entries:
        if not isinstance(wrapper, MultiheadAttentionWrapper):
            raise _refuse(adapter, "peft", "PEFT export supports open_clip's nn.MultiheadAttention projections")
        name = names[id(wrapper)]
        mha = wrapper.original
        d = mha.embed_dim
        dtype = mha.in_proj_weight.dtype
        a_in, b_in = torch.zeros(big_r, d, dtype=dtype), torch.zeros(3 * d, big_r, dtype=dtype)
        a_out, b_out = torch.zeros(big_r, d, dtype=dtype), torch.zeros(d, big_r, dtype=dtype)
        for proj, update in entry.updates.items():
            i = "qkv".index(proj)
            a_in[i * r : (i + 1) * r] = update.lora_A.detach()
            b_in[i * d : (i + 1) * d, i * r : (i + 1) * r] = update.lora_B.detach()
        prefix = f"base_model.model.{name}"
        tensors[f"{prefix}.lora_A.weight"], tensors[f"{prefix}.lora_B.weight"] = a_in, b_in
        tensors[f"{prefix}.base_layer.out_proj.lora_A.weight"] = a_out
        tensors[f"{prefix}.base_layer.out_proj.lora_B.weight"] = b_out
        targets.append(name)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": adapter.backbone.name,
        "r": big_r,
        # PEFT scales by lora_alpha / r; this makes it adaclip's scale (alpha / sqrt(r) or alpha / r).
        "lora_alpha": settings.scale * big_r,
        "lora_dropout": settings.dropout,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # A pattern, not a list: PEFT matches list entries as name suffixes, and the text tower's
        # `transformer.resblocks.0.attn` is a suffix of the image tower's `visual.transformer...`.
        "target_modules": "^(" + "|".join(re.escape(t) for t in sorted(targets)) + ")$",
    }
    return config, tensors


def export_peft(adapter: Adapter, folder: str | Path, *, force: bool = False) -> dict[str, Any]:
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError("PEFT output is a folder, but a file has that name", path=folder)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if (folder / name).exists() and not force:
            raise UsageError("output already exists", path=folder / name, fix="choose another -o or pass --force")
    if not folder.parent.resolve().is_dir():
        raise UsageError("output folder does not exist", path=folder.parent)
    config, tensors = peft_adapter(adapter)
    folder.mkdir(exist_ok=True)
    _save_safetensors(folder / PEFT_WEIGHTS, tensors, {"format": "pt"})
    atomic_write(folder / PEFT_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
    return {
        "format": "peft",
        "output": str(folder),
        "open_clip_model": adapter.backbone.name,
        "load_with": f"peft.PeftModel.from_pretrained(open_clip.create_model({adapter.backbone.name!r}, ...), "
        f"{str(folder)!r})",
        "adapted_modules": len(tensors) // 4,
        "r": config["r"],
    }


# ------------------------------------------------------------------------------------------ onnx


class ImageClassifier(nn.Module):
    """Pixels -> logits with the class features fixed: what the ONNX graph computes."""

    def __init__(self, adapter: Adapter):
        super().__init__()
        self.model = adapter.model
        with torch.no_grad():
            self.register_buffer("class_features", adapter.model.class_features().detach().clone())

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.head_output(self.model.image_features(pixels), self.class_features).logits


def onnx_sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def export_onnx(adapter: Adapter, path: str | Path, *, force: bool = False, opset: int = 17) -> dict[str, Any]:
    path = Path(path)
    sidecar = onnx_sidecar_path(path)
    for target in (path, sidecar):
        check_output_path(target, force=force)
    if adapter.backbone.device.type != "cpu" or adapter.backbone.precision != "fp32":
        raise UsageError(
            "ONNX export runs on the CPU in fp32", fix="load the adapter with device='cpu', precision='fp32'"
        )
    adapter.merge()
    classifier = ImageClassifier(adapter).eval()
    size = adapter.backbone.preprocess.size
    sample = torch.zeros(2, 3, size, size)
    tmp = path.with_name(f".{path.name}.tmp")
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's inference fast path is one fused operator that ONNX has no equivalent of.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Tracing warns about every Python-level shape read; the graph is checked against the model instead.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # The TorchScript-based exporter is deprecated in favour of torch.export's, which needs onnxscript
            # (not a dependency); this one needs torch alone.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                classifier,
                (sample,),
                str(tmp),
                input_names=["pixels"],
                output_names=["logits"],
                dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        tmp.replace(path)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        tmp.unlink(missing_ok=True)
    preprocess = adapter.backbone.preprocess.model_dump(mode="json")
    document = {
        "input": "pixels",
        "output": "logits",
        "class_names": adapter.class_names,
        "preprocess": preprocess,
        "method": adapter.method,
        "backbone": adapter.backbone.identity.describe(),
    }
    atomic_write(sidecar, (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode())
    return {
        "format": "onnx",
        "output": str(path),
        "labels": str(sidecar),
        "classes": len(adapter.class_names),
        "input_size": size,
        "opset": opset,
        "output_bytes": path.stat().st_size,
    }
