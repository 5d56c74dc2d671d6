# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Benchmark 256x256 tile reads per second for cuCIM, OpenSlide and tifffile on one synthetic slide.

    python scripts/bench_read.py [--size 8192] [--seconds 3] [--threads "(1, 2)"]

A JPEG, tile-256 pyramidal BigTIFF of synthetic H&E texture is written to a temporary folder, then tiles are read
at random tile-aligned and unaligned level-0 locations through ``custom.data.slide.Slide.read_region`` (the
backend's own call) and, for cuCIM and OpenSlide, through ``monai.data.WSIReader.get_data`` to show what MONAI's
per-call checks cost. Ratios are to OpenSlide's rate for the same access pattern and thread count, measured in
the same run. MONAI's tifffile backend decodes the whole level for every patch and is left out.
"""

from __future__ import annotations

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
from custom.writers.pyramid_tiff import write_pyramid

TILE = 256
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


def benchmark(size: int = 8192, seconds: float = 3.0, threads: Sequence[int] = (1, 2)) -> list[dict]:
    """Measure tiles/s per reader, access pattern and thread count, with ratios to OpenSlide's."""
    threads = (threads,) if isinstance(threads, int) else tuple(threads)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = make_slide(Path(tmp) / "bench.tif", size)
        print(f"slide: {size}x{size} px, JPEG, tile {TILE}, written in {time.perf_counter() - start:.1f} s")
        rows = []
        for label, read in readers(path).items():
            for access in ("aligned", "unaligned"):
                locations = random_locations(size, aligned=access == "aligned")
                for n in threads:
                    rate = tiles_per_second(read, locations, n, seconds)
                    rows.append({"reader": label, "access": access, "threads": n, "tiles_per_s": rate})
    baseline = {(r["access"], r["threads"]): r["tiles_per_s"] for r in rows if r["reader"] == "openslide"}
    for r in rows:
        r["vs_openslide"] = r["tiles_per_s"] / baseline[(r["access"], r["threads"])]
    return rows


def main(size: int = 8192, seconds: float = 3.0, threads: Sequence[int] = (1, 2)) -> None:
    """Run the benchmark and print its table."""
    rows = benchmark(size, seconds, threads)
    print(f"\n{'reader':<28} {'access':<10} {'threads':>7} {'tiles/s':>9} {'vs OpenSlide':>13}")
    for r in rows:
        rate, ratio = r["tiles_per_s"], r["vs_openslide"]
        print(f"{r['reader']:<28} {r['access']:<10} {r['threads']:>7} {rate:>9.0f} {ratio:>12.2f}x")


if __name__ == "__main__":
    fire.Fire(main)
