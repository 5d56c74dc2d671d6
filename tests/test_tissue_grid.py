# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""custom.data.tissue and custom.data.grid against hand-computed masks, polygons and tile positions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from pyramid_files import write_pyramid
from shapely.geometry import shape
from skimage.color import rgb2hsv

from custom.data import grid as grid_module
from custom.data.grid import grid_for, load_grid_csv, make_tile_grid, save_grid_csv
from custom.data.slide import open_slide
from custom.data.tissue import TissueMask, detect_tissue, saturation_value
from custom.writers.tissue import save_tissue_png, tissue_geojson

GLASS, STAIN = (238, 236, 240), (190, 90, 150)


def _slide_image(tissue_boxes=()) -> np.ndarray:
    """Noisy glass (1024 x 768, level-0 (x, y)) with pink tissue in each (x0, y0, x1, y1) box."""
    rng = np.random.default_rng(0)
    image = np.empty((768, 1024, 3), np.uint8)
    image[:] = GLASS
    for x0, y0, x1, y1 in tissue_boxes:
        image[y0:y1, x0:x1] = STAIN
    noise = rng.integers(-6, 7, image.shape)
    return np.clip(image.astype(int) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def tissue_slide(tmp_path_factory):
    """Tissue at x 256..512, y 128..512 (98,304 px = 12.5 % of the slide) plus a 32 px speck at (800, 592)."""
    image = _slide_image([(256, 128, 512, 512), (800, 592, 832, 624)])
    return open_slide(write_pyramid(tmp_path_factory.mktemp("tissue") / "tissue.tiff", image))


@pytest.fixture(scope="module")
def blank_slide(tmp_path_factory):
    return open_slide(write_pyramid(tmp_path_factory.mktemp("blank") / "blank.tiff", _slide_image()))


def test_tissue_mask_matches_the_painted_box(tissue_slide):
    tissue = detect_tissue(tissue_slide, mpp=8.0)  # 0.5 um/px slide -> 16 level-0 px per mask px
    assert tissue.downsample == 16 and tissue.mask.shape == (48, 64)
    expected = np.zeros((48, 64), bool)
    expected[8:32, 16:32] = True  # the speck (2 x 2 mask px = 256 um2) is below the minimum area
    np.testing.assert_array_equal(tissue.mask, expected)
    assert tissue.fraction() == pytest.approx(0.125)
    assert 0.05 <= tissue.threshold < 0.5  # between glass (~0.02) and stain (~0.53) saturation
    fractions = tissue.box_fractions(np.array([128, -64]), np.array([128, -64]), np.array([256, 64]),
                                     np.array([128, 64]))
    assert fractions[0] == pytest.approx(0.5) and fractions[1] == 0.0


def test_small_areas_are_kept_when_the_minimum_is_lowered(tissue_slide):
    tissue = detect_tissue(tissue_slide, mpp=8.0, min_area_um2=100.0)
    assert tissue.mask[37:39, 50:52].all()
    assert tissue.fraction() == pytest.approx((384 + 4) / 3072)


def test_blank_slide_gives_empty_mask_and_empty_grid_with_warnings(blank_slide):
    with pytest.warns(UserWarning, match="no tissue found in .*blank.tiff"):
        tissue = detect_tissue(blank_slide)
    assert not tissue.mask.any() and tissue.fraction() == 0.0
    with pytest.warns(UserWarning, match="grid is empty"):
        grid = make_tile_grid(blank_slide, tissue, level=0)
    assert len(grid) == 0


def test_missing_mpp_is_assumed_with_a_warning(tmp_path):
    image = _slide_image([(256, 128, 512, 512)])
    slide = open_slide(write_pyramid(tmp_path / "bare.tiff", image, mpp_xy=None))
    with pytest.warns(UserWarning, match="bare.tiff has no mpp"):
        tissue = detect_tissue(slide, mpp=8.0)
    assert tissue.downsample == 16 and tissue.fraction() == pytest.approx(0.125)
    assert detect_tissue(slide, mpp=8.0, mpp_override=0.25, min_area_um2=0).downsample == 32


def test_geojson_polygon_has_the_hole_and_level0_coordinates():
    ring = np.zeros((12, 12), bool)
    ring[2:10, 2:10] = True
    ring[4:8, 4:8] = False
    collection = tissue_geojson(TissueMask(mask=ring, downsample=16.0, threshold=0.1), simplify_px=0.0)
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == 1
    feature = json.loads(json.dumps(collection["features"][0]))
    assert feature["properties"]["objectType"] == "annotation"
    assert feature["properties"]["classification"]["name"] == "Tissue"
    polygon = shape(feature["geometry"])
    assert polygon.geom_type == "Polygon" and len(polygon.interiors) == 1
    # marching squares cuts each outer corner by 1/8 px2 and each hole corner likewise: (63.5 - 15.5) px2
    assert polygon.area == pytest.approx(48.0 * 16**2)
    assert polygon.bounds == pytest.approx((2.5 * 16, 2.5 * 16, 9.5 * 16, 9.5 * 16), abs=8.0)


def test_geojson_has_one_feature_per_piece():
    mask = np.zeros((10, 10), bool)
    mask[1:4, 1:4] = mask[6:9, 6:9] = True
    assert len(tissue_geojson(TissueMask(mask=mask, downsample=4.0, threshold=0.1))["features"]) == 2


def test_tissue_png_and_overlay_read_back(tmp_path, tissue_slide):
    tissue = detect_tissue(tissue_slide)
    written = save_tissue_png(tissue, tmp_path / "tissue.png", tissue.thumbnail)
    mask = np.asarray(Image.open(written[0]))
    np.testing.assert_array_equal(mask, tissue.mask * 255)
    overlay = np.asarray(Image.open(written[1]))
    assert written[1].name == "tissue_overlay.png" and overlay.shape == (48, 64, 3)
    assert overlay[20, 24, 1] > overlay[20, 24, 0]  # tissue tinted green


def test_grid_positions_with_overlap_match_hand_computed(tissue_slide):
    grid = make_tile_grid(tissue_slide, None, level=1, tile_size=128, overlap=32)
    # level 1 is 512 x 384 px; stride 96: x starts 0..384 (5 tiles), y starts 0..288 (4, the last padded)
    expected_x = np.tile(np.arange(5) * 96 * 2, 4)
    expected_y = np.repeat(np.arange(4) * 96 * 2, 5)
    np.testing.assert_array_equal(grid.x, expected_x)
    np.testing.assert_array_equal(grid.y, expected_y)
    assert (grid.level, grid.tile_size, grid.overlap, grid.downsample) == (1, 128, 32, 2.0)
    np.testing.assert_array_equal(grid.tissue_fraction, 1.0)


def test_grid_keeps_only_tiles_on_tissue(tissue_slide):
    tissue = detect_tissue(tissue_slide)
    grid = make_tile_grid(tissue_slide, tissue, level=0, tile_size=128, min_tissue=0.25)
    assert sorted(zip(grid.x.tolist(), grid.y.tolist())) == [(x, y) for x in (256, 384) for y in (128, 256, 384)]
    np.testing.assert_array_equal(grid.tissue_fraction, 1.0)


def test_slide_smaller_than_a_tile_is_refused(tissue_slide):
    with pytest.raises(ValueError, match=r"tissue.tiff: level 2 is 256x192 px .* 256 px tile"):
        make_tile_grid(tissue_slide, None, level=2, tile_size=256)


def test_inference_grid_covers_a_side_shorter_than_a_tile_with_one_tile(tissue_slide):
    """Level 1 is 512x384 (w x h): 400-px tiles give two columns (starts 0 and 400) and one row that passes the
    bottom edge; level-0 (x, y) = level-1 starts x 2."""
    grid = make_tile_grid(tissue_slide, None, level=1, tile_size=400, allow_small=True)
    assert sorted(zip(grid.x.tolist(), grid.y.tolist())) == [(0, 0), (800, 0)]
    assert len(make_tile_grid(tissue_slide, None, level=2, tile_size=256, allow_small=True)) == 1


def test_grid_csv_round_trip(tmp_path, tissue_slide):
    grid = make_tile_grid(tissue_slide, detect_tissue(tissue_slide), level=1, tile_size=64, overlap=16)
    path = save_grid_csv(grid, tmp_path / "grid.csv")
    loaded = load_grid_csv(path)
    assert loaded.params() == grid.params() and len(loaded) == len(grid) > 0
    np.testing.assert_array_equal(loaded.x, grid.x)
    np.testing.assert_array_equal(loaded.y, grid.y)
    np.testing.assert_allclose(loaded.tissue_fraction, grid.tissue_fraction, atol=1e-6)
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv"):
        load_grid_csv(bad)


def test_grid_for_reuses_a_matching_csv_and_recomputes_otherwise(tmp_path, tissue_slide, monkeypatch):
    first = grid_for(tissue_slide, level=0, tile_size=128, cache_dir=tmp_path)
    calls = []
    real_detect = grid_module.detect_tissue
    monkeypatch.setattr(grid_module, "detect_tissue", lambda *a, **k: calls.append(1) or real_detect(*a, **k))
    again = grid_for(tissue_slide, level=0, tile_size=128, cache_dir=tmp_path)
    assert not calls and np.array_equal(again.x, first.x)
    changed = grid_for(tissue_slide, level=0, tile_size=128, min_tissue=0.9, cache_dir=tmp_path)
    assert calls == [1] and changed.min_tissue == 0.9
    assert load_grid_csv(next(tmp_path.glob("*.csv"))).min_tissue == 0.9
    stricter = grid_for(tissue_slide, level=0, tile_size=128, min_tissue=0.9, cache_dir=tmp_path, threshold=0.5)
    assert calls == [1, 1] and stricter.tissue == {"threshold": 0.5}  # tissue settings are part of the key
    assert grid_for(tissue_slide, level=0, tile_size=128, min_tissue=0.9, cache_dir=tmp_path, threshold=0.5).tissue
    assert calls == [1, 1]  # and, once saved, reused


def test_saturation_and_value_equal_skimage_hsv():
    """The hue-free shortcut gives skimage's HSV saturation and value (black pixels included)."""
    rgb = np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = 0, 255, (40, 40, 40)  # black, white, gray
    saturation, value = saturation_value(rgb)
    hsv = rgb2hsv(rgb)
    np.testing.assert_allclose(saturation, hsv[..., 1], atol=1e-6)
    np.testing.assert_allclose(value, hsv[..., 2], atol=1e-6)
    assert saturation[0, 0] == saturation[0, 1] == saturation[0, 2] == 0.0


def test_banded_otsu_equals_skimage_on_all_usable_pixels():
    """The threshold gathered band by band is skimage's Otsu on every non-dark pixel's saturation at once."""
    from skimage.filters import threshold_otsu

    from custom.data import tissue as tissue_module

    rng = np.random.default_rng(5)
    rows = 3 * tissue_module._BAND_ROWS + 17  # several bands and a short last one
    rgb = np.full((rows, 90, 3), 235, np.uint8)
    rgb[: rows // 3] = rng.integers(0, 256, (rows // 3, 90, 3))  # coloured "tissue" in the first band only
    rgb[-5:] = 10  # near-black fill, left out
    saturation, value = saturation_value(rgb)
    expected = threshold_otsu(saturation[value >= 0.15])
    assert tissue_module._saturation_threshold(rgb, 0.15, 0.05) == max(expected, 0.05)
    glass = np.full((rows, 40, 3), 228, np.uint8)  # no spread at all: the floor, in every band
    assert tissue_module._saturation_threshold(glass, 0.15, 0.05) == 0.05
