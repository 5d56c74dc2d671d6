"""Stage-2 handler for DistributedDataParallel runs: one role-swap decision for all ranks (pseudo-labels shard
themselves: ``PseudoLabelHandler``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch.distributed as dist
from monai.utils import IgniteInfo, min_version, optional_import

from custom.distributed import rank, state_digest, unwrap_network, world_size
from custom.engines.distillation_trainer import DistillationEvents
from custom.handlers.role_swap import RoleSwapHandler

if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["DistributedRoleSwapHandler"]

logger = logging.getLogger(__name__)


class DistributedRoleSwapHandler(RoleSwapHandler):
    """
    :class:`RoleSwapHandler` for a trainer that runs on every rank of a process group.

    Rank 0's decision is broadcast, so all ranks swap or none does; every rank then performs the swap, and on
    ``DistillationEvents.ROLES_SWAPPED`` rank 0's teacher and student weights are broadcast into every rank's
    copies, before ``DistillationEvents.TEACHER_CHANGED`` (fired by the swap after every ``ROLES_SWAPPED`` handler) lets
    the pseudo-label handler run the new teacher, whatever the order of the trainer's handlers. Each rank logs the
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
        networks = {"teacher": engine.teacher, "student": unwrap_network(engine.network)}
        if world_size() > 1:
            for network in networks.values():
                for tensor in network.state_dict().values():
                    dist.broadcast(tensor, src=0)
        digests = ", ".join(f"{name} {state_digest(network)}" for name, network in networks.items())
        logger.info(f"role swap synchronised at epoch {engine.state.epoch} on rank {rank()}: {digests}")
