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

A model that finds nothing, i.e. calls less than ``MIN_POS_AREA`` of the validation positives' pixels, gets every
criterion's floor (``CRITERION_FLOOR``): the positives are known to hold tumour, so an empty map is wrong on each of
them, and no criterion may rank it above a model that finds tumour, however poorly. Without the rule an empty model
scores area contrast 0 and AUC 0.5 (ties) and beat, by the swap margin, a stage-1 slide teacher whose contrast was
-0.03 (virtual slides, 0.6.6): the swap shipped a model that marks nothing.

With slide labels the unit is the slide, not the tile: rows carry a group id (``slide_group_id`` of the slide path)
and ``summarise_selection`` first reduces each slide's tiles to one slide row: its score is the generalised mean
over all the slide's tile pixels (``(mean_t s_t^r)^(1/r)`` of the tiles' scores, exact for tiles of one size, the
pooling of ``custom.losses.bag_pool``), or, with ``top_tiles`` (a teacher trained with ``bag_pooling`` top_tiles), the
mean of its ``top_tiles`` highest tile scores, as in training; its area the mean of its tiles' areas (the predicted
tumour fraction of the slide's tissue) and its consistency the mean of its tiles'. ``auc`` is then the slide AUC
and ``fp_area`` the false-positive area on negative slides.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler, from_engine
from monai.metrics import CumulativeIterationMetric, compute_roc_auc

from custom.losses.mil import gm_pool, pool_tile_scores
from custom.metrics.segmentation import predicted_mask, publish_metrics

__all__ = [
    "MASK_FREE_METRICS",
    "SELECTION_METRICS",
    "selection_rows",
    "slide_group_id",
    "group_rows",
    "summarise_selection",
    "finds_nothing",
    "chance_level",
    "flip_maps",
    "SelectionMetric",
    "SelectionHandler",
]

MASK_FREE_METRICS = ("auc", "balanced_accuracy", "area_contrast", "flip_consistency")
SELECTION_METRICS = (*MASK_FREE_METRICS, "mask_f1")

# Below this mean predicted area fraction on the positives a model finds nothing (module docstring) ...
MIN_POS_AREA = 1e-3
# ... and scores each criterion's lowest value.
CRITERION_FLOOR = {"auc": 0.0, "balanced_accuracy": 0.0, "area_contrast": -1.0, "flip_consistency": 0.0}

# The score of a model that does not separate the labels: it ranks them at random, or calls as much on negatives.
CHANCE_LEVEL = {"auc": 0.5, "balanced_accuracy": 0.5, "area_contrast": 0.0}

# Columns of a selection row; GROUP is NaN for a row that is its own unit (an image).
LABEL, SCORE, AREA, CONSISTENCY, GROUP = range(5)
N_COLUMNS = GROUP + 1


def slide_group_id(name: str) -> float:
    """A group id for a slide path, equal on every rank and process (CRC-32, exact in the rows' float64)."""
    return float(zlib.crc32(str(name).encode("utf-8")))


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
    groups: Sequence[float] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows (label, image score, predicted area fraction, consistency, group) for fused maps (B, H, W) and labels
    (B,).

    ``transformed_maps`` are the maps of the transformed inputs, already transformed back (B, H, W); without them
    the consistency column is NaN. ``groups`` are B group ids (``slide_group_id``), NaN without them.
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
    group_ids = [math.nan] * len(maps) if groups is None else [float(g) for g in groups]
    if len(group_ids) != len(maps):
        raise ValueError(f"expected one group id per map ({len(maps)}), got {len(group_ids)}.")
    rows = []
    for index, (prob, label) in enumerate(zip(maps, labels)):
        score = gm_pool(torch.from_numpy(prob), r).item()
        area = float(predicted_mask(prob, smooth_sigma, threshold).mean())
        consistency = math.nan if transformed_maps is None else _soft_dice(prob, transformed_maps[index])
        rows.append([float(label > 0.5), score, area, consistency, group_ids[index]])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, N_COLUMNS)


