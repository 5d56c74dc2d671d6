"""Model-selection scores that need image (or slide) labels only, no pixel mask.

The product promise is weak labels end to end, so the best stage-1 checkpoint, the best student and the role swap
must be decided without masks. Every criterion is computed from per-image rows of the fused probability map
(smoothed and thresholded exactly as the evaluation protocol does, ``custom.metrics.segmentation``):

- ``auc``: ROC AUC of the image score (generalised mean, r = 4, of the unsmoothed fused map) against the labels;
- ``balanced_accuracy``: mean of sensitivity and specificity when an image is called positive at
  ``image score >= threshold``;
- ``area_contrast``: mean predicted tumour area fraction on positive images minus that on negative images (the
  false-positive area on negatives weighed against detection on positives, in [-1, 1]);
- ``flip_consistency``: mean over positive images of the soft Dice (2 sum(pq) / (sum p^2 + sum q^2)) between the map
  and the map of the
  horizontally flipped and 90-degree rotated input, transformed back (0 where both maps are empty: a model that
  finds nothing earns nothing);
- ``mask_f1`` (not computed here): the mask-based F1 of ``MILSegmentationHandler``, for users who have masks.

``fp_area`` (mean predicted area fraction on negatives) and ``pos_area`` (on positives) are published beside them.
A criterion that needs both labels is NaN when the images hold only one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric, compute_roc_auc

from custom.losses.mil import gm_pool
from custom.metrics.segmentation import predicted_mask, publish_metrics

__all__ = [
    "MASK_FREE_METRICS",
    "SELECTION_METRICS",
    "selection_rows",
    "summarise_selection",
    "flip_maps",
    "SelectionMetric",
    "SelectionHandler",
]

MASK_FREE_METRICS = ("auc", "balanced_accuracy", "area_contrast", "flip_consistency")
SELECTION_METRICS = (*MASK_FREE_METRICS, "mask_f1")

# Columns of a selection row.
LABEL, SCORE, AREA, CONSISTENCY = range(4)


def _soft_dice(p: np.ndarray, q: np.ndarray) -> float:
    """Soft Dice 2 sum(pq) / (sum p^2 + sum q^2) of two probability maps: 1 for equal maps, 0 when both are empty."""
    total = float((p * p).sum() + (q * q).sum())
    return 2.0 * float((p * q).sum()) / total if total > 0 else 0.0


def selection_rows(
    maps: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    transformed_maps: torch.Tensor | np.ndarray | None = None,
    smooth_sigma: float | None = 3.0,
    threshold: float = 0.5,
    r: float = 4.0,
) -> torch.Tensor:
    """Rows (label, image score, predicted area fraction, consistency) for fused maps (B, H, W) and labels (B,).

    ``transformed_maps`` are the maps of the transformed inputs, already transformed back (B, H, W); without them
    the consistency column is NaN.
    """
    maps = np.asarray(maps.detach().float().cpu() if isinstance(maps, torch.Tensor) else maps, dtype=np.float32)
    labels = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    if maps.ndim != 3 or len(labels) != len(maps):
        raise ValueError(f"expected maps (B, H, W) and B labels, got {maps.shape} and {labels.shape}.")
    if transformed_maps is not None:
        transformed_maps = np.asarray(
            transformed_maps.detach().float().cpu() if isinstance(transformed_maps, torch.Tensor) else transformed_maps,
            dtype=np.float32,
        )
    rows = []
    for index, (prob, label) in enumerate(zip(maps, labels)):
        score = gm_pool(torch.from_numpy(prob), r).item()
        area = float(predicted_mask(prob, smooth_sigma, threshold).mean())
        consistency = math.nan if transformed_maps is None else _soft_dice(prob, transformed_maps[index])
        rows.append([float(label > 0.5), score, area, consistency])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, CONSISTENCY + 1)


def summarise_selection(rows: torch.Tensor, threshold: float = 0.5) -> dict[str, float | int]:
    """Reduce (N, 4) selection rows to every mask-free criterion, plus ``fp_area``, ``pos_area``, ``n_pos``,
    ``n_neg``."""
    rows = rows.to(torch.float64).reshape(-1, CONSISTENCY + 1)
    positive = rows[:, LABEL] > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    both = n_pos > 0 and n_neg > 0
    called = rows[:, SCORE] >= threshold
    sensitivity = called[positive].double().mean().item() if n_pos else math.nan
    specificity = (~called[~positive]).double().mean().item() if n_neg else math.nan
    pos_area = rows[positive, AREA].mean().item() if n_pos else math.nan
    fp_area = rows[~positive, AREA].mean().item() if n_neg else math.nan
    return {
        "auc": float(compute_roc_auc(rows[:, SCORE], positive.long())) if both else math.nan,
        "balanced_accuracy": (sensitivity + specificity) / 2 if both else math.nan,
        "area_contrast": pos_area - fp_area if both else math.nan,
        "flip_consistency": rows[positive, CONSISTENCY].mean().item() if n_pos else math.nan,
        "fp_area": fp_area,
        "pos_area": pos_area,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def flip_maps(network: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """Fused maps (B, H, W) of the flipped and rotated images, transformed back onto the original grid."""
    # (row, col) axes of a (B, C, H, W) batch: flip the columns, then rotate by 90 degrees in the (row, col) plane.
    transformed = torch.rot90(torch.flip(images, dims=(3,)), k=1, dims=(2, 3))
    with torch.no_grad():
        maps = network(transformed)[:, -1]
    return torch.flip(torch.rot90(maps, k=-1, dims=(1, 2)), dims=(2,))


class SelectionMetric(CumulativeIterationMetric):
    """The mask-free criteria as a cumulative MONAI metric (gathered over ranks like any MONAI metric).

    ``y_pred`` is (B, C, H, W) with the fused map last, or (B, 2, H, W) = (fused map, transformed-back map) when
    the handler computes consistency; ``y`` the image labels (B,) or (B, 1).
    """

    def __init__(self, smooth_sigma: float | None = 3.0, threshold: float = 0.5, r: float = 4.0) -> None:
        super().__init__()
        self.smooth_sigma = smooth_sigma
        self.threshold = threshold
        self.r = r

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Selection rows (B, 4) of one batch."""
        if y is None or y_pred.ndim != 4:
            raise ValueError(f"expected y_pred (B, C, H, W) and labels y (B,), got {tuple(y_pred.shape)} and {y}.")
        maps, transformed = (y_pred[:, 0], y_pred[:, 1]) if y_pred.shape[1] == 2 else (y_pred[:, -1], None)
        return selection_rows(
            maps, y.reshape(len(y_pred), -1)[:, 0], transformed, self.smooth_sigma, self.threshold, self.r
        )

    def aggregate(self) -> dict[str, float | int]:  # type: ignore[override]
        """Every criterion over the images seen since the last ``reset()``."""
        return summarise_selection(self.get_buffer(), self.threshold)


