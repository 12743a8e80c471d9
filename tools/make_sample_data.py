"""Write sample_data/ from Fashion-MNIST (Debian package dataset-fashion-mnist, MIT licence, Zalando).

    python -m tools.make_sample_data [--out sample_data] [--seed 0]

Deterministic given the seed. Layout:
    train/<class>/     16 images per class, from the official train split
    test/<class>/      20 images per class, from the official t10k split
    shifted/           500 t10k images (none of them in test/) with a visible corruption, unlabeled:
                       enough for online test-time adaptation to take 16 steps of 32 (with 50, the
                       demo's TTA moved one image either way)
    shifted_labels.csv file,label for shifted/ (so a demo can score test-time adaptation)
    classes.json       {folder: class name used in prompts}
Images stay 28x28 greyscale PNGs as published; adaclip's transforms resize them.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from tools.lite.fmnist import PROMPT_NAMES, load_split

# Folder names read as class names on their own (adaclip turns _ and - into spaces); classes.json
# gives the exact prompt names (tools.lite.fmnist.PROMPT_NAMES).
FOLDERS = ("tshirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
TRAIN_PER_CLASS, TEST_PER_CLASS, SHIFTED_TOTAL = 16, 20, 500
CORRUPTIONS = ("noise", "blur", "contrast")


def per_class_indices(
    labels: np.ndarray, count: int, rng: np.random.Generator, exclude: set[int] = frozenset()
) -> list[np.ndarray]:
    """`count` random indices of each class, skipping `exclude`, in a fixed order."""
    out = []
    for k in range(len(FOLDERS)):
        pool = np.array([i for i in np.flatnonzero(labels == k) if i not in exclude])
        out.append(np.sort(rng.choice(pool, count, replace=False)))
    return out


def corrupt(image: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A visible but recognisable corruption: Gaussian noise, blur, or low contrast."""
    if kind == "noise":
        return np.clip(image + rng.normal(0, 30, image.shape), 0, 255).astype(np.uint8)
    if kind == "blur":
        return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(0.8)))
    return (image.astype(np.float32) * 0.45 + 70).astype(np.uint8)


def write_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image, mode="L").save(path, optimize=True)


def write_labelled(out: Path, split_dir: str, images: np.ndarray, groups: list[np.ndarray], prefix: str) -> None:
    for k, indices in enumerate(groups):
        for i in indices:
            write_png(images[i], out / split_dir / FOLDERS[k] / f"{prefix}{i:05d}.png")


def write_shifted(out: Path, images: np.ndarray, labels: np.ndarray, used: set[int], rng: np.random.Generator) -> None:
    """SHIFTED_TOTAL t10k images not in test/, SHIFTED_TOTAL / 10 per class, each with one corruption, plus
    their labels."""
    groups = per_class_indices(labels, SHIFTED_TOTAL // len(FOLDERS), rng, exclude=used)
    chosen = rng.permutation(np.concatenate(groups))
    rows = []
    for n, i in enumerate(chosen):
        kind = CORRUPTIONS[n % len(CORRUPTIONS)]
        name = f"shifted_{n:03d}.png"  # no label or index in the name: the folder is unlabeled
        write_png(corrupt(images[i], kind, rng), out / "shifted" / name)
        rows.append((name, FOLDERS[labels[i]], kind))
    with (out / "shifted_labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("file", "label", "corruption"))
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("sample_data"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for sub in ("train", "test", "shifted"):
        shutil.rmtree(args.out / sub, ignore_errors=True)
    train_x, train_y = load_split("train")
    test_x, test_y = load_split("t10k")
    write_labelled(args.out, "train", train_x, per_class_indices(train_y, TRAIN_PER_CLASS, rng), "train_")
    test_groups = per_class_indices(test_y, TEST_PER_CLASS, rng)
    write_labelled(args.out, "test", test_x, test_groups, "t10k_")
    write_shifted(args.out, test_x, test_y, {int(i) for g in test_groups for i in g}, rng)
    (args.out / "classes.json").write_text(json.dumps(dict(zip(FOLDERS, PROMPT_NAMES, strict=True)), indent=2) + "\n")
    print(f"wrote {args.out}/: train {TRAIN_PER_CLASS}/class, test {TEST_PER_CLASS}/class, shifted {SHIFTED_TOTAL}")


if __name__ == "__main__":
    main()
