"""The one training loop every method shares, and what it is made of:

loop.py           train(): epochs, steps, distributed batches, callbacks, Ctrl-C
schedule.py       optimizer, learning-rate schedule, step budget, epoch order
features.py       features computed once: frozen-tower feature cache, reference views
validation.py     validation accuracy and head calibration on the validation images
checkpointing.py  when training state is saved, and resuming from it
"""

from __future__ import annotations

from .checkpointing import CheckpointPolicy
from .loop import EpochCallback, StepCallback, TrainingInterrupted, TrainingOutcome, train
from .schedule import epoch_order, make_optimizer, make_scheduler, training_budget, validates_after

__all__ = [
    "CheckpointPolicy",
    "EpochCallback",
    "StepCallback",
    "TrainingInterrupted",
    "TrainingOutcome",
    "epoch_order",
    "make_optimizer",
    "make_scheduler",
    "train",
    "training_budget",
    "validates_after",
]
