# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Blending overlapping tile predictions into a slide-sized uint8 raster on disk, one band of rows at a time.

Tiles must arrive in row-major order of their top row (the order of ``custom.data.grid.make_tile_grid``): once a
tile starting at row ``r`` arrives, every row above ``r`` is final, is normalised by its summed blending weights
and is written out. Memory is therefore one tile-high float band of the level's width, whatever its height.
Other threads may read the finished rows while tiles still arrive (``wait_rows``), e.g. to write output pyramids.

Coordinates: ``row``/``col`` and ``(height, width)`` are pixels of the inferred level, numpy order.
The raster file is raw row-major uint8 (probability x 255, rounded); rows no tile reached stay 0.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch
from monai.data.utils import compute_importance_map

__all__ = ["importance_map", "StripMerger", "read_raster_rows"]


def importance_map(tile_size: int, mode: str = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """MONAI's blending weights for one tile (as ``SlidingWindowInferer`` uses), floored so no weight is 0."""
    weights = compute_importance_map((tile_size, tile_size), mode=mode, sigma_scale=sigma_scale, device="cpu")
    weights = weights.to(torch.float32).numpy()
    return np.maximum(weights, weights[weights > 0].min())


class StripMerger:
    """Accumulates weighted tile probabilities in a band of rows and flushes finished rows to a raw uint8 file.

    Args:
        path: the raw raster to create (``height * width`` bytes, row-major).
        shape_hw: ``(height, width)`` of the inferred level.
        weights: ``(tile, tile)`` blending weights (see :func:`importance_map`).
    """

    def __init__(self, path: str | os.PathLike, shape_hw: tuple[int, int], weights: np.ndarray) -> None:
        self.path, self.shape_hw, self.weights = Path(path), (int(shape_hw[0]), int(shape_hw[1])), weights
        tile = weights.shape[0]
        self.sum = np.zeros((tile, self.shape_hw[1]), np.float32)
        self.weight_sum = np.zeros((tile, self.shape_hw[1]), np.float32)
        self.top = 0
        self.rows_done = 0
        self.rows_ready = threading.Condition()
        self.file = open(self.path, "w+b")
        self.file.truncate(self.shape_hw[0] * self.shape_hw[1])  # sparse zeros: rows without tiles stay 0

    def add(self, row: int, col: int, probability: np.ndarray) -> None:
        """Blend one ``(tile, tile)`` probability tile whose top-left pixel is ``(row, col)``."""
        if row < self.top:
            raise ValueError(f"{self.path}: tile at row {row} arrived after rows up to {self.top} were written")
        self._advance(row)
        tile = self.weights.shape[0]
        height, width = min(tile, self.shape_hw[0] - row), min(tile, self.shape_hw[1] - col)
        if height <= 0 or width <= 0:
            return
        r = row - self.top
        weights = self.weights[:height, :width]
        self.sum[r : r + height, col : col + width] += probability[:height, :width] * weights
        self.weight_sum[r : r + height, col : col + width] += weights

    def _advance(self, row: int) -> None:
        """Write the rows above ``row`` (they are final) and slide the band down to start at ``row``."""
        done = min(row - self.top, self.sum.shape[0])
        if done <= 0:
            return
        self._write_rows(done)
        for band in (self.sum, self.weight_sum):  # shift up in non-overlapping chunks: no band-sized temporaries
            for start in range(0, band.shape[0] - done, done):
                stop = min(start + done, band.shape[0] - done)
                band[start:stop] = band[start + done : stop + done]
            band[-done:] = 0.0
        self.top = row

    def _write_rows(self, count: int) -> None:
        """Normalise the band's first ``count`` rows and write them at their place in the file."""
        count = min(count, self.shape_hw[0] - self.top)
        if count <= 0:
            return
        probability = self.sum[:count]  # normalised in place: these rows are overwritten once written
        np.divide(probability, self.weight_sum[:count], out=probability, where=self.weight_sum[:count] > 0)
        np.clip(probability, 0.0, 1.0, out=probability)
        probability *= 255.0
        values = np.rint(probability, out=probability).astype(np.uint8)
        os.pwrite(self.file.fileno(), values.tobytes(), self.top * self.shape_hw[1])
        self._publish(self.top + count)

    def _publish(self, rows: int) -> None:
        """Tell ``wait_rows`` callers that the first ``rows`` rows of the file are final."""
        with self.rows_ready:
            self.rows_done = max(self.rows_done, rows)
            self.rows_ready.notify_all()

    def wait_rows(self, stop: int) -> None:
        """Block until rows ``[0, stop)`` are in the file (all of them once the merger is closed)."""
        with self.rows_ready:
            self.rows_ready.wait_for(lambda: self.rows_done >= min(stop, self.shape_hw[0]))

    def close(self) -> Path:
        """Write the remaining rows and close the file; returns its path."""
        if not self.file.closed:
            self._write_rows(self.sum.shape[0])
            self.file.close()
            self._publish(self.shape_hw[0])
        return self.path


def read_raster_rows(path: str | os.PathLike, shape_hw: tuple[int, int], row: int, count: int) -> np.ndarray:
    """Read rows ``[row, row + count)`` of a raw uint8 raster as ``(rows, width)`` without mapping the file."""
    height, width = shape_hw
    count = max(0, min(count, height - row))
    data = np.fromfile(path, dtype=np.uint8, count=count * width, offset=row * width)
    return data.reshape(count, width)
