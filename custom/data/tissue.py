# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Tissue detection on a low-resolution copy of a slide (written as PNG and QuPath GeoJSON by
``custom.writers.tissue``).

Stained tissue is coloured and glass is grey-white, so tissue is where the HSV saturation exceeds an Otsu
threshold (never below ``min_saturation``, so that a blank slide stays blank). Near-black pixels (scanner fill,
dark debris) are excluded. The threshold actually used is kept on the mask so users can see and tune it.
Pen marks are coloured too and are not removed: pass an explicit ``threshold`` or clean the slide's mask.

Coordinates: the mask is ``(rows, cols)``; one mask pixel covers ``downsample`` x ``downsample`` level-0
pixels; boxes (and the exported GeoJSON) are in LEVEL-0 ``(x, y)`` pixels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage
from skimage.filters import threshold_otsu
from skimage.morphology import closing, disk
from skimage.transform import downscale_local_mean

from custom.data.morphology import drop_small_pieces, fill_small_holes
from custom.data.slide import ASSUMED_LEVEL0_MPP, Slide, level0_mpp, mpp_or_assumed

__all__ = ["TissueMask", "detect_tissue", "saturation_value"]

_BLOCK_PIXELS = 2048  # level pixels read per block while building the thumbnail, bounds memory
_BAND_ROWS = 256  # thumbnail rows whose float saturation and value planes exist at once
_OTSU_BINS = 256  # threshold_otsu's default


@dataclass
class TissueMask:
    """A boolean tissue mask at low resolution, with the scale that maps it back to level 0."""

    mask: np.ndarray
    downsample: float
    threshold: float
    thumbnail: np.ndarray | None = field(default=None, repr=False)
    empty_reason: str = ""
    """Why the mask is empty, when it is ('' otherwise): no tissue at all, or only pieces under ``min_area_um2``."""

    def fraction(self) -> float:
        """Fraction of the slide covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def box_fractions(self, x: np.ndarray, y: np.ndarray, width: np.ndarray, height: np.ndarray) -> np.ndarray:
        """Tissue fraction of many level-0 boxes at once, from the column sums of each band of mask rows they span.

        A box covers every mask pixel it touches, so the fraction is over whole mask pixels. The boxes of a tile grid
        share one band per row of tiles, so this is about one pass over the mask and holds one row of sums at a
        time, never a summed-area table as large as the mask (4 bytes per pixel).
        """
        ds = self.downsample
        c0, r0 = np.floor(x / ds).astype(np.int64), np.floor(y / ds).astype(np.int64)
        c1 = np.maximum(np.ceil((x + width) / ds).astype(np.int64), c0 + 1)
        r1 = np.maximum(np.ceil((y + height) / ds).astype(np.int64), r0 + 1)
        rows, cols = self.mask.shape
        cr0, cr1 = np.clip(r0, 0, rows), np.clip(r1, 0, rows)
        cc0, cc1 = np.clip(c0, 0, cols), np.clip(c1, 0, cols)
        inside = np.zeros(len(cr0), np.int64)
        bands, band_of = np.unique(np.stack([cr0, cr1], axis=1), axis=0, return_inverse=True)
        band_of = band_of.ravel()
        for index, (top, bottom) in enumerate(bands):
            boxes = np.flatnonzero(band_of == index)
            prefix = np.zeros(cols + 1, np.int64)
            np.cumsum(self.mask[top:bottom].sum(axis=0), out=prefix[1:])
            inside[boxes] = prefix[cc1[boxes]] - prefix[cc0[boxes]]
        return inside / ((r1 - r0) * (c1 - c0))


def _thumbnail(slide: Slide, level: int, factor: int) -> np.ndarray:
    """Read a whole level block by block, shrinking each block by ``factor``, so memory stays bounded."""
    level_w, level_h = slide.level_dimensions[level]
    ds = slide.level_downsamples[level]
    step = max(1, _BLOCK_PIXELS // factor) * factor
    out = np.empty((-(-level_h // factor), -(-level_w // factor), 3), dtype=np.uint8)
    for row in range(0, level_h, step):
        for col in range(0, level_w, step):
            block = slide.read_region((round(col * ds), round(row * ds)), (step, step), level)
            small = downscale_local_mean(block, (factor, factor, 1)) if factor > 1 else block
            r, c = row // factor, col // factor
            part = out[r : r + small.shape[0], c : c + small.shape[1]]
            part[:] = np.round(small[: part.shape[0], : part.shape[1]])
    return out


def _working_resolution(slide: Slide, mpp: float, level: int | None, level0_mpp: float) -> tuple[int, int]:
    """The level to read and the integer shrink factor that bring it closest to ``mpp`` without going coarser."""
    if level is not None:
        return level, 1
    target = max(mpp / level0_mpp, 1.0)
    fine_enough = [i for i, ds in enumerate(slide.level_downsamples) if ds <= target * 1.001]
    level = fine_enough[-1] if fine_enough else 0
    return level, max(1, int(target / slide.level_downsamples[level] + 1e-6))


def saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value of a uint8 RGB image in [0, 1] (float32), without computing the hue nobody uses."""
    high = rgb.max(axis=-1)
    saturation = np.subtract(high, rgb.min(axis=-1), dtype=np.float32)  # no float copy of the RGB planes
    np.divide(saturation, high, out=saturation, where=high > 0)
    return saturation, np.divide(high, 255.0, dtype=np.float32)


