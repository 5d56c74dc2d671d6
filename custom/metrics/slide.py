# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Slide-level evaluation of whole-slide inference outputs against ground truth (mask TIFF or ASAP XML).

Reads what ``bundle/configs/inference.json`` wrote (``<name>_mask.tif``, ``<name>_prob.tif``, ``<name>_summary.json``)
for every slide of a slide datalist (``slide,label[,mask][,annotation]``) and reports:

* per slide, Dice and IoU of the predicted mask against the ground truth at the inferred level, pixels of exclusion
  regions (ASAP group ``_2``, label value 2) ignored. Both maps are streamed one band of rows at a time, so no
  slide-sized array is ever held. A slide where prediction and truth are both empty scores 1 (a correct negative).
* over slides, the ROC AUC of the summary's slide ``score`` against the slide labels (``monai.metrics``).
* the Camelyon16 FROC with MONAI's own pieces (``monai.apps.pathology.utils``, ``monai.metrics.froc``): lesions are
  the connected tumour regions of the truth grown by ``grow_um`` (isolated tumour cells excluded), detections are
  the local maxima that ``ProbNMS`` picks on the probability map max-pooled to about ``froc_mpp`` microns per pixel.

Ground truth: the ``annotation`` XML when the datalist gives one (it carries exclusions), else the ``mask`` TIFF
(0 background, 2 excluded, any other value tumour), else a negative slide (label 0) is all background and a positive
one without either is left out of Dice, IoU and FROC.

Coordinates: bands and grids are ``(row, col)`` of the inferred level (downsample ``ds``); pixel ``(r, c)`` is sampled
at its centre, level-0 ``((c + 0.5) ds, (r + 0.5) ds)`` (the convention of ``rasterize_annotations``). Detections
are reported as level-0 ``(x, y)``.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from monai.apps.pathology.utils import compute_isolated_tumor_cells, compute_multi_instance_mask
from monai.metrics import compute_froc_curve_data, compute_froc_score, compute_roc_auc
from monai.metrics.froc import compute_fp_tp_probs_nd
from monai.transforms import ProbNMS
from skimage.measure import block_reduce

from custom import tables
from custom.data.annotations import BACKGROUND, EXCLUDED, TUMOUR, rasterize_annotations, read_asap_xml
from custom.data.datalist import load_slide_datalist
from custom.data.slide import open_slide
from custom.data.tiff import LabelTiff
from custom.data.tissue import detect_tissue

__all__ = ["FROC_FPS", "truth_reader", "SlideOverlap", "evaluate_slide", "froc", "SlideEvaluator", "format_table"]

FROC_FPS = (0.25, 0.5, 1, 2, 4, 8)
"""False positives per slide at which Camelyon16 averages the sensitivity."""

BandReader = Callable[[int, int], np.ndarray]
"""``(row, height) -> (height, width)`` uint8 labels (0 / 1 / 2) of one band of the inferred level."""


def _labels(values: np.ndarray) -> np.ndarray:
    """Mask TIFF values as labels: 0 background, 2 excluded, any other value (1, 255) tumour."""
    return np.where(values == EXCLUDED, EXCLUDED, np.where(values > 0, TUMOUR, BACKGROUND)).astype(np.uint8)


def truth_reader(item: dict, ds: float, shape_hw: tuple[int, int], level0_wh: tuple[int, int]) -> BandReader | None:
    """Band reader of a slide's ground truth at the inferred level (see the module docstring for which source)."""
    width = shape_hw[1]
    if item.get("annotation"):
        annotations = read_asap_xml(item["annotation"])
        return lambda row, height: rasterize_annotations(annotations, (0.0, row * ds), (width, height), ds)
    if item.get("mask"):
        mask = LabelTiff(item["mask"])
        if mask.size_wh != tuple(level0_wh):
            raise ValueError(f"{item['mask']}: mask level 0 is {mask.size_wh} (w, h) but the slide's is "
                             f"{tuple(level0_wh)}; a ground-truth mask must have the slide's geometry")
        return lambda row, height: _labels(mask.sampled_rows(ds, row, height, width))
    if item["label"] == 0:
        return lambda row, height: np.zeros((height, width), np.uint8)
    return None


