"""Streaming writer of tiled, compressed, pyramidal BigTIFF files (slides, masks, probability maps).

Level 0 is pulled tile by tile from the caller; each level's tiles are reduced 2x2 into fixed-size records of a
scratch file on disk, from which the next level's tiles are assembled. Memory therefore stays at a few tiles
whatever the image size, and the scratch files live in a temporary folder next to the output.

The levels are written as a chain of top-level reduced-resolution IFDs (``SubFileType`` = 1, as in Aperio SVS),
not as SubIFDs: OpenSlide 4.0 and cuCIM 26.10 only see level 0 of a SubIFD pyramid. X/YResolution are written in
pixels per centimetre, so OpenSlide (``openslide.mpp-x``), cuCIM (``spacing()``) and tifffile report microns per
pixel. cuCIM cannot decode deflate-compressed single-channel files, hence LZW for them by default.

Coordinates: ``row``/``col`` and ``(height, width)`` are level-0 numpy order throughout this module.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import tifffile

__all__ = ["TileSource", "pyramid_shapes", "downsample2", "write_pyramid"]

TileSource = Callable[[int, int, int, int], np.ndarray] | Iterable[np.ndarray]
"""Either ``f(row, col, height, width) -> (height, width[, channels]) uint8`` called in row-major tile order, or an
iterable that yields those same tiles (clipped to the image at its right and bottom edges) in that order."""

_REDUCERS = {"mean", "max", "nearest"}


def pyramid_shapes(shape_hw: tuple[int, int], tile: int = 256) -> list[tuple[int, int]]:
    """(height, width) of every level: halve (rounding up) until the level fits in one tile."""
    height, width = int(shape_hw[0]), int(shape_hw[1])
    if height < 1 or width < 1:
        raise ValueError(f"image shape must be positive, got {shape_hw}")
    shapes = [(height, width)]
    while max(height, width) > tile:
        height, width = (height + 1) // 2, (width + 1) // 2
        shapes.append((height, width))
    return shapes


def downsample2(image: np.ndarray, method: str) -> np.ndarray:
    """Halve a (H, W, C) uint8 array: 'mean' (rounded half up) for images, 'max'/'nearest' so labels keep their values.

    An odd edge is padded by repeating the last row/column, which is what the tiles' own edge padding gives.
    """
    if method not in _REDUCERS:
        raise ValueError(f"downsample must be one of {sorted(_REDUCERS)}, got {method!r}")
    if method == "nearest":
        return image[::2, ::2]
    padded = np.pad(image, ((0, image.shape[0] % 2), (0, image.shape[1] % 2), (0, 0)), mode="edge")
    blocks = padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2, padded.shape[2])
    if method == "max":
        return blocks.max(axis=(1, 3))
    return ((blocks.sum(axis=(1, 3), dtype=np.uint16) + 2) // 4).astype(np.uint8)  # rounded mean


def _pad_tile(tile_array: np.ndarray, tile: int) -> np.ndarray:
    """Pad an edge tile to full size by repeating its last row/column (keeps JPEG and 2x2 reductions artefact-free)."""
    pad = ((0, tile - tile_array.shape[0]), (0, tile - tile_array.shape[1]), (0, 0))
    return np.pad(tile_array, pad, mode="edge")


def _level0_tiles(source: TileSource, shape_hw: tuple[int, int], channels: int, tile: int) -> Iterator[np.ndarray]:
    """Yield full-size (tile, tile, channels) uint8 level-0 tiles in row-major order, checking what the caller gives."""
    height, width = shape_hw
    iterator = iter(source) if not callable(source) else None
    for row in range(0, height, tile):
        for col in range(0, width, tile):
            expected = (min(tile, height - row), min(tile, width - col))
            if iterator is None:
                array = np.asarray(source(row, col, *expected))
            else:
                try:
                    array = np.asarray(next(iterator))
                except StopIteration:
                    raise ValueError(f"tile iterator ended early, before the tile at (row={row}, col={col})") from None
            if array.ndim == 2:
                array = array[..., None]
            if array.shape != (*expected, channels) or array.dtype != np.uint8:
                raise ValueError(
                    f"tile at (row={row}, col={col}) must be uint8 of shape {(*expected, channels)}, "
                    f"got {array.dtype} {array.shape}"
                )
            yield _pad_tile(array, tile)


class _BlockStore:
    """Disk scratch holding the 2x2-reduced block of every tile of one level, one fixed-size record per tile."""

    def __init__(self, path: Path, grid_hw: tuple[int, int], block: int, channels: int):
        self.grid_hw, self.block_shape = grid_hw, (block, block, channels)
        self.record_bytes = block * block * channels
        self.file = open(path, "w+b")

    def put(self, index: int, block: np.ndarray) -> None:
        """Store the reduced block of tile number ``index`` (row-major)."""
        os.pwrite(self.file.fileno(), np.ascontiguousarray(block).tobytes(), index * self.record_bytes)

    def get(self, grid_row: int, grid_col: int) -> np.ndarray | None:
        """Read back the block of tile (grid_row, grid_col), or None outside the grid."""
        if grid_row >= self.grid_hw[0] or grid_col >= self.grid_hw[1]:
            return None
        offset = (grid_row * self.grid_hw[1] + grid_col) * self.record_bytes
        data = os.pread(self.file.fileno(), self.record_bytes, offset)
        return np.frombuffer(data, np.uint8).reshape(self.block_shape)

    def tiles(self, shape_hw: tuple[int, int], tile: int) -> Iterator[np.ndarray]:
        """Yield the next level's full tiles, each stitched from (up to) 2x2 stored blocks."""
        for row in range(0, shape_hw[0], tile):
            for col in range(0, shape_hw[1], tile):
                grid_row, grid_col = 2 * row // tile, 2 * col // tile
                blocks = [[self.get(grid_row + i, grid_col + j) for j in (0, 1)] for i in (0, 1)]
                present = [[b for b in pair if b is not None] for pair in blocks]  # None: past the right/bottom edge
                rows = [np.concatenate(pair, axis=1) for pair in present if pair]
                yield _pad_tile(np.concatenate(rows, axis=0), tile)

    def close(self) -> None:
        """Close the scratch file before its temporary folder is removed."""
        self.file.close()


