"""Evaluation protocol against hand-computed values on 8x8 masks, and the MONAI metric / Ignite handler paths."""

import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.engines import SupervisedEvaluator
from monai.handlers import from_engine

from custom.metrics import (
    METRIC_KEYS,
    MILSegmentationHandler,
    MILSegmentationMetric,
    all_background_maps,
    evaluate_baselines,
    evaluate_maps,
    oracle_label_maps,
)


def box(rows: slice, cols: slice, value: float = 1.0, background: float = 0.0) -> np.ndarray:
    """An 8x8 float map with `value` inside the box."""
    out = np.full((8, 8), background, dtype=np.float32)
    out[rows, cols] = value
    return out


# Truth of the positive images: a 2x2 tumour at rows 2-3, cols 2-3 (4 pixels).
TRUTH = box(slice(2, 4), slice(2, 4))
EMPTY = np.zeros((8, 8), dtype=np.float32)
# Maps are 0.9 where tumour is predicted and 0.1 elsewhere.
PRED_WIDE = box(slice(2, 4), slice(2, 6), 0.9, 0.1)  # 8 pixels covering the truth and 4 more to its right
PRED_NONE = np.full((8, 8), 0.1, dtype=np.float32)
PRED_FP = box(slice(0, 4), slice(0, 4), 0.9, 0.1)  # 16 false-positive pixels on a negative image
DIAGONAL = math.hypot(7, 7)  # HD of an empty prediction on an 8x8 image


def score(p: np.ndarray, r: float = 4.0) -> float:
    """Generalised mean of a map, by numpy."""
    return float(np.mean(p.astype(np.float64) ** r) ** (1 / r))


