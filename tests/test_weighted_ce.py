"""WeightedCELoss against hand-computed values, and the reference code's defects 1 and 2 shown absent."""

import math

import pytest
import torch

from custom.losses.weighted_ce import WeightedCELoss

# 2x2 example. Student p = [0.9, 0.2, 0.6, 0.4]; teacher soft map [0.95, 0.3, 0.9, 0.1] -> mask [1, 0, 1, 0].
# Per-pixel CE = -ln(probability given to the correct class) = -ln [0.9, 0.8, 0.6, 0.6].
# softmax(-ce) = [0.9, 0.8, 0.6, 0.6] / 2.9, so w = 4 * [0.9, 0.8, 0.6, 0.6] / 2.9 (mean 1).
# loss = mean(w * ce) = (4 / 2.9) * (0.9 ln(1/0.9) + 0.8 ln(1/0.8) + 2 * 0.6 ln(1/0.6)) / 4 = 0.30563...
P = torch.tensor([[[[0.9, 0.2], [0.6, 0.4]]]])
TEACHER = torch.tensor([[[[0.95, 0.3], [0.9, 0.1]]]])
CORRECT = [0.9, 0.8, 0.6, 0.6]
WEIGHTS = [4 * c / sum(CORRECT) for c in CORRECT]
EXPECTED = sum(w * -math.log(c) for w, c in zip(WEIGHTS, CORRECT)) / 4


def test_hand_computed_2x2():
    loss = WeightedCELoss()(P, TEACHER)
    assert loss.item() == pytest.approx(EXPECTED, rel=1e-5)
    assert EXPECTED == pytest.approx(0.305631, abs=1e-6)


def test_batch_mean_is_mean_of_images():
    other = torch.tensor([[[[0.3, 0.7], [0.2, 0.8]]]])
    loss_fn = WeightedCELoss()
    both = loss_fn(torch.cat([P, other]), torch.cat([TEACHER, TEACHER]))
    assert both.item() == pytest.approx((loss_fn(P, TEACHER).item() + loss_fn(other, TEACHER).item()) / 2, rel=1e-5)


def test_single_class_target_uses_weight_one():
    target = torch.full_like(P, 0.8)  # every pixel foreground
    expected = sum(-math.log(p) for p in [0.9, 0.2, 0.6, 0.4]) / 4  # plain BCE mean
    assert WeightedCELoss()(P, target).item() == pytest.approx(expected, rel=1e-5)


def test_weights_are_detached():
    pred = P.clone().requires_grad_(True)
    WeightedCELoss()(pred, TEACHER).backward()
    # with constant w: d/dp [w * -ln p] = -w / p (mask 1), d/dp [w * -ln(1 - p)] = w / (1 - p) (mask 0), / 4 pixels
    p = [0.9, 0.2, 0.6, 0.4]
    expected = [-WEIGHTS[0] / p[0], WEIGHTS[1] / (1 - p[1]), -WEIGHTS[2] / p[2], WEIGHTS[3] / (1 - p[3])]
    assert pred.grad.flatten().tolist() == pytest.approx([e / 4 for e in expected], rel=1e-4)


def test_defect1_soft_target_below_one_is_foreground():
    pred = torch.full((1, 1, 4, 4), 0.9)
    target = torch.full((1, 1, 4, 4), 0.9)  # the reference's .long() would make this background (loss -ln 0.1)
    assert WeightedCELoss()(pred, target).item() == pytest.approx(-math.log(0.9), rel=1e-5)


def test_defect1_threshold_is_configurable():
    pred = torch.full((1, 1, 2, 2), 0.9)
    target = torch.full((1, 1, 2, 2), 0.6)
    assert WeightedCELoss(threshold=0.7)(pred, target).item() == pytest.approx(-math.log(0.1), rel=1e-5)


def test_defect2_loss_uses_log_probabilities():
    target = torch.ones(1, 1, 2, 2)
    right = WeightedCELoss()(torch.full((1, 1, 2, 2), 0.999), target).item()
    wrong = WeightedCELoss()(torch.full((1, 1, 2, 2), 0.001), target).item()
    # a cross-entropy on softmax([1 - p, p]) is bounded in [0.31, 1.31]; the correct loss is not
    assert right == pytest.approx(-math.log(0.999), rel=1e-4) and right < 0.01
    assert wrong == pytest.approx(-math.log(0.001), rel=1e-4) and wrong > 5.0


def test_saturated_prediction_stays_finite():
    loss = WeightedCELoss()(torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(-math.log(1e-6), rel=1e-4)


def test_bad_input_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        WeightedCELoss()(P, TEACHER[..., :1])
    with pytest.raises(ValueError, match="threshold"):
        WeightedCELoss(threshold=1.0)