def group_rows(rows: torch.Tensor, r: float = 4.0, top_tiles: int | None = None) -> torch.Tensor:
    """One row per group (slide) from the rows of its tiles; rows without a group stay as they are.

    A group's score is the generalised mean of its tiles' scores with exponent ``r`` (the GM over all its pixels),
    or the mean of its ``top_tiles`` highest tile scores (all of them in a smaller group); its area and consistency
    the means of its tiles', its label the label of its tiles (which must agree).
    """
    rows = rows.to(torch.float64).reshape(-1, N_COLUMNS)
    grouped = ~torch.isnan(rows[:, GROUP])
    if not bool(grouped.any()):
        return rows
    out = [rows[~grouped]]
    for group in torch.unique(rows[grouped, GROUP]):
        members = rows[rows[:, GROUP] == group]
        if bool((members[:, LABEL] != members[0, LABEL]).any()):
            raise ValueError(f"selection group {int(group)} holds tiles of both labels; a slide has one label.")
        score = pool_tile_scores(members[:, SCORE], r, top_tiles)  # as training pools a bag (bag_pool)
        consistency = members[:, CONSISTENCY].mean()
        out.append(torch.stack([members[0, LABEL], score, members[:, AREA].mean(), consistency, group])[None])
    return torch.cat(out)


def summarise_selection(
    rows: torch.Tensor, threshold: float = 0.5, r: float = 4.0, top_tiles: int | None = None
) -> dict[str, float | int]:
    """Reduce (N, 5) selection rows, grouped into slides where they carry a group (``group_rows``), to every
    mask-free criterion, plus ``fp_area``, ``pos_area``, ``n_pos``, ``n_neg`` (images or slides); a model that finds
    nothing on the positives scores each criterion's floor."""
    rows = group_rows(rows, r, top_tiles)
    positive = rows[:, LABEL] > 0.5
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    both = n_pos > 0 and n_neg > 0
    called = rows[:, SCORE] >= threshold
    sensitivity = called[positive].double().mean().item() if n_pos else math.nan
    specificity = (~called[~positive]).double().mean().item() if n_neg else math.nan
    pos_area = rows[positive, AREA].mean().item() if n_pos else math.nan
    fp_area = rows[~positive, AREA].mean().item() if n_neg else math.nan
    criteria = {
        "auc": float(compute_roc_auc(rows[:, SCORE], positive.long())) if both else math.nan,
        "balanced_accuracy": (sensitivity + specificity) / 2 if both else math.nan,
        "area_contrast": pos_area - fp_area if both else math.nan,
        "flip_consistency": rows[positive, CONSISTENCY].mean().item() if n_pos else math.nan,
    }
    if finds_nothing(pos_area):
        criteria = {k: v if math.isnan(v) else CRITERION_FLOOR[k] for k, v in criteria.items()}
    return {
        **criteria,
        "fp_area": fp_area,
        "pos_area": pos_area,
        "n_pos": n_pos,
        "n_neg": n_neg,
    }


def finds_nothing(pos_area: float) -> bool:
    """Whether a model calling ``pos_area`` of the validation positives finds nothing (no positives, NaN: False)."""
    return not math.isnan(pos_area) and pos_area < MIN_POS_AREA


def chance_level(metric_name: str) -> float | None:
    """The chance score of the criterion a published metric name ends with (``val_auc``: 0.5); None where it has
    none (``flip_consistency``, ``mask_f1``)."""
    return next((level for criterion, level in CHANCE_LEVEL.items() if metric_name.endswith(criterion)), None)


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
    the handler computes consistency; ``y`` the image labels (B,) or (B, 1), or (B, 2) float64 = (label, group id)
    when images are tiles of slides.
    """

    def __init__(
        self, smooth_sigma: float | None = 3.0, threshold: float = 0.5, r: float = 4.0, top_tiles: int | None = None
    ) -> None:
        super().__init__()
        self.smooth_sigma = smooth_sigma
        self.threshold = threshold
        self.r = r
        self.top_tiles = top_tiles

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Selection rows (B, 4) of one batch."""
        if y is None or y_pred.ndim != 4:
            raise ValueError(f"expected y_pred (B, C, H, W) and labels y (B,), got {tuple(y_pred.shape)} and {y}.")
        maps, transformed = (y_pred[:, 0], y_pred[:, 1]) if y_pred.shape[1] == 2 else (y_pred[:, -1], None)
        y = y.reshape(len(y_pred), -1)
        groups = y[:, 1] if y.shape[1] > 1 else None
        return selection_rows(maps, y[:, 0], transformed, self.smooth_sigma, self.threshold, self.r, groups)

    def aggregate(self) -> dict[str, float | int]:  # type: ignore[override]
        """Every criterion over the images (or slides) seen since the last ``reset()``."""
        return summarise_selection(self.get_buffer(), self.threshold, self.r, self.top_tiles)


