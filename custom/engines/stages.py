"""Run a training stage so that a killed run resumes from its last checkpoint and a finished stage is not redone."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch
from ignite.handlers import Checkpoint
from monai.engines import Workflow
from monai.handlers import CheckpointSaver

from custom.checkpoints import RECORD_KEY, TrainingRecord

__all__ = [
    "CHECKPOINT_POLICIES", "LAST_PREFIX", "epoch_checkpoints", "RecordedCheckpointSaver", "SavedRecord",
    "StageCheckpointSaver", "run_stage", "stage1_model_path",
]

logger = logging.getLogger(__name__)


def epoch_files(save_dir: str | Path, prefix: str) -> list[Path]:
    """The ``{prefix}_epoch=N.pt`` files of ``save_dir`` in epoch order (numeric, oldest first; none without it)."""
    pattern = re.compile(rf"^{re.escape(prefix)}_epoch=(\d+)\.pt$")
    found = [(int(m.group(1)), p) for p in Path(save_dir).glob(f"{prefix}_epoch=*.pt") if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def epoch_checkpoints(save_dir: str | Path, prefix: str) -> list[Path]:
    """The ``{prefix}_checkpoint_epoch=N.pt`` files that ``CheckpointSaver(save_interval=...)`` left, newest first."""
    return epoch_files(save_dir, f"{prefix}_checkpoint")[::-1]


CHECKPOINT_POLICIES = ("best", "last")
LAST_PREFIX = "teacher_last"  # file prefix of the stage-1 teacher's final-epoch checkpoint (checkpoint_policy "last")


def stage1_model_path(save_dir: str | Path, best_path: str | Path, policy: str) -> Path:
    """The checkpoint that becomes the finished stage 1's MIL teacher: ``best_path`` (best validation score) with
    policy ``"best"``, the newest ``teacher_last_checkpoint_epoch=N.pt`` in ``save_dir`` (the final epoch) with
    ``"last"``.

    On a validation split of a few dozen images from the training patients the best-scoring epoch is a noisy pick:
    on the mosaics the final epoch of the fixed schedule was as good or better on unseen patients in 14 of 15 seeds
    (bundle/docs/README.md, Results: which epoch to keep)."""
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"checkpoint_policy must be one of {CHECKPOINT_POLICIES}, got {policy!r}.")
    if policy == "best":
        return Path(best_path)
    found = epoch_checkpoints(save_dir, LAST_PREFIX)
    if not found:
        raise FileNotFoundError(
            f"checkpoint_policy 'last' takes the stage-1 teacher from {save_dir}/{LAST_PREFIX}_checkpoint_epoch=N.pt "
            "and there is none: was stage 1 trained with checkpoint_policy 'best'? Pass --checkpoint_policy best."
        )
    return found[0]


class SavedRecord:
    """A checkpoint entry holding the :class:`custom.checkpoints.TrainingRecord` of the network saved beside it, with
    the training summary of the moment it is written: ``source``, the epoch (of the engine the saver is attached
    to) and the validation score (the key metric of ``validator``, or of that engine when it is the evaluator).

    Saved like any other object of a ``save_dict`` (``state_dict()``); nothing is restored from it on resume.
    """

    def __init__(self, record: TrainingRecord, weights: str, source: str = "", stage: str | None = None,
                 validator: Workflow | None = None) -> None:
        self.record, self.weights, self.source, self.stage, self.validator = record, weights, source, stage, validator
        self.engine: Workflow | None = None

    def state_dict(self) -> dict[str, Any]:
        """The record, as plain data."""
        scored = self.validator if self.validator is not None else self.engine
        metric = getattr(getattr(scored, "state", None), "key_metric_name", None)
        score = scored.state.metrics.get(metric) if metric else None
        epoch = self.engine.state.epoch if self.engine is not None else None
        training = {"source": self.source, "val_score": None if score is None else float(score),
                    "epochs": self.record.epochs_until(self.stage, epoch)}
        if metric:
            training["selection_metric"] = metric
        return self.record.describe(weights=self.weights, **training)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore: the record is written anew with every checkpoint."""


class RecordedCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files also hold, under ``"record"``, what the saved network is and how it
    was trained (:class:`SavedRecord`), so that the checkpoint alone can be loaded, evaluated and exported
    (``custom.checkpoints.load_weights``). ``train.json``'s best-teacher saver (``teacher_best.pt``).

    Args:
        save_dir, save_dict: as ``CheckpointSaver``; the first entry of ``save_dict`` is the network the record
            describes (``record["weights"]`` names it).
        record: the training's :class:`custom.checkpoints.TrainingRecord`; ``None`` saves no record.
        source: what the saved network is, for the summary (e.g. ``stage-1 MIL teacher (best validation)``).
        stage: the stage the saver runs in (a key of the record's ``epochs``).
        validator: the evaluator whose key metric is the validation score, when the saver is attached to a trainer.
        kwargs: the other arguments of ``CheckpointSaver``.
    """

    def __init__(self, save_dir: str, save_dict: dict, record: TrainingRecord | None = None, source: str = "",
                 stage: str | None = None, validator: Workflow | None = None, **kwargs: Any) -> None:
        save_dict = dict(save_dict)
        if RECORD_KEY in save_dict:
            raise ValueError(f"save_dict must not hold {RECORD_KEY!r}: the record is saved under it")
        if record is not None and save_dict:
            save_dict[RECORD_KEY] = SavedRecord(record, next(iter(save_dict)), source, stage, validator)
        super().__init__(save_dir=save_dir, save_dict=save_dict, **kwargs)

    def attach(self, engine: Workflow) -> None:
        """Record the epochs of ``engine``, then save at the configured events."""
        if isinstance(self.save_dict.get(RECORD_KEY), SavedRecord):
            self.save_dict[RECORD_KEY].engine = engine
        super().attach(engine)


class StageCheckpointSaver(RecordedCheckpointSaver):
    """The epoch ``CheckpointSaver`` of a training stage: each file holds ``save_dict`` plus the engine the saver is
    attached to, under ``engine_key``, and the record (see :class:`RecordedCheckpointSaver`).

    A config cannot list the trainer in the ``save_dict`` of a handler that the trainer's own ``train_handlers``
    list (the reference would be circular), so the engine joins the checkpoint when the saver is attached. List it
    last in ``train_handlers``: Ignite runs the handlers of one event in the order they were attached, so each
    epoch is then saved after its validation and role-swap decision. Same arguments as
    :class:`RecordedCheckpointSaver`.
    """

    def __init__(self, save_dir: str, save_dict: dict, engine_key: str = "trainer", **kwargs: Any) -> None:
        if engine_key in save_dict:
            raise ValueError(
                f"save_dict must not hold {engine_key!r}: the engine the saver is attached to is saved under it"
            )
        super().__init__(save_dir=save_dir, save_dict=dict(save_dict), **kwargs)
        self.engine_key = engine_key

    def attach(self, engine: Workflow) -> None:
        """Checkpoint ``engine`` with the other objects, then save at the configured events."""
        self.save_dict[self.engine_key] = engine
        super().attach(engine)

    def objects(self, engine: Workflow) -> dict[str, Any]:
        """Everything a resumed run restores from a checkpoint of ``engine`` (also on a rank where the saver is not
        attached): the saved objects and the engine; the record is not restored."""
        return {**{k: v for k, v in self.save_dict.items() if k != RECORD_KEY}, self.engine_key: engine}


def run_stage(
    trainer: Workflow,
    saver: StageCheckpointSaver,
    prefix: str,
    best_saver: CheckpointSaver | None = None,
    best_path: str | Path | None = None,
) -> Workflow:
    """Resume ``trainer`` from the newest epoch checkpoint ``saver`` left, then run it.

    ``saver`` is the stage's epoch saver, listed last in the trainer's ``train_handlers`` (see
    :class:`StageCheckpointSaver`); every object of ``saver.objects(trainer)`` is restored.
    The configured ``max_epochs`` wins over the checkpoint's, so a finished run can be extended by raising it.
    ``prefix`` must be the saver's ``file_prefix``. ``best_saver`` (the validator's key-metric saver, with
    ``key_metric_save_state=True``) gets its best-score record back from ``best_path``, so a resumed run does not
    overwrite a better best checkpoint with a worse one. A checkpoint that fails to load (a run killed while
    writing it) is reported and the next older one is tried.
    """
    max_epochs = trainer.state.max_epochs
    for path in epoch_checkpoints(saver.save_dir, prefix):
        try:
            checkpoint = torch.load(path, map_location=trainer.state.device, weights_only=False)
        except Exception as e:  # a truncated file from a killed run: fall back to the previous one
            logger.warning(f"{prefix}: cannot read checkpoint {path} ({e}); trying an older one")
            continue
        Checkpoint.load_objects(to_load=saver.objects(trainer), checkpoint=checkpoint)
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

