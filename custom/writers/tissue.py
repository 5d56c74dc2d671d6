# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Writers of a detected tissue mask (``custom.data.tissue.TissueMask``): a 0/255 PNG with a tinted overlay, and QuPath
GeoJSON with one ``Tissue`` annotation per piece in LEVEL-0 ``(x, y)`` pixels, traced by ``custom.data.polygons``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from shapely.geometry import Polygon
from skimage.io import imsave
from skimage.segmentation import find_boundaries

from custom.data.polygons import mask_polygons
from custom.data.tissue import TissueMask
from custom.writers.geojson import qupath_features, write_qupath_geojson

__all__ = ["TISSUE_CLASS", "TISSUE_COLOR", "save_tissue_png", "tissue_geojson", "save_tissue_geojson"]

TISSUE_CLASS, TISSUE_COLOR = "Tissue", (0, 160, 0)
"""QuPath classification of the tissue annotations, and its colour (RGB)."""


def save_tissue_png(
    tissue: TissueMask, path: str | os.PathLike, thumbnail: np.ndarray | None = None
) -> list[Path]:
    """Write the mask as a 0/255 PNG and, given a thumbnail, ``<stem>_overlay.png`` with tissue tinted green."""
    path = Path(path)
    imsave(path, (tissue.mask * 255).astype(np.uint8), check_contrast=False)
    if thumbnail is None:
        return [path]
    if thumbnail.shape[:2] != tissue.mask.shape:
        raise ValueError(f"{path}: thumbnail {thumbnail.shape[:2]} does not match the mask {tissue.mask.shape}")
    overlay = thumbnail.astype(np.float32)
    overlay[tissue.mask] = 0.6 * overlay[tissue.mask] + 0.4 * np.array([0, 200, 0])
    overlay[find_boundaries(tissue.mask, mode="inner")] = (0, 160, 0)
    overlay_path = path.with_name(f"{path.stem}_overlay.png")
    imsave(overlay_path, overlay.astype(np.uint8), check_contrast=False)
    return [path, overlay_path]


def _tissue_polygons(tissue: TissueMask, simplify_px: float) -> list[Polygon]:
    """The tissue pieces with their holes, in level-0 pixels (no piece dropped: the mask is already cleaned)."""
    return mask_polygons(tissue.mask, tissue.downsample, simplify_px=simplify_px)


def tissue_geojson(tissue: TissueMask, simplify_px: float = 1.0) -> dict:
    """QuPath GeoJSON FeatureCollection of the tissue: one annotation per piece, LEVEL-0 ``(x, y)`` pixels."""
    properties = {"saturationThreshold": tissue.threshold}
    return qupath_features(_tissue_polygons(tissue, simplify_px), TISSUE_CLASS, TISSUE_COLOR, properties)


def save_tissue_geojson(tissue: TissueMask, path: str | os.PathLike, simplify_px: float = 1.0) -> Path:
    """Write :func:`tissue_geojson` to ``path`` for QuPath (File > Import objects)."""
    properties = {"saturationThreshold": tissue.threshold}
    return write_qupath_geojson(path, _tissue_polygons(tissue, simplify_px), TISSUE_CLASS, TISSUE_COLOR, properties)
