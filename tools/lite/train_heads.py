"""Reproduce adaclip/lite/heads.safetensors: data, feature cache, head training, evaluation, record.

    python -m tools.lite.train_heads --out adaclip/lite/heads.safetensors --record docs/lite-heads.json

Needs the lite extra (pip install 'adaclip[lite]') and the data packages (tools/lite/fetch_data.sh:
openclipart-png, tuxpaint-stamps-default, dataset-fashion-mnist from Debian; emoji-datasource-google
from npm). Features are cached under --cache-dir (default /tmp/adaclip-lite-cache), never in the repo.
On a 2-core CPU the first run spends ~25 min extracting features; training itself takes about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
from dataclasses import fields
from pathlib import Path

import torch

from adaclip.lite import HEADS_PATH, LITE_INFO, build_lite_model, head_state_dict, heads_metadata, read_heads
from adaclip.templates import ENSEMBLE_TEMPLATES

from .cache import image_cache, text_cache, towers_for_caching
from .captions import Item, all_items
from .evaluate import (
    REPORT_TEMPLATES,
    cached_predictions,
    end_to_end_zero_shot,
    image_throughput,
    prompts_for,
    retrieval_recall_at_1,
    zero_shot_accuracy,
)
from .fmnist import OFFICIAL_NAMES, PROMPT_NAMES, load_split
from .train import HeadConfig, TrainData, new_model, teacher_probabilities, train_heads

HELD_OUT_FRACTION = 0.1
# ImageNet pseudo-caption prompts: a sampled template per class and step, for text-side variety.
IMAGENET_TEMPLATES = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a black and white photo of a {}.",
    "a low resolution photo of a {}.",
    "a close-up photo of a {}.",
    "{}",
)
DEFAULT_EMOJI_DIR = Path(os.environ.get("ADACLIP_EMOJI_DIR", "/tmp/adaclip-lite-data/emoji/package"))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=HEADS_PATH)
    p.add_argument("--record", type=Path, default=Path("docs/lite-heads.json"))
    p.add_argument(
        "--cache-dir", type=Path, default=Path(os.environ.get("ADACLIP_LITE_CACHE", "/tmp/adaclip-lite-cache"))
    )
    p.add_argument("--emoji-dir", type=Path, default=DEFAULT_EMOJI_DIR, help="unpacked npm emoji-datasource-google")
    p.add_argument(
        "--end-to-end-images",
        type=int,
        default=1000,
        help="t10k images to re-run through the shipped model on pixels (0 skips; 10000 = all)",
    )
    for f in fields(HeadConfig):
        p.add_argument(
            f"--{f.name.replace('_', '-')}",
            type=type(f.default) if not isinstance(f.default, bool) else _bool,
            default=f.default,
        )
    return p.parse_args()


def _bool(text: str) -> bool:
    return text.lower() in ("1", "true", "yes")


def split_items(items: list[Item], ok: torch.Tensor, seed: int) -> tuple[list[int], list[int]]:
    """Usable item indices, shuffled with the seed, split into (train, held-out)."""
    usable = [i for i in range(len(items)) if bool(ok[i])]
    random.Random(seed).shuffle(usable)
    n_held = int(len(usable) * HELD_OUT_FRACTION)
    return sorted(usable[n_held:]), sorted(usable[:n_held])


def imagenet_names() -> list[str]:
    """The 1,000 ImageNet category names torchvision ships (classifier order)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return list(_IMAGENET_CATEGORIES)


def build_train_data(
    items: list[Item], train_idx: list[int], images: dict, texts: dict[str, torch.Tensor], temperature: float = 1.0
) -> TrainData:
    """Gather training tensors: one row per caption, pointing at its item's cached views."""
    feats = images["features"][train_idx].float()
    cap_item, cap_text = [], []
    for row, i in enumerate(train_idx):
        for caption in items[i].captions:
            cap_item.append(row)
            cap_text.append(caption)
    ids = {t: n for n, t in enumerate(sorted(set(cap_text)))}
    names = imagenet_names()
    prompts = torch.stack([texts[p] for p in prompts_for(names, IMAGENET_TEMPLATES)]).view(
        len(names), len(IMAGENET_TEMPLATES), -1
    )
    return TrainData(
        image=feats,
        caption_feats=torch.stack([texts[t] for t in cap_text]),
        caption_item=torch.tensor(cap_item),
        caption_text_id=torch.tensor([ids[t] for t in cap_text]),
        class_prompts=prompts,
        teacher=teacher_probabilities(
            feats, images["classifier_weight"].float(), images["classifier_bias"].float(), temperature
        ),
    )


def all_texts(items: list[Item]) -> list[str]:
    texts = [c for item in items for c in item.captions]
    texts += prompts_for(imagenet_names(), IMAGENET_TEMPLATES)
    for templates in (REPORT_TEMPLATES, ENSEMBLE_TEMPLATES):
        texts += prompts_for(PROMPT_NAMES, templates)
    return texts


def cached_metrics(model, items, held_idx, images, texts) -> dict:
    """Retrieval on held-out items and Fashion-MNIST zero-shot (val and t10k) from cached features."""
    caps = [items[i].captions[0] for i in held_idx]
    ids = {t: n for n, t in enumerate(sorted(set(caps)))}
    retrieval = retrieval_recall_at_1(
        model,
        images["features"][held_idx, 0],
        torch.stack([texts[c] for c in caps]),
        torch.tensor([ids[c] for c in caps]),
    )
    _, train_y = load_split("train")
    val_y = train_y[images["fmnist_val_index"].numpy()]
    _, test_y = load_split("t10k")
    out = {"retrieval_held_out": retrieval}
    for label, templates in (("report_ensemble", REPORT_TEMPLATES), ("adaclip_ensemble", ENSEMBLE_TEMPLATES)):
        prompt_feats = torch.stack([texts[p] for p in prompts_for(PROMPT_NAMES, templates)])
        out[f"fmnist_val_{label}"] = zero_shot_accuracy(model, images["fmnist_val"], val_y, prompt_feats, 10)
        out[f"fmnist_t10k_{label}"] = zero_shot_accuracy(model, images["fmnist_test"], test_y, prompt_feats, 10)
    return out


