# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""custom.data.slide: every backend reads the same pixels, fallback, errors, level selection, workers."""

from __future__ import annotations

import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tifffile
import torch
from monai.data.wsi_reader import CuCIMWSIReader
from pyramid_files import pattern, write_pyramid
from torch.utils.data import DataLoader, Dataset

from custom.data.slide import BACKENDS, SlideReadError, level0_mpp, open_slide, select_level
from custom.data.tiff import LabelTiff, read_tiff_region

IMAGE = pattern()


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    return write_pyramid(tmp_path_factory.mktemp("slides") / "lossless.tiff", IMAGE)


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_backend_reads_exact_pixels_at_each_level(lossless, backend):
    with open_slide(lossless, backends=(backend,)) as slide:
        assert slide.backend == backend
        assert slide.level_dimensions == [(1024, 768), (512, 384), (256, 192)]
        assert slide.level_downsamples == pytest.approx([1, 2, 4])
        assert slide.mpp == pytest.approx((0.5, 0.5))
        assert level0_mpp(slide) * slide.level_downsamples[2] == pytest.approx(2.0)
        assert level0_mpp(slide, 0.25) == 0.25
        for level, step in enumerate((1, 2, 4)):
            x, y = 200, 96  # level 0 (x, y); multiples of every downsample
            region = slide.read_region((x, y), (60, 50), level)
            expected = IMAGE[::step, ::step][y // step : y // step + 50, x // step : x // step + 60]
            np.testing.assert_array_equal(region, expected)
            assert region.flags.writeable and region.flags.c_contiguous


@pytest.mark.parametrize("backend", BACKENDS)
def test_jpeg_pyramid_decodes_within_jpeg_tolerance(tmp_path, backend):
    path = write_pyramid(tmp_path / "jpeg.tiff", IMAGE, levels=2, compression="jpeg")
    slide = open_slide(path, backends=(backend,))
    region = slide.read_region((512, 256), (128, 128), 1)
    error = np.abs(region.astype(int) - IMAGE[::2, ::2][128:256, 256:384]).mean()
    assert error < 3.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_region_outside_slide_is_padded_white(lossless, backend):
    slide = open_slide(lossless, backends=(backend,))
    region = slide.read_region((-10, 700), (40, 100), 0)  # 10 columns left of, 32 rows below the slide
    assert (region[:, :10] == 255).all() and (region[68:] == 255).all()
    np.testing.assert_array_equal(region[:68, 10:], IMAGE[700:768, 0:30])
    assert (slide.read_region((5000, 5000), (8, 8), 1) == 255).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mpp_is_x_y_and_none_without_metadata(tmp_path, backend):
    anisotropic = write_pyramid(tmp_path / "aniso.tiff", IMAGE, levels=1, mpp_xy=(0.5, 0.25))
    bare = write_pyramid(tmp_path / "bare.tiff", IMAGE, levels=1, mpp_xy=None)
    assert open_slide(anisotropic, backends=(backend,)).mpp == pytest.approx((0.5, 0.25))
    assert open_slide(bare, backends=(backend,)).mpp is None


def test_fallback_skips_a_failing_backend_and_names_the_one_used(lossless, monkeypatch):
    def refuse(self, data, **kwargs):
        raise RuntimeError("simulated cuCIM failure")

    monkeypatch.setattr(CuCIMWSIReader, "read", refuse)
    slide = open_slide(lossless, backends=("cucim", "openslide"))
    assert slide.backend == "openslide"
    np.testing.assert_array_equal(slide.read_region((0, 0), (16, 16)), IMAGE[:16, :16])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.svs"):
        open_slide(tmp_path / "nowhere.svs")


def test_truncated_tiff_error_names_file_and_every_backend(tmp_path, lossless):
    truncated = tmp_path / "truncated.tiff"
    truncated.write_bytes(lossless.read_bytes()[: lossless.stat().st_size // 2])
    with pytest.raises(SlideReadError, match="truncated.tiff") as info:
        open_slide(truncated)
    for backend in BACKENDS:
        assert f"{backend}: " in str(info.value)


def test_non_image_file_is_refused_by_all_backends(tmp_path):
    notes = tmp_path / "notes.svs"
    notes.write_text("not a slide")
    with pytest.raises(SlideReadError, match="notes.svs") as info:
        open_slide(notes)
    assert "tifffile: TiffFileError" in str(info.value)


def test_select_level_by_index_and_by_mpp(lossless):
    slide = open_slide(lossless)
    assert select_level(slide, level=2) == 2
    assert select_level(slide, mpp=1.0) == 1
    assert select_level(slide, mpp=1.05, tolerance=0.1) == 1
    with pytest.raises(ValueError, match="level 1: 1.000"):
        select_level(slide, mpp=1.5)
    with pytest.raises(ValueError, match="3 levels"):
        select_level(slide, level=3)
    with pytest.raises(ValueError, match="exactly one"):
        select_level(slide, level=0, mpp=0.5)


def test_mpp_request_without_metadata_needs_override(tmp_path):
    slide = open_slide(write_pyramid(tmp_path / "bare.tiff", IMAGE, mpp_xy=None))
    with pytest.raises(ValueError, match="bare.tiff has no microns-per-pixel"):
        select_level(slide, mpp=1.0)
    assert select_level(slide, mpp=1.0, mpp_override=0.25) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_pickled_slide_reopens_lazily(lossless, backend):
    slide = open_slide(lossless, backends=(backend,))
    copy = pickle.loads(pickle.dumps(slide))
    assert not copy.is_open
    np.testing.assert_array_equal(copy.read_region((128, 64), (32, 32), 1), IMAGE[::2, ::2][32:64, 64:96])


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_share_one_slide(lossless, backend):
    slide = open_slide(lossless, backends=(backend,))
    locations = [(x, y) for y in range(0, 704, 64) for x in range(0, 960, 96)]
    with ThreadPoolExecutor(4) as pool:
        tiles = list(pool.map(lambda xy: slide.read_region(xy, (64, 64)), locations))
    for (x, y), tile in zip(locations, tiles):
        np.testing.assert_array_equal(tile, IMAGE[y : y + 64, x : x + 64])


class _TileDataset(Dataset):
    """Tiles of one slide; the slide's handle is reopened in each worker."""

    def __init__(self, slide, locations):
        self.slide, self.locations = slide, locations

    def __len__(self):
        return len(self.locations)

    def __getitem__(self, index):
        return torch.from_numpy(self.slide.read_region(self.locations[index], (64, 64), 0).copy())


def test_dataloader_with_two_workers_reads_tiles(lossless):
    locations = [(x, y) for y in range(0, 768, 256) for x in range(0, 1024, 256)]
    loader = DataLoader(_TileDataset(open_slide(lossless), locations), batch_size=4, num_workers=2)
    tiles = torch.cat(list(loader)).numpy()
    expected = np.stack([IMAGE[y : y + 64, x : x + 64] for x, y in locations])
    np.testing.assert_array_equal(tiles, expected)


@pytest.mark.parametrize("compression", [None, "zlib"])
def test_strip_tiff_regions_decode_only_their_strips(tmp_path, compression, monkeypatch):
    """A TIFF stored in strips (RGB and a one-channel label mask) reads back any box, edges included, without
    decoding the whole page."""
    rng = np.random.default_rng(0)
    rgb, labels = rng.integers(0, 256, (700, 515, 3), np.uint8), rng.integers(0, 3, (700, 515), np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb, rowsperstrip=64, compression=compression)
    tifffile.imwrite(tmp_path / "labels.tif", labels, rowsperstrip=37, compression=compression)
    monkeypatch.setattr(tifffile.TiffPage, "asarray", lambda *a, **k: pytest.fail("whole page decoded"))
    with tifffile.TiffFile(tmp_path / "rgb.tif") as tif:
        for row, col, height, width in ((0, 0, 256, 256), (650, 400, 50, 115), (100, 13, 500, 500)):
            np.testing.assert_array_equal(read_tiff_region(tif.pages[0], row, col, height, width),
                                          rgb[row:row + height, col:col + width])
    mask = LabelTiff(tmp_path / "labels.tif")
    np.testing.assert_array_equal(mask.rows(680, 256), labels[680:])  # the last band comes back shorter
    np.testing.assert_array_equal(mask.rows(37, 74), labels[37:111])
    mask.close()
