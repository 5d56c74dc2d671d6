"""Mask-free operating thresholds (threshold_fp_budget): hand-computed false-positive curves of validation negatives,
and a training run that scores and ships its models at them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_bundle_training
import torch
from test_bundle_training import run_bundle

from custom.checkpoints import read_record
from custom.metrics.calibration import FalsePositiveCurve
from custom.report import TrainingReport, operating_threshold

tiny_data = test_bundle_training.tiny_data  # the bundle tests' module-scoped synthetic data set


class ChannelMaps(torch.nn.Module):
    """A stand-in segmenter: its maps are the input's first two channels (the fused map is channel 1)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


def _loader(values_and_labels: list[tuple[float, int]]) -> torch.utils.data.DataLoader:
    """Images whose channel 1 (the stand-in's fused map) is the constant ``value``, with image labels."""
    items = [{"image": torch.full((3, 8, 8), v), "label": torch.tensor(label)} for v, label in values_and_labels]
    return torch.utils.data.DataLoader(items, batch_size=2)


@pytest.mark.parametrize("budget, expected", [(0.02, 0.81), (0.5, 0.61)])
def test_the_threshold_is_the_lowest_within_budget_on_the_negatives_alone(budget, expected):
    # negatives at 0.6 and 0.8: mean false-positive area 1 up to 0.60, 0.5 from 0.61 to 0.80, 0 from 0.81;
    # the positive at 0.99 must not count
    loader = _loader([(0.6, 0), (0.99, 1), (0.8, 0)])
    out = operating_threshold(ChannelMaps(), loader, "cpu", budget, smooth_sigma=3.0)
    assert out["threshold"] == pytest.approx(expected)
    assert out["n_negatives"] == 2 and out["fp_area_at_threshold"] == pytest.approx(1.0)
    assert out["fp_area"] == pytest.approx({0.81: 0.0, 0.61: 0.5}[expected]) and out["within_budget"]


def test_a_model_over_budget_everywhere_gets_the_last_threshold_and_says_so():
    out = operating_threshold(ChannelMaps(), _loader([(1.0, 0), (0.3, 1)]), "cpu", 0.02)
    assert out["threshold"] == pytest.approx(0.99) and out["fp_area"] == 1.0 and not out["within_budget"]


def test_smoothing_is_applied_before_the_curve_as_in_the_protocol():
    curve = FalsePositiveCurve(smooth_sigma=1.0)
    spike = np.zeros((1, 9, 9), np.float32)
    spike[0, 4, 4] = 1.0  # one hot pixel: unsmoothed it is 1/81 of the area at every threshold
    curve.update(spike, np.array([0]))
    assert curve.curve()[0] == 0.0  # smoothed with sigma 1 its peak is 1 / (2 pi) < 0.5
    raw = FalsePositiveCurve(smooth_sigma=None)
    raw.update(spike, np.array([0]))
    assert raw.curve() == pytest.approx(np.full(50, 1 / 81))


def test_no_negative_and_bad_budgets_are_refused():
    with pytest.raises(ValueError, match="no negative image"):
        operating_threshold(ChannelMaps(), _loader([(0.7, 1)]), "cpu", 0.02)
    for budget in (0.0, 1.0):
        with pytest.raises(ValueError, match="threshold_fp_budget must lie in"):
            TrainingReport(**{k: None for k in ("output_dir", "ckpt_dir", "stage1_teacher", "teacher", "student",
                                                "role_swap", "test_loader", "test_display", "stage1_history",
                                                "stage1_epoch_length", "stage2_history", "stage2_epoch_length",
                                                "config", "device")}, threshold_fp_budget=budget)


def test_a_run_scores_and_ships_each_model_at_its_calibrated_threshold(tiny_data, tmp_path):
    log = run_bundle(tmp_path, tiny_data, threshold_fp_budget=0.02)
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    operating = metrics["operating_thresholds"]
    assert set(operating) == {"teacher", "student", "model.pt"}
    for entry in operating.values():
        assert 0.5 <= entry["threshold"] <= 0.99 and entry["n_negatives"] >= 1 and entry["fp_budget"] == 0.02
        assert entry["fp_area"] <= 0.02 or not entry["within_budget"]
    record = read_record(tmp_path / "models" / "model.pt")
    assert record["threshold"] == operating["model.pt"]["threshold"]
    assert record["training"]["threshold_calibration"]["threshold"] == operating["model.pt"]["threshold"]
    assert "Operating thresholds (threshold_fp_budget 0.02" in log


def test_a_threshold_above_half_is_where_the_search_starts():
    # the same negatives (0.6 and 0.8) searched from 0.65: 0.5 of the area there already meets a 0.5 budget
    out = operating_threshold(ChannelMaps(), _loader([(0.6, 0), (0.8, 0)]), "cpu", 0.5, threshold=0.65)
    assert out["threshold"] == pytest.approx(0.65) and out["fp_area"] == pytest.approx(0.5)
    assert out["fp_area_at_threshold"] == pytest.approx(0.5)


class Counted(ChannelMaps):
    """ChannelMaps that counts its forward passes."""

    calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)


@pytest.mark.parametrize("source, own_pass", [("best student", False), ("stage-1 MIL teacher", False),
                                              ("teacher (a former student, after swaps)", True)])
def test_model_pt_reuses_the_calibration_of_the_weights_it_holds(source, own_pass, tmp_path):
    nets = {"stage1_teacher": Counted(), "student": Counted(), "teacher": Counted()}
    report = TrainingReport(**{k: None for k in ("role_swap", "test_loader", "test_display",
                                                 "stage1_history", "stage1_epoch_length", "stage2_history",
                                                 "stage2_epoch_length", "config")},
                            **nets, output_dir=tmp_path, ckpt_dir=tmp_path, device="cpu", threshold_fp_budget=0.5,
                            validation_loader=_loader([(0.6, 0)] * 2))
    out = report.operating_thresholds(source)
    assert [nets[k].calls for k in ("stage1_teacher", "student", "teacher")] == [1, 1, int(own_pass)]
    if not own_pass:
        assert out["model.pt"] is out["student" if source == "best student" else "teacher"]
