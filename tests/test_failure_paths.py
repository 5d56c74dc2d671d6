# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Failures that used to cost a user time or outputs: a crash (exit 134) after the right message, outputs lost to a
repeated name, a checkpoint error without the file, a misleading "no tissue found", scratch left by a killed run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pyramid_files import write_pyramid

from custom.checkpoints import UnreadableCheckpoint, load_weights
from custom.data.synthetic import SyntheticSpec, generate_dataset
from custom.inference import SlideInferenceRunner, WholeSlideInferer, inference_items
from custom.networks import DWSMIL

ROOT = Path(__file__).resolve().parents[1]
PURPLE, WHITE = (150, 60, 170), (245, 245, 245)


@pytest.fixture(scope="module")
def patches(tmp_path_factory) -> Path:
    """Synthetic patch folders (12 train and 16 test images of 64 px)."""
    out = tmp_path_factory.mktemp("failures") / "data"
    generate_dataset(out, SyntheticSpec(n_slides=4, size=1024, patches_per_slide=8, patch_size=64, test_fraction=0.5))
    return out / "patches"


def _train(data: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """The README's CPU training command on ``data`` (it is expected to stop before the first epoch)."""
    configs = json.dumps([str(ROOT / "bundle" / "configs" / name) for name in ("train.json", "cpu_train.json")])
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs,
               "--dataset_dir", str(data), "--ckpt_dir", str(run_dir / "models"), "--output_dir", str(run_dir / "out"),
               "--image_size", "64", "--network_width", "0.125"]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_a_fake_png_stops_training_with_exit_1_and_the_file_named(patches, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(patches, data)
    fake = data / "train" / "pos" / "aaa_fake.png"  # first in the list: the cache's thread is busy with the next one
    fake.write_bytes(b"not a png at all")
    result = _train(data, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]  # was 134: "terminate called without an active exception"
    assert "terminate called" not in result.stderr
    assert str(fake) in result.stderr and "corrupt, truncated or not an image" in result.stderr
    # one line, not MONAI's config-expression traceback around it
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(fake) in last and "Traceback" not in result.stderr


def test_a_missing_split_is_one_error_line_and_exit_1(patches, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(patches / "train", data / "train")
    result = _train(data, tmp_path)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == f"error: patch folder split not found: {data / 'test'}"
    assert "Traceback" not in result.stderr and not (tmp_path / "models").exists()


CACHE_FILL = """
import sys
from custom.data.datasets import PatchFolderDataset
images = sys.argv[1:]
PatchFolderDataset([{"image": path, "label": 0} for path in images], 64, cache_rate=1.0, num_workers=2)
"""


def test_a_failed_cache_fill_leaves_no_thread_running_at_exit(patches, tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png at all")
    images = [str(fake)] + sorted(str(p) for p in patches.rglob("*.png")) * 4  # the threads have work queued
    result = subprocess.run([sys.executable, "-c", CACHE_FILL, *images], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "terminate called" not in result.stderr and f"cannot decode image file {fake}" in result.stderr


def _folder(tmp_path: Path, names: list[str]) -> Path:
    """A folder holding a small RGB image under each of ``names``."""
    folder = tmp_path / "inputs"
    folder.mkdir()
    for name in names:
        Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(folder / name)
    return folder


def test_two_inputs_of_one_name_are_refused_before_any_work(tmp_path):
    folder = _folder(tmp_path, ["a.png", "x.png", "x.jpg"])
    message = f"inputs {folder / 'x.jpg'} and {folder / 'x.png'} have the same name 'x'"
    with pytest.raises(ValueError, match="their outputs would both go to x/") as refused:
        inference_items(folder)
    assert str(refused.value).startswith(message)
    with pytest.raises(ValueError, match="have the same name 'x'"):
        inference_items([str(folder / "x.png"), str(tmp_path / "elsewhere" / "x.tif")])
    runner = SlideInferenceRunner(DWSMIL(width=0.125), WholeSlideInferer(progress=False), folder, tmp_path / "out")
    with pytest.raises(ValueError, match="have the same name 'x'"):
        runner.run()
    assert list((tmp_path / "out").iterdir()) == []  # nothing inferred, nothing skipped


@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "text"])
def test_an_unreadable_checkpoint_is_named_with_its_problem(tmp_path, damage):
    network = DWSMIL(width=0.125)
    good = tmp_path / "good.pt"
    torch.save({"network": network.state_dict()}, good)
    data = good.read_bytes()
    bad = tmp_path / f"{damage}.pt"
    bad.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "random": np.random.default_rng(0).bytes(512),
                     "text": b"hello, not a checkpoint"}[damage])
    problems = {"truncated": "it is not a complete PyTorch checkpoint archive, truncated or corrupted",
                "empty": "the file is empty or truncated", "random": "it is not a PyTorch checkpoint",
                "text": "it is not a PyTorch checkpoint"}
    for load in (lambda: load_weights(network, bad, "network"),
                 lambda: load_weights(network, bad, config_key="ckpt_path")):
        with pytest.raises(UnreadableCheckpoint) as refused:
            load()
        message = str(refused.value)
        assert message.startswith(f"checkpoint {bad}") and problems[damage] in message
        assert "weights_only" not in message and refused.value.__cause__ is None
    load_weights(network, good, "network")  # the intact file still loads


