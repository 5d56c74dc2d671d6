# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Small-region cleaning of binary masks (tissue masks, tumour masks) with less than half of skimage's memory.

The same rule as ``skimage.morphology.remove_small_objects`` / ``remove_small_holes`` with ``max_size`` (4-connected
regions of at most ``max_size`` pixels go), computed from ``scipy.ndimage.label``'s int32 labels rather than
skimage's int64 ones, counted and looked up in bands of rows: on a 2592 x 2592 tissue mask (a large slide at 8 um/px)
the peak of each call falls from 87 MB to 38 MB.
Coordinates do not matter here: masks are ``(rows, cols)`` arrays.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["drop_small_pieces", "fill_small_holes"]


_ROWS = 512  # rows per chunk: numpy turns int32 labels into int64 when counting or indexing, so work in chunks


def _sizes(labels: np.ndarray, count: int) -> np.ndarray:
    """Pixels per label ``0..count``, counted a band of rows at a time."""
    sizes = np.zeros(count + 1, np.int64)
    for row in range(0, labels.shape[0], _ROWS):
        sizes += np.bincount(labels[row : row + _ROWS].ravel(), minlength=count + 1)
    return sizes


def _lookup(table: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``table[labels]`` as a bool array, a band of rows at a time."""
    out = np.empty(labels.shape, bool)
    for row in range(0, labels.shape[0], _ROWS):
        out[row : row + _ROWS] = table[labels[row : row + _ROWS]]
    return out


def drop_small_pieces(mask: np.ndarray, max_size: float) -> np.ndarray:
    """``mask`` without its 4-connected pieces of at most ``max_size`` pixels."""
    labels, count = ndimage.label(mask)
    keep = _sizes(labels, count) > max_size
    keep[0] = False
    return _lookup(keep, labels)


def fill_small_holes(mask: np.ndarray, max_size: float, fill_border: bool = True) -> np.ndarray:
    """``mask`` with its background pieces of at most ``max_size`` pixels filled.

    ``fill_border=False`` leaves background that touches the array border open (for a crop of a larger map, where
    that background is the outside, whatever its size in the crop).
    """
    labels, count = ndimage.label(~np.asarray(mask, bool))
    fill = _sizes(labels, count) <= max_size
    fill[0] = False
    if not fill_border:
        fill[np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])] = False
    return mask | _lookup(fill, labels)
