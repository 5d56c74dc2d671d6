# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Active learning (``POST /activelearning/entropy``): the next image to correct is the one the served model is
least sure of.

Uncertainty is the binary entropy (bits) of the fused probability map, ``H(p) = -p log2 p - (1 - p) log2 (1 - p)``,
with ``p`` the stored ``round(255 p) / 255`` of the bundle's sliding-window map, averaged over the image's tissue
(``TumourSegmentation.predict_whole``: a slide's tissue mask, or a plain image's tissue by the same saturation rule);
glass counts for nothing, and an image without tissue scores 0. The unlabelled image (no ``final`` label) with the
highest mean is proposed.

QuPath's Next Sample sends ``{"image": <id>, "patch_size": [w, h]}`` to ask for the next patch of the open image:
the answer then also has ``bbox`` ``[x, y, w, h]`` (level 0) of the window of that size with the highest mean
entropy over tissue among the windows at least half as covered by tissue as the most covered one.

Scores are cached per image, keyed by the image file's and the weights file's modification time, size and inode, so
only new or changed images are inferred again, and every image is when a training replaced the weights. A whole
slide is inferred once per version of the weights (what the bundle's inference of it costs).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.strategy import Strategy

from custom.data.slide import SlideReadError
from custom.data.tissue import TissueMask
from custom.inference.stitch import read_raster_rows
from custom.inference.wsi import SlidePrediction

from .request_checks import MAX_REGION_PIXELS, MIN_TILE, check_pair, studies_image
from .tumour_infer import SCRATCH_PREFIX, ServedModel, TumourSegmentation, file_stamp

__all__ = ["ENTROPY_BITS", "EntropyMap", "EntropyStrategy", "entropy_map"]

logger = logging.getLogger(__name__)


def _entropy_table() -> np.ndarray:
    """Binary entropy in bits of each stored probability value 0..255 (0 at both ends)."""
    p = np.arange(256, dtype=np.float64) / 255.0
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p))
    return np.nan_to_num(h, nan=0.0)


ENTROPY_BITS = _entropy_table()
"""``ENTROPY_BITS[v]`` is the binary entropy of the stored probability ``v / 255``."""
MAX_GRID_SIDE = 256
"""Longest side of an image's cached grid of entropy sums (cells of a whole number of raster pixels)."""
STRIP_PIXELS = 1 << 22
"""Raster pixels read per strip (bounds memory on a whole slide)."""


@dataclass(frozen=True)
class EntropyMap:
    """Entropy summed over tissue, and tissue pixels counted, per cell of ``cell`` x ``cell`` raster pixels; a cell
    covers ``cell * downsample`` level-0 pixels."""

    entropy: np.ndarray
    tissue: np.ndarray
    cell: int
    downsample: float
    level0_wh: tuple[int, int]

    @property
    def mean(self) -> float:
        """Mean entropy (bits) over the image's tissue; 0 without tissue."""
        count = float(self.tissue.sum())
        return float(self.entropy.sum() / count) if count else 0.0

    def most_uncertain_window(self, size_wh: tuple[int, int]) -> list[int]:
        """``[x, y, w, h]`` (level 0) of the window of ``size_wh`` with the highest mean entropy over tissue, among
        windows with at least half the tissue of the most covered one (cell steps)."""
        span = self.cell * self.downsample
        rows, cols = self.tissue.shape
        win_r = min(rows, max(1, round(size_wh[1] / span)))
        win_c = min(cols, max(1, round(size_wh[0] / span)))
        entropy, tissue = _window_sums(self.entropy, win_r, win_c), _window_sums(self.tissue, win_r, win_c)
        enough = tissue >= 0.5 * tissue.max() if tissue.max() > 0 else np.ones_like(tissue, bool)
        score = np.where(enough, entropy / np.maximum(tissue, 1), -1.0)
        r, c = np.unravel_index(int(np.argmax(score)), score.shape)
        width0, height0 = self.level0_wh
        x, y = min(round(c * span), width0 - 1), min(round(r * span), height0 - 1)
        return [int(x), int(y), int(min(size_wh[0], width0 - x)), int(min(size_wh[1], height0 - y))]


def _window_sums(grid: np.ndarray, win_r: int, win_c: int) -> np.ndarray:
    """Sums of every ``win_r`` x ``win_c`` window of ``grid`` (a summed-area table)."""
    table = np.zeros((grid.shape[0] + 1, grid.shape[1] + 1))
    table[1:, 1:] = grid.cumsum(0).cumsum(1)
    return table[win_r:, win_c:] - table[:-win_r, win_c:] - table[win_r:, :-win_c] + table[:-win_r, :-win_c]


def _tissue_rows(tissue: TissueMask, rows: np.ndarray, cols: np.ndarray, downsample: float) -> np.ndarray:
    """The tissue mask at raster pixels (rows x cols of the raster, which is ``downsample`` of level 0): each
    pixel takes the tissue cell its centre falls in."""
    rows_t = np.clip(((rows + 0.5) * downsample / tissue.downsample).astype(np.int64), 0, tissue.mask.shape[0] - 1)
    cols_t = np.clip(((cols + 0.5) * downsample / tissue.downsample).astype(np.int64), 0, tissue.mask.shape[1] - 1)
    return tissue.mask[np.ix_(rows_t, cols_t)]


