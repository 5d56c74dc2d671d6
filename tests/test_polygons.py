# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Tumour outlines from masks: holes, level-0 scaling, small pieces, and a simplification that stays valid."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon

from custom.data.polygons import mask_polygons, simplify_polygon


def test_square_with_hole_in_level0_pixels():
    """A 6x6 square with a 2x2 hole, 4 level-0 px per mask px: area (36 - 4) x 16 within the half-pixel contour."""
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    mask[4:6, 4:6] = False
    (polygon,) = mask_polygons(mask, downsample=4.0, simplify_px=0.0)
    assert len(polygon.interiors) == 1 and polygon.is_valid
    # marching squares cuts every corner by a triangle of 1/8 px: the outline loses 4 of them, the hole too
    assert polygon.area == pytest.approx(((36 - 4 * 0.125) - (4 - 4 * 0.125)) * 16)
    minx, miny, maxx, maxy = polygon.bounds
    assert (minx, miny, maxx, maxy) == (2 * 4.0, 2 * 4.0, 8 * 4.0, 8 * 4.0)  # pixel edges in level-0 (x, y)


def test_small_pieces_and_holes_are_dropped():
    mask = np.zeros((20, 20), bool)
    mask[1:11, 1:11] = True
    mask[5, 5] = False  # a one-pixel hole: filled
    mask[15, 15] = True  # a one-pixel speck: dropped
    polygons = mask_polygons(mask, downsample=1.0, min_area_px=4.0)
    assert len(polygons) == 1 and not polygons[0].interiors


def test_simplify_falls_back_when_douglas_peucker_breaks_the_polygon():
    """Dropping the bump's apex cuts through the hole's tip (GEOS then opens the hole into a notch): the
    topology-preserving result is used instead."""
    outline = [(0, 0), (10, 0), (10, 10), (5, 11), (0, 10)]
    hole = [(4, 8), (6, 8), (5, 10.8)]
    polygon = Polygon(outline, [hole])
    assert polygon.is_valid and not polygon.simplify(1.5, preserve_topology=False).interiors
    simple = simplify_polygon(polygon, 1.5)
    assert simple.is_valid and len(simple.interiors) == 1
    assert simple.area == pytest.approx(polygon.area, rel=0.01)


def test_position_on_a_large_map_only_shifts_the_polygons():
    """The same blob alone, and at (row 300, col 500) of a 1000x2000 map: the polygons differ by that offset x ds."""
    blob = np.zeros((40, 50), bool)
    blob[5:30, 8:45] = True
    blob[12:20, 20:30] = False  # a hole
    blob[0:3, 0:3] = True  # a speck touching the border, dropped
    alone = mask_polygons(blob, downsample=2.0, min_area_px=40.0)
    large = np.zeros((1000, 2000), bool)
    large[300:340, 500:550] = blob
    placed = mask_polygons(large, downsample=2.0, min_area_px=40.0)
    assert len(alone) == len(placed) == 1 and len(alone[0].interiors) == 1
    shifted = np.asarray(alone[0].exterior.coords) + [500 * 2.0, 300 * 2.0]
    np.testing.assert_allclose(np.asarray(placed[0].exterior.coords), shifted)


def test_background_at_the_border_is_outside_not_a_hole():
    """A 1-pixel notch of background on the map's edge stays open even though it is smaller than the minimum."""
    mask = np.ones((10, 10), bool)
    mask[0, 5] = False
    (polygon,) = mask_polygons(mask, downsample=1.0, min_area_px=4.0, simplify_px=0.0)
    assert not polygon.interiors and not polygon.contains(Polygon([(5.2, 0), (5.8, 0), (5.5, 0.4)]))


def test_a_hole_with_an_island_inside_stays_the_hole_of_its_outline():
    """The filled hole's representative point lies on the island; the hole still belongs to the outer outline."""
    mask = np.zeros((40, 40), bool)
    mask[2:38, 2:38] = True
    mask[8:32, 8:32] = False
    mask[16:24, 16:24] = True
    outer, island = mask_polygons(mask, downsample=1.0, simplify_px=0.0)
    assert len(outer.interiors) == 1 and not island.interiors and outer.is_valid and island.is_valid
    assert outer.area == pytest.approx(36**2 - 24**2, abs=2) and island.area == pytest.approx(8**2, abs=1)


def test_speckled_map_never_holds_a_float_copy_of_itself():
    """Each region is contoured on its own box: a map of many specks peaks below the 8 bytes per pixel of
    one float64 copy of it (contouring the whole map took 13), and still yields every speck."""
    import tracemalloc

    mask = np.zeros((1000, 1000), bool)
    for row in range(2, 1000, 25):
        for col in range(2, 1000, 25):
            mask[row : row + 20, col : col + 20] = True  # 1,600 squares of 20 x 20
    tracemalloc.start()
    try:
        polygons = mask_polygons(mask, downsample=1.0, simplify_px=0.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(polygons) == 40 * 40
    assert all(p.area == pytest.approx(400 - 4 * 0.125) for p in polygons)
    assert peak < 6 * mask.size
