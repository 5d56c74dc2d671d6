# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Mask-free thresholds: the lowest threshold at which a model calls at most a budget of the negatives' pixels.

Negative images (or slides) are the one place where image labels give pixel truth: every pixel is background. So
the false-positive area of a map on negatives, as a function of the threshold, is known without a mask, and a
budget on it picks an operating point. Two users: ``custom.handlers.PseudoLabelHandler`` (``pseudo_fp_budget``:
where the teacher's pseudo-masks start, on the training negatives) and ``custom.report`` (``threshold_fp_budget``:
the threshold each model is scored and shipped with, on the validation negatives, which training has not seen).
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["CALIBRATION_GRID", "calibrated_threshold", "false_positive_curve", "fp_area_at", "FalsePositiveCurve"]

CALIBRATION_GRID = np.round(np.arange(0.50, 1.0, 0.01), 2)
"""Thresholds a calibration may choose: never below the method's 0.5, in steps of 0.01."""


def false_positive_curve(prob: np.ndarray) -> np.ndarray:
    """Share of a negative map's pixels at or above each threshold of ``CALIBRATION_GRID``."""
    flat = np.sort(np.asarray(prob, dtype=np.float32).ravel())
    below = np.searchsorted(flat, CALIBRATION_GRID.astype(np.float32), side="left")
    return (flat.size - below) / flat.size


def calibrated_threshold(mean_curve: np.ndarray, fp_budget: float, lowest: float = 0.5) -> float:
    """The lowest grid threshold, from ``lowest`` up, whose mean false-positive area is within the budget (the grid's
    last if none is)."""
    start = int(CALIBRATION_GRID.searchsorted(round(lowest, 2)))
    within = start + np.flatnonzero(np.asarray(mean_curve)[start:] <= fp_budget)
    return float(CALIBRATION_GRID[within[0]] if within.size else CALIBRATION_GRID[-1])


def fp_area_at(mean_curve: np.ndarray, threshold: float) -> float:
    """The curve's false-positive area at a grid threshold."""
    return float(np.asarray(mean_curve)[int(CALIBRATION_GRID.searchsorted(round(threshold, 2)))])


class FalsePositiveCurve:
    """The mean :func:`false_positive_curve` of the negative maps it is shown, after the evaluation protocol's
    smoothing (``smooth_sigma``), so that the threshold it picks acts on the map that protocol thresholds."""

    def __init__(self, smooth_sigma: float | None = 3.0) -> None:
        self.smooth_sigma = smooth_sigma
        self.total = np.zeros(len(CALIBRATION_GRID))
        self.count = 0

    def update(self, maps: np.ndarray, labels: np.ndarray) -> None:
        """Add the fused maps (B, rows, cols) whose image label (B,) is 0; positives are skipped."""
        maps, labels = np.asarray(maps, dtype=np.float32), np.asarray(labels).reshape(-1)
        if maps.ndim != 3 or len(maps) != len(labels):
            raise ValueError(f"expected maps (B, rows, cols) and B labels, got {maps.shape} and {labels.shape}")
        for prob in maps[labels < 0.5]:
            smoothed = gaussian_filter(prob, sigma=self.smooth_sigma) if self.smooth_sigma else prob
            self.total += false_positive_curve(smoothed)
            self.count += 1

    def curve(self) -> np.ndarray:
        """The mean curve over the negatives seen; refused when there were none."""
        if not self.count:
            raise ValueError("no negative image was seen: a false-positive budget needs negatives to calibrate on")
        return self.total / self.count

    def threshold(self, fp_budget: float, lowest: float = 0.5) -> tuple[float, float]:
        """(calibrated threshold from ``lowest`` up, mean false-positive area at it) for ``fp_budget``."""
        curve = self.curve()
        threshold = calibrated_threshold(curve, fp_budget, lowest)
        return threshold, fp_area_at(curve, threshold)
