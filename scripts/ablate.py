"""Run the bundle's training under a set of ablations, over several seeds, and print one table of test metrics.

Every variant is one ``python -m monai.bundle run training`` of bundle/configs/train.json with a few overrides, in a
folder of its own (``out/seed{S}/{variant}``). Per seed, stage 1 (the MIL teacher) is trained once: its checkpoints
are copied into every other variant's folder, where ``run_stage`` finds the finished stage and goes straight to the
distillation. The supervised upper bound (gt masks, bundle/configs/supervised.json) trains its own network and is
labelled as such; so do the mixed-supervision variants (``masks_5pct``, ``masks_20pct``, ``masks_all``: that share of
the training positives' masks used as strong labels, ``strong_fraction``, drawn at their natural share of an epoch;
``masks_5pct_share25`` and ``_share50`` draw them at that share, ``strong_share``), whose teacher and model.pt get
rows.
Each cell is the mean and standard deviation over seeds; the paired rows give the distilled student minus its own
seed's teacher.

    python scripts/ablate.py --dataset_dir ../shared/data/ebhi-seg --out runs/ebhi --seeds 3
"""
from __future__ import annotations

import ast
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire
import numpy as np

from custom.errors import report_input_errors
from custom.tables import Column, format_table

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"

# name -> (extra config files merged after train.json, overrides); the first variant trains the shared stage 1
VARIANTS: dict[str, tuple[list[str], dict]] = {
    "full": ([], {}),
    "snapshots_1": ([], {"teacher_snapshots": 1}),
    "checkpoint_best": ([], {"checkpoint_policy": "best", "teacher_snapshots": 1}),
    "selection_auc": ([], {"selection_metric": "auc"}),
    "masks_5pct_share25_auc": ([], {"strong_fraction": 0.05, "strong_share": 0.25, "selection_metric": "auc"}),
    "no_wce": ([], {"use_wce": False}),
    "no_swap": ([], {"swap_policy": "off"}),
    "periodic_swap": ([], {"swap_policy": "periodic"}),
    "side_targets": ([], {"distill_target": "side", "cache_pseudo_labels": False}),
    "lambda_1": ([], {"lambda_wce": 1.0}),
    "mil_term": ([], {"lambda_mil": 1.0}),
    "student_from_teacher": ([], {"student_init": "teacher"}),
    "wce_threshold_0.3": ([], {"wce_threshold": 0.3}),
    "wce_threshold_0.7": ([], {"wce_threshold": 0.7}),
    "calibrated_2pct": ([], {"pseudo_fp_budget": 0.02}),
    "calibrated_5pct": ([], {"pseudo_fp_budget": 0.05}),
    "stage2_48": ([], {"stage2_epochs": 48}),
    "stage2_48_calibrated_2pct": ([], {"stage2_epochs": 48, "pseudo_fp_budget": 0.02}),
    "stage2_48_operating_2pct": ([], {"stage2_epochs": 48, "threshold_fp_budget": 0.02}),
    "operating_2pct": ([], {"threshold_fp_budget": 0.02}),
    "calibrated_2pct_operating_2pct": ([], {"pseudo_fp_budget": 0.02, "threshold_fp_budget": 0.02}),
    "stain_jitter": ([], {"distill_stain_jitter": True}),
    "stain_jitter_calibrated_2pct": ([], {"distill_stain_jitter": True, "pseudo_fp_budget": 0.02}),
    "supervised_upper_bound": (["supervised.json"], {}),
    "masks_5pct": ([], {"strong_fraction": 0.05, "strong_share": 0.0}),
    "masks_20pct": ([], {"strong_fraction": 0.2, "strong_share": 0.0}),
    "masks_all": ([], {"strong_fraction": 1.0}),
    "masks_5pct_w5": ([], {"strong_fraction": 0.05, "strong_weight": 5.0, "strong_share": 0.0}),
    "masks_5pct_w20": ([], {"strong_fraction": 0.05, "strong_weight": 20.0, "strong_share": 0.0}),
    "masks_5pct_share25": ([], {"strong_fraction": 0.05, "strong_share": 0.25}),
    "masks_5pct_share50": ([], {"strong_fraction": 0.05, "strong_share": 0.5}),
}
DEFAULT_VARIANTS = ("full", "no_wce", "no_swap", "supervised_upper_bound")
COLUMNS = ("f1", "f1_pos", "f1_neg", "iou", "hd", "pixel_dice", "auc", "fp_area")
PAIRED = ("f1", "f1_pos", "f1_neg", "fp_area")
SUPERVISED = "supervised_upper_bound"
# variants whose stage 1 differs from the shared one (mixed supervision changes the teacher's loss): they train their
# own, and the table gives their teacher and shipped model.pt beside their student
OWN_STAGE1 = frozenset({SUPERVISED} | {name for name, (_, over) in VARIANTS.items() if "strong_fraction" in over})
STAGE1_FILES = (
    "stage1_checkpoint_epoch=*.pt", "teacher_best.pt", "teacher_last_checkpoint_epoch=*.pt",
    "stage1_snapshot_epoch=*.pt",
)


