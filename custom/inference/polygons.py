# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Tumour outlines from a binary mask: polygons with holes, simplified, small pieces dropped, in level-0 pixels.

Coordinates: the mask is ``(rows, cols)``; one mask pixel covers ``downsample`` x ``downsample`` level-0 pixels and
its centre lies at level-0 ``((col + 0.5) * downsample, (row + 0.5) * downsample)``. Output polygons are level-0
``(x, y)``, as QuPath, ASAP and GeoJSON expect.
"""

from __future__ import annotations

import numpy as np
import shapely
from shapely.affinity import affine_transform
from shapely.geometry import Polygon
from skimage.measure import find_contours

__all__ = ["mask_polygons"]


def _pixel_geometry(mask: np.ndarray) -> shapely.Geometry:
    """Union of the mask's regions, holes included, in (col, row) pixel-centre coordinates.

    Contours of a binary mask never cross, so the symmetric difference of all rings nests holes in their outlines.
    """
    contours = find_contours(np.pad(mask, 1).astype(np.float32), 0.5)
    rings = [Polygon(c[:, ::-1] - 1.0).buffer(0) for c in contours if len(c) >= 4]
    return shapely.symmetric_difference_all([r for r in rings if r.area > 0])


def mask_polygons(
    mask: np.ndarray, downsample: float, min_area_px: float = 0.0, simplify_px: float = 1.0
) -> list[Polygon]:
    """Polygons (exterior + interior rings) of a boolean mask in level-0 pixels, largest first.

    Args:
        mask: ``(rows, cols)`` boolean mask.
        downsample: level-0 pixels per mask pixel.
        min_area_px: pieces smaller than this many level-0 square pixels are dropped.
        simplify_px: Douglas-Peucker tolerance in mask pixels (1 removes the staircase of pixel edges).
    """
    if not mask.any():
        return []
    geometry = _pixel_geometry(mask.astype(bool)).simplify(simplify_px)
    geometry = affine_transform(geometry, [downsample, 0, 0, downsample, 0.5 * downsample, 0.5 * downsample])
    pieces = [g for g in getattr(geometry, "geoms", [geometry]) if isinstance(g, Polygon) and not g.is_empty]
    return sorted((p for p in pieces if p.area >= min_area_px), key=lambda p: -p.area)
