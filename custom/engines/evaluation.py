"""One evaluator factory for validation, model selection and test evaluation, so every evaluator of a run scores the
same way (train.json's ``validate#evaluator_def``, evaluate.json, ``custom.report.evaluate_network``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import default_prepare_batch
from monai.handlers import from_engine
from monai.inferers import Inferer
from monai.utils import IgniteInfo, min_version, optional_import

from custom.engines.batch import PrepareImageMask
from custom.metrics.calibration import FalsePositiveCurve
from custom.metrics.segmentation import MILSegmentationHandler
from custom.metrics.selection import SELECTION_METRICS, SelectionHandler

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = ["negatives_false_positive_curve", "selection_evaluator", "selection_key"]


def selection_key(selection_metric: str, prefix: str = "val_") -> str:
    """The metric name an evaluator publishes its selection score under, e.g. ``val_auc`` or ``val_mask_f1``."""
    if selection_metric not in SELECTION_METRICS:
        raise ValueError(f"selection_metric must be one of {SELECTION_METRICS}, got {selection_metric!r}")
    return prefix + selection_metric


def selection_evaluator(
    network: torch.nn.Module,
    data_loader: Any,
    device: str | torch.device,
    selection_metric: str = "area_contrast",
    prefix: str = "val_",
    smooth_sigma: float | None = 3.0,
    threshold: float = 0.5,
    amp: bool = False,
    inferer: Inferer | None = None,
    val_handlers: Sequence[Any] | None = None,
    group_key: str | None = None,
    slide_top_tiles: int | None = None,
) -> SupervisedEvaluator:
    """A ``SupervisedEvaluator`` whose key metric is ``prefix + selection_metric``.

    Mask-free criteria pair each image with its image label (MONAI's default batch) and publish every mask-free
    score, per slide when ``group_key`` names the batch key of the tiles' slide (slide-level labels), a slide scored
    by the mean of its ``slide_top_tiles`` highest tiles when given (else the GM over its pixels); ``mask_f1``
    pairs each image with its pixel mask and publishes the mask metrics as ``prefix + "mask_" + key``.
    """
    key = selection_key(selection_metric, prefix)
    if selection_metric == "mask_f1":
        metric = MILSegmentationHandler(
            key="f1", prefix=prefix + "mask_", smooth_sigma=smooth_sigma, threshold=threshold,
            output_transform=from_engine(["pred", "label"]),
        )
        prepare_batch = PrepareImageMask()
    else:
        metric = SelectionHandler(
            key=selection_metric, prefix=prefix, smooth_sigma=smooth_sigma, threshold=threshold, group_key=group_key,
            top_tiles=slide_top_tiles,
        )
        prepare_batch = default_prepare_batch
    return SupervisedEvaluator(
        device=device,
        val_data_loader=data_loader,
        network=network,
        inferer=inferer,
        prepare_batch=prepare_batch,
        key_val_metric={key: metric},
        val_handlers=list(val_handlers) if val_handlers else None,
        amp=amp,
    )


def negatives_false_positive_curve(
    network: torch.nn.Module,
    data_loader: Any,
    device: str | torch.device,
    smooth_sigma: float | None = 3.0,
    amp: bool = False,
    inferer: Inferer | None = None,
) -> FalsePositiveCurve:
    """The mean false-positive curve of ``network``'s fused maps on the negatives of ``data_loader`` (batches of
    images and image labels, as validation's): what a false-positive budget calibrates a threshold on, no mask read."""
    curve = FalsePositiveCurve(smooth_sigma)
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=data_loader, network=network, inferer=inferer,
        prepare_batch=default_prepare_batch, amp=amp,
    )

    def collect(engine: SupervisedEvaluator) -> None:
        preds, labels = from_engine(["pred", "label"])(engine.state.output)
        maps = torch.stack([torch.as_tensor(pred)[-1] for pred in preds]).float().cpu().numpy()
        # a tile of a slide carries (label, slide id): the label comes first
        image_labels = torch.stack([torch.as_tensor(label).reshape(-1)[0] for label in labels]).float().cpu().numpy()
        curve.update(maps, image_labels)

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
    evaluator.run()
    return curve
