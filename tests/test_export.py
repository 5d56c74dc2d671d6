# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Bundle export: metadata checked by verify_net_in_out, TorchScript export with ckpt_export, and inference.json run
from the checkpoint and from the TorchScript model (inference_ts.json) giving the same probability map."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from custom.data.he_renderer import make_layout, render_tile
from custom.networks import DWSMIL
from custom.writers.pyramid_tiff import write_pyramid

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"
WIDTH = "0.125"


def bundle(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle`` from the repository root, as the README does."""
    done = subprocess.run([sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True,
                          cwd=CONFIGS.parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A random model.pt and its TorchScript export, and a folder with one small slide."""
    root = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    torch.save(DWSMIL(width=float(WIDTH)).state_dict(), root / "model.pt")
    bundle("ckpt_export", "network_def", "--filepath", str(root / "model.ts"), "--ckpt_file", str(root / "model.pt"),
           "--meta_file", str(CONFIGS / "metadata.json"), "--config_file", str(CONFIGS / "inference.json"),
           "--network_width", WIDTH)
    (root / "slides").mkdir()
    layout = make_layout(0, 1, 768, positive=True)
    write_pyramid(root / "slides" / "tiny.tif", lambda r, c, h, w: render_tile(layout, r, c, h, w), (768, 768), 3,
                  mpp=1.0)
    return root


def test_verify_net_in_out():
    done = bundle("verify_net_in_out", "network_def", "--meta_file", str(CONFIGS / "metadata.json"),
                  "--config_file", str(CONFIGS / "inference.json"), "--network_width", WIDTH)
    assert "verified with no error" in done.stdout + done.stderr


def test_metadata_is_complete():
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["version"] in meta["changelog"]
    for key in ("monai_version", "pytorch_version", "numpy_version", "required_packages_version", "name", "task",
                "description", "authors", "copyright", "data_source", "data_type", "intended_use", "references",
                "eval_metrics"):
        assert meta[key], key
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == DWSMIL(width=0.125).n_side + 1 == len(pred["channel_def"])


def test_torchscript_matches_checkpoint(exported):
    network = DWSMIL(width=float(WIDTH)).eval()
    network.load_state_dict(torch.load(exported / "model.pt", weights_only=True))
    scripted = torch.jit.load(exported / "model.ts")
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), network(x))


def test_inference_from_checkpoint_and_torchscript_agree(exported):
    common = ["--input", str(exported / "slides"), "--ckpt_dir", str(exported), "--network_width", WIDTH,
              "--mpp", "1.0", "--num_workers", "0", "--threshold", "0.4"]
    bundle("run", "--config_file", str(CONFIGS / "inference.json"), "--output_dir", str(exported / "pt"), *common)
    ts_configs = str([str(CONFIGS / "inference.json"), str(CONFIGS / "inference_ts.json")])
    bundle("run", "--config_file", ts_configs, "--output_dir", str(exported / "ts"), *common)
    from_pt = tifffile.imread(exported / "pt" / "tiny" / "tiny_prob.tif", level=0)
    from_ts = tifffile.imread(exported / "ts" / "tiny" / "tiny_prob.tif", level=0)
    assert from_pt.any()
    # the checkpoint path runs with BatchNorm folded (custom.inference.runtime): equal up to one uint8 rounding step
    difference = np.abs(from_ts.astype(np.int16) - from_pt)
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 1e-4 * difference.size
    summary = json.loads((exported / "pt" / "tiny" / "tiny_summary.json").read_text())
    assert summary["n_tiles"] > 0 and summary["output_mpp"] == 1.0
