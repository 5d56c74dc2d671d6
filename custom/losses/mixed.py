"""Mixed supervision in stage 1: the weak MIL loss on every image plus a supervised term where a pixel mask exists."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn.modules.loss import _Loss

from .mil import MILPoolingLoss
from .supervised import MaskSupervisedLoss

__all__ = ["MixedSupervisionLoss"]


class MixedSupervisionLoss(_Loss):
    """``weak(pred, label) + strong_weight * MaskSupervisedLoss(pred[s], mask[s])`` over the strong images ``s``.

    The targets are ``custom.engines.PrepareWeakStrong``'s dict ``{"label", "mask", "strong"}``. The supervised term
    (soft Dice + BCE of every map against the mask) is the mean over the batch's strong images and 0 in a batch
    without one, so a weak-only training (no strong item) is exactly the weak loss.

    Args:
        weak: the image-label loss, default ``MILPoolingLoss()`` (generalised-mean BCE).
        strong_weight: weight of the supervised term.
    """

    def __init__(self, weak: torch.nn.Module | None = None, strong_weight: float = 1.0) -> None:
        super().__init__()
        if strong_weight < 0:
            raise ValueError(f"strong_weight must be >= 0, got {strong_weight}.")
        self.weak = MILPoolingLoss() if weak is None else weak
        self.strong = MaskSupervisedLoss()
        self.strong_weight = strong_weight

    def forward(self, pred: torch.Tensor, target: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """`pred`: (B, S+1, H, W) probabilities; `target`: label (B,), mask (B, 1, H, W), strong (B,) bool."""
        loss = self.weak(pred, target["label"])
        strong = torch.as_tensor(target["strong"], device=pred.device).reshape(-1).bool()
        if strong.numel() != pred.shape[0]:
            raise ValueError(f"expected one strong flag per image ({pred.shape[0]}), got {strong.numel()}.")
        if self.strong_weight > 0 and bool(strong.any()):
            loss = loss + self.strong_weight * self.strong(pred[strong], target["mask"][strong])
        return loss
