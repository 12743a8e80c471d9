"""The loop's checkpoint policy: where and how often training state is saved (the file format lives in
adaclip.checkpoint), and restoring a run from it so a resumed fit ends with the same adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint import TrainingPosition, checkpoint_does_not_fit, load_checkpoint, restore_rng, save_checkpoint
from ..distributed import DistContext
from ..ui import log


@dataclass
class CheckpointPolicy:
    """Where and how often `fit` saves resumable state."""

    path: Path
    every_steps: int | None = None  # also every N optimisation steps (always at each epoch's end)
    resume: bool = False
    fingerprint: dict = field(default_factory=dict)


def restore_training_state(policy: CheckpointPolicy, model, optimizer, scheduler, averaging=None) -> TrainingPosition:
    """Load the checkpoint into the model's trainable parts, the optimizer, the scheduler, the weight
    average (when the run averages) and the RNGs; returns where training stopped."""
    loaded = load_checkpoint(policy.path, policy.fingerprint)
    try:
        model.load_state_dict(loaded.model_state, strict=True)
        optimizer.load_state_dict(loaded.optimizer_state)
        scheduler.load_state_dict(loaded.scheduler_state)
        if averaging is not None:
            averaging.load_state_dict(loaded.averaging_state)
        restore_rng(loaded.rng)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise checkpoint_does_not_fit(policy.path, exc) from None
    position = loaded.position
    log.info(f"resuming from {policy.path} at epoch {position.epoch + 1}, step {position.step_in_epoch}")
    return position


def save_training_state(
    policy: CheckpointPolicy, model, optimizer, scheduler, position, dist_ctx: DistContext, averaging=None
) -> None:
    if dist_ctx.is_main:
        save_checkpoint(
            policy.path,
            model_state=model.adapter_state(),
            optimizer=optimizer,
            scheduler=scheduler,
            position=position,
            fingerprint=policy.fingerprint,
            averaging_state=averaging.state_dict() if averaging is not None else None,
        )
    dist_ctx.barrier()
