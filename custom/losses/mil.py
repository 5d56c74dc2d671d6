"""Stage-1 MIL losses that train a segmenter from image-level labels only."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.utils import LossReduction
from torch.nn.modules.loss import _Loss

from .dice import soft_dice_loss

__all__ = [
    "gm_pool", "pool_tile_scores", "bag_pool", "BAG_POOLINGS", "MILPoolingLoss", "BagMILLoss", "ConstantMaskDiceLoss"
]

BAG_POOLINGS = ("gm", "top_fraction", "top_tiles")


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


def pool_tile_scores(tile_scores: torch.Tensor, r: float = 4.0, top_tiles: int | None = None) -> torch.Tensor:
    """A bag's score from its tiles' scores (k, ...), pooled over the first axis: the mean of the ``top_tiles``
    highest (all of them when k is smaller), or, with None, their generalised mean with ``r``, which for tiles of one
    size scored by ``gm_pool`` equals the generalised mean over all the bag's pixels."""
    if top_tiles is None:
        return tile_scores.clamp_min(0).pow(r).mean(dim=0).pow(1.0 / r)
    if top_tiles < 1:
        raise ValueError(f"top_tiles must be >= 1, got {top_tiles}.")
    return tile_scores.topk(min(top_tiles, tile_scores.shape[0]), dim=0).values.mean(dim=0)


def bag_pool(
    maps: torch.Tensor, pooling: str = "gm", r: float = 4.0, top_fraction: float = 0.01, top_tiles: int = 2
) -> torch.Tensor:
    """One score per map channel for a bag of tiles (k, C, H, W): the slide's score from all its tiles' pixels.

    ``gm`` is the generalised mean over every pixel of the bag (``gm_pool`` of the tiles laid side by side, so a
    bag of one tile scores like that tile); ``top_fraction`` the mean of the bag's highest ``top_fraction`` of pixels
    (at least one), which lets a few percent of tumour tissue carry a slide however much normal tissue it holds;
    ``top_tiles`` the mean of the ``top_tiles`` highest tile scores (each tile's ``gm_pool`` with ``r``; at most the
    bag's k), the instance-level MIL of slide classifiers: a positive bag asks its likeliest tiles to be tumour
    tiles, a negative bag pushes its likeliest tiles (benign lesions that look like tumour) down.
    """
    if maps.ndim != 4:
        raise ValueError(f"expected a bag of maps (k, C, H, W), got shape {tuple(maps.shape)}.")
    channels = maps.transpose(0, 1)  # (C, k, H, W): every tile of the bag, per channel
    if pooling == "gm":
        return gm_pool(channels.flatten(1, 2), r)
    if pooling == "top_fraction":
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}.")
        pixels = channels.flatten(1)
        n = max(1, round(top_fraction * pixels.shape[1]))
        return pixels.topk(n, dim=1).values.mean(dim=1)
    if pooling == "top_tiles":
        return pool_tile_scores(gm_pool(maps, r), top_tiles=top_tiles)  # gm_pool: (k, C), one score per tile and map
    raise ValueError(f"unknown bag pooling {pooling!r}; expected one of {BAG_POOLINGS}.")


class BagMILLoss(_Loss):
    """BCE between each bag's pooled score (every side map and the fused map) and its slide label.

    Optionally, every tile of a negative slide also takes the all-background soft Dice term of
    ``ConstantMaskDiceLoss`` (Dice of 1 - p against all ones), weighted by ``background_weight``: a negative
    slide is negative at every pixel, which pooling alone only says of its highest pixels. Both terms are means
    over bags (and tiles) and maps, so the scale does not depend on the bag size or the number of side maps.

    Args:
        pooling: "gm" (generalised mean over the bag's pixels with exponent ``r``), "top_fraction" (mean of the
            bag's top ``top_fraction`` pixels) or "top_tiles" (mean of the ``top_tiles`` highest tile scores), see
            ``bag_pool``.
        r: generalised-mean exponent.
        top_fraction: fraction of a bag's pixels averaged by "top_fraction" pooling.
        top_tiles: number of tiles averaged by "top_tiles" pooling.
        background_weight: weight of the all-background term on tiles of negative slides (0 switches it off).
        smooth: Dice smoothing of that term.
    """

    def __init__(
        self, pooling: str = "gm", r: float = 4.0, top_fraction: float = 0.01, background_weight: float = 0.0,
        smooth: float = 1.0, top_tiles: int = 2,
    ) -> None:
        super().__init__()
        if pooling not in BAG_POOLINGS:
            raise ValueError(f"unknown bag pooling {pooling!r}; expected one of {BAG_POOLINGS}.")
        if background_weight < 0:
            raise ValueError(f"background_weight must be >= 0, got {background_weight}.")
        self.pooling = pooling
        self.r = r
        self.top_fraction = top_fraction
        if top_tiles < 1:
            raise ValueError(f"top_tiles must be >= 1, got {top_tiles}.")
        self.top_tiles = top_tiles
        self.background_weight = background_weight
        self.smooth = smooth

    def bag_scores(self, pred: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled scores of bags of maps (B, k, C, H, W)."""
        if pred.ndim != 5:
            raise ValueError(f"expected bags of maps (B, k, C, H, W), got shape {tuple(pred.shape)}.")
        return torch.stack([bag_pool(bag, self.pooling, self.r, self.top_fraction, self.top_tiles) for bag in pred])

    def forward(self, pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """`pred`: (B, k, C, H, W) probabilities of B bags of k tiles; `label`: (B,) or (B, 1) slide labels."""
        scores = self.bag_scores(pred)
        targets = _image_labels(label, pred.shape[0])
        loss = F.binary_cross_entropy(scores, targets[:, None].expand_as(scores))
        negative = targets < 0.5
        if self.background_weight > 0 and bool(negative.any()):
            tiles = pred[negative].flatten(0, 1)  # every tile of every negative bag: (n, C, H, W)
            background = soft_dice_loss(1.0 - tiles, torch.ones_like(tiles[:, :1]), self.smooth).mean()
            loss = loss + self.background_weight * background
        return loss
