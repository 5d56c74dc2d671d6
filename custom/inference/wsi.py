# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The whole-slide sliding-window engine: tissue tiles only, read ahead in worker processes, blended to disk.

One slide at a time: detect tissue, lay a tile grid at the chosen level (by index or microns per pixel), read and
normalise tiles in DataLoader workers (each opens the slide lazily, as cuCIM handles cannot be pickled) while the
main process runs the network on batches, and blend the probability tiles with MONAI's Gaussian importance map
into a raw uint8 raster on disk (``StripMerger``). The slide-sized float output is never held in memory.

Coordinates: tile positions are LEVEL-0 ``(x, y)`` pixels (``TileGrid``); the raster is ``(rows, cols)`` of the
inferred level; a raster pixel ``(r, c)`` covers level-0 ``[c * ds, (c + 1) * ds) x [r * ds, (r + 1) * ds)``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from custom.data.grid import TileGrid, make_tile_grid
from custom.data.slide import Slide, level0_mpp, mpp_or_assumed, select_level
from custom.data.tissue import TissueMask, detect_tissue
from custom.inference.heap import heap_reuse
from custom.inference.runtime import check_runtime, network_versions, prepare_network
from custom.inference.stitch import StripMerger, importance_map

__all__ = ["STAGES", "SlidePrediction", "TileDataset", "WholeSlideInferer"]

STAGES = ("tissue", "read", "preprocess", "wait", "model", "stitch", "write")
"""Timed stages; ``read`` and ``preprocess`` run in the workers (summed over tiles), ``wait`` is the main process
waiting for a batch, so ``model / wall`` is the share of time the network runs."""


class TileDataset(Dataset):
    """The tiles of one slide, read and normalised where the DataLoader runs them (worker processes).

    Items: ``image`` (3, tile, tile) float32 after ``preprocessing``, ``index`` into the grid, and the seconds spent
    reading and preprocessing it.
    """

    def __init__(self, slide: Slide, grid: TileGrid, preprocessing: Callable | None = None) -> None:
        self.slide, self.grid, self.preprocessing = slide, grid, preprocessing

    def __len__(self) -> int:
        return len(self.grid)

    def __getitem__(self, index: int) -> dict:
        start = time.perf_counter()
        size = (self.grid.tile_size, self.grid.tile_size)
        tile = self.slide.read_region((int(self.grid.x[index]), int(self.grid.y[index])), size, self.grid.level)
        read = time.perf_counter()
        image = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float().div_(255.0)
        if self.preprocessing is not None:
            image = torch.as_tensor(self.preprocessing(image), dtype=torch.float32)
        done = time.perf_counter()
        return {"image": image, "index": index, "read_s": read - start, "preprocess_s": done - read}


def _single_thread_worker(_: int) -> None:
    """Keep each reader process on one thread so readers and the network do not oversubscribe the cores."""
    torch.set_num_threads(1)


@dataclass
class SlidePrediction:
    """Where the blended probability raster of one slide is and how it maps back to level 0."""

    source: str
    raster: Path
    shape_hw: tuple[int, int]
    level: int
    downsample: float
    level0_wh: tuple[int, int]
    level0_mpp: float | None
    tissue: TissueMask | None
    n_tiles: int
    timings: dict[str, float] = field(default_factory=dict)


