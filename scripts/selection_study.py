"""Which validation score, computed without pixel masks, picks the checkpoint that is best on unseen patients?

One training run keeps every epoch's weights of both stages (``keep_epoch_weights``). Each kept network is scored on
the validation split with every mask-free criterion of ``custom.metrics.selection`` (and, for reference only, with
the mask F1 where the validation positives have masks), and on the test split with the mask F1. Printed per
criterion and per pool of checkpoints (stage 1, the MIL teacher's epochs; stage 2, the students' epochs; all):
the Spearman correlation of the criterion with test F1, and the regret: the test F1 of the checkpoint the criterion
selects (its first maximum, as the bundle's savers keep) minus the best test F1 of any checkpoint in the pool.

    python scripts/selection_study.py --dataset_dir ../shared/data/ebhi-seg --out runs/study-seg

The training is skipped when ``out`` already holds the finished run (a rerun only rescores), or with ``--train False``.
"""

from __future__ import annotations

import ast
import json
import math
import re
import sys
from pathlib import Path

import fire
import torch
from monai.bundle import ConfigParser
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablate import CONFIGS, run_training  # noqa: E402  (a sibling script)

from custom.checkpoints import load_weights  # noqa: E402
from custom.errors import report_input_errors
from custom.metrics.segmentation import image_scores, summarise_scores  # noqa: E402
from custom.metrics.selection import MASK_FREE_METRICS, flip_maps, selection_rows, summarise_selection  # noqa: E402
from custom.report import evaluate_network  # noqa: E402
from custom.tables import Column, format_table  # noqa: E402

CRITERIA = (*MASK_FREE_METRICS, "mask_f1 (uses masks)")
_EPOCH_FILE = re.compile(r"^(stage1_teacher|stage2_student)_epoch=(\d+)\.pt$")


def _parser(dataset_dir: str, run_dir: Path, configs: list[str], overrides: dict) -> ConfigParser:
    """The run's own configuration, so that validation and test are the very splits the run used."""
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), *(str(CONFIGS / c) for c in configs)])
    parser.update({
        "dataset_dir": dataset_dir, "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "outputs"),
        **overrides,
    })
    return parser


def score_validation(
    network: torch.nn.Module, loader, device, smooth_sigma: float, threshold: float
) -> dict[str, float]:
    """Every criterion of one network on the validation loader, plus the mask F1 where all positives have masks."""
    rows, mask_rows, all_masked = [], [], True
    network.eval()
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device)
            maps = network(images)[:, -1]
            rows.append(selection_rows(maps, batch["label"], flip_maps(network, images), smooth_sigma, threshold))
            all_masked &= bool(torch.as_tensor(batch["has_mask"]).all())
            mask_rows += [image_scores(m, t[0], smooth_sigma, threshold) for m, t in zip(maps.cpu(), batch["mask"])]
    scores = summarise_selection(torch.cat(rows), threshold)
    scores["mask_f1 (uses masks)"] = summarise_scores(torch.stack(mask_rows))["f1"] if all_masked else math.nan
    return scores


def _first_best(values: list[float]) -> int:
    """Index of the first maximum, NaN never chosen; the savers keep the first of equal scores."""
    best = max(range(len(values)), key=lambda i: (-math.inf if math.isnan(values[i]) else values[i], -i))
    return best


def study_table(records: list[dict]) -> tuple[str, list[dict]]:
    """Spearman and regret per criterion and pool of checkpoints, as text and as rows."""
    pools = {
        "stage 1": [r for r in records if r["stage"] == "stage1_teacher"],
        "stage 2": [r for r in records if r["stage"] == "stage2_student"],
        "all": records,
    }
    rows = []
    for criterion in CRITERIA:
        for pool, members in pools.items():
            if len(members) < 2:
                continue
            values = [m["val"][criterion] for m in members]
            test = [m["test"]["f1"] for m in members]
            finite = [i for i, v in enumerate(values) if not math.isnan(v)]
            rho = (spearmanr([values[i] for i in finite], [test[i] for i in finite]).statistic
                   if len(finite) > 2 else math.nan)
            pick = _first_best(values)
            rows.append({
                "criterion": criterion, "pool": pool, "n": len(members), "spearman": float(rho),
                "regret": test[pick] - max(test), "picked": f"{members[pick]['stage']} epoch {members[pick]['epoch']}",
                "picked_test_f1": test[pick],
            })
    columns = [Column("criterion", 22, "<"), Column("pool", 9, "<"), Column("n", 4), Column("spearman", 10, ">", ".3f"),
               Column("regret", 9, ">", ".4f"), Column("  picked (test F1)", align="<")]
    cells = [[r["criterion"], r["pool"], r["n"], r["spearman"], r["regret"],
              f"  {r['picked']} ({r['picked_test_f1']:.4f})"]
             for r in rows]
    return format_table(columns, cells, strip=True), rows


def main(
    dataset_dir: str,
    out: str,
    configs: str | tuple = ("cpu_train.json",),
    extra: str | dict | None = None,
    train: bool = True,
) -> None:
    """Train once with every epoch's weights kept (unless ``out`` holds the finished run), score, print the table.

    ``--train False`` scores the weights already kept (e.g. stage 1 only, of a run stopped in stage 2)."""
    out_dir = Path(out).resolve()
    base_configs = [c.strip() for c in (configs.split(",") if isinstance(configs, str) else configs)]
    extra = ast.literal_eval(extra) if isinstance(extra, str) else dict(extra or {})
    overrides = {**extra, "keep_epoch_weights": True}
    dataset_dir = str(Path(dataset_dir).resolve())
    if train and not (out_dir / "outputs" / "metrics.json").is_file():
        run_training(out_dir, dataset_dir, base_configs, overrides)
    parser = _parser(dataset_dir, out_dir, base_configs, overrides)
    device = parser.get_parsed_content("device")
    smooth_sigma, threshold = parser.get_parsed_content("smooth_sigma"), parser.get_parsed_content("threshold")
    val_loader = parser.get_parsed_content("validate#dataloader")
    test_loader = parser.get_parsed_content("test#dataloader")
    network = parser.get_parsed_content("network_def", instantiate=True).to(device)
    found = [(m.group(1), int(m.group(2)), p) for p in (out_dir / "models" / "epoch_weights").glob("*.pt")
             if (m := _EPOCH_FILE.match(p.name))]
    records = []
    for index, (stage, epoch, path) in enumerate(sorted(found)):
        load_weights(network, path)
        record = {
            "stage": stage, "epoch": epoch,
            "val": score_validation(network, val_loader, device, smooth_sigma, threshold),
            "test": evaluate_network(network, test_loader, device, smooth_sigma=smooth_sigma, threshold=threshold),
        }
        records.append(record)
        print(f"[{index + 1}/{len(found)}] {stage} epoch {epoch}: test f1 {record['test']['f1']:.4f}, "
              + ", ".join(f"{c} {record['val'][c]:.4f}" for c in CRITERIA), flush=True)
    text, rows = study_table(records)
    (out_dir / "selection_study.json").write_text(
        json.dumps({"records": records, "table": rows}, indent=2, default=float)
    )
    (out_dir / "selection_study.txt").write_text(text + "\n")
    print(text)
    print(f"Written: {out_dir / 'selection_study.txt'}, {out_dir / 'selection_study.json'}")


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
