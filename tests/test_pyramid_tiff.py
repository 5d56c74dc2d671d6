"""custom.writers.pyramid_tiff: pyramids read back by tifffile, OpenSlide and cuCIM at every level."""

from __future__ import annotations

import numpy as np
import openslide
import pytest
import tifffile

from custom.writers.pyramid_tiff import downsample2, pyramid_shapes, write_pyramid

cucim = pytest.importorskip("cucim")

HEIGHT, WIDTH = 700, 900  # not multiples of the tile, so edge tiles are partial at every level


def _rgb_image() -> np.ndarray:
    """Smooth gradients and waves: survive JPEG closely, and a misplaced or mirrored tile shows."""
    rows, cols = np.mgrid[:HEIGHT, :WIDTH]
    waves = 128 + 100 * np.sin(rows / 40) * np.cos(cols / 50)
    return np.stack([rows * 255 // HEIGHT, cols * 255 // WIDTH, waves], -1).astype(np.uint8)


def _label_image() -> np.ndarray:
    """A pattern with a distinct value at every pixel modulo 251: any shift or mix-up is detected exactly."""
    return ((np.arange(HEIGHT)[:, None] * 7 + np.arange(WIDTH)[None, :]) % 251).astype(np.uint8)


def _expected_levels(image: np.ndarray, method: str) -> list[np.ndarray]:
    """Hand-computed pyramid: repeat the last row/col when odd, then 2x2 rounded mean or top-left pick."""
    levels = [image if image.ndim == 3 else image[..., None]]
    while max(levels[-1].shape[:2]) > 256:
        a = levels[-1]
        if method == "nearest":
            levels.append(a[::2, ::2])
            continue
        a = np.pad(a, ((0, a.shape[0] % 2), (0, a.shape[1] % 2), (0, 0)), mode="edge").astype(np.int32)
        total = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
        levels.append(((total + 2) // 4).astype(np.uint8))
    return levels


def _from_array(image: np.ndarray):
    """A TileSource over an in-memory array, recording the requested (row, col, height, width)."""
    calls = []

    def read(row, col, height, width):
        calls.append((row, col, height, width))
        return image[row : row + height, col : col + width]

    return read, calls


def test_pyramid_shapes_halve_until_one_tile():
    assert pyramid_shapes((700, 900)) == [(700, 900), (350, 450), (175, 225)]
    assert pyramid_shapes((2048, 2048)) == [(2048, 2048), (1024, 1024), (512, 512), (256, 256)]
    assert pyramid_shapes((100, 50)) == [(100, 50)]
    with pytest.raises(ValueError, match="positive"):
        pyramid_shapes((0, 10))


def test_downsample2_methods():
    image = np.array([[0, 10, 255], [20, 30, 255], [1, 2, 3]], np.uint8)[..., None]
    assert downsample2(image, "mean")[..., 0].tolist() == [[15, 255], [2, 3]]  # (0+10+20+30+2)//4 = 15; padded edges
    assert downsample2(image, "max")[..., 0].tolist() == [[30, 255], [2, 3]]
    assert downsample2(image, "nearest")[..., 0].tolist() == [[0, 255], [1, 3]]
    with pytest.raises(ValueError, match="downsample"):
        downsample2(image, "median")


def test_lossless_single_channel_every_level_three_readers(tmp_path):
    image = _label_image()
    path = tmp_path / "labels.tif"
    read, calls = _from_array(image)
    write_pyramid(path, read, (HEIGHT, WIDTH), channels=1, mpp=0.25)
    assert calls[:4] == [(0, 0, 256, 256), (0, 256, 256, 256), (0, 512, 256, 256), (0, 768, 256, 132)]
    expected = _expected_levels(image, "nearest")

    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        levels = tif.series[0].levels
        assert len(levels) == len(expected) == 3
        for level, want in zip(levels, expected):
            page = level.keyframe
            assert (page.tilelength, page.tilewidth) == (256, 256)
            assert page.compression == tifffile.COMPRESSION.LZW
            np.testing.assert_array_equal(level.asarray(), want[..., 0])
        assert [p.subfiletype for p in tif.pages] == [0, 1, 1]
        assert tif.pages[0].tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert tif.pages[1].get_resolution(tifffile.RESUNIT.MICROMETER) == pytest.approx((1 / 0.5, 1 / 0.5))

    slide = openslide.OpenSlide(path)
    assert slide.level_count == 3
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.25)
    image_cucim = cucim.CuImage(str(path))
    assert image_cucim.resolutions["level_count"] == 3
    assert image_cucim.spacing()[:2] == pytest.approx([0.25, 0.25])
    for level, want in enumerate(expected):
        h, w = want.shape[:2]
        scale = 2**level
        from_openslide = np.asarray(slide.read_region((0, 0), level, (w, h)))[..., 0]  # (x, y) in level-0 pixels
        from_cucim = np.asarray(image_cucim.read_region((0, 0), (w, h), level=level))[..., 0]
        np.testing.assert_array_equal(from_openslide, want[..., 0])
        np.testing.assert_array_equal(from_cucim, want[..., 0])
        assert slide.level_downsamples[level] == pytest.approx(scale)


def test_jpeg_rgb_every_level_three_readers(tmp_path):
    image = _rgb_image()
    path = tmp_path / "slide.tif"
    write_pyramid(path, _from_array(image)[0], (HEIGHT, WIDTH), channels=3, mpp=0.5)
    expected = _expected_levels(image, "mean")

    with tifffile.TiffFile(path) as tif:
        assert tif.is_bigtiff
        assert tif.pages[0].compression == tifffile.COMPRESSION.JPEG
        tifffile_levels = [level.asarray() for level in tif.series[0].levels]
    slide = openslide.OpenSlide(path)
    image_cucim = cucim.CuImage(str(path))
    assert float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]) == pytest.approx(0.5)
    assert image_cucim.spacing()[:2] == pytest.approx([0.5, 0.5])
    assert slide.level_dimensions == tuple((w, h) for h, w in pyramid_shapes((HEIGHT, WIDTH)))  # (x, y) order
    for level, want in enumerate(expected):
        h, w = want.shape[:2]
        readers = {
            "tifffile": tifffile_levels[level],
            "openslide": np.asarray(slide.read_region((0, 0), level, (w, h)))[..., :3],
            "cucim": np.asarray(image_cucim.read_region((0, 0), (w, h), level=level)),
        }
        for name, got in readers.items():
            assert got.shape == want.shape, name
            error = np.abs(got.astype(int) - want.astype(int))
            assert error.mean() < 2.5 and np.percentile(error, 99) < 16, (name, level, error.mean())


def test_iterator_source_and_max_downsample(tmp_path):
    image = np.zeros((520, 300), np.uint8)
    image[301, 3] = 255  # one pixel that 'nearest' would drop and 'max' keeps
    tiles = (image[r : r + 256, c : c + 256] for r in range(0, 520, 256) for c in range(0, 300, 256))
    path = write_pyramid(tmp_path / "mask.tif", tiles, image.shape, channels=1, mpp=1.0, downsample="max")
    with tifffile.TiffFile(path) as tif:
        level1 = tif.series[0].levels[1].asarray()
    assert level1.shape == (260, 150)
    assert np.argwhere(level1 == 255).tolist() == [[150, 1]]


def test_bad_tiles_raise_and_interrupted_write_leaves_no_file(tmp_path):
    path = tmp_path / "broken.tif"

    def failing(row, col, height, width):
        if row >= 256:
            raise RuntimeError("reader died")
        return np.zeros((height, width, 3), np.uint8)

    with pytest.raises(RuntimeError, match="reader died"):
        write_pyramid(path, failing, (600, 600), channels=3, mpp=0.5)
    assert list(tmp_path.iterdir()) == []  # no final file, no partial file, no scratch folder

    with pytest.raises(ValueError, match=r"tile at \(row=0, col=0\).*uint8"):
        write_pyramid(path, lambda r, c, h, w: np.zeros((h, w, 3), np.float32), (300, 300), channels=3, mpp=0.5)
    with pytest.raises(ValueError, match="ended early"):
        write_pyramid(path, iter([np.zeros((256, 256), np.uint8)]), (300, 300), channels=1, mpp=0.5)
    with pytest.raises(ValueError, match="JPEG"):
        write_pyramid(path, _from_array(np.zeros((300, 300), np.uint8))[0], (300, 300), 1, mpp=0.5, compression="jpeg")
    assert not path.exists()
