"""Reading the user's labelled images, whatever form they come in, and batching them.

One concern per module:

- `sources`: what DATA is (class folders, a CSV/JSONL manifest, a Hugging Face imagefolder, WebDataset
  shards) and the labelled sets read from it; the training/evaluation sets and `predict`'s inputs.
- `folders`: class folders and train/val/test split folders.
- `manifest`: CSV/JSONL manifests and imagefolder `metadata.csv`/`metadata.jsonl`.
- `shards`: WebDataset tar shards.
- `classes`: class display names and class files.
- `sampling`: few-shot samples, hold-outs, validation sets, the digest of the files used.
- `loading`: datasets, collate and the DataLoader.
- `records`: the records all of the above produce.
"""

from .classes import check_class_names, class_name_from_folder, read_class_file, read_name_list
from .folders import find_splits, list_images, read_image_folder
from .loading import (
    Batch,
    ImageBytes,
    ImageDataset,
    SkippedImage,
    StreamingImageDataset,
    collate,
    default_workers,
    make_loader,
    open_item,
    sample_seed,
)
from .manifest import read_manifest
from .records import (
    SPLIT_NAMES,
    ImageFolder,
    LabelledImage,
    TarSpan,
    TrainingData,
    name_from_record,
    path_from_record,
    record_name,
)
from .sampling import (
    FEW_SHOT_VAL_PER_CLASS,
    check_val_split,
    few_shot_sample,
    few_shot_validation,
    files_digest,
    holdout_count,
    split_training_pool,
    stratified_holdout,
)
from .shards import read_shards
from .sources import (
    DataSource,
    LabelledSets,
    check_classes_readable,
    iter_input_paths,
    labelled_items,
    open_data,
    prepare_eval_data,
    prepare_training_data,
    read_sets,
)

__all__ = [
    "FEW_SHOT_VAL_PER_CLASS",
    "SPLIT_NAMES",
    "Batch",
    "DataSource",
    "ImageBytes",
    "ImageDataset",
    "ImageFolder",
    "LabelledImage",
    "LabelledSets",
    "SkippedImage",
    "StreamingImageDataset",
    "TarSpan",
    "TrainingData",
    "check_class_names",
    "check_classes_readable",
    "check_val_split",
    "class_name_from_folder",
    "collate",
    "default_workers",
    "few_shot_sample",
    "few_shot_validation",
    "files_digest",
    "find_splits",
    "holdout_count",
    "iter_input_paths",
    "labelled_items",
    "list_images",
    "make_loader",
    "name_from_record",
    "open_data",
    "open_item",
    "path_from_record",
    "prepare_eval_data",
    "prepare_training_data",
    "read_class_file",
    "read_image_folder",
    "read_manifest",
    "read_name_list",
    "read_sets",
    "read_shards",
    "record_name",
    "sample_seed",
    "split_training_pool",
    "stratified_holdout",
]
