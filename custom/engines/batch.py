"""How evaluators take a batch: the image with its ground-truth mask, which the segmentation metrics score against."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import PrepareBatch

__all__ = ["PrepareImageMask"]


class PrepareImageMask(PrepareBatch):
    """``(image, mask)`` on the device, so ``SupervisedEvaluator`` outputs ``label`` = the (B, 1, H, W) mask.

    Training batches pair the image with its image-level label (MONAI's default); evaluation needs the pixel mask,
    from which ``MILSegmentationMetric`` also derives each image's label.
    """

    def __init__(self, image_key: str = "image", mask_key: str = "mask") -> None:
        self.image_key = image_key
        self.mask_key = mask_key

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Move the image and mask of ``batchdata`` to ``device``."""
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        mask = batchdata[self.mask_key].to(device=device, non_blocking=non_blocking, **kwargs)
        return image, mask
