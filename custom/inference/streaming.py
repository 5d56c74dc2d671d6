# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The streaming side of a slide's outputs: its pyramids written band by band from the raw probability raster.

The raster holds probability x 255 as uint8, ``(rows, cols)`` of the inferred level (:func:`threshold_cut` is the
one rule for which stored values are tumour). :class:`PyramidStreamer` writes ``<name>_prob.tif`` and
``<name>_mask.tif`` in background threads, from the rows the ``StripMerger`` has finished, while the network still
runs; on the way :class:`RasterStats` gathers the histogram and the reduced mask that the deliverables
(``custom.inference.outputs``) need, so finishing a slide does not read its raster again.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from custom.inference.stitch import StripMerger, read_raster_rows
from custom.inference.wsi import SlidePrediction
from custom.writers.pyramid_tiff import write_pyramid

__all__ = ["PYRAMID_OUTPUTS", "RasterStats", "RasterTiles", "PyramidStreamer", "raster_stats", "threshold_cut"]

PYRAMID_OUTPUTS = ("prob", "mask")
"""The slide outputs that are streamed: the probability and the mask pyramids (keys of ``outputs.SLIDE_OUTPUTS``)."""
_TILE = 256


def threshold_cut(threshold: float) -> int:
    """The stored uint8 value from which a pixel is tumour: probabilities are kept as round(255 x p)."""
    return int(np.rint(255 * threshold))


class RasterStats:
    """What one pass over the raster's rows gathers: the value histogram and a reduced tumour mask.

    The mask is the raster thresholded and shrunk by ``factor`` (a power of two, majority vote per block) so that
    its longer side is at most ``max_side``; it feeds the polygons and the overlay. Rows must arrive top to bottom,
    in bands of any height (rows short of a whole block wait for the next band).
    """

    def __init__(self, shape_hw: tuple[int, int], threshold: int, max_side: int) -> None:
        self.height, width = shape_hw
        self.factor, self.threshold, self.rows = 1, threshold, 0
        while max(self.height, width) > max_side * self.factor:
            self.factor *= 2
        self.histogram = np.zeros(256, np.int64)
        self.mask = np.zeros((-(-self.height // self.factor), -(-width // self.factor)), bool)
        self.pending = np.zeros((0, width), np.uint8)  # rows of an unfinished block

    @property
    def complete(self) -> bool:
        """Whether every row of the raster has been counted."""
        return self.rows >= self.height

    def add(self, row: int, values: np.ndarray) -> None:
        """Count the ``(rows, width)`` uint8 band starting at raster row ``row``."""
        if row != self.rows:
            raise ValueError(f"raster rows must arrive in order: expected row {self.rows}, got {row}")
        self.histogram += np.bincount(values.ravel(), minlength=256)
        self.rows = row + values.shape[0]
        values = np.concatenate([self.pending, values]) if len(self.pending) else values
        top = (self.rows - values.shape[0]) // self.factor
        whole = values.shape[0] if self.complete else values.shape[0] // self.factor * self.factor
        self.pending = values[whole:]
        tumour = values[:whole] >= self.threshold
        pad = ((0, -tumour.shape[0] % self.factor), (0, -tumour.shape[1] % self.factor))
        blocks = np.pad(tumour, pad).reshape(-1, self.factor, self.mask.shape[1], self.factor)
        self.mask[top : top + blocks.shape[0]] = blocks.mean(axis=(1, 3)) >= 0.5


def raster_stats(prediction: SlidePrediction, threshold: int, max_side: int) -> RasterStats:
    """:class:`RasterStats` of a finished raster, read from disk band by band."""
    stats = RasterStats(prediction.shape_hw, threshold, max_side)
    band = stats.factor * max(1, _TILE // stats.factor)
    for row in range(0, prediction.shape_hw[0], band):
        stats.add(row, read_raster_rows(prediction.raster, prediction.shape_hw, row, band))
    return stats


class RasterTiles:
    """``write_pyramid`` tile source over a raw raster: reads one band of rows at a time, optionally thresholded.

    Given the ``merger`` still blending the raster, each band is read only once the merger has written it; given
    ``stats``, each band is also counted there (before thresholding).
    """

    def __init__(self, path: Path, shape_hw: tuple[int, int], threshold: int | None = None,
                 merger: StripMerger | None = None, stats: RasterStats | None = None) -> None:
        self.path, self.shape_hw, self.threshold, self.merger, self.stats = path, shape_hw, threshold, merger, stats
        self.band_row, self.band = -1, np.zeros((0, 0), np.uint8)

    def __call__(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        if row != self.band_row:
            if self.merger is not None:
                self.merger.wait_rows(row + height)
            self.band_row, self.band = row, read_raster_rows(self.path, self.shape_hw, row, height)
            if self.stats is not None:
                self.stats.add(row, self.band)
            if self.threshold is not None:
                self.band = np.where(self.band >= self.threshold, 255, 0).astype(np.uint8)
        return self.band[:height, col : col + width]


class PyramidStreamer:
    """Writes the probability and mask pyramids in background threads from the rows the merger has finished.

    Pass :meth:`start` as ``on_start`` of ``WholeSlideInferer``: the TIFFs are written while the network runs (TIFF
    encoding releases the GIL), and :meth:`result` waits for them and re-raises a writing error. The first pyramid
    written also fills :attr:`stats` (histogram and reduced mask) on the way.
    """

    def __init__(self, output_dir: str | os.PathLike, name: str, threshold: float = 0.5,
                 outputs: Sequence[str] = PYRAMID_OUTPUTS, max_polygon_side: int = 8192) -> None:
        self.folder, self.name, self.cut = Path(output_dir) / name, name, threshold_cut(threshold)
        self.kinds = [kind for kind in PYRAMID_OUTPUTS if kind in outputs]
        self.max_polygon_side = max_polygon_side
        self.pool = ThreadPoolExecutor(2, thread_name_prefix=f"pyramids-{name}")
        self.futures: dict[str, Future] = {}
        self.stats: RasterStats | None = None

    def start(self, merger: StripMerger, mpp: float) -> None:
        """Begin writing ``<name>_prob.tif`` and/or ``<name>_mask.tif`` (``mpp`` um per pixel) as rows finish."""
        self.write(merger.path, merger.shape_hw, mpp, merger)

    def write(self, raster: Path, shape: tuple[int, int], mpp: float, merger: StripMerger | None = None) -> None:
        """Begin writing the pyramids of ``raster``: a finished one, or one that ``merger`` is still blending."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.kinds:
            self.stats = RasterStats(shape, self.cut, self.max_polygon_side)
        for kind in self.kinds:
            stats = self.stats if kind == self.kinds[0] else None
            tiles = RasterTiles(raster, shape, None if kind == "prob" else self.cut, merger, stats)
            self.futures[kind] = self.pool.submit(write_pyramid, self.folder / f"{self.name}_{kind}.tif", tiles, shape,
                                                  1, mpp, downsample="mean" if kind == "prob" else None)

    def discard(self) -> None:
        """Wait for the writing threads and remove the pyramids they wrote: a slide whose inference failed must not
        leave TIFFs that look complete (the threads finish them from a raster that stopped filling)."""
        for kind, future in self.futures.items():
            with contextlib.suppress(Exception):  # the inference error is the one to report
                future.result()
            (self.folder / f"{self.name}_{kind}.tif").unlink(missing_ok=True)
        self.pool.shutdown()

    def result(self) -> dict[str, Path]:
        """The written pyramids (an empty dict if none were started), once all are complete."""
        try:
            return {key: future.result() for key, future in self.futures.items()}
        finally:
            self.pool.shutdown()
