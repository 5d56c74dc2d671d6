# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Outlines of a binary mask (tumour or tissue): polygons with holes, simplified, small pieces dropped, in level-0 px.

Contours of a binary mask never cross, and marching squares orients them by what lies inside: outlines one way,
holes the other. Each 4-connected region is contoured on its own bounding box, so its holes are its own (an island
inside a hole is a region of its own), and a noisy map with many thousands of regions costs their total size, not
the quadratic cost of overlaying every ring on every other, nor a float copy of the whole map.

Coordinates: the mask is ``(rows, cols)``; one mask pixel covers ``downsample`` x ``downsample`` level-0 pixels and
its centre lies at level-0 ``((col + 0.5) * downsample, (row + 0.5) * downsample)``. Output polygons are level-0
``(x, y)``, as QuPath, ASAP and GeoJSON expect; :func:`outlines_and_holes` splits them into the separate rings that
ASAP XML and MONAI Label take.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from shapely.affinity import affine_transform
from shapely.geometry import LinearRing, Polygon
from skimage.measure import find_contours

from custom.data.morphology import drop_small_pieces, fill_small_holes

__all__ = ["mask_polygons", "outlines_and_holes", "simplify_polygon"]


def _region_polygon(piece: np.ndarray, min_area: float) -> Polygon | None:
    """The outline of one 4-connected region with its holes, in (col, row) pixel-centre coordinates of its crop;
    None when the region (or a hole) is smaller than ``min_area`` (such a hole is left filled).

    ``find_contours`` joins foreground pixels by their faces, as ``ndimage.label`` does, so a region has exactly one
    outline (counter-clockwise) and every clockwise contour is one of its holes. The padded crop goes to it as uint8
    (a view of the bool array), which makes the one float64 copy marching squares needs: none of our own beside it."""
    outline, holes = None, []
    for contour in find_contours(np.pad(piece, 1).view(np.uint8), 0.5):
        if len(contour) < 4:
            continue
        ring = LinearRing(contour[:, ::-1] - 1.0)
        if Polygon(ring).area < max(min_area, 1e-9):
            continue
        if ring.is_ccw:
            outline = ring
        else:
            holes.append(ring)
    return None if outline is None else Polygon(outline, holes)


def mask_polygons(
    mask: np.ndarray, downsample: float, min_area_px: float = 0.0, simplify_px: float = 1.0
) -> list[Polygon]:
    """Polygons (exterior + interior rings) of a boolean mask in level-0 pixels, largest first.

    Only the bounding box of the tumour pixels (plus a one-pixel margin of background) is cleaned, and each
    4-connected region (the foreground connectivity of ``find_contours``) is contoured on its own bounding box, so
    memory follows the largest region rather than the whole map: a noisy map of thousands of specks never holds a
    float copy of the map, nor the raw contours of all of them at once.

    Args:
        mask: ``(rows, cols)`` boolean mask.
        downsample: level-0 pixels per mask pixel.
        min_area_px: regions (and holes) smaller than this many level-0 square pixels are dropped (filled).
        simplify_px: Douglas-Peucker tolerance in mask pixels (1 removes the staircase of pixel edges).
    """
    min_pixels = min_area_px / downsample**2
    mask = np.asarray(mask, bool)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not len(rows):
        return []
    top, left = max(rows[0] - 1, 0), max(cols[0] - 1, 0)
    mask = mask[top : rows[-1] + 2, left : cols[-1] + 2]
    if min_pixels >= 1:  # cheap on pixels, and spares contouring thousands of specks
        mask = fill_small_holes(drop_small_pieces(mask, min_pixels), min_pixels, fill_border=False)
    labels, _ = ndimage.label(mask)
    polygons = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        polygon = _region_polygon(labels[box] == index, min_pixels)
        if polygon is None:
            continue
        row0, col0 = top + box[0].start, left + box[1].start
        to_level0 = [downsample, 0, 0, downsample, (col0 + 0.5) * downsample, (row0 + 0.5) * downsample]
        simple = affine_transform(simplify_polygon(polygon.buffer(0), simplify_px), to_level0)
        polygons += [g for g in getattr(simple, "geoms", [simple]) if isinstance(g, Polygon) and not g.is_empty]
    return sorted(polygons, key=lambda p: -p.area)


def simplify_polygon(polygon: Polygon, tolerance: float) -> Polygon:
    """Douglas-Peucker: an order of magnitude faster than the topology-preserving variant on pixel staircases.

    GEOS repairs a Douglas-Peucker result that became invalid, e.g. by opening a hole near the outline into a notch;
    a result whose topology changed (another type or number of holes) is redone preserving topology.
    """
    simple = polygon.simplify(tolerance, preserve_topology=False)
    same = isinstance(simple, Polygon) and not simple.is_empty and len(simple.interiors) == len(polygon.interiors)
    return simple if same and simple.is_valid else polygon.simplify(tolerance)


def outlines_and_holes(polygons: Sequence[Polygon]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The outlines of ``polygons`` and then all their holes, as open ``(n, 2)`` ``(x, y)`` rings (the closing vertex
    dropped): ASAP XML and MONAI Label store a hole as a ring of its own (group ``_2``, label ``exclusion``)."""
    outlines = [np.asarray(p.exterior.coords)[:-1] for p in polygons]
    holes = [np.asarray(h.coords)[:-1] for p in polygons for h in p.interiors]
    return outlines, holes
