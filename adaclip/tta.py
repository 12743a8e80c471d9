"""Test-time adaptation of RAda's mask on unlabeled images (`adaclip tta`, `Adapter.tta`).

Only the mask network adapts; both encoders stay frozen, so each image is encoded once (no grad) and
every adaptation step runs the mask network alone. Labels are never used for adapting; when they are
known (class sub-folders or a CSV) they only score the predictions.

Where the mask comes from:
  - an adapter whose head is RAda's mask (rada, rada-ft, adaring+rada): its trained mask;
  - an adapter with CLIP's cosine head (zeroshot, full-ft, adaring): a fresh mask at identity (zero
    out-projection, other projections drawn from `seed`), so adaptation starts exactly at the adapter's
    own predictions; the adapted file's method becomes the masked variant (zeroshot -> rada,
    full-ft -> rada-ft, adaring -> adaring+rada);
  - any other head (linear-probe scores with its own weight matrix, not with class features): refused,
    because the mask is defined on the rational matrix of image and class *features*.

Modes:
  - episodic (the TPT protocol, which the paper's test-time comparison implies; the paper's objective is
    not public; Shu et al., NeurIPS 2022, github.com/azshue/TPT): per image, `views - 1` random resized
    crops (area 8-100%, TPT's RandomResizedCrop) + flips and the original view; the `confident_fraction`
    most confident views (lowest entropy) are selected once, before the first step, and kept for every
    step (TPT's `selected_idx`); the entropy of their averaged probability is minimised for `steps` AdamW
    steps (weight decay 0.01, TPT's AdamW default); the prediction is made on the original view with the
    updated mask; then the mask and the optimiser are reset. Each image's views are drawn from a
    generator seeded with `seed` and the image's pixels, so an image's result does not depend on its
    position or name in the folder, and different images get different crops.
  - online (adaclip's choice; no reset): the images are adapted on in batches, in a seeded random order
    (a folder sorted by class would otherwise feed batches of one class), with the information-
    maximisation objective of SHOT (Liang et al., ICML 2020, github.com/tim-learn/SHOT): mean entropy of
    the (`confident_fraction` most confident of the) batch's predictions, minus `diversity_weight` (1, as
    SHOT) times the entropy of the batch's mean prediction (high only when predictions spread over the
    classes; `diversity_momentum` > 0 is adaclip's variant on a running mean), plus `anchor_weight` times
    KL(p_start || p), adaclip's addition, which keeps predictions near those of the starting mask.
    Each batch is predicted right after its update; results come out in folder order.
  - tda (a baseline, training-free: Karmanov et al., "Efficient Test-Time Adaptation of Vision-Language
    Models", CVPR 2024; our implementation): nothing is optimised. Over the stream (same seeded order as
    online), a positive cache keeps, per predicted class, the `positive_capacity` lowest-entropy image
    features, and a negative cache keeps features of moderately uncertain images (entropy in nats divided
    by log2(K), as the reference code computes it, inside `negative_entropy`) with a mask of the classes
    whose probability lies strictly inside `negative_mask` (0.03 < p < 1: the reference's mask_threshold).
    Logits = the adapter's own logits + a_pos * exp(-b_pos (1 - f.K_pos)) V_pos
    - a_neg * exp(-b_neg (1 - f.K_neg)) V_neg (tests/test_parity.py checks this against the reference's
    formulas). One view per image (TDA's ImageNet setting adds AugMix views). The cache lives for the
    stream only: there is no adapted file to write. Works on any adapter.

Defaults. Episodic: TPT's settings (64 views, the 10% most confident, one AdamW step at lr 5e-3,
weight decay 0.01). Online: lr 1e-3, one step per batch of 32, diversity and anchor weights 1. What they
do on corrupted Fashion-MNIST is measured by `python -m benchmarks.tta` (docs/benchmarks.md).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .adapter_file import created_at_now
from .checks import MAX_SEED
from .data import (
    StreamingImageDataset,
    class_name_from_folder,
    labelled_items,
    list_images,
    make_loader,
    open_data,
    open_item,
    record_name,
)
from .errors import InputError, UsageError
from .images import IMAGE_EXTENSIONS
from .methods import CosineHead, make_method_config, method_registry
from .methods.rada import RationalMaskConfig, RationalMaskHead
from .model import AdaptedCLIP
from .ui import log, progress

if TYPE_CHECKING:
    from .adapter import Adapter, Prediction

# The registered method that adds RAda's mask to a cosine-head method (the file written after TTA).
MASKED_VARIANTS = {"zeroshot": "rada", "full-ft": "rada-ft", "adaring": "adaring+rada"}
DEFAULT_LR = {"episodic": 5e-3, "online": 1e-3}
DEFAULT_CONFIDENT = {"episodic": 0.1, "online": 1.0}
# TPT builds torch.optim.AdamW(params, lr), so PyTorch's default weight decay 0.01 applies; online keeps none.
DEFAULT_WEIGHT_DECAY = {"episodic": 0.01, "online": 0.0}


class TDASettings(BaseModel):
    """TDA's caches; defaults are the paper's ImageNet settings."""

    model_config = ConfigDict(extra="forbid")

    positive_capacity: int = Field(3, ge=1, description="features kept per class in the positive cache")
    positive_alpha: float = Field(2.0, ge=0)
    positive_beta: float = Field(5.0, ge=0)
    negative_capacity: int = Field(2, ge=0, description="features kept per class in the negative cache (0: off)")
    negative_alpha: float = Field(0.117, ge=0)
    negative_beta: float = Field(1.0, ge=0)
    negative_entropy: tuple[float, float] = Field(
        (0.2, 0.5),
        description=(
            "band of entropy (nats) / log2(K), as the reference computes it, of images that enter the negative cache"
        ),
    )
    negative_mask: tuple[float, float] = Field(
        (0.03, 1.0), description="a negative entry's value marks the classes with probability strictly inside this band"
    )


class TTASettings(BaseModel):
    """How test-time adaptation runs; recorded in the adapted file's `tta` history."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["episodic", "online", "tda"] = "episodic"
    steps: int = Field(1, ge=1, description="optimiser steps per image (episodic) or per batch (online)")
    views: int = Field(64, ge=1, description="episodic: views per image, the original included (TPT: 64)")
    confident_fraction: float | None = Field(
        None, gt=0, le=1, description="fraction of lowest-entropy views/images kept (default 0.1 episodic, 1 online)"
    )
    lr: float | None = Field(None, gt=0, description="AdamW learning rate (default 5e-3 episodic, 1e-3 online)")
    weight_decay: float | None = Field(
        None, ge=0, description="AdamW weight decay (default 0.01 episodic, as TPT's AdamW; 0 online)"
    )
    batch_size: int = Field(32, ge=1, description="online: images per adaptation step")
    min_crop_scale: float = Field(
        0.08, gt=0, le=1, description="episodic: smallest area a random crop keeps (TPT's RandomResizedCrop: 0.08)"
    )
    diversity_weight: float = Field(1.0, ge=0, description="online: weight of the diversity term (SHOT: 1)")
    diversity_momentum: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="online: 0 (SHOT) takes the diversity term on the batch's mean prediction; m > 0 on a running "
        "mean m * previous + (1 - m) * batch (its gradient then passes only through 1 - m)",
    )
    shuffle: bool = Field(True, description="online: adapt in a seeded random order (results stay in folder order)")
    anchor_weight: float = Field(1.0, ge=0, description="online: weight of KL(start || adapted)")
    seed: int = Field(
        0, ge=0, le=MAX_SEED, strict=True, description="fixes the views and a fresh mask's initialisation"
    )
    mask: RationalMaskConfig = Field(
        default_factory=RationalMaskConfig, description="settings of a fresh mask (adapters without one)"
    )
    tda: TDASettings = Field(default_factory=lambda: TDASettings(), description="tda: the caches (TDA's defaults)")

    @property
    def effective_lr(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.mode]

    @property
    def effective_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else DEFAULT_WEIGHT_DECAY[self.mode]

    @property
    def effective_confident_fraction(self) -> float:
        return self.confident_fraction if self.confident_fraction is not None else DEFAULT_CONFIDENT[self.mode]


