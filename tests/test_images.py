"""Validation rules of custom.data.images: what is read, converted or refused, and how errors name files."""

import imagecodecs
import numpy as np
import pytest
import tifffile
from PIL import Image

from custom.data.images import check_mask_size, read_mask, read_rgb


@pytest.fixture
def rgb():
    """A small deterministic colour image."""
    return np.random.default_rng(0).integers(0, 256, (6, 9, 3), dtype=np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_rgb_lossless_formats_round_trip(tmp_path, rgb, suffix):
    path = tmp_path / f"img{suffix}"
    Image.fromarray(rgb).save(path)
    out = read_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (6, 9, 3)
    np.testing.assert_array_equal(out, rgb)


def test_jpeg_is_read_as_rgb(tmp_path, rgb):
    path = tmp_path / "img.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    out = read_rgb(path)
    assert out.shape == (6, 9, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.asarray(Image.open(path).convert("RGB")))


def test_palette_image_is_expanded_to_its_colours(tmp_path, rgb):
    path = tmp_path / "pal.png"
    Image.fromarray(rgb).convert("P").save(path)
    np.testing.assert_array_equal(read_rgb(path), np.asarray(Image.open(path).convert("RGB")))


def test_grayscale_image_is_refused(tmp_path, rgb):
    path = tmp_path / "gray.png"
    Image.fromarray(rgb[..., 0]).save(path)
    with pytest.raises(ValueError, match=r"gray\.png.*grayscale"):
        read_rgb(path)


def test_opaque_rgba_is_converted(tmp_path, rgb):
    path = tmp_path / "opaque.png"
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(path)
    np.testing.assert_array_equal(read_rgb(path), rgb)


def test_transparent_rgba_is_refused(tmp_path, rgb):
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[0, 0] = 10
    path = tmp_path / "transparent.png"
    Image.fromarray(np.dstack([rgb, alpha])).save(path)
    with pytest.raises(ValueError, match=r"transparent\.png.*transparent pixels"):
        read_rgb(path)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_rgb_is_refused(tmp_path, rgb, suffix):
    wide = rgb.astype(np.uint16) * 257
    path = tmp_path / f"deep{suffix}"
    if suffix == ".png":
        path.write_bytes(imagecodecs.png_encode(wide))
    else:
        tifffile.imwrite(path, wide, photometric="rgb")
    with pytest.raises(ValueError, match=r"deep\.(png|tif).*uint16"):
        read_rgb(path)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_truncated_file_names_the_file(tmp_path, rgb, suffix):
    good = tmp_path / f"good{suffix}"
    Image.fromarray(np.tile(rgb, (8, 8, 1))).save(good)
    bad = tmp_path / f"broken{suffix}"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"broken\{suffix}"):
        read_rgb(bad)


def test_not_an_image_and_missing_file(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=r"notes\.png"):
        read_rgb(text)
    with pytest.raises(FileNotFoundError, match=r"absent\.png"):
        read_rgb(tmp_path / "absent.png")


def test_masks_0_1_and_0_255_give_identical_results(tmp_path):
    binary = np.zeros((5, 7), np.uint8)
    binary[1:4, 2:6] = 1
    Image.fromarray(binary).save(tmp_path / "m01.png")
    Image.fromarray(binary * 255).save(tmp_path / "m255.png")
    Image.fromarray(binary.astype(bool)).save(tmp_path / "m1bit.png")
    Image.fromarray(np.dstack([binary * 255] * 3)).save(tmp_path / "mrgb.png")
    for name in ("m01.png", "m255.png", "m1bit.png", "mrgb.png"):
        out = read_mask(tmp_path / name)
        assert out.dtype == np.uint8, name
        np.testing.assert_array_equal(out, binary, err_msg=name)
    assert read_mask(tmp_path / "m01.png").sum() == 12


def test_non_binary_or_colour_mask_is_refused(tmp_path):
    values = np.array([[0, 1, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "mixed.png")
    with pytest.raises(ValueError, match=r"mixed\.png is not binary"):
        read_mask(tmp_path / "mixed.png")
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match=r"colour\.png has shape"):
        read_mask(tmp_path / "colour.png")


def test_mask_size_mismatch_names_both_files_and_sizes():
    with pytest.raises(ValueError) as info:
        check_mask_size((10, 12), "gt/a.png", (16, 20, 3), "pos/a.png")
    message = str(info.value)
    assert "gt/a.png" in message and "pos/a.png" in message
    assert "(12, 10)" in message and "(20, 16)" in message
    check_mask_size((16, 20), "gt/a.png", (16, 20, 3), "pos/a.png")