def _bands(image: np.ndarray) -> list[slice]:
    """Row bands of the thumbnail: its float planes exist one band at a time, never for the whole slide."""
    return [slice(row, row + _BAND_ROWS) for row in range(0, image.shape[0], _BAND_ROWS)]


def _usable_saturation(rgb: np.ndarray, dark_value: float) -> np.ndarray:
    """Saturation of the pixels bright enough to be judged (near-black is never tissue), flattened."""
    saturation, value = saturation_value(rgb)
    return saturation[value >= dark_value]


def _saturation_threshold(thumbnail: np.ndarray, dark_value: float, min_saturation: float) -> float:
    """Otsu threshold of the usable pixels' saturation, floored so glass-only (or constant) images yield no tissue.

    The 256-bin histogram is gathered band by band over the range of all usable pixels, with the bin edges numpy
    gives ``threshold_otsu``: the same threshold as on one array of them all, without that array.
    """
    low, high, count = None, None, 0
    for band in _bands(thumbnail):
        values = _usable_saturation(thumbnail[band], dark_value)
        if values.size:
            low = values.min() if low is None else min(low, values.min())
            high = values.max() if high is None else max(high, values.max())
            count += values.size
    if count == 0 or high - low < 1e-3:
        return min_saturation
    counts = np.zeros(_OTSU_BINS, np.int64)
    for band in _bands(thumbnail):
        counts += np.histogram(_usable_saturation(thumbnail[band], dark_value), _OTSU_BINS, (low, high))[0]
    edges = np.histogram(np.array([low, high]), _OTSU_BINS, (low, high))[1]
    return max(float(threshold_otsu(hist=(counts, (edges[:-1] + edges[1:]) / 2.0))), min_saturation)


def _tissue_pixels(thumbnail: np.ndarray, threshold: float, dark_value: float) -> np.ndarray:
    """Pixels more saturated than ``threshold`` and not near-black, band by band."""
    tissue = np.empty(thumbnail.shape[:2], bool)
    for band in _bands(thumbnail):
        saturation, value = saturation_value(thumbnail[band])
        np.logical_and(saturation > threshold, value >= dark_value, out=tissue[band])
    return tissue


def detect_tissue(
    slide: Slide,
    mpp: float = 8.0,
    level: int | None = None,
    threshold: float | None = None,
    min_area_um2: float = 20_000.0,
    max_hole_um2: float = 20_000.0,
    min_saturation: float = 0.05,
    dark_value: float = 0.15,
    mpp_override: float | None = None,
) -> TissueMask:
    """Detect tissue on a low-resolution copy of the slide.

    Args:
        slide: the open slide.
        mpp: microns per pixel of the mask; the coarsest level at least this fine is read and shrunk to it.
        level: read this level as is instead of choosing one by ``mpp``.
        threshold: saturation threshold in [0, 1]; None uses Otsu's (floored at ``min_saturation``).
        min_area_um2: tissue pieces smaller than this are dropped.
        max_hole_um2: holes smaller than this inside tissue are filled.
        min_saturation: the lowest threshold Otsu may pick; keeps glass noise out of blank slides.
        dark_value: pixels whose HSV value is below this are never tissue (black fill, debris).
        mpp_override: level-0 microns per pixel for slides without (or with wrong) metadata.
    """
    base_mpp = level0_mpp(slide, mpp_override)
    if base_mpp is None:
        warnings.warn(
            f"{slide.path} has no mpp metadata; assuming {ASSUMED_LEVEL0_MPP} um/px at level 0 to size the tissue "
            "mask (pass mpp_override to set it)",
            stacklevel=2,
        )
    base_mpp = mpp_or_assumed(base_mpp)
    read_level, factor = _working_resolution(slide, mpp, level, base_mpp)
    thumbnail = _thumbnail(slide, read_level, factor)
    downsample = slide.level_downsamples[read_level] * factor
    used = _saturation_threshold(thumbnail, dark_value, min_saturation) if threshold is None else float(threshold)
    pixel_um2 = (base_mpp * downsample) ** 2
    found = closing(_tissue_pixels(thumbnail, used, dark_value), disk(2))
    mask = fill_small_holes(found, int(max_hole_um2 / pixel_um2))
    mask = drop_small_pieces(mask, int(min_area_um2 / pixel_um2))
    reason = "" if mask.any() else _empty_reason(slide.path, found, pixel_um2, min_area_um2, used)
    if reason:
        warnings.warn(reason, stacklevel=2)
    return TissueMask(mask=mask, downsample=downsample, threshold=used, thumbnail=thumbnail, empty_reason=reason)


def _empty_reason(path: str, found: np.ndarray, pixel_um2: float, min_area_um2: float, threshold: float) -> str:
    """What left the tissue mask of ``path`` empty: nothing above the saturation threshold, or only pieces too small
    to keep (the tissue of a small image is real, and "no tissue found" would misreport it)."""
    if not found.any():
        return f"no tissue found in {path} (saturation threshold {threshold:.3f})"
    largest = float(np.bincount(ndimage.label(found)[0].ravel())[1:].max()) * pixel_um2
    return (f"tissue found in {path} ({found.sum() * pixel_um2:.0f} um2), but only in pieces smaller than the "
            f"tissue detection's min_area_um2 of {min_area_um2:g} um2 (the largest is {largest:.0f} um2, the whole "
            f"image {found.size * pixel_um2:.0f} um2), so none is kept; for images this small, lower it with the "
            "inferer's tissue_kwargs={'min_area_um2': ...}")
