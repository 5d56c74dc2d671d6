"""Mean of several networks' maps: the stage-1 teacher's last epochs as one pseudo-label source."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MeanEnsemble"]


class MeanEnsemble(torch.nn.Module):
    """Average the outputs (side maps and fused map, as probabilities) of ``members`` of one architecture.

    A MIL teacher trained from scratch swings by up to 0.2 test F1 between neighbouring epochs; the mean of its last
    few epochs' maps is steadier than any one of them, and a single student distilled from it costs one network at
    inference (Hinton et al., 2015: distilling an ensemble).
    """

    def __init__(self, members: Sequence[torch.nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("MeanEnsemble needs at least one member network.")
        self.members = torch.nn.ModuleList(members)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The element-wise mean of the members' outputs, shape (batch, maps, row, col) as each member's."""
        return torch.stack([member(images) for member in self.members]).mean(dim=0)
