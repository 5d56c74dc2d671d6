"""Which training items an epoch draws: all of them shuffled, a fixed number of them, or strong labels oversampled.

Two knobs shape an epoch and they share one sampler so that they combine (and work the same under ``torchrun``):

- ``tiles_per_epoch``: whole slides hold far more tiles than an epoch needs; a fixed number per epoch keeps an
  epoch's length (and the validation and swap schedule counted in epochs) independent of how many slides there are;
- ``strong_share``: with mixed supervision a few masked images sit among hundreds of weak ones (6 of 226 at 5 % of
  the masks, one batch in three sees one); drawing them with at least a fixed expected share of every batch lets
  the supervised term act at every step instead of now and then.

Draws use torch's global RNG, which the trainers' per-epoch seeding (``EpochSeedHandler``) sets identically on
every rank, so a resumed run draws the same items and the ranks agree on one global draw, each taking every
``world``-th item of it: the share of strong items holds for the whole epoch, not per rank's shard.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from monai.data import DistributedSampler

from custom.data.strong_labels import STRONG_KEY
from custom.errors import InputError

__all__ = ["EpochSampler", "epoch_sampler", "strong_weights"]

logger = logging.getLogger(__name__)


class EpochSampler(torch.utils.data.Sampler[int]):
    """``num_samples`` indices per epoch, drawn without replacement, or with replacement in proportion to ``weights``.

    ``rank`` of ``world`` processes yields positions ``rank, rank + world, ...`` of the one global draw (padded by
    wrapping so that every rank yields the same count, as an evenly divisible ``DistributedSampler`` does).
    """

    def __init__(
        self, size: int, num_samples: int, weights: Sequence[float] | None = None, rank: int = 0, world: int = 1
    ) -> None:
        if num_samples < 1:
            raise InputError(f"tiles_per_epoch must be >= 1 or null, got {num_samples}")
        self.size = size
        self.num_samples = num_samples if weights is not None else min(num_samples, size)
        self.weights = None if weights is None else torch.as_tensor(weights, dtype=torch.double)
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[int]:
        if self.weights is None:
            draw = torch.randperm(self.size)[: self.num_samples]
        else:
            draw = torch.multinomial(self.weights, self.num_samples, replacement=True)
        per_rank = len(self)
        draw = draw.repeat(math.ceil(per_rank * self.world / len(draw)))[: per_rank * self.world]
        return iter(draw[self.rank :: self.world].tolist())

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.world)


def strong_weights(items: Sequence[dict], share: float) -> list[float] | None:
    """Per-item draw weights that raise strong-labelled items to ``share`` of the draws; None where nothing to raise.

    Only ever a raise: where strong items already make ``share`` of the items (the supervised upper bound, every
    mask in use) the epoch stays as it is, so that the share never thins out the masks a run has.
    """
    if not 0.0 < share < 1.0:
        raise InputError(f"strong_share must be in (0, 1) or null, got {share}")
    strong = [bool(item.get(STRONG_KEY, False)) for item in items]
    n_strong = sum(strong)
    if n_strong == 0 or n_strong >= share * len(items):
        return None
    logger.info(
        "strong_share %g: the %d strong of %d items (%.1f %%) are drawn, with replacement, as that share of every "
        "epoch (each about %.1f times per pass over the items)", share, n_strong, len(items),
        100 * n_strong / len(items), share * len(items) / n_strong,
    )
    return [share / n_strong if s else (1.0 - share) / (len(items) - n_strong) for s in strong]


def epoch_sampler(
    dataset: torch.utils.data.Dataset,
    num_samples: int | None = None,
    strong_share: float | None = None,
    distributed: bool = False,
) -> torch.utils.data.Sampler | None:
    """The training sampler for ``tiles_per_epoch`` and ``strong_share``; None (plain shuffling) when both are off.

    ``strong_share`` 0 is off like None: MONAI's ``run`` drops a ``None`` override, so 0 is how a command line says it.

    ``distributed`` (``multi_gpu_train.json``) shards the draw over the ranks; with both knobs off it is MONAI's
    evenly divisible, shuffling ``DistributedSampler``.
    """
    weights = strong_weights(dataset.data, strong_share) if strong_share else None
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if weights is None and num_samples is None:
        return DistributedSampler(dataset, even_divisible=True, shuffle=True) if distributed else None
    per_epoch = len(dataset) if num_samples is None else int(num_samples)
    return EpochSampler(len(dataset), per_epoch, weights, rank, world)
