# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Per-slide output files made from a blended probability raster, streamed band by band from disk.

For a slide ``<name>`` (all in ``<output_dir>/<name>/``):

* ``<name>_prob.tif``   uint8 probability x 255, tiled LZW pyramidal BigTIFF, levels averaged;
* ``<name>_mask.tif``   uint8 0/255 tumour mask, the same geometry, levels by nearest neighbour;
* ``<name>.geojson``    QuPath FeatureCollection of tumour polygons (holes as interior rings), level-0 ``(x, y)``;
* ``<name>.xml``        ASAP XML (Camelyon16): outlines in group ``_0``, their holes in the exclusion group ``_2``;
* ``<name>_overlay.png`` slide thumbnail with the mask tinted red and outlined;
* ``<name>_summary.json`` areas, scores, geometry and timings; written LAST, so its presence means complete.

``outputs`` selects which of the first five are written (:data:`SLIDE_OUTPUTS`, all by default); the summary always is.
The histogram behind the summary's numbers and the reduced mask behind the polygons and the overlay are gathered
while the pyramids stream (:class:`RasterStats`), so finishing a slide does not read its raster again.

Both TIFFs are written at the inferred level: their level 0 is the slide's level ``level`` (downsample ``ds``), and
their resolution tags say ``mpp = slide level-0 mpp x ds``, so viewers that place overlays by physical size (QuPath,
ASAP) align them with the slide; the summary records ``downsample`` to scale pixel coordinates by hand.
Tumour is where the stored value is at least ``round(255 x threshold)``.
Plain images get ``<name>_mask.png`` (0/255), ``<name>_prob.nii.gz`` (float32 ``(rows, cols)``) and the summary.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from skimage.io import imsave
from skimage.segmentation import find_boundaries
from skimage.transform import resize

from custom.data.polygons import mask_polygons, outlines_and_holes
from custom.data.slide import mpp_or_assumed
from custom.inference.stitch import StripMerger, read_raster_rows
from custom.inference.wsi import SlidePrediction
from custom.writers.asap_xml import write_asap_xml
from custom.writers.geojson import write_qupath_geojson
from custom.writers.pyramid_tiff import write_pyramid

__all__ = ["SUMMARY_SUFFIX", "SCORE_DEFINITION", "SLIDE_OUTPUTS", "RasterStats", "RasterTiles", "PyramidStreamer",
           "check_outputs", "summary_path", "threshold_cut", "write_slide_outputs", "write_image_outputs"]

SUMMARY_SUFFIX = "_summary.json"
SCORE_DEFINITION = "mean of the top_k highest pixel probabilities of the map (robust to isolated hot pixels)"
SLIDE_OUTPUTS = ("prob", "mask", "geojson", "asap_xml", "overlay")
"""Keys of the optional per-slide files (``files`` in the summary): pyramids, polygons, XML, overlay picture."""
_TILE = 256


def threshold_cut(threshold: float) -> int:
    """The stored uint8 value from which a pixel is tumour: probabilities are kept as round(255 x p)."""
    return int(np.rint(255 * threshold))


