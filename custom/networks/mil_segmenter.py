"""Deeply supervised MIL segmenter: a stack of blocks, one sigmoid side map per block, and their fused map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MILSegmenter"]


class MILSegmenter(nn.Module):
    """Runs `blocks` in sequence and turns each block's output into a full-size probability map.

    Output contract shared by every backbone of the project: `forward(x (B, C, H, W))` returns
    `(B, n_side + 1, H, W)` probabilities in [0, 1]; channels `0..n_side-1` are the side maps from shallow
    to deep, the last channel is the fused map `sum_i w_i * side_i`.

    A backbone built from plain arguments (``DWSMIL``, ``SAMIL``) sets ``definition``: its config entry with every
    argument, ``{"_target_": "custom.networks.DWSMIL", "width": 0.25, ...}``, which checkpoints record so that the
    network can be built again from the file (``custom.checkpoints``); ``None`` here.

    Args:
        blocks: feature blocks applied one after the other (each may downsample).
        channels: output channels of each block.
        fusion_weights: fixed, non-negative weights of the side maps in the fused map; they must sum to 1
            so the fused map stays a probability.
    """

    def __init__(self, blocks: Sequence[nn.Module], channels: Sequence[int], fusion_weights: Sequence[float]) -> None:
        super().__init__()
        self.definition: dict | None = None
        if not len(blocks) == len(channels) == len(fusion_weights):
            raise ValueError(
                f"need one channel count and one fusion weight per block: {len(blocks)} blocks, "
                f"{len(channels)} channel counts, {len(fusion_weights)} weights."
            )
        if min(fusion_weights) < 0 or abs(sum(fusion_weights) - 1.0) > 1e-6:
            raise ValueError(f"fusion_weights must be non-negative and sum to 1, got {tuple(fusion_weights)}.")
        self.n_side: int = len(blocks)
        self.blocks = nn.ModuleList(blocks)
        self.side_convs = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1) for c in channels)
        # A non-persistent buffer: it follows .to(device) but checkpoints do not override the configured weights.
        self.register_buffer(
            "fusion_weights", torch.tensor(fusion_weights, dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Side maps upsampled to the input size (bilinear on logits, then sigmoid) and their weighted sum."""
        size = (x.shape[-2], x.shape[-1])
        logits = []
        for block, side_conv in zip(self.blocks, self.side_convs):
            x = block(x)
            logits.append(F.interpolate(side_conv(x), size=size, mode="bilinear", align_corners=False))
        sides = torch.sigmoid(torch.cat(logits, dim=1))
        fused = (sides * self.fusion_weights.to(sides.dtype)).sum(dim=1, keepdim=True)
        return torch.cat([sides, fused], dim=1)
