"""The bundle's one-command training, evaluation and resume, run as a user runs them (``python -m monai.bundle``)."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from custom.data.synthetic import SyntheticSpec, generate_dataset
from custom.metrics import METRIC_KEYS
from custom.networks import DWSMIL

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
# a CPU-tiny run: 64-px crops, 1/8-width network, 2 + 2 epochs, a role-swap decision at every stage-2 epoch
TINY = {
    "network_width": 0.125,
    "image_size": 64,
    "batch_size": 8,
    "num_workers": 0,
    "stage1_epochs": 2,
    "stage2_epochs": 2,
    "swap_warmup": 1,
    "swap_interval": 1,
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """Four 1024-px synthetic slides cut into 64-px crops (12 train and 16 test images)."""
    out = tmp_path_factory.mktemp("data") / "tiny"
    generate_dataset(out, SyntheticSpec(n_slides=4, size=1024, patches_per_slide=8, patch_size=64, test_fraction=0.5))
    return out


def bundle_command(
    run_dir: Path, data: Path, configs=("train.json", "cpu_train.json"), run_id: str = "training", **overrides
) -> list[str]:
    """The README's training command with the tiny overrides and this run's folders."""
    files = json.dumps([str(CONFIGS / c) for c in configs])
    args = {**TINY, "dataset_dir": str(data), "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "out"),
            **overrides}
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", files]
    for key, value in args.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return command


def run_bundle(run_dir: Path, data: Path, **kwargs) -> str:
    """Run to completion; fail the test with the log's tail otherwise."""
    result = subprocess.run(
        bundle_command(run_dir, data, **kwargs), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def test_one_command_training_writes_every_output(tiny_data, tmp_path):
    log = run_bundle(tmp_path, tiny_data)
    out, models = tmp_path / "out", tmp_path / "models"
    # the final model loads into the configured network and gives maps in [0, 1]; it records that network
    net = DWSMIL(width=TINY["network_width"])
    saved = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(saved["network"])
    assert saved["record"]["network_def"] == net.definition and saved["record"]["image_size"] == TINY["image_size"]
    with torch.no_grad():
        maps = net.eval()(torch.rand(1, 3, 64, 64))
    assert maps.shape == (1, 4, 64, 64) and 0.0 <= maps.min() and maps.max() <= 1.0
    assert (models / "teacher_best.pt").is_file()
    # the last two epochs of each stage are kept: a run killed while writing one resumes from the other
    assert sorted(p.name for p in models.glob("stage*_checkpoint_epoch=*.pt")) == [
        f"stage{s}_checkpoint_epoch={e}.pt" for s in (1, 2) for e in (1, 2)]
    # the teacher's last stage-1 epochs (teacher_snapshots 3; the tiny run has 2) wrote the first pseudo-labels
    assert sorted(p.name for p in models.glob("stage1_snapshot_epoch=*.pt")) == [
        "stage1_snapshot_epoch=1.pt", "stage1_snapshot_epoch=2.pt"]
    assert "3 stage-1 snapshots asked (teacher_snapshots), 2 found" in log
    # checkpoint_policy "last": the stage-1 teacher is the final epoch's, recorded; teacher_best.pt is kept too
    last = torch.load(models / "teacher_last_checkpoint_epoch=2.pt", map_location="cpu", weights_only=True)
    assert last["record"]["training"]["source"] == "stage-1 MIL teacher (final epoch)"
    assert sorted(p.name for p in models.glob("teacher_last_*.pt")) == ["teacher_last_checkpoint_epoch=2.pt"]
    assert "if_better, val_area_contrast, margin 0.01): teacher" in log and "last student" in log  # checkpoint_policy
    # metrics.json: test fields of the stage-1 teacher and the final model, the rounds, the config
    report = json.loads((out / "metrics.json").read_text())
    for model in ("teacher", "student"):
        assert set(report[model]) == set(METRIC_KEYS)
        assert report[model]["n_pos"] == 6 and report[model]["n_neg"] == 10
        assert 0.0 <= report[model]["f1"] <= 1.0
    assert [r["epoch"] for r in report["rounds"]] == [1, 2]
    assert report["pseudo_label_sources"][0] == {"round": 0, "maps": "mean of the stage-1 teacher's epochs [1, 2]"}
    assert all(set(r) == {"epoch", "metric", "teacher_score", "student_score", "swapped"} for r in report["rounds"])
    assert (all(r["metric"] == "val_area_contrast" for r in report["rounds"])
            and report["selection"]["metric"] == "val_area_contrast")
    assert report["config"]["network_width"] == TINY["network_width"] and report["config"]["swap_policy"] == "if_better"
    # the whole resolved configuration: every knob the run read, whichever file or override set it, and the
    # networks and losses (mpp too: the checkpoints record it, as the resolution the model is trained at)
    assert {"weight_decay", "val_fraction", "resize_mode", "distill_augment", "amp",
            "dataset_dir"} <= set(report["config"])
    assert report["config"]["mpp"] == 1.0
    assert report["config"]["learning_rate"] == 0.001 and report["config"]["amp"] is False
    assert report["modules"]["train::loss"] == "custom.losses.mixed.MixedSupervisionLoss"
    assert report["modules"]["network_def"] == "custom.networks.dws_mil.DWSMIL"
    assert (report["baselines"]["oracle_label"]["f1_neg"] == 1.0
            and report["baselines"]["all_background"]["f1_pos"] == 0.0)
    # pseudo-labels: NIfTI and PNG per training image, listed in the manifest
    pseudo = out / "pseudo_labels"
    manifest = (pseudo / "manifest.csv").read_text().splitlines()
    assert len(manifest) - 1 == len(list(pseudo.glob("*.nii.gz"))) == len(list(pseudo.glob("*.png"))) > 0
    first = manifest[1].split(",")[0]
    prob = nib.load(pseudo / f"{first}.nii.gz").get_fdata()
    png = np.asarray(Image.open(pseudo / f"{first}.png"))
    assert prob.shape == png.shape == (64, 64)
    np.testing.assert_allclose(png, np.round(prob * 255), atol=1)
    # pictures and TensorBoard logs
    for picture in ("training_curves.png", "overlays.png"):
        with Image.open(out / picture) as image:
            assert image.size[0] > 300 and image.size[1] > 200
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert "MIL teacher (stage 1)" in log and "baseline: oracle_label" in log


def newest_checkpoint(models: Path, prefix: str) -> tuple[int, dict] | None:
    """(epoch, content) of the newest ``prefix`` epoch checkpoint that loads, as ``run_stage`` will pick it."""
    paths = sorted(models.glob(f"{prefix}_checkpoint_epoch=*.pt"), key=lambda p: int(p.stem.split("=")[1]),
                   reverse=True)
    for path in paths:
        try:
            return int(path.stem.split("=")[1]), torch.load(path, weights_only=False)
        except Exception:  # still being written when the run was killed
            continue
    return None


def kill_after_checkpoint(command: list[str], models: Path, prefix: str, max_epochs: int) -> tuple[int, dict]:
    """Start a training, SIGKILL it (with its workers) as soon as a ``prefix`` epoch checkpoint is complete, and
    return the newest complete one left behind, which must come before the last epoch."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 400
    while newest_checkpoint(models, prefix) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    saved = newest_checkpoint(models, prefix)
    assert saved is not None, f"the run wrote no complete {prefix} checkpoint before it ended"
    assert saved[0] < max_epochs, f"the run reached epoch {saved[0]} of {max_epochs} before it could be killed"
    return saved


def test_killed_stage1_resumes_to_the_same_weights(tiny_data, tmp_path):
    """Stage 1 killed after an epoch and rerun ends with the weights of an uninterrupted run (same seed, same
    config)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_bundle(straight, tiny_data, stage1_epochs=5, stage2_epochs=0)
    epoch, _ = kill_after_checkpoint(
        bundle_command(resumed, tiny_data, stage1_epochs=5, stage2_epochs=0), resumed / "models", "stage1", 5
    )
    log = run_bundle(resumed, tiny_data, stage1_epochs=5, stage2_epochs=0)
    assert "stage1: resumed from" in log and f"at epoch {epoch} of 5" in log
    a = torch.load(straight / "models" / "stage1_checkpoint_epoch=5.pt", weights_only=False)
    b = torch.load(resumed / "models" / "stage1_checkpoint_epoch=5.pt", weights_only=False)
    assert a["trainer"]["iteration"] == b["trainer"]["iteration"] > 0
    for key, value in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][key], value, msg=f"teacher weight {key} differs after resume")


