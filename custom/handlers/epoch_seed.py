"""Seed every epoch from (seed, epoch), so a run resumed from a checkpoint replays the epochs it had not finished."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from monai.transforms import Randomizable
from monai.utils import IgniteInfo, min_version, optional_import, set_determinism

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["EpochSeedHandler"]


class EpochSeedHandler:
    """Reseed Python, numpy and torch at each epoch start with ``seed + epoch * stride``.

    The DataLoader draws its shuffling order (and its workers' seeds) when an epoch starts, so an epoch's order
    depends only on the seed and the epoch number, not on how much randomness earlier epochs consumed: a stage
    that is killed and resumed from its last epoch checkpoint sees the same batches as an uninterrupted run.
    ``randomizable`` (MONAI transforms with their own generator, e.g. the trainer's batch augmentations) are reseeded
    too, since ``set_determinism`` does not reach their ``R``: the i-th with the epoch's seed + i, so that two of them
    never draw the same numbers.
    Attach it first in ``train_handlers``.
    """

    def __init__(self, seed: int, stride: int = 1000, randomizable: Sequence[Randomizable | None] = ()) -> None:
        self.seed = seed
        self.stride = stride
        self.randomizable = [r for r in randomizable if r is not None]  # a disabled config component is None

    def attach(self, engine: Engine) -> None:
        """Reseed before every epoch's data iterator is created."""
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        """``engine.state.epoch`` is already the new epoch's number here."""
        seed = self.seed + engine.state.epoch * self.stride
        set_determinism(seed=seed)
        for offset, transform in enumerate(self.randomizable):
            transform.set_random_state(seed=seed + offset)
