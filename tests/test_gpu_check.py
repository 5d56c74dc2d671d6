"""scripts/gpu_check.sh: its every step at tiny sizes on the CPU (GPU_CHECK_DEVICE=cpu GPU_CHECK_SMALL=1), with every
summary key printed with a number, and its refusal without a CUDA device."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

TRAIN = [f"train_{stage}_{figure}" for stage in ("stage1", "stage2_cached", "stage2_teacher")
         for figure in ("img_s", "plain_img_s", "peak_mb")] + ["train_vs_plain"]
BAGS = [f"bags_{row}_{figure}" for row in ("tile_training", "one_pass", "two_passes")
        for figure in ("tiles_s", "peak_mb")]
BAGS += ["bags_vs_tiles", "bags_camelyon16_epoch_min_one_pass", "bags_camelyon16_epoch_min_two_passes"]
INFER = ["infer_n_tiles", "infer_tissue_mp"] + [
    f"infer_{method}_{figure}" for method in ("ours", "monai_cucim")
    for figure in ("tissue_mp_s", "tiles_s", "wall_s", "peak_mb", "peak_rss_mb")
] + ["infer_max_abs_diff", "infer_speedup_vs_monai"]
CPU_READERS = ("cucim", "openslide", "tifffile", "cucim_monai", "openslide_monai")
GPU_READERS = ("cucim_gpu", "cucim_batch32_cpu", "cucim_batch32_gpu")  # rows only where cuCIM's GPU decode runs
READ = [f"read_{reader}_{access}_1t_tiles_s" for reader in CPU_READERS + GPU_READERS
        for access in ("aligned", "unaligned")]
STEPS = [f"step_{name}_s" for name in ("train", "bags", "slide", "infer", "read")] + ["gpu_check_total_s"]
NUMBER = re.compile(r"-?\d+(\.\d+)?(e[-+]\d+)?")


def _run(out: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    environment.update(PYTHON=sys.executable, **env)
    return subprocess.run(["bash", str(SCRIPT), str(out)], capture_output=True, text=True, env=environment,
                          timeout=2400)  # the small run's own budget is 2300 s


def _summary(output: str) -> dict[str, str]:
    block = output.split("==== summary (key=value) ====\n", 1)[1].split("==== end of summary ====", 1)[0]
    pairs = [line.split("=", 1) for line in block.splitlines() if line and not line.startswith("#")]
    assert all(len(pair) == 2 for pair in pairs), block
    return dict(pairs)


def test_cpu_small_run_prints_every_figure(tmp_path):
    out = tmp_path / "check"
    done = _run(out, GPU_CHECK_DEVICE="cpu", GPU_CHECK_SMALL="1")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = _summary(done.stdout)
    assert list(summary) == TRAIN + BAGS + INFER + READ + STEPS
    gpu_decode = {f"read_{reader}_{access}_1t_tiles_s" for reader in GPU_READERS for access in ("aligned", "unaligned")}
    for key, value in summary.items():
        if key in gpu_decode and not torch.cuda.is_available():
            assert value == "skipped", (key, value)
        else:
            assert NUMBER.fullmatch(value), (key, value)
    assert "skipped: cuCIM GPU decode unavailable" in done.stdout or torch.cuda.is_available()
    assert float(summary["infer_max_abs_diff"]) < 0.01  # both methods made the same map
    assert int(summary["infer_n_tiles"]) > 0 and float(summary["train_vs_plain"]) > 0
    log = (out / "gpu_check.log").read_text()
    assert "==== end of summary ====" in log and "== environment" in log
    for name in ("train", "bags", "infer", "read"):
        assert json.loads((out / f"{name}.json").read_text())
        assert (out / f"{name}.log").is_file()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_without_cuda_it_exits_1_saying_so(tmp_path):
    done = _run(tmp_path / "check")
    assert done.returncode == 1
    assert "no CUDA device: torch.cuda.is_available() is False" in done.stdout + done.stderr
    assert "== train" not in done.stdout
    assert "no CUDA device" in (tmp_path / "check" / "gpu_check.log").read_text()
