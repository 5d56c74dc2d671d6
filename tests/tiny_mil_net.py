"""A tiny network with the project's MIL segmenter contract, for fast engine and handler tests."""

import torch
import torch.nn.functional as F
from torch import nn


class TinyMILNet(nn.Module):
    """``net(x: (B, 3, H, W)) -> (B, n_side + 1, H, W)`` probabilities: side maps, then their weighted fusion."""

    def __init__(self, n_side: int = 2, width: int = 4) -> None:
        super().__init__()
        self.n_side = n_side
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
            for i in range(n_side)
        )
        self.heads = nn.ModuleList(nn.Conv2d(width, 1, 1) for _ in range(n_side))
        self.register_buffer("fusion", torch.full((n_side,), 1.0 / n_side))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Side map i is computed at 1/2**i resolution and upsampled back, as in DWS-MIL."""
        size, sides, h = x.shape[2:], [], x
        for i, (block, head) in enumerate(zip(self.blocks, self.heads)):
            h = block(F.avg_pool2d(h, 2) if i else h)
            sides.append(torch.sigmoid(F.interpolate(head(h), size=size, mode="bilinear", align_corners=False)))
        side = torch.cat(sides, dim=1)
        return torch.cat([side, (side * self.fusion.view(1, -1, 1, 1)).sum(1, keepdim=True)], dim=1)