def save_heads(model, cfg: HeadConfig, path: Path, provenance: dict) -> str:
    """Write the heads as float16 safetensors with construction metadata; returns the sha256."""
    import hashlib

    from safetensors.torch import save_file

    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in head_state_dict(model).items()}
    tensors["logit_scale"] = model.logit_scale.detach().float().reshape(model.logit_scale.shape).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=heads_metadata(cfg.model_config(), provenance))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reload_heads(cfg: HeadConfig, path: Path):
    """A model carrying the heads exactly as saved (float16-rounded), for honest evaluation."""
    from adaclip.lite import load_heads

    model = new_model(cfg)
    tensors, _ = read_heads(path)
    load_heads(model, tensors)
    return model.eval()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 8))
    cfg = HeadConfig(**{f.name: getattr(args, f.name) for f in fields(HeadConfig)})
    timings: dict[str, float] = {}
    started = time.time()

    items = all_items(args.emoji_dir)
    trunk, text_tower, tokenizer = towers_for_caching()
    images = image_cache(args.cache_dir, items, 0, trunk)
    timings["image_features_s"] = round(float(images["seconds"]) + float(images.get("fmnist_seconds", 0)), 1)
    t0 = time.time()
    texts = text_cache(args.cache_dir, all_texts(items), text_tower, tokenizer)
    timings["text_features_s"] = round(time.time() - t0, 1)
    del trunk, text_tower

    train_idx, held_idx = split_items(items, images["ok"], cfg.seed)
    data = build_train_data(items, train_idx, images, texts, cfg.distill_temperature)
    model, train_log = train_heads(data, cfg)
    timings["train_s"] = train_log["seconds"]

    provenance = {"config": cfg.as_dict(), "items": len(train_idx)}
    sha = save_heads(model, cfg, args.out, provenance)
    saved = reload_heads(cfg, args.out)
    metrics = cached_metrics(saved, items, held_idx, images, texts)
    print(json.dumps({k: v for k, v in metrics.items()}, indent=1))

    record = {
        "lite_version": LITE_INFO["version"],
        "heads_file": str(args.out),
        "heads_sha256": sha,
        "heads_bytes": args.out.stat().st_size,
        "config": cfg.as_dict(),
        "data": data_counts(items, train_idx, held_idx, images, data),
        "fmnist_class_names_in_prompts": list(PROMPT_NAMES),
        "fmnist_official_names": list(OFFICIAL_NAMES),
        "report_templates": list(REPORT_TEMPLATES),
        "adaclip_ensemble_templates": list(ENSEMBLE_TEMPLATES),
        "imagenet_pseudo_caption_templates": list(IMAGENET_TEMPLATES),
        "metrics_from_cached_features": metrics,
        "train_log": train_log["history"],
        "timings": timings,
        "machine": machine(),
    }
    if args.end_to_end_images > 0:
        record["end_to_end"] = end_to_end_check(args.out, args.end_to_end_images, saved, images, texts)
    timings["total_s"] = round(time.time() - started, 1)
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out} (sha256 {sha}) and {args.record}")
    if args.out.resolve() == HEADS_PATH.resolve():
        print(f'if this is a release, set HEADS_SHA256 = "{sha}" in adaclip/lite/__init__.py')


def end_to_end_check(heads: Path, n: int, saved, images: dict, texts: dict[str, torch.Tensor]) -> dict:
    """The shipped path on pixels (build_lite_model, product transform, tokenizer) on the first n t10k
    images, compared with the cached-feature path on the same images: the two must agree."""
    model, tokenizer, _ = build_lite_model("cpu", heads_path=heads)
    pixels, labels = load_split("t10k")
    result = end_to_end_zero_shot(model, tokenizer, pixels[:n], labels[:n], PROMPT_NAMES, REPORT_TEMPLATES)
    prompt_feats = torch.stack([texts[p] for p in prompts_for(PROMPT_NAMES, REPORT_TEMPLATES)])
    cached = cached_predictions(saved, images["fmnist_test"][:n], prompt_feats, len(PROMPT_NAMES))
    result["agreement_with_cached_path"] = float((cached == result.pop("predictions")).mean())
    result["image_tower_images_per_s_b32_fp32"] = round(image_throughput(model), 1)
    print(json.dumps(result, indent=1))
    return result


def data_counts(items, train_idx, held_idx, images, data: TrainData) -> dict:
    sources = sorted({i.source for i in items})
    return {
        "items_by_source": {s: sum(1 for i in items if i.source == s) for s in sources},
        "unusable_images": int((~images["ok"]).sum()),
        "train_items": len(train_idx),
        "held_out_items": len(held_idx),
        "views_per_item": int(images["features"].shape[1]),
        "caption_pairs": int(len(data.caption_item)),
        "distinct_captions": int(data.caption_text_id.max()) + 1,
        "imagenet_classes": int(data.class_prompts.shape[0]),
        "fmnist_val_images_from_train_split": int(len(images["fmnist_val"])),
        "fmnist_t10k_images": int(len(images["fmnist_test"])),
    }


def machine() -> dict:
    return {
        "description": "2-core CPU, no GPU",
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    main()
