"""multi_gpu_train.json and multi_gpu_inference.json run as users run them, with torchrun, 2 CPU processes on gloo."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_bundle_training import TINY as SINGLE_PROCESS_TINY

from custom.data.synthetic import SyntheticSpec, generate_dataset
from custom.distributed import state_digest
from custom.networks import DWSMIL

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundle" / "configs"
# tests/test_bundle_training.py's tiny run, with a swap at every stage-2 epoch and no random augmentation, so that
# 1 and 2 processes see the same global batches: 12 training images (val_fraction 0.25 of 16) split 8 + 4
TINY = {**SINGLE_PROCESS_TINY, "swap_policy": "periodic", "distill_augment": False, "val_fraction": 0.25}
GLOBAL_BATCH = 8
# measured: identical stage-1 test metrics, distilled F1 0.650 (1 process) vs 0.658 (2); float summation order and
# Adam's normalisation of tiny gradients are the only differences
F1_TOLERANCE = 0.05
SYNCED = re.compile(r"role swap synchronised at epoch (\d+) on rank (\d+): teacher (\w+), student (\w+)")


def torchrun(nproc: int, configs: list[str], run_id: str, overrides: dict) -> str:
    """``torchrun --standalone --nproc_per_node=nproc -m monai.bundle run``; fail with the log's tail otherwise."""
    files = json.dumps([str(CONFIGS / c) for c in configs])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "monai.bundle", "run", run_id, "--config_file", files]
    for key, value in overrides.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes share the 2-core CI machine
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    return log


