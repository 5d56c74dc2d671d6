"""How good are a run's pseudo-labels, where some training images have masks? And how much of it is memorised?

Reads the pseudo-label cache of a training run (``output_dir/pseudo_labels/manifest.csv`` and the maps it names,
written by ``custom.handlers.PseudoLabelHandler``: the current teacher's fused maps on the training images) and
scores them the way the evaluation protocol scores test images, without smoothing: on every positive training image
that has a mask (the patch-folder convention, ``<split>/gt/<same name>`` next to ``<split>/pos/``), the Dice of the
map binarised at ``threshold`` against the mask; on every negative, the false-positive area (share of pixels at or
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


def mask_of(image_path: str) -> Path:
    """The mask a patch folder keeps for ``<split>/pos/<name>``: ``<split>/gt/<name>``."""
    image = Path(image_path)
    return image.parent.parent / "gt" / image.name


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty."""
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def pseudo_label_quality(pseudo_dir: str | Path, threshold: float = 0.5) -> dict:
    """Per-image rows and their means: Dice on positives with a mask, false-positive area on negatives."""
    pseudo_dir = Path(pseudo_dir)
    manifest = pseudo_dir / "manifest.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest} not found: give the pseudo_labels folder of a training run's output_dir")
    dices, fp_areas, unmasked = [], [], 0
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
    return {
        "n_pos_with_mask": len(dices), "n_pos_without_mask": unmasked, "n_neg": len(fp_areas),
        "dice_pos": float(np.mean(dices)) if dices else float("nan"),
        "fp_area_neg": float(np.mean(fp_areas)) if fp_areas else float("nan"),
    }


def read_probability_png(path: Path) -> np.ndarray:
    """A pseudo-label PNG (probability x 255, uint8) as float probabilities in [0, 1]."""
    with Image.open(path) as image:
        return np.asarray(image, dtype=np.float32) / 255.0


def main(pseudo_dir: str, threshold: float = 0.5) -> None:
    """Print the pseudo-labels' Dice on masked positives and false-positive area on negatives, as JSON."""
    try:
        result = pseudo_label_quality(pseudo_dir, threshold)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