class SelectionHandler(IgniteMetricHandler):
    """Ignite handler of ``SelectionMetric`` for an evaluator whose batches pair images with image labels.

    ``engine.state.metrics[name]`` receives criterion ``key`` (so checkpoints are ranked on it) and every value of
    ``summarise_selection`` is published as ``prefix + name``. With ``key="flip_consistency"`` (or
    ``consistency=True``) the handler runs the evaluator's network once more per batch on transformed images.
    """

    def __init__(
        self,
        key: str = "area_contrast",
        prefix: str = "",
        smooth_sigma: float | None = 3.0,
        threshold: float = 0.5,
        r: float = 4.0,
        consistency: bool | None = None,
        save_details: bool = True,
    ) -> None:
        if key not in MASK_FREE_METRICS:
            raise ValueError(f"key must be one of {MASK_FREE_METRICS}, got {key!r}.")
        self.key = key
        self.prefix = prefix
        self.consistency = key == "flip_consistency" if consistency is None else consistency
        self._engine: Engine | None = None
        metric = SelectionMetric(smooth_sigma, threshold, r)
        super().__init__(metric_fn=metric, output_transform=self._maps_and_labels, save_details=save_details)

    def attach(self, engine: Engine, name: str) -> None:  # type: ignore[override]
        """Remember the evaluator, whose network the consistency criterion runs again."""
        self._engine = engine
        super().attach(engine, name)

    def _maps_and_labels(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused maps [and transformed-back maps], labels) of one evaluator iteration."""
        images, preds, labels = from_engine(["image", "pred", "label"])(output)
        pred = torch.stack(list(preds)) if isinstance(preds, (list, tuple)) else preds
        label = torch.stack([torch.as_tensor(v) for v in labels]) if isinstance(labels, (list, tuple)) else labels
        fused = pred[:, -1:]
        if self.consistency:
            image = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
            network = self._engine.network
            was_training = network.training
            network.eval()
            fused = torch.cat([fused, flip_maps(network, image.to(pred.device))[:, None].to(fused)], dim=1)
            network.train(was_training)
        return fused, label.reshape(len(fused))

    def completed(self, engine: Engine, name: str) -> None:
        """Publish the ranking criterion under ``name`` and every value under prefixed keys."""
        summary = self.compute()
        if not self.consistency:  # not computed: not published as NaN
            summary.pop("flip_consistency")
        publish_metrics(engine, name, summary, self.prefix, self.key)
