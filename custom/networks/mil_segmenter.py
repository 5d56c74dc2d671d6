"""Deeply supervised MIL segmenter: a stack of blocks, one sigmoid side map per block, and their fused map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MILSegmenter"]


def upsample_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A side map's logits at the input size: bilinear before the sigmoid, as the method fixes."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


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
            logits.append(upsample_logits(side_conv(x), size))
        sides = torch.sigmoid(torch.cat(logits, dim=1))
        fused = (sides * self.fusion_weights.to(sides.dtype)).sum(dim=1, keepdim=True)
        return torch.cat([sides, fused], dim=1)

    def channel_map(
        self, x: torch.Tensor, channel: int = -1, blocks: Sequence[nn.Module] | None = None
    ) -> torch.Tensor:
        """Output channel ``channel`` of :meth:`forward` as ``(B, H, W)``, computing only what it needs.

        A side map runs the blocks up to its own; the fused map accumulates ``w_i * sigmoid(up(logit_i))`` one side
        at a time, without stacking the side maps or concatenating the output (the upsampling stays per side map:
        the sigmoid comes after it, so it cannot move after the fusion). Equal to ``forward(x)[:, channel]`` up to
        float rounding. ``blocks``: replacements of ``self.blocks`` computing the same functions (e.g. with
        BatchNorm folded, as ``custom.inference.runtime`` builds them).
        """
        blocks = self.blocks if blocks is None else blocks
        n_channels = self.n_side + 1
        if not -n_channels <= channel < n_channels:
            raise IndexError(f"channel {channel} out of range for {n_channels} output channels")
        channel %= n_channels
        size = (x.shape[-2], x.shape[-1])
        wanted = range(self.n_side) if channel == self.n_side else [channel]
        fused: torch.Tensor | None = None
        for i, (block, side_conv) in enumerate(zip(blocks, self.side_convs)):
            if i > wanted[-1]:
                break
            x = block(x)
            if i not in wanted:
                continue
            side = torch.sigmoid_(upsample_logits(side_conv(x), size))
            if channel != self.n_side:
                return side[:, 0]
            weight = self.fusion_weights[0, i, 0, 0].to(side.dtype)
            fused = side.mul_(weight) if fused is None else fused.add_(side.mul_(weight))
        return fused[:, 0]