def _cell_sums(values: np.ndarray, cell: int) -> np.ndarray:
    """Sums over ``cell`` x ``cell`` blocks of a strip (zero-padded to whole blocks)."""
    rows, cols = values.shape
    padded = np.zeros((math.ceil(rows / cell) * cell, math.ceil(cols / cell) * cell), values.dtype)
    padded[:rows, :cols] = values
    return padded.reshape(padded.shape[0] // cell, cell, padded.shape[1] // cell, cell).sum(axis=(1, 3))


def entropy_map(prediction: SlidePrediction, tissue: TissueMask) -> EntropyMap:
    """The cell grid of entropy over tissue of a probability raster, read strip by strip."""
    height, width = prediction.shape_hw
    cell = max(1, math.ceil(max(height, width) / MAX_GRID_SIDE))
    strip = max(1, STRIP_PIXELS // max(width, 1) // cell) * cell
    cols = np.arange(width)
    entropy, counts = [], []
    for row in range(0, height, strip):
        values = read_raster_rows(prediction.raster, prediction.shape_hw, row, strip)
        inside = _tissue_rows(tissue, np.arange(row, row + values.shape[0]), cols, prediction.downsample)
        entropy.append(_cell_sums(np.where(inside, ENTROPY_BITS[values], 0.0), cell))
        counts.append(_cell_sums(inside.astype(np.int64), cell))
    return EntropyMap(np.concatenate(entropy), np.concatenate(counts).astype(np.float64), cell,
                      float(prediction.downsample), tuple(prediction.level0_wh))


class EntropyStrategy(Strategy):
    """Proposes the unlabelled image (and, for the open image, the patch) the served model is least certain of."""

    def __init__(self, task: TumourSegmentation, max_region_px: int = MAX_REGION_PIXELS) -> None:
        super().__init__("Highest mean entropy of the served model's map over tissue (unlabelled images)")
        self.task, self.max_region_px = task, max_region_px
        self._cache: dict[str, tuple[tuple, EntropyMap]] = {}
        self._lock = threading.Lock()

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any] | None:
        """The proposal: ``id``, its ``entropy``, the ``ranking`` (top 10), how many maps were ``computed`` now and
        taken from the ``cached`` ones, images ``skipped`` (unreadable), and ``bbox`` when a patch was asked for."""
        served = self.task.served()
        image = request.get("image")
        if image:
            return self._next_patch(request, datastore, served)
        scores, counts, skipped = {}, {"computed": 0, "cached": 0}, {}
        self._forget_unlisted(datastore)
        for image_id in datastore.get_unlabeled_images():
            try:
                entropy, how = self._map(image_id, datastore.get_image_uri(image_id), served)
            except (SlideReadError, ValueError, OSError) as err:
                logger.warning("entropy of %s not computed: %s", image_id, err)
                skipped[image_id] = str(err)
                continue
            scores[image_id] = entropy.mean
            counts[how] += 1
        if not scores:
            return None
        ranking = sorted(scores.items(), key=lambda item: (-item[1], item[0]))
        logger.info("entropy: %s (%.4f bits) of %d unlabelled image(s)", ranking[0][0], ranking[0][1], len(scores))
        return {"id": ranking[0][0], "entropy": ranking[0][1], "ranking": [list(r) for r in ranking[:10]],
                **counts, "skipped": skipped}

    def _next_patch(self, request: dict, datastore: Datastore, served: ServedModel) -> dict[str, Any]:
        """The most uncertain window of ``patch_size`` in the named image (QuPath's Next Patch)."""
        path = studies_image(datastore, request["image"])
        size_wh = check_pair(request, "patch_size") if "patch_size" in request else (1024, 1024)
        if min(size_wh) < MIN_TILE or size_wh[0] * size_wh[1] > self.max_region_px:
            raise HTTPException(400, f"'patch_size' must be at least {MIN_TILE} a side and at most "
                                     f"{self.max_region_px} pixels, got {list(size_wh)}")
        try:
            entropy, how = self._map(request["image"], path, served)
        except (SlideReadError, ValueError, OSError) as err:
            raise HTTPException(400, f"{Path(path).name} cannot be inferred: {err}") from err
        return {"id": request["image"], "entropy": entropy.mean, "bbox": entropy.most_uncertain_window(size_wh),
                "computed": int(how == "computed"), "cached": int(how == "cached")}

    def _forget_unlisted(self, datastore: Datastore) -> None:
        """Drop the cached maps of images the datastore no longer lists."""
        listed = set(datastore.list_images())
        with self._lock:
            for image_id in [i for i in self._cache if i not in listed]:
                del self._cache[image_id]

    def _map(self, image_id: str, path: str, served: ServedModel) -> tuple[EntropyMap, str]:
        """The entropy map of one image for the served weights, and whether it was ``computed`` or ``cached``."""
        key = (path, file_stamp(path), served.stamp)
        with self._lock:
            hit = self._cache.get(image_id)
        if hit is not None and hit[0] == key:
            return hit[1], "cached"
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
            prediction, tissue = self.task.predict_whole(path, Path(scratch) / "prob.raw", served)
            entropy = entropy_map(prediction, tissue)
        with self._lock:
            self._cache[image_id] = (key, entropy)
        return entropy, "computed"