def _reduce_into(tiles: Iterator[np.ndarray], store: _BlockStore | None, method: str) -> Iterator[np.ndarray]:
    """Pass tiles through to tifffile while saving each one's 2x2 reduction for the next level."""
    for index, tile_array in enumerate(tiles):
        if store is not None:
            store.put(index, downsample2(tile_array, method))
        yield tile_array.squeeze(-1) if tile_array.shape[-1] == 1 else tile_array


def write_pyramid(
    path: str | os.PathLike,
    tiles: TileSource,
    shape_hw: tuple[int, int],
    channels: int,
    mpp: float,
    tile: int = 256,
    compression: str | None = None,
    downsample: str | None = None,
    jpeg_quality: int = 90,
) -> Path:
    """Write a tiled pyramidal BigTIFF atomically (a temporary name renamed at the end) and return its path.

    Args:
        path: output ``.tif``; its folder must exist. A failed or killed run leaves no file under this name.
        tiles: level-0 tiles, see ``TileSource`` (level-0 ``row, col, height, width``).
        shape_hw: level-0 ``(height, width)`` in pixels.
        channels: 3 (RGB) or 1 (grayscale: masks, probability maps).
        mpp: level-0 microns per pixel; level ``k`` gets ``mpp * 2**k``.
        tile: tile edge in pixels (a multiple of 16, as TIFF requires).
        compression: tifffile codec name; default 'jpeg' for RGB and 'lzw' for one channel (readable by cuCIM).
        downsample: 'mean', 'max' or 'nearest'; default 'mean' for RGB and 'nearest' for one channel, so label
            values never blend. Use 'mean' for probability maps.
        jpeg_quality: JPEG quality (1-100) when compression is 'jpeg'.
    """
    path = Path(path)
    if channels not in (1, 3):
        raise ValueError(f"{path}: channels must be 1 or 3, got {channels}")
    if tile % 16 or tile <= 0:
        raise ValueError(f"{path}: tile must be a positive multiple of 16, got {tile}")
    if not mpp > 0:
        raise ValueError(f"{path}: mpp must be positive, got {mpp}")
    compression = compression or ("jpeg" if channels == 3 else "lzw")
    downsample = downsample or ("mean" if channels == 3 else "nearest")
    if compression == "jpeg" and channels != 3:
        raise ValueError(f"{path}: JPEG would blur label values; use a lossless compression for {channels} channel(s)")
    downsample2(np.zeros((2, 2, 1), np.uint8), downsample)  # fail on a bad name before any work
    shapes = pyramid_shapes(shape_hw, tile)
    codec_args = {"level": jpeg_quality} if compression == "jpeg" else None
    photometric = "rgb" if channels == 3 else "minisblack"

    partial = path.with_name(f".{path.name}.partial")
    try:
        with ExitStack() as stack:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.")))
            writer = stack.enter_context(tifffile.TiffWriter(partial, bigtiff=True))
            level_tiles = _level0_tiles(tiles, shapes[0], channels, tile)
            for level, shape in enumerate(shapes):
                store = None
                if level + 1 < len(shapes):
                    grid_hw = (-(-shape[0] // tile), -(-shape[1] // tile))
                    store = _BlockStore(scratch / f"level{level + 1}.raw", grid_hw, tile // 2, channels)
                    stack.callback(store.close)
                pixels_per_cm = 1e4 / (mpp * 2**level)
                writer.write(
                    _reduce_into(level_tiles, store, downsample),
                    shape=(*shape, channels) if channels == 3 else shape,
                    dtype=np.uint8,
                    tile=(tile, tile),
                    photometric=photometric,
                    compression=compression,
                    compressionargs=codec_args,
                    resolution=(pixels_per_cm, pixels_per_cm),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if level else 0,
                    metadata=None,
                )
                if store is not None:
                    level_tiles = store.tiles(shapes[level + 1], tile)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path
