"""What a bundle run under ``torchrun`` needs besides MONAI's own samplers and DDP: which rank this is, which handlers
a rank keeps, rank-0-only steps, a barrier at the end of a stage, the network inside a DDP wrapper, and a digest to
compare weights across ranks. The distributed variants of components live beside them: the role swap's in
``custom.handlers.distributed_role_swap``, the sharded inference runner in ``custom.inference.sharded``."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.distributed as dist
from monai.handlers import CheckpointSaver, StatsHandler, TensorBoardStatsHandler
from monai.utils import IgniteInfo, min_version, optional_import

idist, _ = optional_import("ignite.distributed", IgniteInfo.OPT_IMPORT_VERSION, min_version)
Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
ProgressBar, _ = optional_import("ignite.handlers", IgniteInfo.OPT_IMPORT_VERSION, min_version, "ProgressBar")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["REPORTING_HANDLERS", "rank", "world_size", "barrier", "handlers_for_rank", "on_rank_zero_alone",
           "StageBarrier", "unwrap_network", "state_digest"]

# handlers that only log or write files: one copy (rank 0) is enough, the others would duplicate or race
REPORTING_HANDLERS = (StatsHandler, TensorBoardStatsHandler, ProgressBar, CheckpointSaver)

T = TypeVar("T")


def rank() -> int:
    """This process's rank; 0 when torch.distributed is not initialised (a plain single-process run)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank, when there are several."""
    if world_size() > 1:
        dist.barrier()


def handlers_for_rank(handlers: Sequence | None, reporting: tuple[type, ...] = REPORTING_HANDLERS) -> list | None:
    """All ``handlers`` on rank 0; on other ranks those that are not instances of ``reporting``.

    Validation, schedulers, seeding and role swaps must run on every rank (they change what each rank computes);
    logs, TensorBoard, progress bars and checkpoint files are written once, by rank 0.
    """
    if handlers is None or rank() == 0:
        return None if handlers is None else list(handlers)
    return [h for h in handlers if not isinstance(h, reporting)]


def on_rank_zero_alone(function: Callable[..., T]) -> Callable[..., T | None]:
    """``function`` as single-process work: every rank leaves the process group, then rank 0 alone runs it.

    For the final report: its MONAI metrics would all-gather across ranks while a group exists, and the other
    ranks have no share of that work. Other ranks return None.
    """

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> T | None:
        this_rank = rank()
        if dist.is_available() and dist.is_initialized():
            barrier()
            dist.destroy_process_group()
            idist.sync()  # Ignite (and so MONAI's metric gathering) would otherwise still see the old world size
        return function(*args, **kwargs) if this_rank == 0 else None

    return wrapper


class StageBarrier:
    """Hold every rank at the end of a training stage until rank 0 has written that stage's checkpoints.

    Rank 0 saves the epoch and best-metric checkpoints inside the last epoch's handlers; a rank that left the stage
    earlier could otherwise read a best checkpoint that is still being written. Attach it last.
    """

    def attach(self, engine: Engine) -> None:
        """Wait when the stage completes (after every epoch handler, the savers included)."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """The barrier itself."""
        barrier()


def unwrap_network(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DataParallel / DistributedDataParallel wrapper, so state-dict keys carry no prefix."""
    wrappers = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
    return network.module if isinstance(network, wrappers) else network


def state_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and values), to compare weights across processes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
