# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Whole-slide inference throughput: this project's engine against MONAI's PatchInferer + WSISlidingWindowSplitter.

All methods run the same randomly initialised DWS-MIL on the same device over the same tissue tiles (MONAI gets the
project's tile grid through ``filter_fn``, as a careful user would) with uniform blending (MONAI's ``AvgMerger``),
so they produce the same probability map; the max absolute difference over the tiles is printed. Like with like, every
method ends with that map on disk as the same tiled pyramidal TIFF (MONAI's merged array is written with the project's
``write_pyramid``, as its user would write it once inference returns). This project's engine runs its network as
``--runtime`` says (inference.json's ``runtime``, default ``auto``: BatchNorm folded, conv+ReLU as one oneDNN call,
only the fused channel computed; ``custom.inference.runtime``) with freed memory kept in the heap (``--heap_reuse``),
reads tiles in a worker process and streams the pyramid while the network runs; MONAI runs the plain network, as its
users would. Every row's wall starts before the network is prepared: ``--runtime compile`` pays its compile there
(at the first batch, in each fresh process; with inductor's on-disk cache warm after the first run), and no method
gets an untimed warm-up. A second row of ours
writes every output (mask pyramid, GeoJSON, ASAP XML, overlay) as the inference config does by default. Each method
runs in its own process so its peak resident memory is its own. The synthetic slide is generated once and cached; its
level size is ``tile + k * (tile - overlap)`` so MONAI's zero padding and the project's white padding never differ.

    python scripts/bench_infer.py                              # 20,736 px slide, inferred at level 2
    python scripts/bench_infer.py --memory_check               # also the 4x larger slide (2x2 mosaic), ours only
    python scripts/bench_infer.py --ckpt bundle/models/model.pt --level 1  # a trained network (cpu_train.json, 1 um/px)
    python scripts/bench_infer.py --device cuda --width 1.0 --size 40384 --level 1 --methods ours,cucim
    python scripts/bench_infer.py --scaling True               # ours, every output, on 1x, 4x and 16x the tissue

The last line is ``speedup_vs_monai=<ratio>``: the faster MONAI variant's wall time over ours, same output file.
``--device cuda`` runs every method's network on the GPU, under float16 autocast with ``--amp`` (the default, as
inference.json; MONAI's network is wrapped in the same autocast), and records each method's peak GPU memory
(``max_memory_allocated``); on a CPU ``--amp`` changes nothing. ``--methods`` picks the rows (default all four);
``--json_out FILE`` also writes the setting and the rows as JSON.

``--scaling True`` measures how cost grows instead: the default slide and k x k mosaics of it (``--sizes``, tissue area
multiples, perfect squares; default 1,4,16: the same tissue fraction, so about 1:4:16 tissue tiles) each inferred by
this engine with every output (the ``ours_all_outputs`` row), each in a fresh process after an untimed warm-up there
on the 1x slide, so no row inherits another's heap. Each row has its own peak-memory window (``bench_train.reset_peak``
/ ``peak_since``, opened after the warm-up: the main process's resident set, the reader worker's own memory not
included, as in the rows above) and the time per tile against the first row's. Each row is ``--repeats`` such runs
(default 3): the run of median wall, with the median and the range of their peaks, since heap reuse makes the peak
swing by hundreds of MB between identical runs. The last line is ``scaling: time/tile <last>x vs <first>x = R, peak
memory ... = M`` (medians).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import fire
import numpy as np
import tifffile
import torch
from bench_train import peak_since, reset_peak  # the memory window of the training benchmarks, one owner

from custom.checkpoints import load_weights, read_record
from custom.data.grid import make_tile_grid
from custom.data.he_renderer import make_layout, render_tile, tissue_fraction
from custom.data.slide import open_slide
from custom.data.tiff import read_tiff_region
from custom.data.tissue import detect_tissue
from custom.errors import report_input_errors
from custom.inference.heap import heap_reuse as keep_heap
from custom.inference.outputs import SLIDE_OUTPUTS, write_slide_outputs
from custom.inference.streaming import PyramidStreamer
from custom.inference.wsi import WholeSlideInferer
from custom.networks import DWSMIL
from custom.tables import Column, format_table
from custom.transforms import IMAGENET_MEAN, IMAGENET_STD
from custom.writers.pyramid_tiff import write_pyramid