@dataclass
class SlideOverlap:
    """What one streaming pass over a slide gathers: pixel counts and the FROC grids."""

    intersection: int
    predicted: int
    true: int
    prob_grid: np.ndarray  # (rows, cols) float probability, max-pooled by ``factor``
    tumour_grid: np.ndarray  # (rows, cols) bool, tumour anywhere in the block
    factor: int

    @property
    def dice(self) -> float:
        """Dice of the non-excluded pixels; 1 when prediction and truth are both empty."""
        total = self.predicted + self.true
        return 2 * self.intersection / total if total else 1.0

    @property
    def iou(self) -> float:
        """IoU of the non-excluded pixels; 1 when prediction and truth are both empty."""
        union = self.predicted + self.true - self.intersection
        return self.intersection / union if union else 1.0


def evaluate_slide(mask_tif: str | os.PathLike, prob_tif: str | os.PathLike, truth: BandReader, factor: int,
                   band: int = 256) -> SlideOverlap:
    """Stream the predicted mask, probability map and truth together, band by band (``band`` is rounded to
    ``factor``)."""
    mask, prob = LabelTiff(mask_tif), LabelTiff(prob_tif)
    try:
        width, height = mask.size_wh
        if prob.size_wh != mask.size_wh:
            raise ValueError(f"{prob_tif}: size {prob.size_wh} differs from the mask's {mask.size_wh}")
        band = factor * max(1, band // factor)
        counts = np.zeros(3, np.int64)
        prob_rows, tumour_rows = [], []
        for row in range(0, height, band):
            rows = min(band, height - row)
            labels = truth(row, rows)
            predicted, true, kept = mask.rows(row, rows) > 0, labels == TUMOUR, labels != EXCLUDED
            counts += [np.count_nonzero(predicted & true), np.count_nonzero(predicted & kept), np.count_nonzero(true)]
            prob_rows.append(block_reduce(prob.rows(row, rows), factor, np.max, cval=0))  # every peak kept
            tumour_rows.append(block_reduce(true, factor, np.max, cval=0))
    finally:
        mask.close()
        prob.close()
    prob_grid = np.concatenate(prob_rows).astype(np.float32) / 255.0
    return SlideOverlap(*(int(c) for c in counts), prob_grid, np.concatenate(tumour_rows), factor)


def _lesions(tumour: np.ndarray, grid_mpp: float, grow_um: float, itc_um: float) -> tuple[np.ndarray, list[int]]:
    """Camelyon16 lesion instances (grown by ``grow_um``) and the labels of isolated tumour cells, as LesionFROC.

    A slide without tumour has no lesion: MONAI's distance transform would otherwise make its whole grid one.
    """
    if not tumour.any():
        return np.zeros(tumour.shape, np.int64), []
    instances = compute_multi_instance_mask(tumour.astype(np.uint8), grow_um / (2 * grid_mpp))
    with warnings.catch_warnings():  # MONAI still asks scikit-image for the deprecated major_axis_length
        warnings.filterwarnings("ignore", message=".*major_axis_length")
        return instances, compute_isolated_tumor_cells(instances, (itc_um + grow_um) / grid_mpp)


def froc(fp_probs: list[np.ndarray], tp_probs: list[np.ndarray], n_targets: int, n_images: int) -> float | None:
    """Camelyon16 FROC score (mean sensitivity at ``FROC_FPS``); None when no slide has a lesion."""
    if not n_targets:
        return None
    fps, sensitivity = compute_froc_curve_data(np.concatenate(fp_probs), np.concatenate(tp_probs), n_targets, n_images)
    return float(compute_froc_score(fps, sensitivity, FROC_FPS))


class SlideEvaluator:
    """Evaluates inference outputs of a slide datalist; ``run()`` writes ``slide_metrics.json`` and prints a table.

    Args:
        datalist: the slide list (CSV/JSON, ``custom.data.load_slide_datalist``) with labels and ground truth.
        inference_dir: the ``output_dir`` of inference.json (one ``<name>/`` folder per slide).
        output_path: the metrics JSON; default ``<inference_dir>/slide_metrics.json``.
        froc_mpp: resolution (microns per pixel) of the grid FROC runs on; Camelyon16 uses about 16 (level 6).
        grow_um: lesions are grown by this distance before matching detections (Camelyon16: 75, about 5 cells).
        itc_um: lesions whose longest diameter is under this are isolated tumour cells, not counted (200).
        nms_box_um: side of the box suppressed around each detection (about 48 pixels at level 6).
        nms_threshold: detections stop below this probability.
        nms_sigma: Gaussian smoothing (in grid pixels) of the map before picking maxima.
        band: rows streamed at a time.
    """

    def __init__(self, datalist: str | os.PathLike, inference_dir: str | os.PathLike,
                 output_path: str | os.PathLike | None = None, froc_mpp: float = 16.0, grow_um: float = 75.0,
                 itc_um: float = 200.0, nms_box_um: float = 750.0, nms_threshold: float = 0.5,
                 nms_sigma: float = 0.0, band: int = 256) -> None:
        self.datalist, self.inference_dir = datalist, Path(inference_dir)
        self.output_path = Path(output_path) if output_path else self.inference_dir / "slide_metrics.json"
        self.froc_mpp, self.grow_um, self.itc_um = froc_mpp, grow_um, itc_um
        self.nms_box_um, self.nms_threshold, self.nms_sigma, self.band = nms_box_um, nms_threshold, nms_sigma, band

    def _summary(self, item: dict) -> dict:
        """The inference summary of a slide, or an error saying inference has not finished it."""
        path = self.inference_dir / item["name"] / f"{item['name']}_summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{item['slide']}: no inference output {path}; run inference.json on it first")
        return json.loads(path.read_text())

    def evaluate_item(self, item: dict) -> tuple[dict, tuple | None]:
        """One slide's row of the report and, with ground truth, its FROC (fp probs, tp probs, targets)."""
        summary = self._summary(item)
        ds, output_mpp = float(summary["downsample"]), float(summary["output_mpp"])
        row = {"name": item["name"], "label": item["label"], "score": summary["score"],
               "tumour_fraction_of_tissue": summary.get("tumour_fraction_of_tissue")}
        shape_hw = tuple(reversed(summary["output_size_wh"]))
        truth = truth_reader(item, ds, shape_hw, tuple(summary["level0_size_wh"]))
        if truth is None:
            return row | {"dice": None, "iou": None}, None
        missing = [kind for kind in ("mask", "prob") if kind not in summary["files"]]
        if missing:
            raise ValueError(f"{item['slide']}: inference wrote no {' / '.join(missing)} TIFF (config key 'outputs'); "
                             "rerun inference.json with 'prob' and 'mask' in outputs and overwrite true")
        factor = 2 ** max(0, int(math.floor(math.log2(self.froc_mpp / output_mpp))))
        folder = self.inference_dir / item["name"]
        overlap = evaluate_slide(folder / summary["files"]["mask"], folder / summary["files"]["prob"], truth, factor,
                                 self.band)
        grid_mpp = output_mpp * factor
        nms = ProbNMS(sigma=self.nms_sigma, prob_threshold=self.nms_threshold,
                      box_size=max(1, round(self.nms_box_um / grid_mpp)))
        detections = np.array(nms(overlap.prob_grid), np.float64).reshape(-1, 3)  # (prob, row, col) of the grid
        instances, itc = _lesions(overlap.tumour_grid, grid_mpp, self.grow_um, self.itc_um)
        fp, tp, n_targets = compute_fp_tp_probs_nd(detections[:, 0], detections[:, 1:].astype(np.int64), instances, itc)
        step = ds * factor
        row |= {
            "dice": overlap.dice, "iou": overlap.iou, "tumour_px": overlap.true, "predicted_px": overlap.predicted,
            "lesions": n_targets, "lesions_detected": int(np.count_nonzero(tp)), "false_positives": len(fp),
            "detections_xy_prob": [[(c + 0.5) * step, (r + 0.5) * step, p] for p, r, c in detections.tolist()],
        }
        return row, (fp, tp, n_targets)

    def run(self) -> dict:
        """Evaluate every slide of the datalist; write and return the report (per-slide rows and the totals)."""
        rows, frocs = [], []
        for item in load_slide_datalist(self.datalist):
            row, found = self.evaluate_item(item)
            rows.append(row)
            if found is not None:
                frocs.append(found)
        report = {"slides": rows, **self.totals(rows, frocs)}
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        self.output_path.write_text(json.dumps(report, indent=2))
        print(format_table(report))
        return report

    @staticmethod
    def totals(rows: list[dict], frocs: list[tuple]) -> dict:
        """Mean Dice / IoU over slides with ground truth (all and positives), the false-positive area on negative
        slides (mean predicted tumour fraction of their tissue), slide AUC and FROC (None: undefined)."""
        scored = [r for r in rows if r["dice"] is not None]
        positives = [r for r in scored if r["label"] == 1]
        negative_areas = [r["tumour_fraction_of_tissue"] for r in rows
                          if r["label"] == 0 and r.get("tumour_fraction_of_tissue") is not None]
        labels = [r["label"] for r in rows]
        auc = None
        if 0 < sum(labels) < len(labels):
            auc = float(compute_roc_auc(torch.tensor([r["score"] for r in rows]), torch.tensor(labels)))
        fp, tp, targets = zip(*frocs) if frocs else ((), (), ())
        return {
            "dice": _mean([r["dice"] for r in scored]),
            "iou": _mean([r["iou"] for r in scored]),
            "dice_pos": _mean([r["dice"] for r in positives]),
            "iou_pos": _mean([r["iou"] for r in positives]),
            "fp_area_neg": _mean(negative_areas),
            "auc": auc,
            "froc": froc(list(fp), list(tp), sum(targets), len(frocs)),
            "n_slides": len(rows),
            "n_with_truth": len(scored),
        }