class WholeSlideInferer:
    """Sliding-window inference over the tissue of one slide, streamed to a raw uint8 probability raster.

    Args:
        tile_size: window side in pixels at the inferred level.
        overlap: pixels shared by neighbouring windows; overlapping predictions are blended with ``blend_mode``.
        level: pyramid level to infer at (exclusive with ``mpp``).
        mpp: microns per pixel to infer at; the nearest level within ``mpp_tolerance`` is used.
        batch_size: tiles per network call.
        num_workers: DataLoader worker processes that read ahead of the network (0 reads in the main process).
        amp: mixed precision (float16 autocast) when the device is a GPU; ignored on a CPU.
        min_tissue: the smallest tissue fraction of a tile that is run; the rest of the slide stays 0.
        channel: the network output channel to keep (the fused map is the last, -1).
        blend_mode: ``"gaussian"`` or ``"constant"`` (MONAI importance-map modes).
        tissue_kwargs: arguments of ``custom.data.tissue.detect_tissue`` (e.g. ``threshold``, ``mpp``).
        mpp_override: level-0 microns per pixel for slides without (or with wrong) metadata.
        mpp_tolerance: accepted relative difference when selecting a level by ``mpp``.
        progress: show a tqdm bar per slide (tiles/s and ETA).
        runtime: how the network is evaluated (``custom.inference.runtime``): ``"auto"`` (oneDNN conv+ReLU on a
            CPU, else ``"fused"``), ``"onednn"``, ``"fused"`` (BatchNorm folded, channels-last, only the kept
            channel computed), ``"compile"`` (``torch.compile``, falling back to ``"onednn"``/``"fused"`` when it
            fails) or ``"eager"`` (the network as given). All give the same map up to float rounding.
        heap_reuse: keep freed memory in the process heap while the tiles run (``custom.inference.heap``: glibc
            only), so the network's activations are not page-faulted in again at every layer of every batch.
        trained_mpp: microns per pixel the network was trained at (its checkpoint's record); a slide inferred at
            a resolution more than ``mpp_tolerance`` away from it is warned about, naming both.
    """

    def __init__(
        self,
        tile_size: int = 256,
        overlap: int = 32,
        level: int | None = None,
        mpp: float | None = None,
        batch_size: int = 8,
        num_workers: int = 1,
        amp: bool = True,
        min_tissue: float = 0.01,
        channel: int = -1,
        blend_mode: str = "gaussian",
        tissue_kwargs: dict | None = None,
        mpp_override: float | None = None,
        mpp_tolerance: float = 0.1,
        progress: bool = True,
        runtime: str = "auto",
        heap_reuse: bool = True,
        trained_mpp: float | None = None,
    ) -> None:
        if level is None and mpp is None:
            level = 0
        self.tile_size, self.overlap, self.level, self.mpp = tile_size, overlap, level, mpp
        self.batch_size, self.num_workers, self.amp = batch_size, num_workers, amp
        self.min_tissue, self.channel, self.progress = min_tissue, channel, progress
        self.runtime, self.heap_reuse = check_runtime(runtime), heap_reuse
        self._prepared: tuple | None = None  # (network, its weight versions, callable, memory format), kept per network
        self.tissue_kwargs = dict(tissue_kwargs or {})
        self.mpp_override, self.mpp_tolerance = mpp_override, mpp_tolerance
        self.trained_mpp = trained_mpp
        self.weights = importance_map(tile_size, blend_mode)

    def select_level(self, slide: Slide) -> int:
        """The level this inferer reads ``slide`` at."""
        return select_level(slide, self.level, self.mpp, self.mpp_tolerance, self.mpp_override)

    def check_resolution(self, slide: Slide, level: int, output_mpp: float | None) -> None:
        """Warn when ``slide`` is inferred at a resolution other than the one the network was trained at."""
        if self.trained_mpp and output_mpp and abs(output_mpp / self.trained_mpp - 1) > self.mpp_tolerance:
            logging.getLogger(__name__).warning(
                "%s: inferred at %.3g um/px (level %d), but the network was trained at %.3g um/px (its checkpoint's "
                "record): its maps are of another scale; leave 'mpp' and 'level' unset to infer at the trained "
                "resolution", Path(slide.path).name, output_mpp, level, self.trained_mpp,
            )

    def tile_grid(self, slide: Slide, tissue: TissueMask | None, level: int) -> TileGrid:
        """Tissue tiles at ``level``; a side shorter than one window gets one window, white-padded past the edge."""
        return make_tile_grid(slide, tissue, level, self.tile_size, self.overlap, self.min_tissue, allow_small=True)

    def __call__(
        self,
        slide: Slide,
        network: torch.nn.Module,
        raster_path: str | os.PathLike,
        preprocessing: Callable | None = None,
        plain_image: bool = False,
        on_start: Callable[[StripMerger, float], None] | None = None,
    ) -> SlidePrediction:
        """Infer one slide into ``raster_path``; a ``plain_image`` is read at its only level, every window run.

        ``on_start(merger, output_mpp)`` is called once the raster exists, so outputs can be streamed from its
        finished rows (``StripMerger.wait_rows``) while the network still runs; ``output_mpp`` is the raster's
        microns per pixel (from ``custom.data.slide.mpp_or_assumed``, as in the summary).
        """
        start = time.perf_counter()
        timings = dict.fromkeys(STAGES, 0.0)
        level = 0 if plain_image else self.select_level(slide)
        tissue = None if plain_image else detect_tissue(slide, mpp_override=self.mpp_override, **self.tissue_kwargs)
        timings["tissue"] = time.perf_counter() - start
        grid = self.tile_grid(slide, tissue, level)
        shape_hw = tuple(reversed(slide.level_dimensions[level]))
        merger = StripMerger(raster_path, shape_hw, self.weights)
        mpp = level0_mpp(slide, self.mpp_override)
        if not plain_image:
            self.check_resolution(slide, level, None if mpp is None else mpp * grid.downsample)
        if on_start is not None:
            on_start(merger, mpp_or_assumed(mpp) * grid.downsample)
        try:
            with heap_reuse(self.heap_reuse):
                self._run_tiles(TileDataset(slide, grid, preprocessing), network, merger, timings)
        finally:
            merger.close()
        timings["wall"] = time.perf_counter() - start
        return SlidePrediction(
            slide.path,
            Path(raster_path), shape_hw, level, grid.downsample, tuple(slide.level_dimensions[0]), mpp, tissue,
            len(grid), timings,
        )

    def _loader(self, tiles: TileDataset, device: torch.device) -> DataLoader:
        """Batches read ahead by worker processes (pinned for a GPU so the copy overlaps the network)."""
        workers = self.num_workers if len(tiles) > self.batch_size else 0
        return DataLoader(
            tiles,
            batch_size=self.batch_size,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            worker_init_fn=_single_thread_worker if workers else None,
            prefetch_factor=4 if workers else None,
        )

    def prepared_network(self, network: torch.nn.Module, device: torch.device) -> tuple[Callable, torch.memory_format]:
        """``network`` made ready to run as ``runtime`` says (``prepare_network``): kept from one slide to the next
        while it is the same network with the same weights (a compiled network compiles once), redone otherwise."""
        network.eval()
        versions = network_versions(network)
        cached = self._prepared
        if cached is None or cached[0] is not network or cached[1] != versions:
            self._prepared = (network, versions, *prepare_network(network, self.runtime, self.channel, device))
        return self._prepared[2], self._prepared[3]

    def _run_tiles(self, tiles: TileDataset, network: torch.nn.Module, merger: StripMerger, timings: dict) -> None:
        """Run the network on every tile batch and blend the chosen output channel into ``merger``."""
        device = next(network.parameters()).device
        autocast = torch.autocast(device.type, dtype=torch.float16, enabled=self.amp and device.type == "cuda")
        ds, grid = tiles.grid.downsample, tiles.grid
        bar = tqdm(total=len(tiles), desc=Path(grid.slide).name, unit="tile", disable=not self.progress, leave=False)
        batches = iter(self._loader(tiles, device))
        run_network, memory_format = self.prepared_network(network, device)
        with torch.inference_mode(), bar:
            while True:
                waited = time.perf_counter()
                batch = next(batches, None)
                began = time.perf_counter()
                timings["wait"] += began - waited
                if batch is None:
                    break
                timings["read"] += float(batch["read_s"].sum())
                timings["preprocess"] += float(batch["preprocess_s"].sum())
                with autocast:
                    images = batch["image"].to(device, non_blocking=True, memory_format=memory_format)
                    output = run_network(images)
                probabilities = output.float().cpu().numpy()
                ran = time.perf_counter()
                timings["model"] += ran - began
                for index, probability in zip(batch["index"].tolist(), probabilities):
                    merger.add(round(grid.y[index] / ds), round(grid.x[index] / ds), probability)
                timings["stitch"] += time.perf_counter() - ran
                bar.update(len(probabilities))
