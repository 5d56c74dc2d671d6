"""How engines take a batch: evaluators the image with its ground-truth mask, which the segmentation metrics score
against; mixed-supervision training the image with its label and, for strong images, its mask."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import PrepareBatch

__all__ = ["PrepareImageMask", "PrepareWeakStrong"]


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


class PrepareWeakStrong(PrepareBatch):
    """``(image, {"label", "mask", "strong"})`` on the device, for ``custom.losses.MixedSupervisionLoss``.

    Stage 1 of mixed supervision needs every image's label and, for the strong images, their mask; a batch without
    a ``strong`` key (e.g. slide tiles) is all weak.
    """

    def __init__(
        self, image_key: str = "image", label_key: str = "label", mask_key: str = "mask", strong_key: str = "strong"
    ) -> None:
        # strong_key: the flag custom.data.with_strong_labels sets (its STRONG_KEY); engines import no data module
        self.image_key, self.label_key, self.mask_key, self.strong_key = image_key, label_key, mask_key, strong_key

    def __call__(
        self, batchdata: dict[str, torch.Tensor], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Move the image and the weak and strong targets of ``batchdata`` to ``device``."""
        image = batchdata[self.image_key].to(device=device, non_blocking=non_blocking, **kwargs)
        label = torch.as_tensor(batchdata[self.label_key])
        strong = torch.as_tensor(batchdata.get(self.strong_key, torch.zeros(label.shape[0], dtype=torch.bool))).bool()
        targets = {self.label_key: label, self.strong_key: strong}
        if bool(strong.any()):
            targets[self.mask_key] = batchdata[self.mask_key]
        return image, {k: torch.as_tensor(v).to(device=device, non_blocking=non_blocking) for k, v in targets.items()}
