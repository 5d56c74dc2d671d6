# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Benchmark 256x256 tile reads per second for cuCIM, OpenSlide and tifffile on one synthetic slide.

    python scripts/bench_read.py [--size 8192] [--seconds 3] [--threads "(1, 2)"] [--gpu_decode True] [--json_out F]

A JPEG, tile-256 pyramidal BigTIFF of synthetic H&E texture is written to a temporary folder, then tiles are read
at random tile-aligned and unaligned level-0 locations through ``custom.data.slide.Slide.read_region`` (the
backend's own call) and, for cuCIM and OpenSlide, through ``monai.data.WSIReader.get_data`` to show what MONAI's
per-call checks cost. Ratios are to OpenSlide's rate for the same access pattern and thread count, measured in
the same run. MONAI's tifffile backend decodes the whole level for every patch and is left out.

``--gpu_decode True`` adds cuCIM's GPU decode (``read_region(..., device="cuda")``, nvJPEG), one tile per call and
through cuCIM's batch reader (a list of locations, ``num_workers`` = the thread count, ``batch_size`` 32), beside the
same batch reader decoding on the CPU; every GPU read is waited for before the next. Where the GPU decode cannot start
(no GPU, no nvJPEG) its rows are left out and a line says why. ``--json_out FILE`` also writes the rows as JSON.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import fire
import numpy as np
from monai.data import WSIReader

from custom.data.he_renderer import make_layout, render_tile
from custom.data.slide import BACKENDS, open_slide
from custom.errors import report_input_errors
from custom.writers.pyramid_tiff import write_pyramid

TILE = 256
BATCH = 32  # locations per batch of cuCIM's batch reader
TEXTURE = 1024  # the synthetic tissue is rendered once at this size and repeated; rendering a whole slide is slow


def make_slide(path: Path, size: int, mpp: float = 0.5) -> Path:
    """Write a size x size JPEG pyramidal TIFF of repeated synthetic tissue (tile 256, like most scanners)."""
    texture = render_tile(make_layout(seed=0, index=0, size=TEXTURE, positive=True), 0, 0, TEXTURE, TEXTURE)

    def tile(row: int, col: int, height: int, width: int) -> np.ndarray:
        r, c = row % TEXTURE, col % TEXTURE
        return texture[r : r + height, c : c + width]

    return write_pyramid(path, tile, (size, size), channels=3, mpp=mpp, tile=TILE, compression="jpeg")


def random_locations(size: int, aligned: bool, count: int = 20_000, seed: int = 0) -> np.ndarray:
    """Level-0 (x, y) tile corners, on the file's 256 px tile grid or anywhere inside the slide."""
    rng = np.random.default_rng(seed)
    if aligned:
        return rng.integers(0, size // TILE, (count, 2)) * TILE
    return rng.integers(0, size - TILE, (count, 2))


def tiles_per_second(read: Callable[[int, int], object], locations: np.ndarray, threads: int, seconds: float) -> float:
    """Read tiles from ``threads`` threads for ``seconds`` and return the combined rate."""
    for x, y in locations[:8]:  # warm-up: open files, first decoder set-up
        read(int(x), int(y))
    deadline = time.perf_counter() + seconds

    def worker(offset: int) -> int:
        done = 0
        while time.perf_counter() < deadline:
            x, y = locations[(offset + done * threads) % len(locations)]
            read(int(x), int(y))
            done += 1
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(worker, range(threads)))
    return total / (time.perf_counter() - start)


def readers(path: Path) -> dict[str, Callable[[int, int], object]]:
    """Tile readers by label: each backend through Slide, and cuCIM / OpenSlide through MONAI's get_data."""
    found = {}
    for backend in BACKENDS:
        slide = open_slide(path, backends=(backend,))
        found[backend] = lambda x, y, slide=slide: slide.read_region((x, y), (TILE, TILE))
    for backend in ("cucim", "openslide"):
        reader = WSIReader(backend=backend, channel_dim=-1)
        wsi = reader.read(str(path))
        # MONAI takes (row, col) locations and (height, width) sizes
        found[f"{backend} (MONAI get_data)"] = lambda x, y, r=reader, w=wsi: r.get_data(w, (y, x), (TILE, TILE), 0)
    return found


def _wait_for_gpu() -> None:
    """Wait until the GPU's queued work (cuCIM's decode) has finished."""
    import torch

    torch.cuda.synchronize()


def cucim_batches(handle, locations: np.ndarray, threads: int, device: str) -> int:
    """Read ``locations`` (level-0 (x, y)) through cuCIM's batch reader on ``device``; returns the tiles read."""
    tiles = 0
    for batch in handle.read_region([tuple(map(int, xy)) for xy in locations], (TILE, TILE), 0,
                                    num_workers=threads, batch_size=BATCH, device=device):
        tiles += batch.shape[0]
    if device != "cpu":
        _wait_for_gpu()
    return tiles


def gpu_readers(path: Path) -> tuple[dict[str, Callable[[int, int], object]], dict[str, Callable], str | None]:
    """cuCIM's GPU decode, one tile per call, and its batch reader (on the GPU and, to compare, on the CPU); or
    none and the reason when the GPU decode cannot start (each reader is tried once here)."""
    from cucim import CuImage

    handle = CuImage(str(path))

    def one(x: int, y: int) -> object:
        tile = handle.read_region(location=(x, y), size=(TILE, TILE), level=0, device="cuda")
        _wait_for_gpu()
        return tile

    try:
        one(0, 0)
        cucim_batches(handle, np.zeros((2, 2), dtype=np.int64), 1, "cuda")
    except Exception as error:  # no GPU, no nvJPEG, or a cuCIM built without it: the reason is printed
        return {}, {}, f"{type(error).__name__}: {error}"
    batch_readers = {f"cucim batches of {BATCH} (CPU decode)": lambda loc, n: cucim_batches(handle, loc, n, "cpu"),
                     f"cucim batches of {BATCH} (GPU decode)": lambda loc, n: cucim_batches(handle, loc, n, "cuda")}
    return {"cucim GPU decode": one}, batch_readers, None


def batch_tiles_per_second(read: Callable[[np.ndarray, int], int], locations: np.ndarray, threads: int,
                           seconds: float) -> float:
    """Tiles per second of a batch reader handed ``8 * BATCH`` locations at a time for ``seconds``."""
    read(locations[:BATCH], threads)  # warm-up
    chunk, done, offset = 8 * BATCH, 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        done += read(locations[offset : offset + chunk], threads)
        offset = (offset + chunk) % (len(locations) - chunk)
    return done / (time.perf_counter() - start)


def benchmark(size: int = 8192, seconds: float = 3.0, threads: Sequence[int] = (1, 2), gpu_decode: bool = False,
              on_row: Callable[[list[dict], str | None], None] | None = None) -> tuple[list[dict], str | None]:
    """Measure tiles/s per reader, access pattern and thread count, with ratios to OpenSlide's; with
    ``gpu_decode`` also cuCIM's GPU decode (its rows last), or the reason it could not run. ``on_row(rows,
    reason)`` is called after every row, so what was measured survives a reader that crashes the process."""
    threads = (threads,) if isinstance(threads, int) else tuple(threads)
    skipped = None
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = make_slide(Path(tmp) / "bench.tif", size)
        print(f"slide: {size}x{size} px, JPEG, tile {TILE}, written in {time.perf_counter() - start:.1f} s")
        rows = []
        tile_readers, batch_readers = readers(path), {}
        if gpu_decode:
            gpu_tile, batch_readers, skipped = gpu_readers(path)
            tile_readers |= gpu_tile
            if skipped:
                print(f"skipped: cuCIM GPU decode unavailable ({skipped})")
        for label, read in [*tile_readers.items(), *batch_readers.items()]:
            for access in ("aligned", "unaligned"):
                locations = random_locations(size, aligned=access == "aligned")
                for n in threads:
                    if label in batch_readers:
                        rate = batch_tiles_per_second(read, locations, n, seconds)
                    else:
                        rate = tiles_per_second(read, locations, n, seconds)
                    rows.append({"reader": label, "access": access, "threads": n, "tiles_per_s": rate})
                    if on_row is not None:
                        on_row(rows, skipped)
    baseline = {(r["access"], r["threads"]): r["tiles_per_s"] for r in rows if r["reader"] == "openslide"}
    for r in rows:
        r["vs_openslide"] = r["tiles_per_s"] / baseline[(r["access"], r["threads"])]
    return rows, skipped


def main(size: int = 8192, seconds: float = 3.0, threads: Sequence[int] = (1, 2), gpu_decode: bool = False,
         json_out: str | None = None) -> None:
    """Run the benchmark and print its table (and write it to ``json_out`` when given)."""
    def record(rows: list[dict], skipped: str | None) -> dict:
        return {"size": size, "seconds": seconds, "threads": [threads] if isinstance(threads, int) else list(threads),
                "gpu_decode": gpu_decode, "gpu_decode_skipped": skipped, "rows": rows}

    def write(rows: list[dict], skipped: str | None) -> None:
        if json_out:
            Path(json_out).write_text(json.dumps(record(rows, skipped), indent=1))

    rows, skipped = benchmark(size, seconds, threads, gpu_decode, on_row=write)
    width = max(28, *(len(r["reader"]) for r in rows))
    print(f"\n{'reader':<{width}} {'access':<10} {'threads':>7} {'tiles/s':>9} {'vs OpenSlide':>13}")
    for r in rows:
        rate, ratio = r["tiles_per_s"], r["vs_openslide"]
        print(f"{r['reader']:<{width}} {r['access']:<10} {r['threads']:>7} {rate:>9.0f} {ratio:>12.2f}x")
    write(rows, skipped)


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