def _slide(path: Path, size: int, tissue: bool) -> Path:
    """A pyramidal slide (0.5 um/px) of ``size`` px, all stained or all glass."""
    write_pyramid(path, np.full((size, size, 3), PURPLE if tissue else WHITE, np.uint8), levels=1, tile=64)
    return path


def test_a_small_slide_with_tissue_is_not_reported_as_without_tissue(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    _slide(folder / "small.tif", 256, tissue=True)  # 128 x 128 um: 16384 um2 of tissue, under 20000 um2
    _slide(folder / "glass.tif", 256, tissue=False)
    inferer = WholeSlideInferer(tile_size=64, overlap=0, level=0, num_workers=0, progress=False)
    with pytest.warns(UserWarning) as warned:
        SlideInferenceRunner(DWSMIL(width=0.125), inferer, folder, tmp_path / "out").run()
    messages = sorted(str(w.message) for w in warned if "tissue found in" in str(w.message))
    assert messages[0].startswith(f"no tissue found in {folder / 'glass.tif'}")
    assert messages[1] == (f"tissue found in {folder / 'small.tif'} (16384 um2), but only in pieces smaller than "
                           "the tissue detection's min_area_um2 of 20000 um2 (the largest is 16384 um2, the whole "
                           "image 16384 um2), so none is kept; for images this small, lower it with the inferer's "
                           "tissue_kwargs={'min_area_um2': ...}")
    small = json.loads((tmp_path / "out" / "small" / "small_summary.json").read_text())
    assert small["message"].startswith(f"tissue found in {folder / 'small.tif'}") and small["n_tiles"] == 0
    assert small["message"].endswith(": nothing was inferred, the mask is empty")
    glass = json.loads((tmp_path / "out" / "glass" / "glass_summary.json").read_text())
    assert glass["message"].startswith("no tissue found in")


class _Failing(torch.nn.Module):
    """The network, raising after ``calls`` batches (a runtime error in the middle of a slide)."""

    def __init__(self, network: torch.nn.Module, calls: int) -> None:
        super().__init__()
        self.network, self.calls = network, calls

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise RuntimeError("out of memory (simulated)")
        return self.network(images)


def test_scratch_of_a_killed_run_is_removed_and_a_failed_slide_leaves_nothing(tmp_path):
    slide = _slide(tmp_path / "s.tif", 512, tissue=True)
    folder = tmp_path / "out" / "s"
    stale = [folder / ".s.prob.raw", folder / ".s_mask.tif.partial", folder / ".s_prob.tif.x1y2z3" / "level1.raw"]
    for path in stale:  # what a SIGKILL in the middle of a slide leaves
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1024)
    (folder / "s_summary.json").write_text("{}")  # from an earlier run; re-inferred with overwrite
    (folder / "keep.txt").write_text("the user's")
    inferer = WholeSlideInferer(tile_size=64, overlap=0, level=0, batch_size=2, num_workers=0, progress=False,
                                runtime="eager")
    runner = SlideInferenceRunner(_Failing(DWSMIL(width=0.125), 3), inferer, slide, tmp_path / "out",
                                  overwrite=True, raise_on_failure=False)
    report = runner.run()
    assert [f["error"] for f in report["failed"]] == ["RuntimeError: out of memory (simulated)"]
    assert sorted(p.name for p in folder.iterdir()) == ["keep.txt"]  # no scratch, no pyramids, no stale summary
    runner.network.calls = 10**6
    assert runner.run()["done"] == [str(slide)]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []
    assert {"s_mask.tif", "s_prob.tif", "s_summary.json"} <= {p.name for p in folder.iterdir()}
    assert os.path.getsize(folder / "s_mask.tif") > 0