def test_killed_stage2_resumes_with_same_teacher_and_schedule(tiny_data, tmp_path):
    """SIGKILL during stage 2; the rerun restores teacher, rounds and pseudo-label round, and finishes the schedule."""
    command = bundle_command(tmp_path, tiny_data, stage2_epochs=6, swap_policy="periodic")
    epoch, saved = kill_after_checkpoint(command, tmp_path / "models", "stage2", 6)
    assert [r["epoch"] for r in saved["role_swap"]["rounds"]] == list(range(1, epoch + 1))
    assert saved["pseudo_labels"]["round"] == epoch  # one regeneration per (periodic) swap
    assert not (tmp_path / "out" / "metrics.json").exists()

    log = run_bundle(tmp_path, tiny_data, stage2_epochs=6, swap_policy="periodic")
    assert "stage1: already complete" in log and "stage2: resumed from" in log and f"at epoch {epoch} of 6" in log
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    rounds = report["rounds"]
    assert [r["epoch"] for r in rounds] == [1, 2, 3, 4, 5, 6] and all(r["swapped"] for r in rounds)
    assert rounds[:epoch] == saved["role_swap"]["rounds"]
    final = torch.load(tmp_path / "models" / "stage2_checkpoint_epoch=6.pt", weights_only=False)
    assert (final["pseudo_labels"]["round"] == 6
            and final["trainer"]["iteration"] == 6 * final["trainer"]["epoch_length"])


