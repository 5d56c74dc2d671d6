"""A network's weights per epoch: all of them for the selection study (``scripts/selection_study.py``), the last few
of the stage-1 teacher as its snapshots (``teacher_snapshots``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from custom.distributed import rank, unwrap_network
from custom.engines.stages import epoch_files as epoch_weight_files

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["EpochWeightsSaver", "SNAPSHOT_PREFIX", "epoch_weight_files"]

# file prefix of the stage-1 teacher's last epochs, the pseudo-label ensemble of ``teacher_snapshots``
SNAPSHOT_PREFIX = "stage1_snapshot"


class EpochWeightsSaver:
    """Save ``network``'s state dict as ``{save_dir}/{prefix}_epoch={N}.pt`` after every epoch, written atomically.

    The epoch checkpoints keep only the last two epochs (for resuming); a study of which validation score picks the
    best checkpoint needs all of them. Off by default (``keep_epoch_weights``): one file per epoch adds up.
    With ``keep_last`` only the last that many epochs' files of ``prefix`` stay (the teacher's snapshots).
    """

    def __init__(
        self, network: torch.nn.Module, save_dir: str | os.PathLike, prefix: str, keep_last: int | None = None
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be at least 1 or None, got {keep_last}.")
        self.network = network
        self.save_dir = Path(save_dir)
        self.prefix = prefix
        self.keep_last = keep_last

    def attach(self, engine: Engine) -> None:
        """Save at each epoch end, after the epoch's validation and role-swap decision."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write this epoch's weights, on rank 0 only (every rank holds the same weights; two writers would race)."""
        if rank() != 0:
            return
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"{self.prefix}_epoch={engine.state.epoch}.pt"
        partial = path.with_suffix(".pt.part")
        torch.save(unwrap_network(self.network).state_dict(), partial)
        os.replace(partial, path)
        if self.keep_last is not None:
            for old in epoch_weight_files(self.save_dir, self.prefix)[:-self.keep_last]:
                old.unlink(missing_ok=True)