MEAN, STD = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
METHODS = ("ours", "openslide", "cucim", "ours_all")
ROW_NAMES = {"ours": "ours", "openslide": "monai_openslide", "cucim": "monai_cucim", "ours_all": "ours_all_outputs"}


def normalise(image: torch.Tensor) -> torch.Tensor:
    """The bundle's ImageNet normalisation of a [0, 1] image (works on (3, H, W) and (B, 3, H, W)), on its device."""
    if image.device.type == "cpu":
        return (image - MEAN) / STD
    return (image - MEAN.to(image.device)) / STD.to(image.device)


def _render(layout, tile: int, position: tuple[int, int]) -> np.ndarray:
    """One level-0 tile of the synthetic slide (module level so worker processes can run it)."""
    row, col = position
    return render_tile(layout, row, col, min(tile, layout.size - row), min(tile, layout.size - col))


def make_slide(path: Path, size: int, seed: int = 0, workers: int = 2, tile: int = 256) -> Path:
    """A synthetic H&E slide rendered tile by tile in ``workers`` processes; reused when already cached."""
    if path.is_file():
        return path
    layout = make_layout(seed, 1, size, positive=True)
    positions = [(r, c) for r in range(0, size, tile) for c in range(0, size, tile)]
    with ProcessPoolExecutor(workers) as pool:
        tiles = pool.map(partial(_render, layout, tile), positions, chunksize=16)
        write_pyramid(path, tiles, (size, size), 3, mpp=0.5, tile=tile)
    print(f"generated {path} ({size} px, tissue {tissue_fraction(layout):.0%})", flush=True)
    return path


def make_mosaic(source: Path, path: Path, tile: int = 256, repeat: int = 2) -> Path:
    """A ``repeat`` x ``repeat`` mosaic of ``source`` (side a multiple of ``tile``; ``repeat**2`` x its pixels, same
    tissue fraction), copied tile by tile, far quicker than rendering that much tissue; reused when already cached."""
    if path.is_file():
        return path
    with tifffile.TiffFile(source) as tif:
        page = tif.pages[0]
        size = page.shape[0]

        def tile_at(row: int, col: int, height: int, width: int) -> np.ndarray:
            return read_tiff_region(page, row % size, col % size, height, width)

        write_pyramid(path, tile_at, (repeat * size, repeat * size), 3, mpp=0.5, tile=tile)
    print(f"generated {path} ({repeat}x{repeat} mosaic of {source.name}, {repeat * size} px)", flush=True)
    return path