def check_outputs(outputs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The requested outputs as a tuple, refusing unknown names (config key ``outputs``) before any work."""
    unknown = sorted(set(outputs) - set(SLIDE_OUTPUTS))
    if unknown:
        raise ValueError(f"unknown slide outputs {unknown} (config key 'outputs'); choose from {list(SLIDE_OUTPUTS)}")
    return tuple(outputs)


def summary_path(output_dir: str | os.PathLike, name: str) -> Path:
    """The summary JSON of slide ``name``: the marker of a completed slide (resume skips it)."""
    return Path(output_dir) / name / f"{name}{SUMMARY_SUFFIX}"


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
                 outputs: tuple[str, ...] = SLIDE_OUTPUTS, max_polygon_side: int = 8192) -> None:
        self.folder, self.name, self.cut = Path(output_dir) / name, name, threshold_cut(threshold)
        self.kinds = [kind for kind in ("prob", "mask") if kind in check_outputs(outputs)]
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


def top_k_mean(histogram: np.ndarray, k: int) -> float:
    """Mean probability of the ``k`` highest uint8 values, from their histogram (no pixel array needed)."""
    counts = histogram[::-1]
    taken = np.minimum(counts, np.maximum(k - (np.cumsum(counts) - counts), 0))
    total = taken.sum()
    return float((taken * np.arange(255, -1, -1)).sum() / (255.0 * total)) if total else 0.0


def _overlay(thumbnail: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The thumbnail with the tumour mask (resized to it by nearest neighbour) tinted red and outlined."""
    mask = resize(mask, thumbnail.shape[:2], order=0, anti_aliasing=False, preserve_range=True).astype(bool)
    out = thumbnail.astype(np.float32)
    out[mask] = 0.55 * out[mask] + 0.45 * np.array([255.0, 0.0, 0.0])
    out[find_boundaries(mask, mode="inner")] = (200, 0, 0)
    return out.astype(np.uint8)


def write_slide_outputs(
    prediction: SlidePrediction,
    output_dir: str | os.PathLike,
    name: str,
    threshold: float = 0.5,
    min_area_um2: float = 2_000.0,
    simplify_px: float = 1.0,
    top_k: int = 1000,
    max_polygon_side: int = 8192,
    pyramids: PyramidStreamer | None = None,
    outputs: tuple[str, ...] = SLIDE_OUTPUTS,
) -> dict:
    """Write the requested ``outputs`` of one slide and return its summary (also written, last, as JSON).

    ``pyramids`` is the :class:`PyramidStreamer` that wrote the TIFFs while the network ran (made with the same
    ``threshold``, ``outputs`` and ``max_polygon_side``); without one they are written here. Waiting for them counts as
    ``write`` time, and their statistics spare a second pass over the raster.
    """
    start = time.perf_counter()
    outputs = check_outputs(outputs)
    folder = Path(output_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    level0_mpp = mpp_or_assumed(prediction.level0_mpp)
    ds = prediction.downsample
    cut = threshold_cut(threshold)
    shape = prediction.shape_hw
    if pyramids is None:
        pyramids = PyramidStreamer(output_dir, name, threshold, outputs, max_polygon_side)
        pyramids.write(prediction.raster, shape, level0_mpp * ds)
    files: dict[str, Path] = pyramids.result()
    if pyramids.cut != cut:
        raise ValueError(f"{name}: the pyramids were thresholded at {pyramids.cut}/255, the outputs at {cut}/255")
    stats = pyramids.stats if pyramids.stats is not None else raster_stats(prediction, cut, max_polygon_side)
    polygons = None
    if {"geojson", "asap_xml"} & set(outputs):
        polygons = mask_polygons(stats.mask, ds * stats.factor, min_area_um2 / level0_mpp**2, simplify_px)
    if "geojson" in outputs:
        files["geojson"] = write_qupath_geojson(folder / f"{name}.geojson", polygons)
    if "asap_xml" in outputs:
        rings, holes = outlines_and_holes(polygons)
        groups = ["_0"] * len(rings) + ["_2"] * len(holes)
        files["asap_xml"] = write_asap_xml(folder / f"{name}.xml", rings + holes, groups)
    tissue = prediction.tissue
    if "overlay" in outputs and tissue is not None and tissue.thumbnail is not None:
        files["overlay"] = folder / f"{name}_overlay.png"
        imsave(files["overlay"], _overlay(tissue.thumbnail, stats.mask), check_contrast=False)
    tumour_px = int(stats.histogram[cut:].sum())
    tumour_mm2 = tumour_px * (level0_mpp * ds) ** 2 / 1e6
    tissue_mm2 = float(tissue.mask.sum()) * (level0_mpp * tissue.downsample) ** 2 / 1e6 if tissue is not None else None
    prediction.timings["write"] = time.perf_counter() - start
    prediction.timings["wall"] = prediction.timings.get("wall", 0.0) + prediction.timings["write"]
    summary = {
        "slide": prediction.source,
        "name": name,
        "tissue_found": bool(prediction.n_tiles),
        "message": _message(prediction),
        "n_tiles": prediction.n_tiles,
        "level": prediction.level,
        "downsample": ds,
        "level0_size_wh": list(prediction.level0_wh),
        "output_size_wh": [shape[1], shape[0]],
        "level0_mpp": level0_mpp,
        "mpp_assumed": prediction.level0_mpp is None,
        "output_mpp": level0_mpp * ds,
        "threshold": threshold,
        "tumour_area_mm2": tumour_mm2,
        "tissue_area_mm2": tissue_mm2,
        "tumour_fraction_of_tissue": min(tumour_mm2 / tissue_mm2, 1.0) if tissue_mm2 else 0.0,
        "max_probability": float(np.flatnonzero(stats.histogram)[-1] / 255.0),
        "score": top_k_mean(stats.histogram, top_k),
        "score_definition": SCORE_DEFINITION.replace("top_k", str(top_k)),
        "n_regions": None if polygons is None else len(polygons),
        "polygon_downsample": ds * stats.factor,
        "timings_s": {k: round(v, 4) for k, v in prediction.timings.items()},
        "files": {k: Path(v).name for k, v in files.items()},
    }
    summary_path(output_dir, name).write_text(json.dumps(summary, indent=2))
    return summary


def _message(prediction: SlidePrediction) -> str:
    """"ok", or why no tile of the slide was run: no tissue, tissue only in pieces too small to keep, or too little
    of it in any tile."""
    tissue = prediction.tissue
    if prediction.n_tiles:
        return "ok"
    if tissue is not None and tissue.empty_reason:
        reason = tissue.empty_reason
    elif tissue is not None and tissue.mask.any():
        reason = "tissue found, but no tile holds the inferer's min_tissue fraction of it"
    else:
        reason = "no tissue found"
    return f"{reason}: nothing was inferred, the mask is empty"


def write_image_outputs(
    prediction: SlidePrediction, output_dir: str | os.PathLike, name: str, threshold: float = 0.5, top_k: int = 1000
) -> dict:
    """Write the PNG mask, the NIfTI probability map and the summary of a plain image; return the summary."""
    folder = Path(output_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    values = read_raster_rows(prediction.raster, prediction.shape_hw, 0, prediction.shape_hw[0])
    cut = threshold_cut(threshold)
    mask = np.where(values >= cut, 255, 0).astype(np.uint8)
    files = {"mask": folder / f"{name}_mask.png", "prob": folder / f"{name}_prob.nii.gz"}
    imsave(files["mask"], mask, check_contrast=False)
    spacing = prediction.level0_mpp or 1.0
    nib.save(nib.Nifti1Image(values.astype(np.float32) / 255.0, np.diag([spacing, spacing, 1.0, 1.0])), files["prob"])
    histogram = np.bincount(values.ravel(), minlength=256)
    summary = {
        "slide": prediction.source,
        "name": name,
        "n_tiles": prediction.n_tiles,
        "output_size_wh": [prediction.shape_hw[1], prediction.shape_hw[0]],
        "threshold": threshold,
        "tumour_fraction_of_image": float((mask > 0).mean()),
        "max_probability": float(values.max() / 255.0),
        "score": top_k_mean(histogram, top_k),
        "score_definition": SCORE_DEFINITION.replace("top_k", str(top_k)),
        "timings_s": {k: round(v, 4) for k, v in prediction.timings.items()},
        "files": {k: v.name for k, v in files.items()},
    }
    summary_path(output_dir, name).write_text(json.dumps(summary, indent=2))
    return summary
