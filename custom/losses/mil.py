"""Stage-1 MIL losses that train a segmenter from image-level labels only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from .dice import soft_dice_loss

__all__ = ["gm_pool", "MILPoolingLoss", "ConstantMaskDiceLoss"]


def gm_pool(p: torch.Tensor, r: float = 4.0, eps: float = 1e-6) -> torch.Tensor:
    """Generalised mean `(mean_pixels p^r)^(1/r)` over the last two axes: the image score of a probability map.

    r = 1 is the mean, r -> inf the max; r = 4 (SA-MIL / DWS-MIL) lets a few confident pixels carry the image.
    Probabilities are floored at `eps` (the r-th root has an infinite gradient at 0) and divided by their
    (detached) maximum before the power, which leaves the value unchanged but keeps `p^r` from underflowing.
    """
    p = p.clamp_min(eps)
    peak = p.amax(dim=(-2, -1), keepdim=True).detach()
    return peak[..., 0, 0] * (p / peak).pow(r).mean(dim=(-2, -1)).pow(1.0 / r)


def _image_labels(label: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Image labels as a float (B,) vector, accepting (B,) or (B, 1)."""
    label = label.reshape(-1).float()
    if label.numel() != batch_size:
        raise ValueError(f"expected one image label per image ({batch_size}), got shape {tuple(label.shape)}.")
    return label


class MILPoolingLoss(_Loss):
    """BCE between the generalised-mean score of every side map and the fused map and the image label.

    The BCE is averaged over images and maps (`reduction="mean"`), so its scale does not depend on the batch
    size or the number of side maps and the learning rate carries over between backbones; "sum" is offered
    for losses that follow the reference code's summation.

    Args:
        r: generalised-mean exponent.
        eps: floor of the pixel probabilities (see `gm_pool`).
        reduction: "mean" or "sum" over images and maps.
    """

    def __init__(self, r: float = 4.0, eps: float = 1e-6, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.r = r
        self.eps = eps

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """`pred`: (B, S+1, H, W) probabilities; `label`: (B,) or (B, 1) image labels in {0, 1}."""
        scores = gm_pool(pred, self.r, self.eps)  # (B, S+1)
        targets = _image_labels(label, pred.shape[0])[:, None].expand_as(scores)
        return F.binary_cross_entropy(scores, targets, reduction=self.reduction)


class ConstantMaskDiceLoss(_Loss):
    """Soft Dice of every side map and the fused map against a mask made from the image label.

    The IKD-MIL reference scheme: a positive image asks every pixel to be tumour (Dice of p against all
    ones); a negative image asks every pixel to be background (Dice of 1 - p against all ones). Uses
    `soft_dice_loss` with smooth = 1 like the reference. The reference sums over images and maps; "mean"
    (the default) divides that sum by B x (S+1), which Adam barely notices but keeps the scale batch-free.

    Args:
        smooth: Dice smoothing added to numerator and denominator.
        reduction: "mean" or "sum" over images and maps.
    """

    def __init__(self, smooth: float = 1.0, reduction: LossReduction | str = LossReduction.MEAN) -> None:
        super().__init__(reduction=LossReduction(reduction).value)
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.smooth = smooth

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """`pred`: (B, S+1, H, W) probabilities; `label`: (B,) or (B, 1) image labels in {0, 1}."""
        positive = _image_labels(label, pred.shape[0]).view(-1, 1, 1, 1) > 0.5
        foreground = torch.where(positive, pred, 1.0 - pred)
        losses = soft_dice_loss(foreground, torch.ones_like(pred[:, :1]), self.smooth)
        return losses.mean() if self.reduction == "mean" else losses.sum()
