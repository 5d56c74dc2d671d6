"""Whole-slide inference sharded across the ranks of a ``torchrun`` job: each slide inferred by exactly one rank."""

from __future__ import annotations

import json

import torch.distributed as dist

from custom.distributed import barrier, rank, world_size
from custom.inference.runner import SlideInferenceRunner, raise_for_failures

__all__ = ["ShardedSlideInferenceRunner"]


class ShardedSlideInferenceRunner(SlideInferenceRunner):
    """
    :class:`SlideInferenceRunner` for one rank of a process group: item ``i`` of the resolved input list is inferred
    by rank ``i % world_size``, so every slide is written by exactly one rank and a rerun skips finished slides
    whatever the number of ranks (resume is per slide, on its summary JSON).

    Rank 0 gathers every rank's done/skipped/failed lists and writes ``run_summary.json`` with them merged, plus
    ``"ranks"``: each rank's own lists. Every rank raises the same :class:`SlideInferenceError` when any slide
    failed (with ``raise_on_failure``), after the summary is written. Without torch.distributed it is the plain
    runner. Same arguments as :class:`SlideInferenceRunner`.
    """

    def assigned(self, items: list[dict]) -> list[dict]:
        """This rank's share: every ``world_size``-th item from index ``rank``."""
        return items[rank() :: world_size()]

    def conclude(self, report: dict) -> dict:
        """Merge all ranks' reports on every rank; rank 0 writes the summary; raise if any slide failed anywhere."""
        reports = [report]
        if world_size() > 1:
            reports = [None] * world_size()
            dist.all_gather_object(reports, report)
        merged: dict = {key: [entry for r in reports for entry in r[key]] for key in ("done", "skipped", "failed")}
        merged["ranks"] = reports
        if rank() == 0:
            (self.output_dir / "run_summary.json").write_text(json.dumps(merged, indent=2))
        barrier()
        if self.raise_on_failure:
            raise_for_failures(merged)
        return merged
