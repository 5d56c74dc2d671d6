"""Which weights the report calls the distilled model and which it ships as model.pt."""

import json
from types import SimpleNamespace

import pytest
import torch
from test_bundle_training import CONFIGS

from custom.report import distilled_model, is_student, select_final_model, subset_metrics


def _state(value: float) -> dict:
    return {"w": torch.full((1,), value)}


@pytest.mark.parametrize(
    "best_score, teacher_score, swapped, distilled, shipped",
    [
        (0.7, 0.8, False, ("best student", 0.0), ("stage-1 MIL teacher", 1.0)),  # student never beat the teacher
        (0.9, 0.8, False, ("best student", 0.0), ("best student", 0.0)),
        (0.7, 0.8, True, ("teacher (a former student, after swaps)", 1.0),
         ("teacher (a former student, after swaps)", 1.0)),
        (0.9, 0.8, True, ("best student", 0.0), ("best student", 0.0)),
        (None, 0.8, False, ("stage-1 MIL teacher", 1.0), ("stage-1 MIL teacher", 1.0)),  # no student validated
    ],
)
def test_distilled_and_shipped_models(best_score, teacher_score, swapped, distilled, shipped):
    teacher = torch.nn.Module()
    teacher.register_buffer("w", torch.ones(1))  # teacher weights are 1, the best student's 0
    role_swap = SimpleNamespace(
        best_student_state=None if best_score is None else _state(0.0),
        best_student_score=best_score,
        teacher_score=teacher_score,
        rounds=[{"epoch": 1, "swapped": swapped}],
        keep="best",
    )
    for chosen, (source, weight) in ((distilled_model(teacher, role_swap), distilled),
                                     (select_final_model(teacher, role_swap), shipped)):
        assert chosen[1] == source and chosen[0]["w"].item() == weight


@pytest.mark.parametrize(
    "best_score, shipped", [(0.79, "stage-1 MIL teacher"), (0.80, "stage-1 MIL teacher"), (0.81, "best student")]
)
def test_final_model_needs_a_higher_validation_score(best_score, shipped):
    """No tie and no near miss goes to the student."""
    teacher = torch.nn.Module()
    teacher.register_buffer("w", torch.ones(1))
    role_swap = SimpleNamespace(
        best_student_state=_state(0.0), best_student_score=best_score, teacher_score=0.80, rounds=[], keep="best"
    )
    assert select_final_model(teacher, role_swap)[1] == shipped


def test_a_kept_last_student_is_named_so_and_counts_as_the_student():
    teacher = torch.nn.Module()
    teacher.register_buffer("w", torch.ones(1))
    role_swap = SimpleNamespace(
        best_student_state=_state(0.0), best_student_score=0.9, teacher_score=0.80, rounds=[], keep="last"
    )
    weights, source, score = select_final_model(teacher, role_swap)
    assert (source, score, weights["w"].item()) == ("last student", 0.9, 0.0)
    assert distilled_model(teacher, role_swap)[1] == "last student"
    assert is_student("last student") and is_student("best student")
    assert not is_student("stage-1 MIL teacher") and not is_student("teacher (a former student, after swaps)")


def test_subset_metrics_split_negatives_by_name(caplog):
    caplog.set_level("INFO")
    # rows as image_scores makes them: label, f1, iou, hd, intersection, pred size, true size, mil score, pixels
    rows = torch.tensor([
        [1, 0.8, 0.7, 3.0, 40, 50, 50, 0.9, 100],  # GT1 positive
        [0, 0.5, 0.4, float("nan"), 0, 50, 0, 0.6, 100],  # GT2 normal negative, half predicted
        [0, 1.0, 1.0, float("nan"), 0, 0, 0, 0.1, 100],  # polyp_GT3, clean
        [0, 0.0, 0.0, float("nan"), 0, 100, 0, 0.9, 100],  # low-grade_GT4, all predicted
    ], dtype=torch.float64)
    names = ["GT1-1", "GT2-1", "polyp_GT3-1", "low-grade_GT4-1"]
    subsets = subset_metrics(rows, names, {"benign": "^(polyp|low-grade)_", "rest": ""})
    assert subsets["benign"]["n_neg"] == 2 and subsets["benign"]["n_pos"] == 0
    assert subsets["benign"]["fp_area"] == pytest.approx(0.5) and subsets["benign"]["f1_neg"] == pytest.approx(0.5)
    assert subsets["rest"]["n_pos"] == 1 and subsets["rest"]["fp_area"] == pytest.approx(0.5)
    assert subset_metrics(rows, names, {"none": "^zzz"}) == {}  # a subset without images is left out
    # the shipped pattern also finds benign names behind patch_folder_datalist's pos_/neg_ prefix, and only them
    shipped = json.loads((CONFIGS / "train.json").read_text())["test_subsets"]
    prefixed = ["pos_GT1-1", "neg_GT2-1", "neg_polyp_GT3-1", "neg_low-grade_GT4-1"]
    assert subset_metrics(rows, prefixed, shipped)["benign"]["n_neg"] == 2
    assert subset_metrics(rows, prefixed, shipped)["rest"]["n_neg"] == 1
    assert "test subsets without an image, left out: none ('^zzz')" in caplog.text
    with pytest.raises(ValueError, match="4 score rows but 3 image names"):
        subset_metrics(rows, names[:3], {"rest": ""})


def test_resolved_knobs_keep_every_top_level_plain_value_and_nothing_else():
    """What metrics.json records as "config": every knob of the run, whatever config file set it."""
    from custom.report import resolved_knobs, resolved_modules

    resolved = {
        "seed": 3, "weight_decay": 1e-4, "amp": False, "pretrained_path": None, "device": torch.device("cpu"),
        "test_subsets": {"rest": ""}, "outputs": ("prob", "mask"), "_meta_": {"version": "0.3.0"},
        "teacher": torch.nn.Linear(1, 1), "train::loss": torch.nn.BCELoss(), "train::optimizer::lr": 0.1,
        "train#datalist": ["a"], "mixed": [1, torch.nn.Linear(1, 1)],
    }
    assert resolved_knobs(resolved) == {
        "amp": False, "device": "cpu", "outputs": ["prob", "mask"], "pretrained_path": None, "seed": 3,
        "test_subsets": {"rest": ""}, "weight_decay": 1e-4,
    }
    assert resolved_modules(resolved) == {"teacher": "torch.nn.modules.linear.Linear",
                                          "train::loss": "torch.nn.modules.loss.BCELoss"}
