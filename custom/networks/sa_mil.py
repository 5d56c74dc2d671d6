"""SA-MIL style segmenter: the DWS-MIL trunk with multi-head self-attention over the deepest feature map."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .mil_segmenter import MILSegmenter
from .vgg import stage_channels, vgg16_bn_trunk

__all__ = ["SpatialSelfAttention", "SAMIL"]


class SpatialSelfAttention(nn.Module):
    """Residual multi-head self-attention across all positions of a (B, C, H, W) feature map.

    Pre-norm attention whose output is scaled by a learnable gate initialised at 0 (as in SAGAN), so the
    block starts as the identity and does not disturb a pretrained trunk; it lets every position see the
    whole image, which MIL needs to tell an isolated tumour-like patch from tumour context.
    """

    def __init__(self, channels: int, num_heads: int = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if channels % num_heads != 0:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads}).")
        self.norm = nn.LayerNorm(channels)
        self.attention = nn.MultiheadAttention(channels, num_heads, dropout=dropout, batch_first=True)
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend over the H*W positions as a token sequence and add the result back to the map."""
        b, c, h, w = x.shape
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B, H*W, C)
        attended, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return x + self.gate * attended.transpose(1, 2).reshape(b, c, h, w)


class SAMIL(MILSegmenter):
    """VGG16-BN blocks 1-3 with self-attention after block 3 (1/8 resolution), one side map per block.

    Attention runs only on the deepest map: at 256x256 input that is 32x32 = 1024 tokens, whereas block 2
    would give 4096 and a 16x larger attention matrix.

    Args:
        in_channels: image channels.
        width: channel multiplier (1.0 = 64/128/256 channels); the deepest width must divide by num_heads.
        fusion_weights: weights of the three side maps in the fused map (SA-MIL uses (0.2, 0.35, 0.45)).
        num_heads: attention heads.
        pretrained_path: optional local torchvision `vgg16_bn` state-dict file for the convolutional trunk
            (width=1.0 only); the attention block always starts as the identity.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: float = 1.0,
        fusion_weights: Sequence[float] = (0.2, 0.35, 0.45),
        num_heads: int = 8,
        pretrained_path: str | None = None,
    ) -> None:
        channels = stage_channels(width)
        blocks: list[nn.Module] = list(vgg16_bn_trunk(width, in_channels, pretrained_path))
        blocks[-1] = nn.Sequential(blocks[-1], SpatialSelfAttention(channels[-1], num_heads))
        super().__init__(blocks, channels, fusion_weights)
        self.definition = {
            "_target_": "custom.networks.SAMIL", "in_channels": int(in_channels), "width": float(width),
            "fusion_weights": [float(w) for w in fusion_weights], "num_heads": int(num_heads),
            "pretrained_path": pretrained_path,
        }
