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
while the pyramids stream (``custom.inference.streaming``), so finishing a slide does not read its raster again.

Both TIFFs are written at the inferred level: their level 0 is the slide's level ``level`` (downsample ``ds``), and
their resolution tags say ``mpp = slide level-0 mpp x ds``, so viewers that place overlays by physical size (QuPath,
ASAP) align them with the slide; the summary records ``downsample`` to scale pixel coordinates by hand.
Tumour is where the stored value is at least ``round(255 x threshold)``.
Plain images get ``<name>_mask.png`` (0/255), ``<name>_prob.nii.gz`` (float32 ``(rows, cols)``) and the summary.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from skimage.io import imsave
from skimage.segmentation import find_boundaries

from custom.data.polygons import mask_polygons, outlines_and_holes
from custom.data.slide import mpp_or_assumed
from custom.inference.stitch import read_raster_rows
from custom.inference.streaming import PYRAMID_OUTPUTS, PyramidStreamer, raster_stats, threshold_cut
from custom.inference.wsi import SlidePrediction
from custom.writers.asap_xml import write_asap_xml
from custom.writers.geojson import write_qupath_geojson

__all__ = ["SUMMARY_SUFFIX", "SCORE_DEFINITION", "SLIDE_OUTPUTS", "check_outputs", "summary_path", "top_k_mean",
           "write_slide_outputs", "write_image_outputs"]

SUMMARY_SUFFIX = "_summary.json"
SCORE_DEFINITION = "mean of the top_k highest pixel probabilities of the map (robust to isolated hot pixels)"
SLIDE_OUTPUTS = (*PYRAMID_OUTPUTS, "geojson", "asap_xml", "overlay")
"""Keys of the optional per-slide files (``files`` in the summary): pyramids, polygons, XML, overlay picture."""


def check_outputs(outputs: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The requested outputs as a tuple, refusing unknown names (config key ``outputs``) before any work."""
    unknown = sorted(set(outputs) - set(SLIDE_OUTPUTS))
    if unknown:
        raise ValueError(f"unknown slide outputs {unknown} (config key 'outputs'); choose from {list(SLIDE_OUTPUTS)}")
    return tuple(outputs)


def summary_path(output_dir: str | os.PathLike, name: str) -> Path:
    """The summary JSON of slide ``name``: the marker of a completed slide (resume skips it)."""
    return Path(output_dir) / name / f"{name}{SUMMARY_SUFFIX}"


def top_k_mean(histogram: np.ndarray, k: int) -> float:
    """Mean probability of the ``k`` highest uint8 values, from their histogram (no pixel array needed)."""
    counts = histogram[::-1]
    taken = np.minimum(counts, np.maximum(k - (np.cumsum(counts) - counts), 0))
    total = taken.sum()
    return float((taken * np.arange(255, -1, -1)).sum() / (255.0 * total)) if total else 0.0


TINT = 0.45 * np.array([255.0, 0.0, 0.0], np.float32)
"""What the overlay adds to 0.55 x each tumour pixel: 45 % red."""
_OVERLAY_ROWS = 512  # thumbnail rows tinted at once: their float pixels are the overlay's largest temporaries


def _overlay(thumbnail: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The thumbnail with the tumour mask (resized to it by nearest neighbour) tinted red and outlined.

    In bands of rows, uint8 and bool throughout: the thumbnail grows with the slide's area (the tissue detector's
    fixed resolution), so only the copy returned is thumbnail-sized. Each band is outlined with one row of its
    neighbours around it, so its outline is the one of the whole picture."""
    rows = _nearest_index(mask.shape[0], thumbnail.shape[0])
    cols = _nearest_index(mask.shape[1], thumbnail.shape[1])
    out = thumbnail.copy()
    for start in range(0, len(rows), _OVERLAY_ROWS):
        stop = min(start + _OVERLAY_ROWS, len(rows))
        above = max(start - 1, 0)
        tumour = mask[rows[above : stop + 1, None], cols[None, :]]
        core = slice(start - above, stop - above)
        edge = find_boundaries(tumour, mode="inner")[core]
        tumour, band = tumour[core], out[start:stop]
        band[tumour] = (0.55 * band[tumour] + TINT).astype(np.uint8)
        band[edge] = (200, 0, 0)
    return out


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """For each of ``size_out`` pixels, the input pixel whose centre is nearest (``resize(order=0)``'s sampling)."""
    centres = (np.arange(size_out) + 0.5) * (size_in / size_out)
    return np.minimum(centres.astype(np.int64), size_in - 1)


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

    ``pyramids`` is the ``PyramidStreamer`` that wrote the TIFFs while the network ran (made with the same
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
