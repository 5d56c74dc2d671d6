"""Per-image soft Dice, the building block of the constant-mask MIL loss and of the distillation loss."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss

__all__ = ["soft_dice_loss"]


def soft_dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss of every (image, channel) pair: `1 - (2 sum(p t) + smooth) / (sum p + sum t + smooth)`.

    Sums run over the spatial axes of one image and one channel, as in the IKD-MIL reference; this is
    MONAI's `DiceLoss(smooth_nr=smooth, smooth_dr=smooth, reduction="none")` on probabilities.

    Args:
        pred: probabilities (B, C, H, W).
        target: soft or hard target broadcastable to `pred`, e.g. (B, 1, H, W) shared by all channels.

    Returns:
        losses of shape (B, C).
    """
    dice = DiceLoss(smooth_nr=smooth, smooth_dr=smooth, reduction="none")
    return dice(pred, target.expand_as(pred)).flatten(1)
