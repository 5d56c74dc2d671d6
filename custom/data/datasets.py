"""MONAI datasets for image patches with image-level labels (and, where they exist, pixel masks).

Every item is a dict ``{"image": (3, H, W) float32 in [0, 1], "label": float scalar tensor,
"mask": (1, H, W) float32, "has_mask": bool, "name": str}`` so that bundle configs can append their own MONAI
transforms (``NormalizeIntensityd`` with ImageNet statistics, random flips, ...) after the loading chain.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, MetaTensor
from monai.transforms import Compose, MapTransform, Resized, ResizeWithPadOrCropd, Transform
from monai.utils import ensure_tuple, ensure_tuple_rep

from custom.data.images import check_mask_size, read_mask, read_rgb

__all__ = ["LoadPatchd", "patch_transforms", "PatchFolderDataset"]

RESIZE_MODES = ("resize", "center_crop", "none")


class LoadPatchd(MapTransform):
    """Load an H&E patch and its mask through the validating readers of ``custom.data.images``.

    The image becomes a (3, rows, cols) float32 MetaTensor in [0, 1] (its path kept as ``filename_or_obj``), the
    mask a (1, rows, cols) float32 tensor of 0/1, all-zero when the item's mask is None (negatives, and positives
    without a gt file; ``has_mask`` tells the two apart so evaluation can skip the latter), and the label a float
    scalar tensor, the form BCE-style losses take.
    """

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "mask", label_key: str = "label") -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.label_key = label_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image_path = d[key]
            image = read_rgb(image_path)
            mask_path = d.get(self.mask_key)
            if mask_path is None:
                mask = np.zeros(image.shape[:2], np.uint8)
            else:
                mask = read_mask(mask_path)
                check_mask_size(mask.shape, mask_path, image.shape, image_path)
            pixels = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
            d[key] = MetaTensor(pixels, meta={"filename_or_obj": str(image_path)})
            d[self.mask_key] = torch.from_numpy(mask).unsqueeze(0).float()
            d["has_mask"] = mask_path is not None
        d[self.label_key] = torch.tensor(float(d[self.label_key]))
        return d


def patch_transforms(
    image_size: Sequence[int] | int | None = None, resize_mode: str = "resize", keys: Sequence[str] = ("image", "mask")
) -> list[Transform]:
    """Loading plus sizing: ``resize`` (image bilinear with anti-aliasing, mask nearest), ``center_crop``
    (crops larger images and zero-pads smaller ones) or ``none``; ``image_size`` is (rows, cols) or one int."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
    image_key, mask_key = keys
    transforms: list[Transform] = [LoadPatchd(image_key, mask_key=mask_key)]
    if resize_mode == "none" or image_size is None:
        return transforms
    size = ensure_tuple_rep(image_size, 2)
    if resize_mode == "resize":
        transforms.append(
            Resized(keys, spatial_size=size, mode=("bilinear", "nearest"), anti_aliasing=(True, False))
        )
    else:
        transforms.append(ResizeWithPadOrCropd(keys, spatial_size=size))
    return transforms


class PatchFolderDataset(CacheDataset):
    """Items of ``patch_folder_datalist`` (or a split of them) loaded, validated and sized, then ``transform``.

    The deterministic part (loading and sizing) is cached for ``cache_rate`` of the items (0 caches nothing);
    ``transform`` (a callable, a list or a ``Compose``) runs after it on every access, e.g. normalisation and flips.
    """

    def __init__(
        self,
        data: Sequence[dict],
        image_size: Sequence[int] | int | None = None,
        resize_mode: str = "resize",
        transform: Callable | Sequence[Callable] | None = None,
        cache_rate: float = 0.0,
        num_workers: int | None = 1,
    ) -> None:
        extra = ensure_tuple(transform) if transform is not None else ()
        chain = Compose([*patch_transforms(image_size, resize_mode), *extra]).flatten()
        super().__init__(data, transform=chain, cache_rate=cache_rate, num_workers=num_workers, progress=False)
