# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The slide-label benchmark table: one row per inferred model, from the ``slide_metrics.json`` that
``inference.json + evaluate_slides.json`` wrote, beside the floor "all tissue of positive slides is tumour".

    python scripts/slide_benchmark.py --datalist DATA/test_slides.csv \\
        --runs "slide-bag MIL teacher=runs/infer_bag_teacher,distilled student=runs/infer_bag_model"

Columns: mean Dice over positive slides, the false-positive area on negative slides (mean predicted tumour fraction
of their tissue), slide AUC and the Camelyon16 FROC. The floor knows each slide's label; its Dice is measured on the
tissue mask's grid (``tissue_mpp``).
"""

from __future__ import annotations

import json
from pathlib import Path

import fire

from custom.errors import report_input_errors
from custom.metrics.slide import all_tissue_floor
from custom.tables import Column, format_table

COLUMNS = [Column("row", align="<"), Column("Dice (pos)", float_format=".3f"),
           Column("FP area (neg)", float_format=".4f"), Column("slide AUC", float_format=".3f"),
           Column("FROC", float_format=".3f"), Column("slides", align=">")]
KEYS = ("dice_pos", "fp_area_neg", "auc", "froc", "n_slides")


def _runs(runs: str | dict) -> dict[str, Path]:
    """``name=folder,name=folder`` (or a dict) as an ordered mapping."""
    if isinstance(runs, dict):
        return {str(k): Path(v) for k, v in runs.items()}
    pairs = [part.split("=", 1) for part in str(runs).split(",") if part.strip()]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"error: --runs takes name=folder pairs separated by commas, got {runs!r}")
    return {name.strip(): Path(folder.strip()) for name, folder in pairs}


def benchmark_rows(datalist: str, runs: str | dict, tissue_mpp: float = 8.0) -> dict[str, dict]:
    """Row name -> the totals of its ``slide_metrics.json``; the floor last."""
    rows = {}
    for name, folder in _runs(runs).items():
        path = folder / "slide_metrics.json"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found; run inference.json + evaluate_slides.json into {folder}")
        rows[name] = json.loads(path.read_text())
    rows["floor: all tissue of positive slides is tumour (knows the label)"] = all_tissue_floor(datalist, tissue_mpp)
    return rows


def main(datalist: str, runs: str | dict, tissue_mpp: float = 8.0, markdown: bool = False) -> None:
    """Print the table, plain text or markdown (``--markdown``)."""
    rows = benchmark_rows(datalist, runs, tissue_mpp)
    table = [[name, *(report.get(k) for k in KEYS)] for name, report in rows.items()]
    if markdown:
        print("| " + " | ".join(c.title for c in COLUMNS) + " |")
        print("|" + " --- |" * len(COLUMNS))
        for row in table:
            print("| " + " | ".join("-" if v is None else format(v, c.float_format if isinstance(v, float) else "")
                                    for v, c in zip(row, COLUMNS)) + " |")
    else:
        print(format_table(COLUMNS, table, sep="  "))


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