def test_evaluate_config_writes_eval_metrics(tiny_data, tmp_path):
    run_bundle(tmp_path, tiny_data, stage1_epochs=1, stage2_epochs=0)
    log = run_bundle(
        tmp_path, tiny_data, configs=("train.json", "cpu_train.json", "evaluate.json"), run_id="run",
        ckpt_path=str(tmp_path / "models" / "teacher_best.pt"), output_dir=str(tmp_path / "eval"),
    )
    metrics = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert set(metrics) == {*METRIC_KEYS, "subsets"} and metrics["n_pos"] == 6 and metrics["n_neg"] == 10
    assert list(metrics["subsets"]) == ["rest"] and metrics["subsets"]["rest"]["f1"] == pytest.approx(metrics["f1"])
    baselines = json.loads((tmp_path / "eval" / "eval_baselines.json").read_text())
    assert baselines["all_background"]["f1"] == pytest.approx(10 / 16)  # F1 1 on the 10 negatives, 0 on 6 positives
    assert "baseline: oracle_label" in log


@pytest.fixture(scope="module")
def slide_data(tmp_path_factory) -> Path:
    """Six 1024-px synthetic slides in slides.csv: four to train (two positive), two to test."""
    data = tmp_path_factory.mktemp("slides") / "slides"
    generate_dataset(data, SyntheticSpec(n_slides=6, size=1024, patches_per_slide=1, patch_size=64, test_fraction=0.34))
    return data


SLIDE_BAGS = ("train.json", "cpu_train.json", "slides.json", "slide_mil.json")
TINY_BAGS = {"mpp": 1.0, "val_fraction": 0.3, "tiles_per_bag": 8, "tile_batch": 4}


def test_training_on_tiles_of_a_slide_datalist(slide_data, tmp_path):
    """slides.json: stage 1 and 2 on tiles of slides.csv (split column), scored against the mask TIFFs."""
    run_bundle(
        tmp_path / "run", slide_data, configs=("train.json", "cpu_train.json", "slides.json"),
        stage1_epochs=1, stage2_epochs=1, mpp=1.0, val_fraction=0.3,
    )
    report = json.loads((tmp_path / "run" / "out" / "metrics.json").read_text())
    assert report["config"]["mpp"] == 1.0 and report["config"]["min_tissue"] == 0.5  # slides.json's knobs recorded too
    grids = sorted(p.name for p in (tmp_path / "run" / "out" / "tile_grids").glob("*.csv"))
    assert grids == [f"slide_00{i}_level1_tile64_overlap0.csv" for i in range(6)]  # 1.0 um/px = level 1
    n_test = report["student"]["n_pos"] + report["student"]["n_neg"]
    csv_rows = sum(
        len((tmp_path / "run" / "out" / "tile_grids" / f"slide_00{i}_level1_tile64_overlap0.csv")
            .read_text().splitlines()) - 2
        for i in (4, 5)
    )
    assert n_test == csv_rows > 0 and report["student"]["n_pos"] > 0  # every tissue tile of the two test slides


def _validation_counts(log: str) -> list[tuple[float, float]]:
    """(val_n_pos, val_n_neg) of every validation line of a run's log."""
    counts = []
    for line in log.splitlines():
        if "Metrics --" in line and "val_n_pos" in line:
            fields = dict(re.findall(r"(val_n_pos|val_n_neg): ([0-9.]+)", line))
            counts.append((float(fields["val_n_pos"]), float(fields["val_n_neg"])))
    return counts