def train(run_dir: Path, data: Path, nproc: int) -> str:
    """Both stages with the tiny settings, ``GLOBAL_BATCH / nproc`` images per rank."""
    overrides = {**TINY, "batch_size": GLOBAL_BATCH // nproc, "dataset_dir": str(data),
                 "ckpt_dir": str(run_dir / "models"), "output_dir": str(run_dir / "out")}
    return torchrun(nproc, ["train.json", "cpu_train.json", "multi_gpu_train.json"], "training", overrides)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Four synthetic slides; the same training with 2 processes and with 1."""
    root = tmp_path_factory.mktemp("multi_gpu")
    data = root / "data"
    generate_dataset(data, SyntheticSpec(n_slides=4, size=1024, patches_per_slide=8, patch_size=64, test_fraction=0.5))
    return {"data": data, "two": root / "two", "one": root / "one",
            "log": train(root / "two", data, 2), "log_one": train(root / "one", data, 1)}


def test_ranks_hold_identical_weights_after_every_swap(runs):
    rounds = json.loads((runs["two"] / "out" / "metrics.json").read_text())["rounds"]
    swaps = [r["epoch"] for r in rounds if r["swapped"]]
    assert swaps == [1, 2]
    logged: dict[int, dict[int, tuple[str, str]]] = {}
    for epoch, rank, teacher, student in SYNCED.findall(runs["log"]):
        logged.setdefault(int(epoch), {})[int(rank)] = (teacher, student)
    assert sorted(logged) == swaps
    for epoch in swaps:
        assert sorted(logged[epoch]) == [0, 1] and logged[epoch][0] == logged[epoch][1], f"ranks differ at {epoch}"
        assert logged[epoch][0][0] != logged[epoch][0][1]  # a swap exchanges two different networks
    # the digests are of the real weights: rank 0's epoch-2 checkpoint is saved after that epoch's swap
    saved = torch.load(runs["two"] / "models" / "stage2_checkpoint_epoch=2.pt", weights_only=False)
    for key, index in (("teacher", 0), ("student", 1)):
        net = DWSMIL(width=TINY["network_width"])
        net.load_state_dict(saved[key])
        assert state_digest(net) == logged[2][0][index]


def test_pseudo_labels_are_sharded_and_each_written_once(runs):
    pseudo = runs["two"] / "out" / "pseudo_labels"
    with open(pseudo / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names)) == 12
    assert sorted(p.name.removesuffix(".nii.gz") for p in pseudo.glob("*.nii.gz")) == sorted(names)
    assert {row["round"] for row in rows} == {"2"}  # regenerated after the second swap
    # the manifest keeps the single-process loader's order, and each rank wrote half of the maps
    with open(runs["one"] / "out" / "pseudo_labels" / "manifest.csv", newline="") as f:
        assert [row["name"] for row in csv.DictReader(f)] == names
    assert runs["log"].count("12 maps written by 2 rank(s)") == 3 and "(6, 6 per rank)" in runs["log"]


def test_two_processes_match_one_with_the_same_global_batch(runs):
    one = json.loads((runs["one"] / "out" / "metrics.json").read_text())
    two = json.loads((runs["two"] / "out" / "metrics.json").read_text())
    for model in ("teacher", "student"):
        assert two[model]["n_pos"] == one[model]["n_pos"] == 6 and two[model]["n_neg"] == one[model]["n_neg"] == 10
        assert abs(two[model]["f1"] - one[model]["f1"]) <= F1_TOLERANCE, (model, one[model]["f1"], two[model]["f1"])
    assert [r["swapped"] for r in two["rounds"]] == [r["swapped"] for r in one["rounds"]]
    # rank 0 alone wrote the report
    assert (runs["two"] / "models" / "model.pt").is_file()
    assert "Test split (6 positive, 10 negative images)" in runs["log"]
    assert runs["log"].count("Test split") == 1


def test_inference_shards_slides_and_resumes(runs, tmp_path):
    slides = sorted(p.stem for p in (runs["data"] / "slides").glob("*.tif"))
    assert len(slides) == 4
    overrides = {"dataset_dir": str(runs["data"]), "ckpt_path": str(runs["two"] / "models" / "model.pt"),
                 "network_width": TINY["network_width"], "output_dir": str(tmp_path), "tile_size": 128,
                 "overlap": 16, "batch_size": 8, "num_workers": 0, "amp": False}
    configs = ["inference.json", "multi_gpu_inference.json"]
    torchrun(2, configs, "inference", overrides)
    summary = json.loads((tmp_path / "run_summary.json").read_text())
    done = [Path(p).stem for p in summary["done"]]
    assert sorted(done) == slides and not summary["skipped"] and not summary["failed"]
    # slide i by rank i % 2, each written by exactly one rank
    assert [[Path(p).stem for p in r["done"]] for r in summary["ranks"]] == [slides[0::2], slides[1::2]]
    for name in slides:
        assert json.loads((tmp_path / name / f"{name}_summary.json").read_text())
    (tmp_path / slides[1] / f"{slides[1]}_summary.json").unlink()  # as if rank 1 was killed on that slide
    torchrun(2, configs, "inference", overrides)
    rerun = json.loads((tmp_path / "run_summary.json").read_text())
    assert [Path(p).stem for p in rerun["done"]] == [slides[1]]
    assert sorted(Path(p).stem for p in rerun["skipped"]) == [s for s in slides if s != slides[1]]


def test_slide_bags_are_sharded_over_ranks(tmp_path):
    """slide_mil.json under torchrun: each rank trains on half of the bags, the ranks agree on every swap, and the
    tile pseudo-labels of the training slides are written once between them."""
    data = tmp_path / "slides"
    generate_dataset(data, SyntheticSpec(n_slides=6, size=1024, patches_per_slide=1, patch_size=64, test_fraction=0.34))
    run = tmp_path / "run"
    overrides = {**TINY, "stage1_epochs": 1, "stage2_epochs": 1, "batch_size": 4, "mpp": 1.0, "val_fraction": 0.3,
                 "tiles_per_bag": 4, "bags_per_slide": 4, "bags_per_batch": 2, "dataset_dir": str(data),
                 "ckpt_dir": str(run / "models"), "output_dir": str(run / "out")}
    configs = ["train.json", "cpu_train.json", "slides.json", "slide_mil.json", "multi_gpu_train.json"]
    log = torchrun(2, configs, "training", overrides)
    stage1 = torch.load(run / "models" / "stage1_checkpoint_epoch=1.pt", weights_only=False)
    # two training slides x 4 bags = 8 bags; 4 per rank in batches of 2: 2 steps per epoch (1 process: 4)
    assert stage1["trainer"]["epoch_length"] == 2
    synced = SYNCED.findall(log)
    assert sorted(int(rank) for _, rank, _, _ in synced) == [0, 1] and synced[0][2:] == synced[1][2:]
    with open(run / "out" / "pseudo_labels" / "manifest.csv", newline="") as f:
        names = [row["name"] for row in csv.DictReader(f)]
    assert len(names) == len(set(names)) > 2 and {n.rsplit("_", 2)[0] for n in names} <= {f"slide_00{i}" for i in
                                                                                          range(4)}
    assert json.loads((run / "out" / "metrics.json").read_text())["config"]["tiles_per_bag"] == 4
