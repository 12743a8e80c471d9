"""LoRA (`--method lora`): low-rank updates of the attention projections in both encoders (CLIP-LoRA).

The recipe is CLIP-LoRA's (Zanella & Ben Ayed, CVPR-W 2024, github.com/MaxZanella/CLIP-LoRA): rank 2,
alpha 1, on the query, key and value projections of every attention layer of both encoders, dropout
0.25 on the input of each low-rank branch, AdamW (lr 2e-4, weight decay 1e-2), batch 32, 500 x shots
iterations with a cosine schedule, random resized crops (scale 0.08-1) and flips; class features from the
first template only (`prompts="first"`: CLIP-LoRA encodes `template[0]`). With a frozen image tower (the
`lite` backbone's CNN) the training loop caches `train.cache_views` augmented views of each image's
features, so each iteration costs only the text tower. Each adapted projection W (d_out x d_in) gets

    y = W x + b + s * B A dropout(x),    A: (r, d_in) Kaiming-uniform,  B: (d_out, r) zero,

so the adapted model starts exactly at zero-shot CLIP, and costs r * (d_in + d_out) parameters:
184,320 on ViT-B/16 (768-wide image and 512-wide text towers, 12 layers each, q/k/v, r = 2).
The scale s is alpha / sqrt(r) by default: that is what CLIP-LoRA's code computes (loralib/layers.py;
alpha / r is commented out there); `rank_scaling="r"` gives the LoRA paper's and PEFT's alpha / r.

Laid out like Hugging Face PEFT's `tuners/lora`: `config` (the settings and the registered method),
`layer` (the update and the wrappers that apply it to an `nn.Linear` or an `nn.MultiheadAttention`,
with merge/unmerge) and `model` (the injector: which modules of which towers and blocks are adapted).
Towers without attention (a CNN image tower, e.g. the `lite` backbone's EfficientNet) are skipped with
a warning; the image features are then cached like any frozen tower.
"""

from .config import LoRAConfig, LoRASettings
from .layer import LinearWrapper, LoRAUpdate, MultiheadAttentionWrapper, _Entry
from .model import LoRAAdapters, find_attention

__all__ = [
    "LinearWrapper",
    "LoRAAdapters",
    "LoRAConfig",
    "LoRASettings",
    "LoRAUpdate",
    "MultiheadAttentionWrapper",
    "_Entry",
    "find_attention",
]
