"""scripts/selection_study.py: Spearman and regret of each criterion against hand-made checkpoint records."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from selection_study import CRITERIA, study_table  # noqa: E402


def _record(stage: str, epoch: int, test_f1: float, auc: float) -> dict:
    val = {c: math.nan for c in CRITERIA}
    val["auc"] = auc
    return {"stage": stage, "epoch": epoch, "val": val, "test": {"f1": test_f1}}


def test_spearman_and_regret_by_hand():
    records = [
        _record("stage1_teacher", 1, 0.50, 0.70),
        _record("stage1_teacher", 2, 0.60, 0.90),  # auc picks this one (first maximum)
        _record("stage1_teacher", 3, 0.70, 0.90),  # the best on test
        _record("stage2_student", 1, 0.65, 0.80),
        _record("stage2_student", 2, 0.55, 0.85),
    ]
    _, rows = study_table(records)
    by = {(r["criterion"], r["pool"]): r for r in rows}
    stage1 = by[("auc", "stage 1")]
    assert stage1["regret"] == pytest.approx(0.60 - 0.70) and stage1["picked"] == "stage1_teacher epoch 2"
    # ranks of auc (1, 2.5, 2.5) against test (1, 2, 3): Pearson of the ranks = 0.8660
    assert stage1["spearman"] == pytest.approx(math.sqrt(3) / 2)
    assert by[("auc", "stage 2")]["regret"] == pytest.approx(0.55 - 0.65)
    assert by[("auc", "all")]["regret"] == pytest.approx(0.60 - 0.70) and by[("auc", "all")]["n"] == 5
    assert math.isnan(by[("balanced_accuracy", "stage 1")]["spearman"])  # never computed: NaN, not a number
