"""Run a training stage so that a killed run resumes from its last checkpoint and a finished stage is not redone."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from ignite.handlers import Checkpoint
from monai.engines import Workflow
from monai.handlers import CheckpointSaver

__all__ = ["epoch_checkpoints", "run_stage"]

logger = logging.getLogger(__name__)


def epoch_checkpoints(save_dir: str | Path, prefix: str) -> list[Path]:
    """The ``{prefix}_checkpoint_epoch=N.pt`` files that ``CheckpointSaver(save_interval=...)`` left, newest first."""
    pattern = re.compile(rf"^{re.escape(prefix)}_checkpoint_epoch=(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in Path(save_dir).glob(f"{prefix}_checkpoint_epoch=*.pt") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def run_stage(
    trainer: Workflow,
    saver: CheckpointSaver,
    prefix: str,
    best_saver: CheckpointSaver | None = None,
    best_path: str | Path | None = None,
) -> Workflow:
    """Attach ``saver`` (every object of its ``save_dict`` is checkpointed), resume from its newest file, then run.

    ``saver`` is attached here, after the trainer's own handlers, so each epoch is saved after its validation and
    role-swap decision; it cannot sit in ``train_handlers`` because its ``save_dict`` holds the trainer itself.
    The configured ``max_epochs`` wins over the checkpoint's, so a finished run can be extended by raising it.
    ``prefix`` must be the saver's ``file_prefix``. ``best_saver`` (the validator's key-metric saver, with
    ``key_metric_save_state=True``) gets its best-score record back from ``best_path``, so a resumed run does not
    overwrite a better best checkpoint with a worse one. A checkpoint that fails to load (a run killed while
    writing it) is reported and the next older one is tried.
    """
    saver.attach(trainer)
    max_epochs = trainer.state.max_epochs
    for path in epoch_checkpoints(saver.save_dir, prefix):
        try:
            checkpoint = torch.load(path, map_location=trainer.state.device, weights_only=False)
        except Exception as e:  # a truncated file from a killed run: fall back to the previous one
            logger.warning(f"{prefix}: cannot read checkpoint {path} ({e}); trying an older one")
            continue
        Checkpoint.load_objects(to_load=saver.save_dict, checkpoint=checkpoint)
        trainer.state.max_epochs = max_epochs
        if best_saver is not None and best_path is not None and Path(best_path).is_file():
            best_saver.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=False)["checkpointer"])
        logger.info(f"{prefix}: resumed from {path} at epoch {trainer.state.epoch} of {max_epochs}")
        break
    if trainer.state.epoch >= max_epochs:
        logger.info(f"{prefix}: already complete ({trainer.state.epoch} epochs), not run again")
        return trainer
    trainer.run()
    return trainer