def _network(width: float, threads: int, ckpt: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """The benchmarked network on ``device``: the same seed (or checkpoint) gives every method the same weights."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    network = DWSMIL(width=width)
    if ckpt:  # the network the checkpoint records, whatever --width says
        network = load_weights(network, ckpt, rebuild=True, knobs={"width": "--width"})
    return network.eval().to(device)


def _width(width: float, ckpt: str | None) -> float:
    """The width benchmarked: the checkpoint's record's, else ``--width``."""
    return read_record(ckpt).get("network_def", {}).get("width", width) if ckpt else width


def _grid(slide_path: Path, level: int, tile: int, overlap: int, min_tissue: float):
    """The tissue tile grid both methods run (``tissue`` seconds included)."""
    slide = open_slide(slide_path)
    return slide, make_tile_grid(slide, detect_tissue(slide), level, tile, overlap, min_tissue)


def run_ours(slide_path: Path, out: Path, level: int, tile: int, overlap: int, batch_size: int, num_workers: int,
             width: float, threads: int, min_tissue: float, ckpt: str | None = None,
             outputs: tuple[str, ...] = ("prob",), device: str = "cpu", amp: bool = True,
             runtime: str = "auto", heap_reuse: bool = True) -> dict:
    """This project's engine writing ``outputs`` (of ``SLIDE_OUTPUTS``), its network run as ``runtime``; returns the
    stage timings. The wall starts before the network is prepared, so a ``compile`` pays its compile in it."""
    network = _network(width, threads, ckpt, device)
    inferer = WholeSlideInferer(tile, overlap, level=level, batch_size=batch_size, num_workers=num_workers,
                                min_tissue=min_tissue, blend_mode="constant", progress=False, amp=amp,
                                runtime=runtime, heap_reuse=heap_reuse)
    start = time.perf_counter()
    slide = open_slide(slide_path)
    out.mkdir(parents=True, exist_ok=True)
    streamer = PyramidStreamer(out, "slide", outputs=outputs)
    with keep_heap(heap_reuse):  # as SlideInferenceRunner.infer_item: over the slide and its outputs
        prediction = inferer(slide, network, out / "prob.raw", normalise, on_start=streamer.start)
        summary = write_slide_outputs(prediction, out, "slide", min_area_um2=2000.0, pyramids=streamer,
                                      outputs=outputs)
    timings = dict(summary["timings_s"], wall=time.perf_counter() - start)
    return {"timings": timings, "n_tiles": prediction.n_tiles, "prob_tif": str(out / "slide" / "slide_prob.tif")}


class _Timed(torch.nn.Module):
    """Wraps a network to add up the seconds its forward passes take; on a GPU under float16 autocast when ``amp``
    (as this project's engine runs), the fused map returned as float32 on the CPU, where MONAI's merger holds it."""

    def __init__(self, network: torch.nn.Module, amp: bool = False) -> None:
        super().__init__()
        self.network, self.seconds = network, 0.0
        self.cuda = next(network.parameters()).device.type == "cuda"
        self.amp = amp and self.cuda

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        if not self.cuda:
            out = self.network(x)[:, -1:]
        else:
            with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
                out = self.network(x)[:, -1:]
            out = out.float().cpu()  # waits for the GPU
        self.seconds += time.perf_counter() - start
        return out


def run_monai(slide_path: Path, out: Path, reader: str, level: int, tile: int, overlap: int, batch_size: int,
              width: float, threads: int, min_tissue: float, ckpt: str | None, ours_tif: str | None,
              device: str = "cpu", amp: bool = True) -> dict:
    """MONAI's PatchInferer + WSISlidingWindowSplitter over the same tissue tiles, its map written as ours is."""
    from monai.inferers import AvgMerger, PatchInferer, WSISlidingWindowSplitter

    start = time.perf_counter()
    slide, grid = _grid(slide_path, level, tile, overlap, min_tissue)
    tissue_s = time.perf_counter() - start
    ds = grid.downsample
    keep = {(round(y / ds), round(x / ds)) for x, y in zip(grid.x, grid.y)}  # (row, col) at the level, as MONAI's
    splitter = WSISlidingWindowSplitter(tile, overlap, filter_fn=lambda patch, location: tuple(location) in keep,
                                        reader=reader, level=level)
    to_device = torch.device(device)
    inferer = PatchInferer(splitter, AvgMerger, batch_size=batch_size,
                           preprocessing=lambda x: normalise(x.to(to_device).float() / 255.0))
    network = _Timed(_network(width, threads, ckpt, device), amp)
    with torch.inference_mode():
        merged = inferer(str(slide_path), network)[0, 0].numpy()
    written = time.perf_counter()
    values = np.rint(np.clip(np.nan_to_num(merged, nan=0.0), 0.0, 1.0) * 255.0).astype(np.uint8)
    mpp = 0.5 * slide.level_downsamples[level]  # the synthetic slide is 0.5 um/px at level 0
    write_pyramid(out / "monai_prob.tif", lambda r, c, h, w: values[r : r + h, c : c + w], values.shape, 1, mpp,
                  downsample="mean")
    wall = time.perf_counter() - start
    timings = {"tissue": tissue_s, "model": network.seconds, "write": wall - (written - start), "wall": wall}
    result = {"timings": timings, "n_tiles": len(grid)}
    if ours_tif:
        ours = tifffile.imread(ours_tif, level=0) / 255.0
        covered = np.isfinite(merged)
        result["max_abs_diff"] = float(np.abs(ours[covered] - merged[covered]).max())
    return result


SCALE_COLUMNS = [
    Column("tissue", align="<"),
    Column("slide px"),
    Column("level px"),
    Column("tiles"),
    Column("wall s", float_format=".2f"),
    Column("s/1k tiles", float_format=".2f"),
    Column("start RSS MB", float_format=".0f"),
    Column("peak RSS MB", float_format=".0f"),
    Column("peak range", align="<"),
    Column("tile ratio", float_format=".2f"),
    Column("time ratio", float_format=".2f"),
    Column("time/tile", float_format=".2f"),
]


def _factors(sizes: int | str | tuple[int, ...]) -> list[int]:
    """``--sizes`` (fire gives ``1,4,16`` as a tuple, ``4`` as an int) as area factors, each a perfect square."""
    factors = [int(f) for f in (sizes.split(",") if isinstance(sizes, str) else np.atleast_1d(sizes))]
    if not factors or any(f < 1 or round(f**0.5) ** 2 != f for f in factors):
        raise SystemExit(f"--sizes: tissue area factors that are perfect squares (k x k mosaics), got {sizes}")
    return factors


def scaled_slide(cache: Path, size: int, factor: int, gen_workers: int = 2) -> Path:
    """The benchmark slide (factor 1) or a k x k mosaic of it (factor k**2), generated once and cached."""
    base = make_slide(cache / f"bench_{size}.tif", size, workers=gen_workers)
    repeat = round(factor**0.5)
    return base if repeat == 1 else make_mosaic(base, cache / f"bench_{repeat * size}_mosaic.tif", repeat=repeat)


def measure_scaled(slide_path: Path, out: Path, num_workers: int, ours_opts: dict | None = None, **common) -> dict:
    """One row of the scaling table: ours with every output, inside its own peak-memory window (RSS; GPU too)."""
    gc.collect()  # the warm-up's objects go before the window opens
    gpu = torch.device(common["device"]) if torch.device(common["device"]).type == "cuda" else None
    rss_start = reset_peak(torch.device("cpu"))
    gpu_start = reset_peak(gpu) if gpu else 0.0
    result = run_ours(slide_path, out, num_workers=num_workers, outputs=SLIDE_OUTPUTS, **(ours_opts or {}), **common)
    result.update(start_rss_mb=rss_start, peak_rss_mb=rss_start + peak_since(torch.device("cpu"), rss_start))
    if gpu:
        result["peak_gpu_mb"] = gpu_start + peak_since(gpu, gpu_start)
    return result


def _median_run(runs: list[dict]) -> dict:
    """One row from ``repeats`` runs of it: the run of median wall time, with the median peak memory beside the
    spread of every run's (heap reuse makes the peak swing between identical runs, the wall far less)."""
    row = dict(sorted(runs, key=lambda run: run["timings"]["wall"])[len(runs) // 2])
    peaks = [run["peak_rss_mb"] for run in runs]
    row.update(peak_rss_mb=float(np.median(peaks)), peak_rss_runs_mb=peaks,
               wall_runs_s=[run["timings"]["wall"] for run in runs])
    return row


def run_scaling(size: int, sizes: int | str | tuple[int, ...], cache: Path, common: dict, num_workers: int,
                gen_workers: int = 2, warmup: bool = True, json_out: str | None = None,
                ours_opts: dict | None = None, repeats: int = 3) -> list[dict]:
    """Print how wall time and peak memory grow with the tissue: one row per area factor (the median of ``repeats``
    fresh-process runs), ratios to the first."""
    factors = _factors(sizes)
    slides = {f: scaled_slide(cache, size, f, gen_workers) for f in factors}  # generated before any timing
    level = common["level"]
    rows = []
    for factor in factors:
        row = _median_run([_child("scaled", slide=slides[factor], cache_dir=cache, size=size, num_workers=num_workers,
                                  warmup=warmup, **(ours_opts or {}), **common) for _ in range(max(1, repeats))])
        with open_slide(slides[factor]) as s:
            row.update(factor=factor, slide_px=s.level_dimensions[0][0], level_px=s.level_dimensions[level][0])
        rows.append(row)
        print(f"{factor}x: {row['n_tiles']} tiles, wall {row['timings']['wall']:.1f} s", flush=True)
    first = rows[0]
    columns = SCALE_COLUMNS + ([Column("peak GPU MB", float_format=".0f")] if "peak_gpu_mb" in first else [])
    table = []
    for row in rows:
        tiles, wall = row["n_tiles"] / first["n_tiles"], row["timings"]["wall"] / first["timings"]["wall"]
        row.update(tile_ratio=tiles, time_ratio=wall, time_per_tile_ratio=wall / tiles)
        table.append([f"{row['factor']}x", row["slide_px"], row["level_px"], row["n_tiles"], row["timings"]["wall"],
                      1000 * row["timings"]["wall"] / row["n_tiles"], row["start_rss_mb"], row["peak_rss_mb"],
                      "-".join(f"{m:.0f}" for m in (min(row["peak_rss_runs_mb"]), max(row["peak_rss_runs_mb"]))),
                      tiles, wall, wall / tiles] + ([row["peak_gpu_mb"]] if "peak_gpu_mb" in row else []))
    print(f"ours with every output, level {level}, {common['tile']} px tiles (overlap {common['overlap']}), DWS-MIL "
          f"width {_width(common['width'], common['ckpt'])}, batch {common['batch_size']}, {common['threads']} torch "
          f"threads, {num_workers} reader worker(s), device {common['device']}; larger slides are k x k mosaics of "
          f"the {size} px one; each row the median of {max(1, repeats)} runs in fresh processes (peak RSS: their "
          f"median and range); ratios against the {factors[0]}x row")
    print(format_table(columns, table, sep="  "))
    last = rows[-1]
    memory = last["peak_rss_mb"] / first["peak_rss_mb"]
    if json_out:
        Path(json_out).write_text(json.dumps({"size": size, **common, "num_workers": num_workers, "rows": rows},
                                             indent=1))
    print(f"scaling: time/tile {last['factor']}x vs {first['factor']}x = {last['time_per_tile_ratio']:.2f}, "
          f"peak memory {last['factor']}x vs {first['factor']}x = {memory:.2f}")
    return rows


def _child(method: str, **kwargs) -> dict:
    """Run one method in a fresh process; returns its result and peak resident memory."""
    command = [sys.executable, __file__, "--method", method, *[f"--{k}={v}" for k, v in kwargs.items()]]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        raise RuntimeError(f"{method} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1])


def bench(size: int = 20736, level: int = 2, tile: int = 256, overlap: int = 32, batch_size: int = 8,
          num_workers: int = 1, width: float = 0.25, threads: int = 2, min_tissue: float = 0.01,
          cache_dir: str = os.path.join(tempfile.gettempdir(), "wsl_bench"), memory_check: bool = False,
          ckpt: str | None = None, method: str | None = None, slide: str | None = None,
          ours_tif: str | None = None, device: str = "cpu", amp: bool = True,
          methods: str | tuple[str, ...] = METHODS, gen_workers: int = 2, json_out: str | None = None,
          generate_only: bool = False, scaling: bool = False, sizes: int | str | tuple[int, ...] = (1, 4, 16),
          warmup: bool = True, runtime: str = "auto", heap_reuse: bool = True, repeats: int = 3) -> None:
    """Print the comparison table; ``method`` (ours / ours_all / openslide / cucim; scaled: one row of the scaling
    table) runs one method (internal use).

    ``ckpt``: a checkpoint (e.g. the README's trained ``bundle/models/model.pt``, with ``--level`` matching its
    training resolution) instead of random weights, for maps with real tumour regions to outline; the network it
    records is benchmarked (``--width`` only for a plain state dict without a record). ``device``: where every
    method's network runs; ``amp``: float16 autocast on a GPU. ``methods``: the rows run (``ours`` first, and at
    least one MONAI row). ``gen_workers``: processes rendering the synthetic slide when it is not cached;
    ``generate_only``: generate (or find) the cached slide and stop. ``scaling``: the scaling table instead (ours
    with every output on ``sizes`` x the tissue, each row the median of ``repeats`` runs, ``warmup``: an untimed run
    first in each); ``generate_only`` then generates
    every slide of ``sizes``. ``runtime`` / ``heap_reuse``: this engine's network runtime and heap reuse
    (inference.json's knobs of those names).
    """
    common = {"level": level, "tile": tile, "overlap": overlap, "batch_size": batch_size, "width": width,
              "threads": threads, "min_tissue": min_tissue, "ckpt": ckpt, "device": device, "amp": amp}
    ours_opts = {"runtime": runtime, "heap_reuse": heap_reuse}  # this engine's knobs (inference.json's defaults)
    if method is not None:
        path = Path(slide)
        out = Path(cache_dir) / f"out_{path.stem}_{method}"
        if method == "scaled":  # one row of the scaling table, in a process of its own
            if warmup:  # the first forward passes and the torch.fx fold pay one-off costs no row should carry
                run_ours(scaled_slide(Path(cache_dir), size, 1), Path(cache_dir) / "out_scaling_warmup",
                         num_workers=num_workers, outputs=SLIDE_OUTPUTS, **ours_opts, **common)
            print(json.dumps(measure_scaled(path, out, num_workers, ours_opts, **common)))
            return
        if method in ("ours", "ours_all"):
            outputs = SLIDE_OUTPUTS if method == "ours_all" else ("prob",)
            result = run_ours(path, out, num_workers=num_workers, outputs=outputs, **ours_opts, **common)
        else:
            out.mkdir(parents=True, exist_ok=True)
            reader = {"openslide": "OpenSlide", "cucim": "cuCIM"}[method]
            result = run_monai(path, out, reader, ours_tif=ours_tif, **common)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.device(device).type == "cuda":
            result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
        print(json.dumps(result))
        return
    methods = tuple(methods.split(",")) if isinstance(methods, str) else tuple(methods)
    if methods[0] != "ours" or not {"openslide", "cucim"} & set(methods) or not set(methods) <= set(METHODS):
        raise SystemExit(f"--methods: 'ours' first, then at least one of openslide, cucim (of {METHODS}); "
                         f"got {methods}")
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    if scaling and generate_only:
        for factor in _factors(sizes):
            print(f"slide {scaled_slide(cache, size, factor, gen_workers)} ready")
        return
    if scaling:
        run_scaling(size, sizes, cache, common, num_workers, gen_workers, warmup, json_out, ours_opts, repeats)
        return
    started = time.perf_counter()
    slide_path = make_slide(cache / f"bench_{size}.tif", size, workers=gen_workers)
    generate_s = time.perf_counter() - started
    if generate_only:
        print(f"slide {slide_path} ready in {generate_s:.1f} s")
        return
    with open_slide(slide_path) as s:
        level_w, level_h = s.level_dimensions[level]
    ours = _child("ours", slide=slide_path, cache_dir=cache, num_workers=num_workers, **ours_opts, **common)
    rows = {"ours": ours}
    for reader in ("openslide", "cucim"):
        if reader in methods:
            rows[f"monai_{reader}"] = _child(reader, slide=slide_path, cache_dir=cache, ours_tif=ours["prob_tif"],
                                             **common)
    if "ours_all" in methods:
        rows["ours_all_outputs"] = _child("ours_all", slide=slide_path, cache_dir=cache, num_workers=num_workers,
                                          **ours_opts, **common)
    tissue_mp = ours["n_tiles"] * (tile - overlap) ** 2 / 1e6  # tissue area the tiles stand for, level pixels
    amp_on = amp and torch.device(device).type == "cuda"
    print(f"slide {size} px, level {level} ({level_w}x{level_h}), {ours['n_tiles']} tissue tiles of {tile} "
          f"(overlap {overlap}), DWS-MIL width {_width(width, ckpt)}, batch {batch_size}, {threads} torch threads, "
          f"{num_workers} reader worker(s); weights {ckpt or 'random (seed 0)'}; device {device}"
          + (", AMP (float16 autocast)" if amp_on else ""))
    print("Every row ends with the probability map as the same LZW pyramidal TIFF on disk.\n"
          f"ours: network runtime '{runtime}' (auto: BatchNorm folded, oneDNN conv+ReLU, only the fused channel), "
          f"heap reuse {'on' if heap_reuse else 'off'}, inference_mode, tiles read in a worker process, the pyramid "
          "written by a background thread as rows finish; 'write' is what is left after the network; the wall "
          "includes preparing (compiling) the network.\nMONAI: the plain network under inference_mode, the same "
          "batch size and torch threads, PatchInferer reading in the main process (it has no reader workers); "
          "'write' = its map to the TIFF."
          + ("\nours_all_outputs: also the mask pyramid, GeoJSON, ASAP XML and overlay (the inference config's "
             "default)." if "ours_all_outputs" in rows else ""))
    stages = ("tissue", "read", "preprocess", "wait", "model", "stitch", "write", "wall")
    print(f"{'method':<18}" + "".join(f"{s:>10}" for s in stages) + f"{'MP/s':>8}{'net%':>7}{'RSS MB':>9}"
          f"{'maxdiff':>9}")
    for name, row in rows.items():
        t = row["timings"]
        cells = "".join(f"{t[s]:>10.2f}" if s in t else f"{'-':>10}" for s in stages)
        diff = f"{row['max_abs_diff']:.4f}" if "max_abs_diff" in row else "-"
        print(f"{name:<18}{cells}{tissue_mp / t['wall']:>8.2f}{100 * t['model'] / t['wall']:>6.0f}%"
              f"{row['peak_rss_mb']:>9.0f}{diff:>9}")
    if memory_check:  # peak RSS swings by up to 300 MB between identical runs (heap reuse): medians of five runs each
        mosaic = make_mosaic(slide_path, cache / f"bench_{2 * size}_mosaic.tif")
        small = [ours] + [_child("ours", slide=slide_path, cache_dir=cache, num_workers=num_workers, **ours_opts,
                                 **common) for _ in range(4)]
        big = [_child("ours", slide=mosaic, cache_dir=cache, num_workers=num_workers, **ours_opts, **common)
               for _ in range(5)]
        small_mb, big_mb = ([r["peak_rss_mb"] for r in runs] for runs in (small, big))
        ratio = float(np.median(big_mb) / np.median(small_mb))
        print(f"peak RSS ours (5 runs each): {size} px {[round(m) for m in small_mb]} MB, 4x slide ({2 * size} px, "
              f"{big[0]['n_tiles']} tiles, wall {big[0]['timings']['wall']:.1f} s) {[round(m) for m in big_mb]} MB: "
              f"median x{ratio:.2f}")
    fastest = min(rows[k]["timings"]["wall"] for k in ("monai_openslide", "monai_cucim") if k in rows)
    if "ours_all_outputs" in rows:
        print(f"all outputs: speedup {fastest / rows['ours_all_outputs']['timings']['wall']:.2f} over MONAI writing "
              "only the probability map")
    if torch.device(device).type == "cuda":
        print("tiles/s: " + ", ".join(f"{name} {row['n_tiles'] / row['timings']['wall']:.0f}"
                                      for name, row in rows.items())
              + "; peak GPU memory (max_memory_allocated): "
              + ", ".join(f"{name} {row['peak_gpu_mb']:.0f} MB" for name, row in rows.items()))
    if json_out:
        record = {"size": size, "level": level, "level_wh": [level_w, level_h], "tile": tile, "overlap": overlap,
                  "batch_size": batch_size, "num_workers": num_workers, "width": _width(width, ckpt),
                  "threads": threads, "device": device, "amp": amp_on, "generate_s": generate_s, **ours_opts,
                  "n_tiles": ours["n_tiles"], "tissue_mp": tissue_mp,
                  "speedup_vs_monai": fastest / ours["timings"]["wall"],
                  "rows": {name: dict(row, tissue_mp_s=tissue_mp / row["timings"]["wall"],
                                      tiles_s=row["n_tiles"] / row["timings"]["wall"]) for name, row in rows.items()}}
        Path(json_out).write_text(json.dumps(record, indent=1))
    print(f"speedup_vs_monai={fastest / ours['timings']['wall']:.2f}")


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(bench)
