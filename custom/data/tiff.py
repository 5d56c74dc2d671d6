# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Tile-selective TIFF reading with tifffile: only the tiles (or strips) a region touches are decoded (no zarr).

``read_tiff_region`` serves ``custom.data.slide.Slide``'s tifffile backend (RGB) and :class:`LabelTiff`, the reader
of one-channel pyramidal TIFFs (ground-truth masks, the predicted mask and probability map) that the evaluation
streams band by band. Boxes are ``(row, col)`` / ``(height, width)`` of one page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

__all__ = ["LabelTiff", "read_tiff_region"]


def read_tiff_region(page: Any, row0: int, col0: int, height: int, width: int) -> np.ndarray:
    """Decode only the TIFF tiles (or strips) that overlap a ``(row, col)`` box of one tifffile page (no zarr needed).

    A strip is a segment one image wide; the box is clipped to the image, so a band past the bottom comes back shorter.
    """
    if page.dtype != np.uint8:
        raise ValueError(f"only 8-bit slides are supported, this page holds {page.dtype}")
    if page.planarconfig != 1:  # separate colour planes: segments are per channel, decode the page as a whole
        return np.ascontiguousarray(page.asarray()[row0 : row0 + height, col0 : col0 + width, :3])
    height, width = min(height, page.imagelength - row0), min(width, page.imagewidth - col0)
    if page.is_tiled:
        tile_h, tile_w = page.tilelength, page.tilewidth
    else:
        tile_h, tile_w = min(page.rowsperstrip, page.imagelength), page.imagewidth
    tiles_across = -(-page.imagewidth // tile_w)
    tile_rows = range(row0 // tile_h, (row0 + height - 1) // tile_h + 1)
    tile_cols = range(col0 // tile_w, (col0 + width - 1) // tile_w + 1)
    indices = [r * tiles_across + c for r in tile_rows for c in tile_cols]
    mosaic = np.empty((len(tile_rows) * tile_h, len(tile_cols) * tile_w, page.samplesperpixel), np.uint8)
    decode_args = {"jpegtables": page.jpegtables, "jpegheader": page.jpegheader, "_fullsize": True}
    segments = page.parent.filehandle.read_segments(
        [page.dataoffsets[i] for i in indices], [page.databytecounts[i] for i in indices], indices=indices
    )
    for data, index in segments:
        tile = page.decode(data, index, **decode_args)[0]
        r, c = divmod(index, tiles_across)
        r, c = r - tile_rows.start, c - tile_cols.start
        mosaic[r * tile_h : (r + 1) * tile_h, c * tile_w : (c + 1) * tile_w] = tile.reshape(tile_h, tile_w, -1)
    top, left = row0 - tile_rows.start * tile_h, col0 - tile_cols.start * tile_w
    return np.ascontiguousarray(mosaic[top : top + height, left : left + width, :3])


class LabelTiff:
    """A one-channel (pyramidal) TIFF read band by band: masks and probability maps, ground truth or predicted.

    ``custom.data.slide.Slide`` reads RGB only; this decodes just the tiles (or strips) a band touches.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.tif = tifffile.TiffFile(self.path)
        self.pages = [level.keyframe for level in self.tif.series[0].levels]
        if self.pages[0].samplesperpixel != 1:
            raise ValueError(f"{self.path}: expected a one-channel mask or map, found {self.pages[0].samplesperpixel}")
        self.size_wh = (self.pages[0].imagewidth, self.pages[0].imagelength)
        self.downsamples = [self.size_wh[0] / page.imagewidth for page in self.pages]

    def rows(self, row: int, height: int, level: int = 0) -> np.ndarray:
        """Rows ``[row, row + height)`` of ``level``, full width, as ``(height, width)`` uint8."""
        page = self.pages[level]
        return read_tiff_region(page, row, 0, height, page.imagewidth)[..., 0]

    def sampled_rows(self, ds: float, row: int, height: int, width: int) -> np.ndarray:
        """Rows of the grid of downsample ``ds``, each pixel taken at its centre from the closest finer level."""
        level = max(i for i, d in enumerate(self.downsamples) if d <= ds * (1 + 1e-6))
        d, page = self.downsamples[level], self.pages[level]
        rows = np.minimum(((np.arange(row, row + height) + 0.5) * ds / d).astype(np.int64), page.imagelength - 1)
        cols = np.minimum(((np.arange(width) + 0.5) * ds / d).astype(np.int64), page.imagewidth - 1)
        top = int(rows[0])
        return self.rows(top, int(rows[-1]) - top + 1, level)[rows - top][:, cols]

    def close(self) -> None:
        """Close the file."""
        self.tif.close()