def make_tta_settings(**values: Any) -> TTASettings:
    try:
        return TTASettings.model_validate({k: v for k, v in values.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise UsageError(f"invalid tta settings: {problems}") from None


@dataclass
class TTAResult:
    """What a TTA run produced: predictions in input order, the adapted adapter, and how it went."""

    predictions: list[Prediction]
    adapter: Adapter | None  # None when no registered method adds the mask to the source's (lora, coop)
    n_images: int
    skipped: int
    seconds: float
    labelled: int = 0
    accuracy: float | None = None
    accuracy_before: float | None = None  # the same adapter without adaptation, same images
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.n_images / self.seconds if self.seconds > 0 else float("inf")


# ------------------------------------------------------------------------------------------ checks


def output_method(adapter: Adapter) -> str:
    """The method name of the file TTA writes for this adapter (UsageError when there is none)."""
    head = adapter.model.head
    if isinstance(head, RationalMaskHead):
        return adapter.method
    check_adaptable(adapter)
    target = MASKED_VARIANTS.get(adapter.method)
    if target is None or target not in method_registry():
        raise UsageError(
            f"no registered method adds RAda's mask to {adapter.method!r}, so the adapted file cannot be written",
            fix="run without -o (predictions only), or start from a zeroshot, full-ft or rada adapter",
        )
    return target


def check_adaptable(adapter: Adapter) -> None:
    head = adapter.model.head
    if not isinstance(head, (RationalMaskHead, CosineHead)):
        raise UsageError(
            f"test-time adaptation needs a method that scores image against class features; "
            f"{adapter.method!r} uses its own classifier weights",
            fix="start from a zeroshot, rada, rada-ft, full-ft or adaring adapter",
        )


def list_tta_images(folder: str | Path) -> list[Path]:
    if open_data(folder).kind != "folder":  # a manifest or shards: their images, in their order
        return [item for item, _ in labelled_items(folder)]
    folder = Path(folder)
    if not folder.exists():
        raise InputError("folder not found", path=folder)
    if not folder.is_dir():
        raise InputError("not a folder", path=folder, fix="give a folder of images (searched recursively)")
    images = list_images(folder)
    if not images:
        raise InputError(
            "no images found", path=folder, fix=f"supported extensions: {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return images


# ------------------------------------------------------------------------------------------ labels


def resolve_labels(
    adapter: Adapter, folder: Path, images: list[Path], labels: str | Path | dict | None
) -> list[int | None] | None:
    """True class indices for scoring (never for adapting): `folders` (each image's parent folder),
    a CSV with `file,label` columns (paths relative to the folder), or a {path: label} mapping.
    Labels may be class folder names or class names."""
    if labels is None:
        return None
    index = _label_index(adapter)
    if isinstance(labels, str) and labels == "folders" and open_data(folder).kind != "folder":
        named = {str(item): key for item, key in labelled_items(folder)}  # the manifest's or shards' labels
    elif isinstance(labels, str) and labels == "folders":
        named = {str(p): record_name(p.parent.name) for p in images if p.parent != folder}
    elif isinstance(labels, dict):
        named = {str(Path(k) if Path(k).is_absolute() else folder / k): str(v) for k, v in labels.items()}
    else:
        named = _read_label_csv(Path(labels), folder)
    unknown = sorted({name for name in named.values() if _lookup(index, name) is None})
    if unknown:
        raise InputError(
            f"labels name classes the adapter does not have: {', '.join(map(repr, unknown[:5]))}",
            fix=f"labels must be class folder names or class names, e.g. {adapter.class_names[0]!r}",
        )
    result = [_lookup(index, named[str(p)]) if str(p) in named else None for p in images]
    if all(r is None for r in result):
        raise InputError("no image in the folder has a label", fix="check the label file's paths (relative to FOLDER)")
    return result


def _label_index(adapter: Adapter) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(adapter.class_names):
        index.setdefault(name.lower(), i)
    for i, folder in enumerate(adapter.metadata.class_folders or []):
        index.setdefault(folder.lower(), i)
        index.setdefault(class_name_from_folder(folder).lower(), i)
    return index


def _lookup(index: dict[str, int], name: str) -> int | None:
    key = name.strip().lower()
    found = index.get(key)
    return found if found is not None else index.get(class_name_from_folder(name).lower())


def _read_label_csv(path: Path, folder: Path) -> dict[str, str]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise InputError("label file not found", path=path) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"cannot read label file ({exc})", path=path) from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["file", "label"]:
        rows = rows[1:]
    named: dict[str, str] = {}
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip():
            continue
        if len(row) < 2:
            raise InputError(f"label file row {number} needs two columns: file,label", path=path)
        file = Path(row[0].strip())
        named[str(file if file.is_absolute() else folder / file)] = row[1].strip()
    return named


# ------------------------------------------------------------------------------------------ objectives


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each row's softmax."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def confident_rows(logits: torch.Tensor, fraction: float) -> torch.Tensor | None:
    """Indices of the rows with the lowest entropy, max(1, int(fraction * n)) of them (TPT keeps 6 of
    64), or None when that is every row."""
    n = logits.shape[0]
    keep = max(1, min(n, int(fraction * n)))
    if keep == n:
        return None
    return entropy(logits.detach()).argsort()[:keep]


def confident(logits: torch.Tensor, fraction: float) -> torch.Tensor:
    """The rows with the lowest entropy (see `confident_rows`)."""
    rows = confident_rows(logits, fraction)
    return logits if rows is None else logits[rows]


def view_seed(seed: int, image: Image.Image) -> int:
    """The seed of an image's episodic views: from `seed` and the image's pixels, so the same image gets the
    same views anywhere in any folder, and two images of the same size get different crops."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=8, key=str(seed).encode())
    digest.update(f"{image.mode}{image.size}".encode())
    return int.from_bytes(digest.digest(), "little") & (2**63 - 1)


def episodic_views(image: Image.Image, seed: int, n_views: int, eval_transform, augment) -> torch.Tensor:
    """TPT's views of one image: the original (eval transform) and `n_views - 1` random augmentations,
    drawn from a generator seeded by `view_seed` (the global RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(view_seed(seed, image))
        return torch.stack([eval_transform(image)] + [augment(image) for _ in range(n_views - 1)])


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the rows' averaged probability (computed in log space)."""
    logp = F.log_softmax(logits, dim=-1)
    mean_logp = torch.logsumexp(logp, dim=0) - math.log(logits.shape[0])
    return -(mean_logp.exp() * mean_logp).sum()


def online_loss(
    logits: torch.Tensor, start_logits: torch.Tensor, settings: TTASettings, running: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The online objective and the updated running mean prediction."""
    kept = confident(logits, settings.effective_confident_fraction)
    loss = entropy(kept).mean()
    batch_mean = logits.softmax(dim=-1).mean(dim=0)
    m = settings.diversity_momentum if running is not None else 0.0  # 0: SHOT's batch-mean marginal
    marginal = m * (running if running is not None else 0) + (1 - m) * batch_mean
    if settings.diversity_weight:
        loss = loss + settings.diversity_weight * (marginal * marginal.clamp_min(1e-12).log()).sum()
    if settings.anchor_weight:
        start = F.log_softmax(start_logits, dim=-1)
        loss = loss + settings.anchor_weight * F.kl_div(
            F.log_softmax(logits, dim=-1), start, log_target=True, reduction="batchmean"
        )
    return loss, marginal.detach()


class TDACache:
    """TDA's positive and negative caches of test features (see the module docstring)."""

    def __init__(self, n_classes: int, settings: TDASettings):
        self.n_classes = n_classes
        self.settings = settings
        # per class: list of (normalised entropy, feature, value row)
        self.positive: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_classes)]
        self.negative: list[list[tuple[float, torch.Tensor, torch.Tensor]]] = [[] for _ in range(n_classes)]

    @staticmethod
    def _insert(slot: list, capacity: int, item: tuple) -> None:
        if capacity <= 0:
            return
        if len(slot) < capacity:
            slot.append(item)
        elif item[0] < slot[-1][0]:
            slot[-1] = item
        else:
            return
        slot.sort(key=lambda entry: entry[0])

    @staticmethod
    def _logits(feature: torch.Tensor, slots: list[list], beta: float) -> torch.Tensor | None:
        entries = [entry for slot in slots for entry in slot]
        if not entries:
            return None
        keys = torch.stack([e[1] for e in entries])
        values = torch.stack([e[2] for e in entries])
        affinity = torch.exp(-beta * (1.0 - keys @ feature))
        return affinity @ values

    def observe_and_adjust(self, feature: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """Add one image to the caches, then return its cache-adjusted logits."""
        s = self.settings
        probs = logits.softmax(dim=-1)
        # The reference divides an entropy in nats by log2(K) (utils.get_entropy); its thresholds were set
        # on that scale, so the same division is kept.
        normalised = float(-(probs * logits.log_softmax(dim=-1)).sum() / math.log2(max(2, self.n_classes)))
        predicted = int(probs.argmax())
        feature = feature.float()
        one_hot = F.one_hot(torch.tensor(predicted), self.n_classes).float().to(feature.device)
        self._insert(self.positive[predicted], s.positive_capacity, (normalised, feature, one_hot))
        low, high = s.negative_entropy
        if low < normalised < high:
            low_p, high_p = s.negative_mask
            possible = ((probs > low_p) & (probs < high_p)).float()  # subtracted below: "probably not these"
            self._insert(self.negative[predicted], s.negative_capacity, (normalised, feature, possible))
        adjusted = logits.clone()
        positive = self._logits(feature, self.positive, s.positive_beta)
        if positive is not None:
            adjusted += s.positive_alpha * positive
        negative = self._logits(feature, self.negative, s.negative_beta)
        if negative is not None:
            adjusted -= s.negative_alpha * negative
        return adjusted


# ------------------------------------------------------------------------------------------ the run


class TestTimeAdaptation:
    """One TTA run over a list of images. `run()` yields predictions in input order (streamable);
    afterwards `adapted_adapter()` gives the adapter with the final mask and the run in its history."""

    __test__ = False  # not a pytest class

    def __init__(self, adapter: Adapter, settings: TTASettings):
        self.source = adapter
        self.settings = settings
        self.n_images = 0
        self.skipped = 0
        self.seconds = 0.0
        self.correct = 0
        self.correct_before = 0
        self.labelled = 0
        if settings.mode == "tda":  # training-free: the adapter as it is, plus caches
            self.start = "none"
            self.model = adapter.model
            self.model.eval()
            return
        check_adaptable(adapter)
        head = adapter.model.head
        if isinstance(head, RationalMaskHead):
            self.start = "adapter"
            start_head = copy.deepcopy(head)
            config = adapter.model.config
        else:
            self.start = "identity"
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)
                start_head = RationalMaskHead(adapter.backbone.embed_dim, settings.mask)
            config = None  # decided when the file is written
        start_head.requires_grad_(True)
        self.model: AdaptedCLIP = adapter.model.with_head(start_head, config or adapter.model.config)
        self.model.eval()
        self.head = start_head
        self._start_state = {k: v.detach().clone() for k, v in start_head.state_dict().items()}
        self._frozen_start = copy.deepcopy(start_head).requires_grad_(False) if settings.mode == "online" else None
        self.optimizer = self._new_optimizer()

    def _new_optimizer(self) -> torch.optim.Optimizer:
        s = self.settings
        return torch.optim.AdamW(self.head.parameters(), lr=s.effective_lr, weight_decay=s.effective_weight_decay)

    def _reset(self) -> None:
        self.head.load_state_dict(self._start_state)
        self.optimizer = self._new_optimizer()

    # --- running ----------------------------------------------------------------------------------

    def run(self, images: list[Path], truth: list[int | None] | None = None, *, top_k: int = 5) -> Iterator[Prediction]:
        """Adapt on `images` and yield one Prediction per image (unreadable ones with `error`)."""
        started = time.perf_counter()
        steps = {"episodic": self._episodic, "online": self._online, "tda": self._tda}[self.settings.mode](images)
        try:
            with progress(f"tta ({self.settings.mode})", total=len(images)) as advance:
                for index, path, probs, before in steps:
                    advance(1)
                    yield self._record(index, path, probs, before, truth, top_k)
        finally:
            self.seconds += time.perf_counter() - started
            self.model.eval()

    def _record(self, index, path, probs, before, truth, top_k) -> Prediction:
        from .adapter import Prediction

        if probs is None:
            self.skipped += 1
            return Prediction(str(path), None, None, None, error=before)
        self.n_images += 1
        prediction = self.source._prediction(str(path), probs, top_k)
        if truth is not None and truth[index] is not None:
            self.labelled += 1
            self.correct += int(prediction.class_index == truth[index])
            self.correct_before += int(before == truth[index])
            prediction.true_label = self.model.class_names[truth[index]]
        return prediction

    def _class_features(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.class_features()

    def _episodic(self, images: list[Path]):
        backbone = self.model.backbone
        scale = backbone.logit_scale
        eval_transform = backbone.eval_transform()
        augment = backbone.train_transform(self.settings.min_crop_scale)
        fraction = self.settings.effective_confident_fraction
        class_features = self._class_features()
        for index, path in enumerate(images):
            try:
                image = open_item(path)
                pixels = episodic_views(image, self.settings.seed, self.settings.views, eval_transform, augment)
            except Exception as exc:  # noqa: BLE001 - one unreadable image must not end the run
                yield index, path, None, getattr(exc, "reason", f"{type(exc).__name__}: {exc}")
                continue
            with torch.no_grad():
                features = self.model.image_features(pixels)  # (V, D), encoders frozen: once per image
            before, kept = None, None
            for step in range(self.settings.steps):
                logits = self.head(features, class_features, scale).logits  # (V, K)
                if step == 0:  # TPT selects the confident views once, before the first step, and keeps them
                    before = int(logits[0].argmax())
                    kept = confident_rows(logits, fraction)
                loss = marginal_entropy(logits if kept is None else logits[kept])
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            with torch.no_grad():
                probs = self.head(features[:1], class_features, scale).logits.float().softmax(dim=-1)[0].cpu()
            self._reset()
            yield index, path, probs, before

    def _stream(self, images: list[Path], predict_batch):
        """Feed the images in a seeded random order (a folder sorted by class would otherwise arrive
        one class at a time), batch by batch, to `predict_batch(features) -> (probs, before)`; yield the
        results back in folder order as soon as all earlier ones are done."""
        order = list(range(len(images)))
        if self.settings.shuffle:
            order = torch.randperm(len(images), generator=torch.Generator().manual_seed(self.settings.seed)).tolist()
        dataset = StreamingImageDataset([images[i] for i in order], self.model.backbone.eval_transform())
        pending: dict[int, tuple] = {}
        next_index = 0
        for batch in make_loader(dataset, batch_size=self.settings.batch_size, workers=0):
            results = [(s.index, Path(s.path), None, s.reason) for s in batch.skipped]
            if len(batch.labels):
                with torch.no_grad():
                    features = self.model.image_features(batch.pixels)
                probs, before = predict_batch(features)
                results += [
                    (index, Path(path), probs[row], before[row])
                    for row, (index, path) in enumerate(zip(batch.indices.tolist(), batch.paths, strict=True))
                ]
            for position, path, probs, before in results:
                pending[order[position]] = (order[position], path, probs, before)
            while next_index in pending:
                yield pending.pop(next_index)
                next_index += 1

    def _online(self, images: list[Path]):
        scale = self.model.backbone.logit_scale
        class_features = self._class_features()
        running = None

        def adapt_and_predict(features: torch.Tensor):
            nonlocal running
            with torch.no_grad():
                start_logits = self._frozen_start(features, class_features, scale).logits
            for _ in range(self.settings.steps):
                logits = self.head(features, class_features, scale).logits
                loss, marginal = online_loss(logits, start_logits, self.settings, running)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
            running = marginal
            with torch.no_grad():
                probs = self.head(features, class_features, scale).logits.float().softmax(dim=-1).cpu()
            return probs, start_logits.argmax(dim=-1).tolist()

        yield from self._stream(images, adapt_and_predict)

    def _tda(self, images: list[Path]):
        cache = TDACache(len(self.model.class_names), self.settings.tda)

        def predict(features: torch.Tensor):
            with torch.no_grad():
                logits = self.model.logits_from_features(features).float()
            adjusted = torch.stack([cache.observe_and_adjust(f, row) for f, row in zip(features, logits, strict=True)])
            return adjusted.softmax(dim=-1).cpu(), logits.argmax(dim=-1).tolist()

        yield from self._stream(images, predict)

    # --- results ----------------------------------------------------------------------------------

    def record(self, source_name: str | None = None) -> dict[str, Any]:
        """The entry appended to the adapted file's `tta` history."""
        s = self.settings
        entry: dict[str, Any] = {"mode": s.mode, "seed": s.seed}
        if s.mode != "tda":
            entry.update(steps=s.steps, lr=s.effective_lr, confident_fraction=s.effective_confident_fraction)
        entry.update(
            {
                "n_images": self.n_images,
                "skipped_images": self.skipped,
                "started_from": self.start,
                "source": source_name or self.source.source_name,
                "source_method": self.source.method,
                "created_at": created_at_now(),
            }
        )
        if s.mode == "episodic":
            entry.update(views=s.views, min_crop_scale=s.min_crop_scale, weight_decay=s.effective_weight_decay)
        elif s.mode == "online":
            entry.update(
                batch_size=s.batch_size,
                diversity_weight=s.diversity_weight,
                diversity_momentum=s.diversity_momentum,
                anchor_weight=s.anchor_weight,
            )
        else:
            entry.update(batch_size=s.batch_size, tda=s.tda.model_dump(mode="json"))
        if self.labelled:
            entry.update(
                labelled=self.labelled,
                accuracy=round(self.correct / self.labelled, 6),
                accuracy_before=round(self.correct_before / self.labelled, 6),
            )
        return entry

    def adapted_adapter(self, source_name: str | None = None) -> Adapter:
        """A new Adapter with the current mask (episodic: the starting mask) and this run in its history.
        It shares the backbone and components with the source adapter, which is left unchanged."""
        from .adapter import Adapter

        if self.settings.mode == "tda":
            raise UsageError("tda keeps its caches for the stream only: there is no adapted adapter to write")
        method = output_method(self.source)
        if self.start == "adapter":
            config = self.model.config
        else:
            overrides = {**self.source.metadata.method_config, "mask": self.settings.mask.model_dump(mode="json")}
            config = make_method_config(method, overrides)
        head = copy.deepcopy(self.head).requires_grad_(True)
        model = self.source.model.with_head(head, config)
        model.eval()
        metadata = self.source.metadata.model_copy(deep=True)
        metadata.method = method
        metadata.method_config = config.model_dump(mode="json")
        metadata.trainable_params = model.n_trainable()
        metadata.created_at = created_at_now()
        metadata.tta = [*metadata.tta, self.record(source_name)]
        adapter = Adapter(model, metadata)
        return adapter

    def result(self, predictions: list[Prediction], source_name: str | None = None) -> TTAResult:
        try:
            adapted = self.adapted_adapter(source_name)
            record = adapted.metadata.tta[-1]
        except UsageError as exc:  # e.g. lora + mask: predictions are fine, there is just no method to save as
            log.info(f"no adapted adapter: {exc.one_line()}")
            adapted, record = None, self.record(source_name)
        return TTAResult(
            predictions=predictions,
            adapter=adapted,
            n_images=self.n_images,
            skipped=self.skipped,
            seconds=self.seconds,
            labelled=self.labelled,
            accuracy=record.get("accuracy"),
            accuracy_before=record.get("accuracy_before"),
            record=record,
        )

    def summary_line(self) -> str:
        rate = self.n_images / self.seconds if self.seconds > 0 else float("inf")
        text = f"tta {self.settings.mode}: {self.n_images} images in {self.seconds:.1f}s ({rate:.2f} images/s)" + (
            f", skipped {self.skipped} unreadable" if self.skipped else ""
        )
        if self.labelled:
            text += (
                f"; accuracy {self.correct / self.labelled:.4f} on {self.labelled} labelled images"
                f" (without adaptation {self.correct_before / self.labelled:.4f})"
            )
        return text


def run_tta(
    adapter: Adapter,
    folder: str | Path,
    *,
    labels: str | Path | dict | None = None,
    top_k: int = 5,
    **settings: Any,
) -> TTAResult:
    """Adapt `adapter`'s mask on the images under `folder` (recursive); see `Adapter.tta`."""
    images = list_tta_images(folder)
    truth = resolve_labels(adapter, Path(folder), images, labels)
    run = TestTimeAdaptation(adapter, make_tta_settings(**settings))
    predictions = list(run.run(images, truth, top_k=top_k))
    log.info(run.summary_line())
    return run.result(predictions)