def _mean(values: list[float]) -> float | None:
    """Mean of a group, None (JSON null) for an empty group."""
    return float(np.mean(values)) if values else None


def format_table(report: dict) -> str:
    """The report as a fixed-width text table: one line per slide, then the totals."""
    def cell(value: float | None) -> str:
        return f"{'-':>8}" if value is None else f"{value:>8.3f}"

    numbers = [tables.Column(k, 8, ">", ".3f") for k in ("score", "dice", "iou")]
    counts = [tables.Column("tumour%", 9, ">", ".2%"), tables.Column("lesions", 9), tables.Column("found", 7),
              tables.Column("FP", 5)]
    columns = [tables.Column("slide", 24, "<"), tables.Column("label", 6), *numbers, *counts]
    keys = ("name", "label", "score", "dice", "iou", "tumour_fraction_of_tissue", "lesions", "lesions_detected",
            "false_positives")
    lines = [tables.format_table(columns, [[r.get(k) for k in keys] for r in report["slides"]])]
    lines.append(f"mean dice {cell(report['dice']).strip()}  iou {cell(report['iou']).strip()}  "
                 f"(positives: dice {cell(report['dice_pos']).strip()}, iou {cell(report['iou_pos']).strip()})  "
                 f"false-positive area on negative slides {cell(report.get('fp_area_neg')).strip()}  "
                 f"slide AUC {cell(report['auc']).strip()}  FROC {cell(report['froc']).strip()}")
    return "\n".join(lines)


