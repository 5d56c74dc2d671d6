"""Reference probability maps that bracket a method's scores, run through the very same `evaluate_maps`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .segmentation import binarise_mask, evaluate_maps

__all__ = ["oracle_label_maps", "all_background_maps", "evaluate_baselines"]


def oracle_label_maps(masks: Sequence[np.ndarray | torch.Tensor], labels: Sequence[int]) -> list[np.ndarray]:
    """Maps that know only the image label: all tumour on positive images, nothing on negatives.

    This is the best a classifier without localisation can do; a segmenter must beat it on f1_pos / iou_pos.
    """
    return [np.full(np.shape(mask), float(label), dtype=np.float32) for mask, label in zip(masks, labels)]


def all_background_maps(masks: Sequence[np.ndarray | torch.Tensor]) -> list[np.ndarray]:
    """Maps that predict no tumour anywhere: perfect on negatives, zero on positives."""
    return [np.zeros(np.shape(mask), dtype=np.float32) for mask in masks]


def evaluate_baselines(
    masks: Sequence[np.ndarray | torch.Tensor], labels: Sequence[int] | None = None, **kwargs
) -> dict[str, dict[str, float | int]]:
    """Metrics of both baselines (`kwargs` as in `evaluate_maps`); labels default to "mask has tumour"."""
    if labels is None:
        labels = [int(binarise_mask(mask).any()) for mask in masks]
    return {
        "oracle_label": evaluate_maps(oracle_label_maps(masks, labels), masks, labels, **kwargs),
        "all_background": evaluate_maps(all_background_maps(masks), masks, labels, **kwargs),
    }