def run_training(run_dir: Path, dataset_dir: str, configs: list[str], overrides: dict) -> dict:
    """One bundle training in ``run_dir`` (resumed if it was interrupted); returns its metrics.json."""
    files = [str(CONFIGS / "train.json"), *(str(CONFIGS / c) for c in configs)]
    args = {"dataset_dir": dataset_dir, "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "outputs"),
            **overrides}
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(files)]
    for key, value in args.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]  # fire reads Python literals
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "a") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{run_dir} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
    print(f"{run_dir}: done in {seconds:.0f} s", flush=True)
    metrics = json.loads((run_dir / "outputs" / "metrics.json").read_text())
    metrics["seconds"] = seconds
    return metrics


def _share_stage1(source: Path, target: Path) -> None:
    """Copy the finished stage-1 checkpoints so that the variant skips stage 1 and distils the same teacher."""
    (target / "models").mkdir(parents=True, exist_ok=True)
    for pattern in STAGE1_FILES:
        for path in (source / "models").glob(pattern):
            shutil.copy2(path, target / "models" / path.name)


def shipped_metrics(metrics: dict) -> dict:
    """Test metrics of the shipped model.pt: the stage-1 teacher's, or the distilled model's (student or former one)."""
    return metrics["teacher"] if metrics["final_model"]["source"] == "stage-1 MIL teacher" else metrics["student"]


def _with_subsets(metrics: dict, subsets: dict) -> dict:
    """A model's test metrics plus ``fp_area`` / ``f1_neg`` of each test subset (e.g. benign lesions) as columns."""
    flat = dict(metrics)
    for subset, values in subsets.items():
        flat[f"fp_area[{subset}]"] = values.get("fp_area", math.nan)
        flat[f"f1_neg[{subset}]"] = values.get("f1_neg", math.nan)
    return flat


def _cell(values: list[float]) -> str:
    """mean +- standard deviation over seeds (sample std; no spread with one seed)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "nan"
    return f"{np.mean(values):.4f}" + (f"+-{np.std(values, ddof=1):.4f}" if len(values) > 1 else "")


def rows_per_seed(results: dict[int, dict[str, dict]]) -> dict[str, list[dict]]:
    """Row name -> one metrics dict per seed: teacher, each variant's student, model.pt of "full", bound, floors."""
    rows: dict[str, list[dict]] = {}
    for per_variant in results.values():
        distilled = {n: m for n, m in per_variant.items() if n not in OWN_STAGE1}
        first = next(iter(distilled.values()), None) or next(iter(per_variant.values()))
        if distilled:
            rows.setdefault("MIL teacher (stage 1)", []).append(
                _with_subsets(first["teacher"], first["subsets"].get("teacher", {}))
            )
        for name, metrics in per_variant.items():
            calibrated = bool(metrics.get("operating_thresholds"))  # its teacher is scored at its own threshold
            if (name in OWN_STAGE1 and name != SUPERVISED) or calibrated:
                rows.setdefault(f"MIL teacher: {name}", []).append(
                    _with_subsets(metrics["teacher"], metrics["subsets"].get("teacher", {}))
                )
            label = "supervised UPPER BOUND (gt masks)" if name == SUPERVISED else f"distilled: {name}"
            rows.setdefault(label, []).append(_with_subsets(metrics["student"], metrics["subsets"].get("student", {})))
            if name == "full" or calibrated or (name in OWN_STAGE1 and name != SUPERVISED):
                source = "teacher" if metrics["final_model"]["source"] == "stage-1 MIL teacher" else "student"
                rows.setdefault(f"shipped model.pt ({name})", []).append(
                    _with_subsets(shipped_metrics(metrics), metrics["subsets"].get(source, {}))
                )
        for name, metrics in first.get("baselines", {}).items():
            rows.setdefault(f"baseline: {name}", []).append(metrics)
    return rows


