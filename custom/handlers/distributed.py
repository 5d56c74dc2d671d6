"""Stage-2 handlers for DistributedDataParallel runs: one role-swap decision for all ranks, sharded pseudo-labels."""

from __future__ import annotations

import itertools
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from custom.engines.distillation_trainer import DistillationEvents
from custom.engines.distributed import barrier, rank, state_digest, world_size
from custom.handlers.pseudo_labels import PseudoLabelHandler
from custom.handlers.role_swap import RoleSwapHandler, _unwrap

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["DistributedRoleSwapHandler", "ShardedPseudoLabelHandler"]

logger = logging.getLogger(__name__)


class DistributedRoleSwapHandler(RoleSwapHandler):
    """
    :class:`RoleSwapHandler` for a trainer that runs on every rank of a process group.

    Rank 0's decision is broadcast, so all ranks swap or none does; every rank then performs the swap, and on
    ``DistillationEvents.ROLES_SWAPPED`` rank 0's teacher and student weights are broadcast into every rank's
    copies, before the pseudo-label handler (attached after this one) runs the new teacher. Each rank logs the
    SHA-256 of both networks after the swap ("role swap synchronised ..."), so a run's log shows that the ranks agree.
    The validators should see the whole validation set (a sharded loader whose metric MONAI gathers, or an
    unsharded one) so that every rank records the same scores. Same arguments as :class:`RoleSwapHandler`.
    """

    def attach(self, engine: Engine) -> None:
        """As :class:`RoleSwapHandler`, plus the weight broadcast after each swap."""
        super().attach(engine)
        engine.add_event_handler(DistillationEvents.ROLES_SWAPPED, self.synchronise)

    def _should_swap(self) -> bool:
        """Rank 0's decision, on every rank."""
        decision = [super()._should_swap()]
        if world_size() > 1:
            dist.broadcast_object_list(decision, src=0)
        return bool(decision[0])

    def synchronise(self, engine: Engine) -> None:
        """Overwrite every rank's teacher and student with rank 0's, in place (the optimizer keeps its parameters)."""
        networks = {"teacher": engine.teacher, "student": _unwrap(engine.network)}
        if world_size() > 1:
            for network in networks.values():
                for tensor in network.state_dict().values():
                    dist.broadcast(tensor, src=0)
        digests = ", ".join(f"{name} {state_digest(network)}" for name, network in networks.items())
        logger.info(f"role swap synchronised at epoch {engine.state.epoch} on rank {rank()}: {digests}")


class ShardedPseudoLabelHandler(PseudoLabelHandler):
    """
    :class:`PseudoLabelHandler` whose maps are written by all ranks, each for its shard of the images.

    Give it a loader with ``monai.data.DistributedSampler(dataset, even_divisible=False, shuffle=False)``: the
    shards are then disjoint and cover the data, so every image's map is written exactly once. Rank 0 gathers the
    rows, restores the loader's order (that sampler deals index ``i`` to rank ``i % world_size``) and writes
    ``manifest.csv``; all ranks then wait, so no rank trains on maps another rank is still writing. An image that
    two ranks wrote (a padded or unsharded loader) is refused. Same arguments as :class:`PseudoLabelHandler`.
    """

    def __call__(self, engine: Engine) -> None:
        """Write this rank's shard, gather the manifest on rank 0, then wait for every rank."""
        rows = self.write_maps(engine.teacher, engine.state.device, engine.state.epoch)
        shards: list[Any] = [rows]
        if world_size() > 1:
            shards = [None] * world_size()
            dist.gather_object(rows, shards if rank() == 0 else None, dst=0)
        if rank() == 0:
            ordered = [row for group in itertools.zip_longest(*shards) for row in group if row is not None]
            _check_written_once(ordered)
            self.write_manifest(ordered)
            self.logger.info(
                f"pseudo-labels round {self.round}: {len(ordered)} maps written by {world_size()} rank(s) to "
                f"{self.output_dir} ({', '.join(str(len(s)) for s in shards)} per rank)"
            )
        barrier()


def _check_written_once(rows: list[dict[str, Any]]) -> None:
    """Refuse a gathered manifest in which an image appears twice: its shards overlapped."""
    repeated = sorted(name for name, count in Counter(row["name"] for row in rows).items() if count > 1)
    if repeated:
        raise RuntimeError(
            f"pseudo-labels of {repeated[:5]} were written by several ranks: give the pseudo-label loader a "
            "DistributedSampler(even_divisible=False, shuffle=False)."
        )
