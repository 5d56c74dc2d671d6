"""The fully supervised upper bound: the same MIL network trained on ground-truth masks instead of image labels."""

from __future__ import annotations

import torch
from torch.nn import functional as F
from torch.nn.modules.loss import _Loss

from .dice import soft_dice_loss

__all__ = ["MaskSupervisedLoss"]


class MaskSupervisedLoss(_Loss):
    """Soft Dice + BCE of every side map and the fused map against the pixel mask, averaged over maps and images.

    Only for an upper-bound run labelled as such: it uses the masks that weak supervision is meant to do without.
    ``mask`` is (B, 1, H, W), 0/1; maps are probabilities, so BCE is computed on clamped log-probabilities.
    """

    def __init__(self, smooth: float = 1.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.smooth = smooth
        self.eps = eps

    def forward(self, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Scalar loss for maps (B, S+1, H, W) and mask (B, 1, H, W)."""
        if mask.shape[0] != pred.shape[0] or mask.shape[-2:] != pred.shape[-2:]:
            raise ValueError(f"mask {tuple(mask.shape)} does not match the maps {tuple(pred.shape)} (B, ., H, W)")
        target = (mask > 0.5).to(pred.dtype).expand_as(pred)
        p = pred.float().clamp(self.eps, 1.0 - self.eps)
        bce = F.binary_cross_entropy(p, target.float())
        return soft_dice_loss(pred, target, self.smooth).mean() + bce