def table(results: dict[int, dict[str, dict]]) -> str:
    """Mean +- std over seeds per row; then the paired student - teacher differences, and how often model.pt was
    the better of the two on test."""
    rows = rows_per_seed(results)
    extra = sorted({k for per_seed in rows.values() for m in per_seed for k in m
                    if k.startswith(("fp_area[", "f1_neg["))})
    if len({k.split("[")[1] for k in extra}) < 2:  # one subset repeats the whole test split
        extra = []
    columns = [*COLUMNS, *extra]
    width = max(17, *(len(c) + 2 for c in columns))
    cells = [[name, *(_cell([m.get(c, math.nan) for m in per_seed]) for c in columns)]
             for name, per_seed in rows.items()]
    lines = [f"{len(results)} seed(s): {sorted(results)}",
             format_table([Column("", 36, "<"), *(Column(c, width) for c in columns)], cells)]
    lines.append("")
    lines.append("paired over seeds: distilled student minus its own seed's stage-1 teacher")
    paired = sorted({n for per_variant in results.values() for n in per_variant if n != SUPERVISED})
    name_width = max([20, *(len(n) + 2 for n in paired)])
    for variant in paired:
        diffs = {c: [m[variant]["student"][c] - m[variant]["teacher"][c] for m in results.values() if variant in m]
                 for c in PAIRED}
        lines.append(f"  {variant:<{name_width}}" + "  ".join(f"{c} {_cell(v)}" for c, v in diffs.items()))
    shipping = sorted({n for per_variant in results.values() for n, m in per_variant.items()
                       if n == "full" or m.get("operating_thresholds")})
    for variant in shipping:
        runs = [m[variant] for m in results.values() if variant in m]
        better = sum(shipped_metrics(m)["f1"] >= max(m["teacher"]["f1"], m["student"]["f1"]) for m in runs)
        lines.append(
            f"model.pt ({variant}) was the better of teacher and student on test F1 in {better} of {len(runs)} seed(s)"
        )
    return "\n".join(lines)


def main(
    dataset_dir: str,
    out: str,
    variants: str | tuple = DEFAULT_VARIANTS,
    configs: str | tuple = ("cpu_train.json",),
    extra: str | dict | None = None,
    seeds: int = 1,
    first_seed: int = 111,
) -> None:
    """Run ``variants`` (comma-separated names of VARIANTS) on ``dataset_dir`` with ``seeds`` seeds (``first_seed``,
    ``first_seed + 1``, ...); every run gets ``configs`` (merged after train.json, default the CPU-sized cpu_train.json)
    and ``extra`` overrides (a dict, e.g. "{'image_size': 224}"). Finished runs are read back, not rerun."""
    names = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants)]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    base_configs = [c.strip() for c in (configs.split(",") if isinstance(configs, str) else configs)]
    extra = ast.literal_eval(extra) if isinstance(extra, str) else dict(extra or {})
    out_dir = Path(out).resolve()
    dataset = str(Path(dataset_dir).resolve())
    results: dict[int, dict[str, dict]] = {}
    for seed in range(first_seed, first_seed + seeds):
        results[seed] = {}
        stage1_source: Path | None = None
        for name in names:
            variant_configs, overrides = VARIANTS[name]
            run_dir = out_dir / f"seed{seed}" / name
            shares = name not in OWN_STAGE1
            if shares and stage1_source is not None:
                _share_stage1(stage1_source, run_dir)
            metrics_path = run_dir / "outputs" / "metrics.json"
            if metrics_path.is_file():
                results[seed][name] = json.loads(metrics_path.read_text())
            else:
                settings = {**extra, **overrides, "seed": seed}
                results[seed][name] = run_training(run_dir, dataset, base_configs + variant_configs, settings)
            if shares and stage1_source is None:
                stage1_source = run_dir
    text = table(results)
    (out_dir / "ablation.json").write_text(json.dumps(results, indent=2))
    (out_dir / "ablation.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
