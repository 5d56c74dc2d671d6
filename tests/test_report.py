"""Which weights the report calls the distilled model and which it ships as model.pt."""

from types import SimpleNamespace

import pytest
import torch

from custom.report import distilled_model, select_final_model


def _state(value: float) -> dict:
    return {"w": torch.full((1,), value)}


@pytest.mark.parametrize(
    "best_score, teacher_score, swapped, distilled, shipped",
    [
        (0.7, 0.8, False, ("best student", 0.0), ("stage-1 MIL teacher", 1.0)),  # student never beat the teacher
        (0.9, 0.8, False, ("best student", 0.0), ("best student", 0.0)),
        (0.7, 0.8, True, ("teacher (a former student, after swaps)", 1.0), ("teacher (a former student, after swaps)", 1.0)),
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
    )
    for chosen, (source, weight) in ((distilled_model(teacher, role_swap), distilled), (select_final_model(teacher, role_swap), shipped)):
        assert chosen[1] == source and chosen[0]["w"].item() == weight
