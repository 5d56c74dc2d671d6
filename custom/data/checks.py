"""Checks on a training run's data made before any training, so bad data costs seconds, not the hours of a run.

Every problem found is named with its part (training, validation, test) and, where a file is at fault, the file.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from custom.errors import InputError

__all__ = ["TWO_LABEL_METRICS", "check_training_data", "check_mask_sizes"]

logger = logging.getLogger(__name__)

# Mask-free criteria that compare positives with negatives; flip_consistency and mask_f1 need positives only.
TWO_LABEL_METRICS = ("auc", "balanced_accuracy", "area_contrast")


def _counts(items: Sequence[dict]) -> tuple[int, int]:
    """(positives, negatives) of a part."""
    positives = sum(int(item["label"]) for item in items)
    return positives, len(items) - positives


def _image_size(path: str) -> tuple[int, int]:
    """(width, height) from the file's header alone, naming the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size
    except Exception as e:  # noqa: BLE001 - any reader failure is the same problem for the user
        raise InputError(f"cannot read image file {path} (corrupt, truncated or not an image): {e}") from e


def check_mask_sizes(items: Sequence[dict], part: str) -> None:
    """Refuse any mask whose (width, height) differs from its image's, reading only the files' headers."""
    for item in items:
        if item.get("mask") is None or "image" not in item:
            continue
        image_wh, mask_wh = _image_size(item["image"]), _image_size(item["mask"])
        if image_wh != mask_wh:
            raise InputError(
                f"{part}: mask {item['mask']} has size (width, height) {mask_wh} but its image {item['image']} "
                f"has {image_wh}"
            )


def _check_training(train: Sequence[dict], unit: str = "image") -> None:
    """Training needs positives to learn tumour from; without negatives MIL cannot tell tumour from tissue, which a
    bag of a slide's tiles cannot do without at all (a warning for images, an error for slides)."""
    positives, negatives = _counts(train)
    if not train:
        raise InputError(f"training: no {unit} left after carving out validation")
    if not positives:
        raise InputError(f"training: no positive {unit} among {len(train)}; the MIL teacher needs tumour {unit}s")
    if not negatives and unit == "slide":
        raise InputError(
            f"training: all {len(train)} slides are labelled positive; slide-bag MIL learns tumour from the contrast "
            "between positive and tumour-free slides (label 0): add negative slides, or train in tile-label mode"
        )
    if not negatives:
        warnings.warn(
            f"training: all {len(train)} images are positive; with no negative image the MIL teacher cannot learn "
            "what is not tumour and will call all tissue tumour. Add tumour-free images (label 0).",
            stacklevel=2,
        )


def _check_validation(val: Sequence[dict], selection_metric: str, n_training: int) -> None:
    """The selection score must be computable on validation, else checkpoints and swaps would be chosen blind."""
    positives, negatives = _counts(val)
    if not val:
        raise InputError(
            f"validation: no image (training has {n_training}); raise val_fraction or add images, since checkpoint "
            "selection and the role swap are decided on validation"
        )
    if selection_metric in TWO_LABEL_METRICS and not (positives and negatives):
        raise InputError(
            f"validation: selection_metric {selection_metric!r} compares positives with negatives but validation holds "
            f"{positives} positive and {negatives} negative images; add images of the missing label or raise "
            "val_fraction"
        )
    if selection_metric in ("flip_consistency", "mask_f1") and not positives:
        raise InputError(
            f"validation: selection_metric {selection_metric!r} needs positive images; validation has none"
        )
    if selection_metric == "mask_f1":
        missing = [item for item in val if int(item["label"]) == 1 and item.get("mask") is None]
        if missing:
            names = [item.get("name", Path(str(item.get("image", item.get("slide")))).stem) for item in missing[:3]]
            raise InputError(
                f"validation: selection_metric 'mask_f1' needs a pixel mask for every positive image, but "
                f"{len(missing)} of {positives} have none (e.g. {names}); use a mask-free selection_metric (auc, "
                "balanced_accuracy, area_contrast, flip_consistency) or add the masks"
            )


def _check_test(test: Sequence[dict]) -> None:
    """The test table needs images; one label alone makes half of its columns NaN."""
    positives, negatives = _counts(test)
    if not test:
        raise InputError("test: no image; the run ends with a test evaluation")
    if not (positives and negatives):
        warnings.warn(
            f"test: {positives} positive and {negatives} negative images; metrics of the missing label are NaN",
            stacklevel=2,
        )


def check_training_data(
    train: Sequence[dict], val: Sequence[dict], test: Sequence[dict], selection_metric: str, unit: str = "image"
) -> None:
    """Check the parts' sizes and labels for the chosen selection metric, and every mask's size, before training;
    ``unit`` is what one item is ("image", or "slide" for slide-bag MIL, which needs negative slides)."""
    _check_training(train, unit)
    _check_validation(val, selection_metric, len(train))
    _check_test(test)
    for part, items in (("training", train), ("validation", val), ("test", test)):
        check_mask_sizes(items, part)
    logger.info(
        "data checked: training %d/%d, validation %d/%d, test %d/%d (positive/negative); selection by %s",
        *_counts(train), *_counts(val), *_counts(test), selection_metric,
    )