def all_tissue_floor(datalist: str | os.PathLike, tissue_mpp: float = 8.0) -> dict:
    """The floor "all tissue of a positive slide is tumour, nothing on a negative slide" (it knows the slide label).

    Dice per positive slide of the detected tissue (``detect_tissue`` at ``tissue_mpp``) against the mask TIFF
    sampled on the tissue mask's grid; false-positive area 0 and slide AUC 1 by construction. Returns the keys of
    ``SlideEvaluator.totals`` that apply (``froc`` is None: the floor ranks no detection).
    """
    dices = []
    items = load_slide_datalist(datalist)
    for item in items:
        if item["label"] != 1:
            continue
        if not item.get("mask"):
            raise ValueError(f"{item['slide']}: the all-tissue floor needs the slide's mask TIFF (column 'mask')")
        with open_slide(item["slide"]) as slide:
            tissue = detect_tissue(slide, mpp=tissue_mpp)
        height, width = tissue.mask.shape
        mask = LabelTiff(item["mask"])
        try:
            truth = _labels(mask.sampled_rows(tissue.downsample, 0, height, width)) == TUMOUR
        finally:
            mask.close()
        predicted = tissue.mask.astype(bool)
        total = int(truth.sum() + predicted.sum())
        dices.append(2.0 * float((truth & predicted).sum()) / total if total else 1.0)
    labels = [item["label"] for item in items]
    return {"dice_pos": _mean(dices), "fp_area_neg": 0.0 if 0 in labels else None,
            "auc": 1.0 if 0 < sum(labels) < len(labels) else None, "froc": None, "n_slides": len(items)}
