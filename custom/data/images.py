"""Plain image and mask files (PNG, JPEG, TIFF, ...) read into validated arrays.

Images come back as ``(rows, cols, 3)`` uint8 RGB and masks as ``(rows, cols)`` uint8 in {0, 1}.
Files are decoded with ``imagecodecs``, which keeps the stored bit depth (Pillow silently drops the low
byte of a 16-bit RGB PNG) and expands palette images to RGB (lossless).

What is refused or converted, and why:

- grayscale image (one channel, or gray + alpha): refused, an H&E model needs the stain colours;
- RGBA image: converted to RGB when alpha is 255 everywhere (exports often carry an opaque alpha),
  refused when any pixel is transparent, since its colour under the transparency is undefined;
- 16-bit or floating-point image: refused, because the intended scaling (full 16-bit range, 12-bit data in a
  16-bit container, ...) cannot be known from the file; convert it to 8-bit RGB first;
- mask: one 8-bit channel (or three equal channels, a gray mask saved as RGB) whose values are a subset of
  {0, 1} or of {0, 255}; anything else (e.g. a JPEG-compressed mask with in-between values) is refused,
  and the accepted masks are binarised as ``value > 0``.
"""

from __future__ import annotations

import os
from pathlib import Path

import imagecodecs
import numpy as np

from custom.errors import InputError, MissingInputError

__all__ = ["read_rgb", "read_mask", "check_mask_size"]

_BINARY_VALUE_SETS = ({0, 1}, {0, 255})
_JPEG_START, _JPEG_END = b"\xff\xd8", b"\xff\xd9"
_JPEG_TAIL = 1024  # some writers pad a few bytes after the end-of-image marker


def _decode(path: str | os.PathLike) -> np.ndarray:
    """Decode any raster file at its stored bit depth, naming the file when it is missing or corrupt."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingInputError(f"image file not found: {path}") from None
    # libjpeg decodes a cut-off JPEG with gray filler and only a warning; its end-of-image marker tells.
    if data.startswith(_JPEG_START) and _JPEG_END not in data[-_JPEG_TAIL:]:
        raise InputError(f"cannot decode image file {path}: truncated JPEG (no end-of-image marker)")
    try:
        return imagecodecs.imread(data)
    except Exception as e:
        # imagecodecs reports one line per codec it tried; the first names the format-specific problem.
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot decode image file {path} (corrupt, truncated or not an image): {reason}") from e


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """Read an H&E image as (rows, cols, 3) uint8 RGB, refusing files whose colours would be guessed."""
    array = _decode(path)
    if array.dtype != np.uint8:
        raise InputError(
            f"image {path} has {array.dtype} pixels; only 8-bit RGB is accepted (convert 16-bit or float images "
            "to 8-bit RGB with the scaling that fits your scanner)"
        )
    channels = 1 if array.ndim == 2 else array.shape[-1]
    if array.ndim not in (2, 3) or channels not in (1, 2, 3, 4):
        raise InputError(f"image {path} has shape {array.shape}; expected (rows, cols, 3) RGB")
    if channels in (1, 2):
        raise InputError(f"image {path} is grayscale ({channels} channel(s)); an H&E image must be RGB colour")
    if channels == 4:
        if np.any(array[..., 3] != 255):
            raise InputError(f"image {path} is RGBA with transparent pixels; save it as opaque RGB")
        array = array[..., :3]
    return np.ascontiguousarray(array)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a binary mask stored as 0/1 or 0/255 into (rows, cols) uint8 0/1, so both conventions give one result."""
    array = _decode(path)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    elif array.ndim == 3 and array.shape[-1] == 3 and np.all(array == array[..., :1]):
        array = array[..., 0]
    if array.ndim != 2:
        raise InputError(f"mask {path} has shape {array.shape}; expected one channel (rows, cols)")
    if array.dtype not in (np.uint8, np.bool_):
        raise InputError(f"mask {path} has {array.dtype} pixels; expected 8-bit values 0/1 or 0/255")
    values = {int(v) for v in np.unique(array)}
    if not any(values <= allowed for allowed in _BINARY_VALUE_SETS):
        shown = sorted(values)[:8]
        raise InputError(f"mask {path} is not binary: values {shown}; expected a subset of {{0, 1}} or {{0, 255}}")
    return (array > 0).astype(np.uint8)


def check_mask_size(
    mask_shape: tuple[int, ...],
    mask_path: str | os.PathLike,
    image_shape: tuple[int, ...],
    image_path: str | os.PathLike,
) -> None:
    """Refuse a mask whose (rows, cols) differ from its image's, naming both files and both (width, height) sizes."""
    if tuple(mask_shape[:2]) != tuple(image_shape[:2]):
        mask_wh = (mask_shape[1], mask_shape[0])
        image_wh = (image_shape[1], image_shape[0])
        raise InputError(
            f"mask {mask_path} has size (width, height) {mask_wh} but its image {image_path} has {image_wh}"
        )
