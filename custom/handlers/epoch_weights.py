"""Every epoch's weights of a network, kept for the selection study (``scripts/selection_study.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from custom.distributed import unwrap_network

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["EpochWeightsSaver"]


class EpochWeightsSaver:
    """Save ``network``'s state dict as ``{save_dir}/{prefix}_epoch={N}.pt`` after every epoch, written atomically.

    The epoch checkpoints keep only the last two epochs (for resuming); a study of which validation score picks the
    best checkpoint needs all of them. Off by default (``keep_epoch_weights``): one file per epoch adds up.
    """

    def __init__(self, network: torch.nn.Module, save_dir: str | os.PathLike, prefix: str) -> None:
        self.network = network
        self.save_dir = Path(save_dir)
        self.prefix = prefix

    def attach(self, engine: Engine) -> None:
        """Save at each epoch end, after the epoch's validation and role-swap decision."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Write this epoch's weights."""
        self.save_dir.mkdir(parents=True, exist_ok=True)
        path = self.save_dir / f"{self.prefix}_epoch={engine.state.epoch}.pt"
        partial = path.with_suffix(".pt.part")
        torch.save(unwrap_network(self.network).state_dict(), partial)
        os.replace(partial, path)
