"""Run the bundle's training under a set of ablations and print one table of their test metrics.

Every variant is one ``python -m monai.bundle run training`` of bundle/configs/train.json with a few overrides, in a
folder of its own. Stage 1 (the MIL teacher) is trained once: its checkpoints are copied into every other variant's
folder, where ``run_stage`` finds the finished stage and goes straight to the distillation. The supervised upper
bound (gt masks, bundle/configs/supervised.json) trains its own network and is labelled as such.

    python scripts/ablate.py --dataset_dir ../shared/data/ebhi-seg --out runs/ebhi --extra "{'image_size': 224}"
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import fire

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"

# name -> (extra config files merged after train.json, overrides); the first variant trains the shared stage 1
VARIANTS: dict[str, tuple[list[str], dict]] = {
    "full": ([], {}),
    "no_wce": ([], {"use_wce": False}),
    "no_swap": ([], {"swap_policy": "off"}),
    "periodic_swap": ([], {"swap_policy": "periodic"}),
    "side_targets": ([], {"distill_target": "side", "cache_pseudo_labels": False}),
    "lambda_1": ([], {"lambda_wce": 1.0}),
    "wce_threshold_0.3": ([], {"wce_threshold": 0.3}),
    "supervised_upper_bound": (["supervised.json"], {}),
}
DEFAULT_VARIANTS = ("full", "no_wce", "no_swap", "supervised_upper_bound")
COLUMNS = ("f1", "iou", "hd", "f1_pos", "f1_neg", "iou_pos", "iou_neg", "pixel_dice", "auc")
STAGE1_FILES = ("stage1_checkpoint_epoch=*.pt", "teacher_best.pt")


def _run(variant: str, out: Path, dataset_dir: str, configs: list[str], overrides: dict) -> dict:
    """One bundle training in ``out/variant``; returns its metrics.json."""
    run_dir = out / variant
    files = [str(CONFIGS / "train.json"), *(str(CONFIGS / c) for c in configs)]
    args = {"dataset_dir": dataset_dir, "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "outputs"), **overrides}
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", json.dumps(files)]
    for key, value in args.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]  # fire reads Python literals
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "train.log", "w") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (exit {result.returncode}); see {run_dir / 'train.log'}")
    print(f"{variant}: done in {seconds:.0f} s", flush=True)
    metrics = json.loads((run_dir / "outputs" / "metrics.json").read_text())
    metrics["seconds"] = seconds
    return metrics


def _share_stage1(source: Path, target: Path) -> None:
    """Copy the finished stage-1 checkpoints so that the variant skips stage 1 and distils the same teacher."""
    (target / "models").mkdir(parents=True, exist_ok=True)
    for pattern in STAGE1_FILES:
        for path in (source / "models").glob(pattern):
            shutil.copy2(path, target / "models" / path.name)


def table(results: dict[str, dict]) -> str:
    """Rows: the shared stage-1 teacher, each variant's final model, and the baselines; columns: test metrics."""
    rows: dict[str, dict] = {}
    first = next(iter(results.values()))
    rows["MIL teacher (stage 1)"] = first["teacher"]
    for name, metrics in results.items():
        label = "supervised UPPER BOUND (gt masks)" if name == "supervised_upper_bound" else f"distilled: {name}"
        rows[label] = metrics["student"]
    for name, metrics in first.get("baselines", {}).items():
        rows[f"baseline: {name}"] = metrics
    lines = [f"{'':<36}" + "".join(f"{c:>11}" for c in COLUMNS)]
    lines += [f"{name:<36}" + "".join(f"{m[c]:>11.4f}" for c in COLUMNS) for name, m in rows.items()]
    return "\n".join(lines)


def main(
    dataset_dir: str,
    out: str,
    variants: str | tuple = DEFAULT_VARIANTS,
    configs: str | tuple = ("cpu.json",),
    extra: str | dict | None = None,
) -> None:
    """Run ``variants`` (comma-separated names of VARIANTS) on ``dataset_dir``; every run gets ``configs`` (merged
    after train.json, default the CPU-sized cpu.json) and ``extra`` overrides (a dict, e.g. "{'image_size': 224}")."""
    names = [v.strip() for v in (variants.split(",") if isinstance(variants, str) else variants)]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    base_configs = [c.strip() for c in (configs.split(",") if isinstance(configs, str) else configs)]
    extra = ast.literal_eval(extra) if isinstance(extra, str) else dict(extra or {})
    out_dir = Path(out).resolve()
    results: dict[str, dict] = {}
    stage1_source: Path | None = None
    for name in names:
        variant_configs, overrides = VARIANTS[name]
        distils = name != "supervised_upper_bound"
        if distils and stage1_source is not None:
            _share_stage1(stage1_source, out_dir / name)
        results[name] = _run(name, out_dir, str(Path(dataset_dir).resolve()), base_configs + variant_configs, {**extra, **overrides})
        if distils and stage1_source is None:
            stage1_source = out_dir / name
    text = table(results)
    (out_dir / "ablation.json").write_text(json.dumps(results, indent=2))
    (out_dir / "ablation.txt").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    fire.Fire(main)
