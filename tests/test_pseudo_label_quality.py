"""scripts/pseudo_label_quality.py against hand-computed Dice and false-positive areas on tiny pseudo-label caches."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from pseudo_label_quality import pseudo_label_quality  # noqa: E402  (a script, not a package)


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


@pytest.fixture
def cache(tmp_path):
    """Two positives (one with a mask) and one negative, 4 x 4, with their teacher maps."""
    data, pseudo = tmp_path / "data" / "train", tmp_path / "pseudo"
    rows = []
    truth = np.zeros((4, 4), np.uint8)
    truth[:2] = 255  # 8 tumour pixels
    teacher = np.zeros((4, 4), np.uint8)
    teacher[:1] = 200  # 4 pixels at 0.78, all inside the mask
    teacher[3, :2] = 255  # 2 pixels outside it
    teacher[2, 0] = 100  # 0.39, below the threshold
    for name, label, image_dir, pseudo_map in [
        ("pos_a", 1, "pos", teacher), ("pos_b", 1, "pos", np.full((4, 4), 255)), ("neg_c", 0, "neg", teacher)
    ]:
        image = data / image_dir / f"{name[4:]}.png"
        _png(image, np.zeros((4, 4, 3)))
        _png(pseudo / f"{name}.png", pseudo_map)
        rows.append({"name": name, "image": str(image), "label": label, "png": str(pseudo / f"{name}.png")})
    _png(data / "gt" / "a.png", truth)
    with open(pseudo / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "image", "label", "png"])
        writer.writeheader()
        writer.writerows(rows)
    return pseudo


def test_dice_and_false_positive_area_by_hand(cache):
    result = pseudo_label_quality(cache)
    # positive a: 6 predicted, 8 true, 4 shared -> 2 * 4 / 14; b has no mask; negative: 6 of 16 pixels predicted
    assert result["dice_pos"] == pytest.approx(8 / 14)
    assert result["fp_area_neg"] == pytest.approx(6 / 16)
    assert (result["n_pos_with_mask"], result["n_pos_without_mask"], result["n_neg"]) == (1, 1, 1)
    # positive a calls 6 pixels of which 4 are tumour, and finds 4 of the 8 tumour pixels: it under-calls
    assert result["precision_pos"] == pytest.approx(4 / 6) and result["recall_pos"] == pytest.approx(4 / 8)
    assert result["called_area_pos"] == pytest.approx(6 / 16) and result["true_area_pos"] == pytest.approx(8 / 16)
    assert pseudo_label_quality(cache, threshold=0.3)["dice_pos"] == pytest.approx(2 * 4 / (7 + 8))


def test_a_folder_without_manifest_exits_1_naming_it(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "pseudo_label_quality.py"), "--pseudo_dir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 1
    assert f"{tmp_path / 'manifest.csv'} not found" in result.stderr
