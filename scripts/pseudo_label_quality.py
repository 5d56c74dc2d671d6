"""How good are a run's pseudo-labels, where some training images have masks? And how much of it is memorised?

Reads the pseudo-label cache of a training run (``output_dir/pseudo_labels/manifest.csv`` and the maps it names,
written by ``custom.handlers.PseudoLabelHandler``: the current teacher's fused maps on the training images) and
scores them the way the evaluation protocol scores test images, without smoothing: on every positive training image
that has a mask (the patch-folder convention, ``<split>/gt/<same name>`` next to ``<split>/pos/``), the Dice of the
map binarised at ``threshold`` against the mask, with its precision and recall and the area it calls against the
mask's (over-calling pseudo-masks teach a student to call tumour where there is none; under-calling ones the
opposite); on every negative, the false-positive area (share of pixels at or
above ``threshold``). Set beside the same model's test metrics, the gap says how much of the teacher's quality is
memorised training images rather than knowledge of the tissue. Masks are only read here, never in training.

    python scripts/pseudo_label_quality.py --pseudo_dir runs/abl-mosaic/seed111/full/outputs/pseudo_labels
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import fire
import numpy as np
from PIL import Image
from skimage.transform import resize

from custom.data.images import read_mask
from custom.errors import report_input_errors


def mask_of(image_path: str) -> Path:
    """The mask a patch folder keeps for ``<split>/pos/<name>``: ``<split>/gt/<name>``."""
    image = Path(image_path)
    return image.parent.parent / "gt" / image.name


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def precision_recall(prediction: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Share of the called pixels that are tumour, and of the tumour that is called (nan where nothing is called,
    or there is no tumour: such images leave the mean of that figure)."""
    shared = int(np.logical_and(prediction, truth).sum())
    called, true = int(prediction.sum()), int(truth.sum())
    return (shared / called if called else float("nan")), (shared / true if true else float("nan"))


def pseudo_label_quality(pseudo_dir: str | Path, threshold: float = 0.5) -> dict:
    """Means over images: on positives with a mask Dice, precision, recall and the called and true tumour shares; on
    negatives the false-positive area."""
    pseudo_dir = Path(pseudo_dir)
    manifest = pseudo_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: give the pseudo_labels folder of a training run's output_dir")
    dices, precisions, recalls, called, true, fp_areas, unmasked = [], [], [], [], [], [], 0
    with open(manifest, newline="") as f:
        for row in csv.DictReader(f):
            probabilities = read_probability_png(pseudo_dir / Path(row["png"]).name)
            predicted = probabilities >= threshold
            if int(row["label"]) == 0:
                fp_areas.append(float(predicted.mean()))
                continue
            truth_path = mask_of(row["image"])
            if not truth_path.is_file():
                unmasked += 1
                continue
            truth = read_mask(truth_path).astype(bool)
            if truth.shape != predicted.shape:  # the map is at the training size; compare at the mask's size
                predicted = resize(probabilities, truth.shape, order=1, preserve_range=True) >= threshold
            dices.append(dice(predicted, truth))
            precision, recall = precision_recall(predicted, truth)
            precisions.append(precision)
            recalls.append(recall)
            called.append(float(predicted.mean()))
            true.append(float(truth.mean()))
    return {
        "n_pos_with_mask": len(dices), "n_pos_without_mask": unmasked, "n_neg": len(fp_areas),
        "dice_pos": _mean(dices), "precision_pos": _mean(precisions), "recall_pos": _mean(recalls),
        "called_area_pos": _mean(called), "true_area_pos": _mean(true),
        "fp_area_neg": _mean(fp_areas),
    }


def _mean(values: list[float]) -> float:
    """The mean of the defined values; nan when there are none."""
    defined = [v for v in values if not np.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")


def read_probability_png(path: Path) -> np.ndarray:
    """A pseudo-label PNG (probability x 255, uint8) as float probabilities in [0, 1]."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32) / 255.0


def main(pseudo_dir: str, threshold: float = 0.5) -> None:
    """Print the pseudo-labels' Dice, precision, recall and called area on masked positives and false-positive area
    on negatives, as JSON."""
    try:
        result = pseudo_label_quality(pseudo_dir, threshold)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