class SelectionHandler(IgniteMetricHandler):
    """Ignite handler of ``SelectionMetric`` for an evaluator whose batches pair images with image labels.

    ``engine.state.metrics[name]`` receives criterion ``key`` (so checkpoints are ranked on it) and every value of
    ``summarise_selection`` is published as ``prefix + name``. With ``key="flip_consistency"`` (or
    ``consistency=True``) the handler runs the evaluator's network once more per batch on transformed images.
    With ``group_key`` (e.g. ``"slide"``) the batch's values under that key group tiles into slides, and every
    criterion is computed per slide (module docstring); ``top_tiles`` then scores a slide by its highest tiles.
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
        group_key: str | None = None,
        top_tiles: int | None = None,
    ) -> None:
        if key not in MASK_FREE_METRICS:
            raise ValueError(f"key must be one of {MASK_FREE_METRICS}, got {key!r}.")
        self.key = key
        self.group_key = group_key
        self.prefix = prefix
        self.consistency = key == "flip_consistency" if consistency is None else consistency
        self._engine: Engine | None = None
        metric = SelectionMetric(smooth_sigma, threshold, r, top_tiles)
        super().__init__(metric_fn=metric, output_transform=self._maps_and_labels, save_details=save_details)

    def attach(self, engine: Engine, name: str) -> None:  # type: ignore[override]
        """Remember the evaluator, whose network the consistency criterion runs again."""
        self._engine = engine
        super().attach(engine, name)

    def _groups(self, n: int) -> torch.Tensor | None:
        """Group ids (n,) of the evaluator's current batch, from its ``group_key`` values; None without grouping."""
        if self.group_key is None:
            return None
        batch = self._engine.state.batch if self._engine is not None else None
        # MONAI's workflows decollate the batch into one dict per image before the metrics run
        items = batch if isinstance(batch, (list, tuple)) else [batch]
        if not all(isinstance(item, dict) and self.group_key in item for item in items):
            raise KeyError(f"selection by {self.group_key!r} groups, but the batch has no {self.group_key!r} key.")
        decollated = isinstance(batch, (list, tuple))
        names = [item[self.group_key] for item in items] if decollated else list(batch[self.group_key])
        if len(names) != n:
            raise ValueError(f"batch has {len(names)} {self.group_key!r} values for {n} images.")
        return torch.tensor([slide_group_id(name) for name in names], dtype=torch.float64)

    def _maps_and_labels(self, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused maps [and transformed-back maps], labels [with group ids]) of one evaluator iteration."""
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
        label = label.reshape(len(fused))
        groups = self._groups(len(fused))
        if groups is None:
            return fused, label
        return fused, torch.stack([label.double().cpu(), groups], dim=1)

    def completed(self, engine: Engine, name: str) -> None:
        """Publish the ranking criterion under ``name`` and every value under prefixed keys."""
        summary = self.compute()
        if finds_nothing(summary["pos_area"]):
            logging.getLogger(__name__).info(
                f"{name}: the model calls {summary['pos_area']:.5f} of the validation positives' pixels (below "
                f"{MIN_POS_AREA}): it finds nothing and scores {CRITERION_FLOOR[self.key]}, each criterion's floor"
            )
        if not self.consistency:  # not computed: not published as NaN
            summary.pop("flip_consistency")
        publish_metrics(engine, name, summary, self.prefix, self.key)