def test_slide_bag_mil_trains_from_slide_labels_and_selects_per_slide(slide_data, tmp_path):
    """slide_mil.json: stage 1 on bags of tiles with one label per slide, pseudo-masks per tile, stage 2 tile by tile,
    validation scored per slide (two validation slides, not their tiles)."""
    log = run_bundle(tmp_path, slide_data, configs=SLIDE_BAGS, stage1_epochs=2, stage2_epochs=2, **TINY_BAGS)
    assert "ignite.engine.engine.BagMILTrainer" in log and "ignite.engine.engine.DistillationTrainer" in log
    counts = _validation_counts(log)
    assert len(counts) == 2 + 2 and set(counts) == {(1.0, 1.0)}  # each epoch of stage 1 and stage 2
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["config"]["tiles_per_bag"] == 8 and report["config"]["bag_pooling"] == "gm"
    with open(tmp_path / "out" / "pseudo_labels" / "manifest.csv") as f:
        rows = list(csv.DictReader(f))
    train_slides = {row["name"].rsplit("_", 2)[0] for row in rows}
    assert len(train_slides) == 2 and all(name.startswith("slide_00") for name in train_slides)  # tiles, not bags
    labels = {row["name"].rsplit("_", 2)[0]: row["label"] for row in rows}
    assert sorted(labels.values()) == ["0", "1"]
    assert (tmp_path / "models" / "model.pt").is_file()


def test_killed_slide_bag_stage1_resumes_to_the_same_weights(slide_data, tmp_path):
    """The bag stage resumes like the others: killed after an epoch, rerun, it ends with an uninterrupted run's
    weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    kwargs = {"configs": SLIDE_BAGS, "stage1_epochs": 4, "stage2_epochs": 0, **TINY_BAGS}
    run_bundle(straight, slide_data, **kwargs)
    epoch, _ = kill_after_checkpoint(bundle_command(resumed, slide_data, **kwargs), resumed / "models", "stage1", 4)
    log = run_bundle(resumed, slide_data, **kwargs)
    assert "stage1: resumed from" in log and f"at epoch {epoch} of 4" in log
    a = torch.load(straight / "models" / "stage1_checkpoint_epoch=4.pt", weights_only=False)
    b = torch.load(resumed / "models" / "stage1_checkpoint_epoch=4.pt", weights_only=False)
    for key, value in a["teacher"].items():
        torch.testing.assert_close(b["teacher"][key], value, msg=f"teacher weight {key} differs after resume")


@pytest.fixture(scope="module")
def labels_only_data(tiny_data, tmp_path_factory) -> Path:
    """The tiny patch folders without train/gt: image-level labels only, the use case the bundle exists for."""
    out = tmp_path_factory.mktemp("labels_only") / "data"
    shutil.copytree(tiny_data / "patches", out)
    shutil.rmtree(out / "train" / "gt")
    return out


def test_image_labels_only_training_selects_without_masks(labels_only_data, tmp_path):
    log = run_bundle(tmp_path, labels_only_data, swap_margin=0.05, pseudo_fp_budget=0.02)
    assert "selection by area_contrast" in log and "validation split by" in log
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["selection"] == {"metric": "val_area_contrast", "swap_margin": 0.05}
    assert report["config"]["selection_metric"] == "area_contrast" and report["config"]["swap_margin"] == 0.05
    for r in report["rounds"]:  # every decision follows the margin rule on the mask-free score
        assert r["metric"] == "val_area_contrast"
        assert r["swapped"] == (r["student_score"] is not None and r["student_score"] > r["teacher_score"] + 0.05)
    assert "role swap at epoch 1 (if_better, val_area_contrast, margin 0.05)" in log
    # the stage-2 targets are calibrated without a mask: once per pseudo-label round (the first and one per swap)
    calibrations = report["target_calibration"]
    assert [c["round"] for c in calibrations] == list(range(1 + sum(r["swapped"] for r in report["rounds"])))
    for c in calibrations:
        assert 0.5 <= c["threshold"] <= 0.99 and c["fp_budget"] == 0.02 and c["n_negatives"] > 0
        assert c["fp_area_at_threshold"] <= 0.02 or c["threshold"] == 0.99
        assert f"pseudo-labels round {c['round']}: target threshold {c['threshold']:.2f} calibrated on" in log


def test_mask_f1_without_masks_stops_before_training(labels_only_data, tmp_path):
    result = subprocess.run(
        bundle_command(tmp_path, labels_only_data, selection_metric="mask_f1"), cwd=ROOT, capture_output=True,
        text=True, timeout=300
    )
    assert result.returncode == 1
    assert ("selection_metric 'mask_f1' needs a pixel mask for every positive image, but 1 of 1 have none"
            in result.stderr)
    assert not list((tmp_path / "models").glob("stage1_checkpoint_epoch=*.pt"))  # nothing was trained
