"""Mask-free calibration of the stage-2 targets: the threshold read off the teacher's false calls on training
negatives (hand-computed curves), and the recentred targets the loss learns (hand-computed values)."""

import logging

import numpy as np
import pytest
import torch
from monai.data import DataLoader

from custom.handlers.pseudo_labels import PseudoLabelHandler
from custom.losses.distillation import DistillationLoss
from custom.metrics.calibration import CALIBRATION_GRID, calibrated_threshold, false_positive_curve


def test_false_positive_curve_counts_pixels_at_or_above_each_threshold():
    curve = false_positive_curve(np.array([[0.4, 0.5], [0.55, 0.7], [0.95, 0.1]], dtype=np.float32))
    at = dict(zip(CALIBRATION_GRID.tolist(), curve.tolist()))
    assert at[0.5] == pytest.approx(4 / 6)  # 0.5 itself counts (>=, as AsDiscrete)
    assert at[0.55] == pytest.approx(3 / 6)
    assert at[0.56] == pytest.approx(2 / 6) and at[0.7] == pytest.approx(2 / 6)
    assert at[0.71] == pytest.approx(1 / 6) and at[0.95] == pytest.approx(1 / 6)
    assert at[0.96] == 0.0 and len(curve) == 50


def test_calibrated_threshold_is_the_lowest_within_budget_and_never_below_half():
    curve = np.linspace(0.10, 0.0, len(CALIBRATION_GRID))  # 0.10 at 0.50, falling by 0.1/49 per step
    # first index with 0.10 - 0.1 k / 49 <= 0.02 is k = 40 (0.0184), i.e. threshold 0.90
    assert calibrated_threshold(curve, 0.02) == pytest.approx(0.90)
    assert calibrated_threshold(np.zeros(50), 0.02) == 0.5  # a teacher silent on negatives keeps 0.5, not lower
    assert calibrated_threshold(np.full(50, 0.3), 0.02) == pytest.approx(0.99)  # none within: the grid's last


def test_recentred_targets_put_the_threshold_at_one_half():
    loss = DistillationLoss(target_threshold=0.8)
    teacher = torch.tensor([0.8, 0.5, 0.9, 0.0, 1.0])
    # sigmoid(logit(t) - logit(0.8)): 0.8 -> 0.5; 0.5 -> 1 / (1 + 4) = 0.2; 0.9 -> 9 / (9 + 4) = 9 / 13
    expected = [0.5, 0.2, 9 / 13, 0.0, 1.0]
    np.testing.assert_allclose(loss.recentre(teacher).numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(DistillationLoss().recentre(teacher).numpy(), teacher.numpy())


def test_threshold_one_half_changes_nothing_and_a_higher_one_changes_the_loss():
    torch.manual_seed(0)
    student, teacher = torch.rand(4, 3, 8, 8), torch.rand(4, 1, 8, 8)
    label = torch.tensor([1, 0, 1, 1])
    plain = DistillationLoss()(student, teacher, label)
    assert DistillationLoss(target_threshold=0.5)(student, teacher, label).item() == pytest.approx(plain.item(), 1e-5)
    assert DistillationLoss(target_threshold=0.7)(student, teacher, label).item() != pytest.approx(plain.item(), 1e-3)
    with pytest.raises(ValueError, match="target_threshold must lie in"):
        DistillationLoss(target_threshold=1.0)


class ConstantTeacher(torch.nn.Module):
    """Maps whose fused channel is a fixed ramp: on a negative image the share above t is known exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.linspace(0.0, 0.99, x.shape[-1] * x.shape[-2]).view(1, 1, x.shape[-2], x.shape[-1])
        return ramp.expand(x.shape[0], 2, -1, -1).clone()


class FakeEngine:
    """What the handler reads from the trainer: its teacher, device and epoch."""

    def __init__(self):
        self.teacher = ConstantTeacher()
        self.state = type("State", (), {"device": "cpu", "epoch": 0})()


def test_handler_calibrates_on_negatives_and_sets_the_loss(tmp_path, caplog):
    items = [{"image": torch.zeros(3, 10, 10), "label": i % 2, "name": f"im{i}"} for i in range(4)]
    loss = DistillationLoss()
    handler = PseudoLabelHandler(DataLoader(items, batch_size=2), tmp_path, fp_budget=0.2, loss=loss)
    with caplog.at_level(logging.INFO):
        handler(FakeEngine())
    # 100 ramp values 0.00, 0.01, ..., 0.99: the share at or above t is (100 - ceil(100 t)) / 100 (up to float32
    # rounding of the ramp); 0.2 is first reached at t = 0.80
    assert loss.target_threshold == pytest.approx(0.80) and handler.threshold == pytest.approx(0.80)
    assert "target threshold 0.80 calibrated on 2 training negatives" in caplog.text
    assert "budget 0.2" in caplog.text
    assert (tmp_path / "manifest.csv").read_text().splitlines()[0].split(",")[-1] == "mean_prob"
    (calibration,) = handler.calibrations
    assert calibration["round"] == 0 and calibration["n_negatives"] == 2
    assert calibration["fp_area_at_0.5"] == pytest.approx(0.5, abs=0.011)  # 0.50 ... 0.99 of the ramp
    assert calibration["fp_area_at_threshold"] == pytest.approx(0.2, abs=0.011)
    handler(FakeEngine())  # the same round again, as after a resume: replaced, not repeated
    assert len(handler.calibrations) == 1


def test_handler_refuses_a_budget_without_negatives_or_loss(tmp_path):
    items = [{"image": torch.zeros(3, 10, 10), "label": 1, "name": f"im{i}"} for i in range(2)]
    handler = PseudoLabelHandler(DataLoader(items, batch_size=2), tmp_path, fp_budget=0.02, loss=DistillationLoss())
    with pytest.raises(ValueError, match="none of the 2 training images is negative"):
        handler(FakeEngine())
    with pytest.raises(ValueError, match="needs the stage-2 loss"):
        PseudoLabelHandler([], tmp_path, fp_budget=0.02)
    with pytest.raises(ValueError, match="fp_budget must lie in"):
        PseudoLabelHandler([], tmp_path, fp_budget=0.0, loss=DistillationLoss())


def test_calibrated_threshold_searches_from_the_lowest_it_is_given():
    curve = np.linspace(0.10, 0.0, len(CALIBRATION_GRID))
    assert calibrated_threshold(curve, 0.02, lowest=0.95) == pytest.approx(0.95)
    assert calibrated_threshold(curve, 0.02, lowest=0.5) == pytest.approx(0.90)
