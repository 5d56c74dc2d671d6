"""scripts/bench_read.py: cuCIM's batch reader (the path its GPU-decode rows time) on the CPU, and the GPU probe's
refusal where the GPU decode cannot start."""

import importlib.util
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_read.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_read", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cucim_batches_reads_every_location_on_the_cpu(tmp_path):
    from cucim import CuImage

    bench = _bench_module()
    path = bench.make_slide(tmp_path / "slide.tif", 1024)
    locations = bench.random_locations(1024, aligned=False, count=bench.BATCH + 5)
    assert bench.cucim_batches(CuImage(str(path)), locations, 2, "cpu") == len(locations)
    rate = bench.batch_tiles_per_second(lambda loc, n: bench.cucim_batches(CuImage(str(path)), loc, n, "cpu"),
                                        bench.random_locations(1024, aligned=True, count=400), 1, 0.1)
    assert rate > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_readers_give_a_reason_without_a_gpu(tmp_path):
    bench = _bench_module()
    path = bench.make_slide(tmp_path / "slide.tif", 512)
    tiles, batches, reason = bench.gpu_readers(path)
    assert tiles == {} and batches == {} and reason  # e.g. 'RuntimeError: NVJPEG initialization error'