def test_hand_computed_protocol():
    """Positive wide, positive empty, clean negative, negative with 16 false positives (no smoothing)."""
    probs = [PRED_WIDE, PRED_NONE, PRED_NONE, PRED_FP]
    masks = [TRUTH * 255, TRUTH, EMPTY, EMPTY]  # 0/255 and 0/1 masks both accepted
    result = evaluate_maps(probs, masks, [1, 1, 0, 0], smooth_sigma=None)
    assert set(result) == set(METRIC_KEYS)
    # wide: F1 = 2*4/(8+4) = 2/3, IoU = 4/8; the rightmost predicted column (col 5) is 2 from truth's col 3: HD 2
    # empty: F1 0, IoU 0, HD = diagonal ; clean negative: background F1 = IoU = 1
    # FP negative: 48 background pixels predicted of 64: F1 = 2*48/(48+64) = 6/7, IoU = 48/64 = 3/4
    assert result["f1_pos"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["iou_pos"] == pytest.approx((0.5 + 0) / 2)
    assert result["f1_neg"] == pytest.approx((1 + 6 / 7) / 2)
    assert result["iou_neg"] == pytest.approx((1 + 0.75) / 2)
    assert result["f1"] == pytest.approx((2 / 3 + 0 + 1 + 6 / 7) / 4)
    assert result["iou"] == pytest.approx((0.5 + 0 + 1 + 0.75) / 4)
    assert result["hd"] == pytest.approx((2 + DIAGONAL) / 2, abs=1e-5)
    # pixel Dice: 2 * (4 + 0 + 0 + 0) / ((8 + 4) + (0 + 4) + 0 + (16 + 0)) = 8 / 32
    assert result["pixel_dice"] == pytest.approx(0.25)
    # MIL scores: wide 0.535, none 0.1, none 0.1, FP 0.637. Pairs (pos, neg): wide > clean 1, wide < FP 0,
    # none = clean 0.5 (tie), none < FP 0 -> AUC = 1.5 / 4
    assert score(PRED_WIDE) < score(PRED_FP)
    assert result["auc"] == pytest.approx(0.375)
    assert (result["n_pos"], result["n_neg"]) == (2, 2)


def test_hausdorff_averages_over_positives_only():
    """Defect 7: with 2 positives and 1 negative the mean HD is (2 + diagonal) / 2, not total / 3 * 2."""
    result = evaluate_maps([PRED_WIDE, PRED_NONE, PRED_NONE], [TRUTH, TRUTH, EMPTY], [1, 1, 0], smooth_sigma=None)
    assert result["hd"] == pytest.approx((2 + DIAGONAL) / 2, abs=1e-5)
    assert result["hd"] != pytest.approx((2 + DIAGONAL) / 3 * 2, abs=1e-3)


def test_groups_without_images_give_nan():
    """Only negatives: positive-group means, HD and AUC are NaN; the overall mean is the negatives' mean."""
    result = evaluate_maps([PRED_NONE, PRED_FP], [EMPTY, EMPTY], [0, 0], smooth_sigma=None)
    assert math.isnan(result["hd"]) and math.isnan(result["f1_pos"]) and math.isnan(result["auc"])
    assert result["f1"] == pytest.approx((1 + 6 / 7) / 2)
    assert result["pixel_dice"] == pytest.approx(0.0)  # 16 predicted pixels, no true ones
    assert evaluate_maps([PRED_NONE], [EMPTY], [0], smooth_sigma=None)["pixel_dice"] == 1.0


def test_smoothing_on_and_off():
    """A lone confident pixel is a false positive unsmoothed, and vanishes after sigma-3 smoothing."""
    lone = box(slice(4, 5), slice(4, 5), 1.0, 0.0)
    raw = evaluate_maps([lone], [EMPTY], [0], smooth_sigma=None)
    assert raw["f1_neg"] == pytest.approx(2 * 63 / (63 + 64))  # 63 background pixels predicted
    smoothed = evaluate_maps([lone], [EMPTY], [0], smooth_sigma=3.0)
    assert smoothed["f1_neg"] == 1.0  # peak 1 / (2 pi 9) = 0.018 < 0.5


def test_smoothing_reflects_at_the_border():
    """A uniform 0.6 map stays 0.6 under "reflect" smoothing; zero padding would darken the corners below 0.5."""
    uniform = np.full((8, 8), 0.6, dtype=np.float32)
    full = np.ones((8, 8), dtype=np.float32)
    result = evaluate_maps([uniform], [full], [1], smooth_sigma=3.0)
    assert result["f1_pos"] == 1.0 and result["hd"] == 0.0


def test_label_mask_disagreement_and_bad_shapes_raise():
    """A positive label needs tumour pixels and a negative none; maps and masks must match in shape."""
    with pytest.raises(ValueError, match="image 1: label 1 disagrees with its mask"):
        evaluate_maps([PRED_NONE, PRED_NONE], [TRUTH, EMPTY], [1, 1])
    with pytest.raises(ValueError, match="need one of each per image"):
        evaluate_maps([PRED_NONE], [TRUTH, EMPTY], [1, 0])
    with pytest.raises(ValueError, match="same shape"):
        evaluate_maps([PRED_NONE[:4]], [TRUTH], [1])


def test_baselines():
    """Oracle label: all tumour on positives; all background: nothing anywhere."""
    masks, labels = [TRUTH, EMPTY], [1, 0]
    np.testing.assert_array_equal(oracle_label_maps(masks, labels)[0], np.ones((8, 8)))
    np.testing.assert_array_equal(all_background_maps(masks)[1], np.zeros((8, 8)))
    result = evaluate_baselines(masks, smooth_sigma=None)
    oracle, background = result["oracle_label"], result["all_background"]
    # oracle on the positive: F1 = 2*4/(64+4) = 8/68, IoU = 4/64, HD = farthest image corner (7,7) to (3,3)
    assert oracle["f1_pos"] == pytest.approx(8 / 68)
    assert oracle["iou_pos"] == pytest.approx(4 / 64)
    assert oracle["hd"] == pytest.approx(math.hypot(4, 4))
    assert oracle["f1_neg"] == 1.0 and oracle["auc"] == 1.0
    assert background["f1_pos"] == 0.0 and background["f1_neg"] == 1.0
    assert background["hd"] == pytest.approx(DIAGONAL) and background["pixel_dice"] == 0.0
    assert background["auc"] == 0.5


def network_like(probs: list[np.ndarray]) -> torch.Tensor:
    """(B, 4, H, W) like a segmenter's output: three side channels of noise, the fused map last."""
    fused = torch.from_numpy(np.stack(probs))[:, None]
    return torch.cat([torch.rand(len(probs), 3, 8, 8), fused], dim=1)


PROBS = [PRED_WIDE, PRED_NONE, PRED_NONE, PRED_FP]
MASKS = [TRUTH, TRUTH, EMPTY, EMPTY]


def test_metric_class_matches_evaluate_maps_over_batches():
    """Two batches through the cumulative metric give evaluate_maps' numbers; reset starts over."""
    expected = evaluate_maps(PROBS, MASKS, [1, 1, 0, 0])
    metric = MILSegmentationMetric()
    masks = torch.from_numpy(np.stack(MASKS))[:, None]
    metric(network_like(PROBS[:3]), masks[:3])
    metric(network_like(PROBS[3:]), masks[3:])
    assert metric.aggregate() == pytest.approx(expected, nan_ok=True)
    metric.reset()
    metric(network_like(PROBS[2:3]), masks[2:3])
    assert metric.aggregate()["n_neg"] == 1 and metric.aggregate()["n_pos"] == 0


def test_ignite_handler_publishes_the_metric_dict():
    """On a bare Ignite engine the key value lands under the handler's name and every entry under its key."""
    expected = evaluate_maps(PROBS, MASKS, [1, 1, 0, 0])
    masks = torch.from_numpy(np.stack(MASKS))[:, None]
    batches = [(network_like(PROBS[:2]), masks[:2]), (network_like(PROBS[2:]), masks[2:])]
    engine = Engine(lambda engine, batch: batch)
    MILSegmentationHandler(key="iou", prefix="val_").attach(engine, "val_key")
    engine.run(batches)
    assert engine.state.metrics["val_key"] == pytest.approx(expected["iou"])
    for key in METRIC_KEYS:
        assert engine.state.metrics[f"val_{key}"] == pytest.approx(expected[key])
    assert engine.state.metric_details["val_key"].shape == (4, 9)  # one score row per image
    with pytest.raises(ValueError, match="key must be one of"):
        MILSegmentationHandler(key="dice")


def test_handler_as_key_metric_of_a_supervised_evaluator():
    """In a MONAI SupervisedEvaluator (decollated batches) the key metric equals evaluate_maps' f1."""
    expected = evaluate_maps(PROBS, MASKS, [1, 1, 0, 0])
    data = [
        {"image": network_like(PROBS[i : i + 2]), "label": torch.from_numpy(np.stack(MASKS[i : i + 2]))[:, None]}
        for i in (0, 2)
    ]
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=data,
        network=torch.nn.Identity(),
        key_val_metric={"val_f1": MILSegmentationHandler(output_transform=from_engine(["pred", "label"]))},
    )
    evaluator.run()
    assert evaluator.state.metrics["val_f1"] == pytest.approx(expected["f1"])
    assert evaluator.state.metrics["hd"] == pytest.approx(expected["hd"])
    assert evaluator.state.best_metric == pytest.approx(expected["f1"])
