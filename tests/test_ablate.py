"""scripts/ablate.py's table: mean and spread per row, paired student - teacher, and which model was shipped."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import ablate  # noqa: E402

FLOORS = {"oracle_label": {"f1": 0.73}, "all_background": {"f1": 0.5}}


def _model(f1: float) -> dict:
    return {"f1": f1, "f1_pos": f1 - 0.1, "f1_neg": f1 + 0.1, "fp_area": 1 - f1}


def _run(teacher: float, student: float, source: str, operating: bool = False) -> dict:
    return {"teacher": _model(teacher), "student": _model(student), "subsets": {}, "baselines": FLOORS,
            "final_model": {"source": source}, "operating_thresholds": {"teacher": {}} if operating else {}}


RESULTS = {
    111: {"full": _run(0.60, 0.50, "stage-1 MIL teacher"), "operating_2pct": _run(0.70, 0.74, "best student", True)},
    112: {"full": _run(0.64, 0.70, "stage-1 MIL teacher"), "operating_2pct": _run(0.72, 0.70, "stage-1 MIL teacher",
                                                                                   True)},
}


def test_rows_hold_each_seed_and_a_calibrated_variant_gets_its_own_teacher_and_model_rows():
    rows = ablate.rows_per_seed(RESULTS)
    assert [m["f1"] for m in rows["MIL teacher (stage 1)"]] == [0.60, 0.64]
    assert [m["f1"] for m in rows["MIL teacher: operating_2pct"]] == [0.70, 0.72]
    assert [m["f1"] for m in rows["shipped model.pt (operating_2pct)"]] == [0.74, 0.72]
    assert [m["f1"] for m in rows["shipped model.pt (full)"]] == [0.60, 0.64]
    assert "MIL teacher: full" not in rows


def test_table_gives_mean_std_the_paired_differences_and_the_shipped_model_count():
    text = ablate.table(RESULTS)
    # paired full: 0.50 - 0.60 = -0.10 and 0.70 - 0.64 = +0.06: mean -0.02, sample std 0.1131
    assert "full                f1 -0.0200+-0.1131" in text
    assert "model.pt (full) was the better of teacher and student on test F1 in 1 of 2 seed(s)" in text
    assert "model.pt (operating_2pct) was the better of teacher and student on test F1 in 2 of 2 seed(s)" in text
    assert "0.6200+-0.0283" in text  # the shared teacher over the two seeds
