# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""A grid of tiles over a slide's tissue, and its CSV form so later stages reuse it instead of recomputing.

Tile positions are LEVEL-0 ``(x, y)`` pixels of each tile's top-left corner (the convention of OpenSlide,
QuPath and ``Slide.read_region``); ``tile_size`` and ``overlap`` are pixels AT ``level``. The grid covers the
whole level: tiles on the right and bottom edges may reach past the slide and are then padded white by
``Slide.read_region``. A level smaller than one tile is refused with a ``ValueError``.

CSV layout: one ``# {json}`` comment line with the grid parameters, then ``x,y,tissue_fraction`` rows
(``pandas.read_csv(path, comment="#")`` reads it too).
"""

from __future__ import annotations

import csv
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from custom.data.slide import Slide, select_level
from custom.data.tissue import TissueMask, detect_tissue

__all__ = ["TileGrid", "make_tile_grid", "save_grid_csv", "load_grid_csv", "grid_for"]

_COLUMNS = ("x", "y", "tissue_fraction")
_TISSUE_SIGNATURE = inspect.signature(detect_tissue)  # its defaults complete a grid's tissue settings (cache key)


@dataclass
class TileGrid:
    """Tiles of one slide at one level: one entry per tile in ``x``, ``y`` and ``tissue_fraction``."""

    x: np.ndarray
    y: np.ndarray
    level: int
    tile_size: int
    overlap: int
    tissue_fraction: np.ndarray
    slide: str
    downsample: float
    min_tissue: float = 0.0
    tissue: dict = field(default_factory=dict)  # the detect_tissue keyword arguments behind tissue_fraction

    def __len__(self) -> int:
        return len(self.x)

    def params(self) -> dict:
        """The parameters that decide the grid; a cached CSV is reused only when they all match."""
        return _params(self.slide, self.level, self.tile_size, self.overlap, self.downsample, self.min_tissue,
                       self.tissue)


def _params(slide: str, level: int, tile_size: int, overlap: int, downsample: float, min_tissue: float,
            tissue: dict) -> dict:
    """The cache key of a grid (:meth:`TileGrid.params`), also built by :func:`grid_for` before any grid exists.

    ``tissue`` is completed with :func:`detect_tissue`'s defaults, so the same settings give the same key whether
    they were passed or left out.
    """
    settings = _TISSUE_SIGNATURE.bind_partial(**tissue)
    settings.apply_defaults()
    return {"slide": slide, "level": level, "tile_size": tile_size, "overlap": overlap, "downsample": downsample,
            "min_tissue": min_tissue, "tissue": dict(settings.arguments)}


def _starts(length: int, tile_size: int, stride: int) -> np.ndarray:
    """Tile starts along one axis so that the tiles cover ``[0, length)``; the last may pass the edge."""
    count = max(1, -(-(length - tile_size) // stride) + 1)  # one tile even when the axis is shorter than it
    return np.arange(count, dtype=np.int64) * stride


def make_tile_grid(
    slide: Slide,
    tissue: TissueMask | None,
    level: int,
    tile_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.25,
    allow_small: bool = False,
) -> TileGrid:
    """Lay tiles over the slide at ``level`` and keep those whose tissue fraction is at least ``min_tissue``.

    Args:
        slide: the open slide.
        tissue: its tissue mask; None keeps every tile (tissue fraction reported as 1).
        level: pyramid level the tiles are read at.
        tile_size: tile side in pixels at ``level``.
        overlap: pixels at ``level`` shared by neighbouring tiles.
        min_tissue: the smallest tissue fraction a kept tile has.
        allow_small: a level narrower or shorter than one tile gets one tile along that side, reaching past the edge
            (inference pads it); by default such a level is refused (training tiles must lie on the slide).
    """
    if not 0 <= level < slide.level_count:
        raise ValueError(f"{slide.path}: level {level} requested but the slide has {slide.level_count} levels")
    if tile_size <= 0 or not 0 <= overlap < tile_size:
        raise ValueError(f"{slide.path}: need tile_size > 0 and 0 <= overlap < tile_size, got {tile_size}, {overlap}")
    level_w, level_h = slide.level_dimensions[level]
    if not allow_small and (level_w < tile_size or level_h < tile_size):
        raise ValueError(
            f"{slide.path}: level {level} is {level_w}x{level_h} px (w x h), smaller than one {tile_size} px tile; "
            "choose a finer level or a smaller tile"
        )
    ds = slide.level_downsamples[level]
    stride = tile_size - overlap
    rows, cols = np.meshgrid(_starts(level_h, tile_size, stride), _starts(level_w, tile_size, stride), indexing="ij")
    x, y = np.round(cols.ravel() * ds).astype(np.int64), np.round(rows.ravel() * ds).astype(np.int64)
    side = tile_size * ds
    fraction = np.ones(len(x)) if tissue is None else tissue.box_fractions(x, y, side, side)
    keep = fraction >= min_tissue
    if not keep.any():
        warnings.warn(f"no tile of {slide.path} reaches {min_tissue:.0%} tissue; the grid is empty", stacklevel=2)
    return TileGrid(x[keep], y[keep], level, tile_size, overlap, fraction[keep], slide.path, float(ds), min_tissue)


def save_grid_csv(grid: TileGrid, path: str | os.PathLike) -> Path:
    """Write the grid as CSV with its parameters in a leading ``# {json}`` comment line."""
    path = Path(path)
    with path.open("w", newline="") as f:
        f.write(f"# {json.dumps(grid.params())}\n")
        writer = csv.writer(f)
        writer.writerow(_COLUMNS)
        writer.writerows(zip(grid.x.tolist(), grid.y.tolist(), np.round(grid.tissue_fraction, 6).tolist()))
    return path


def load_grid_csv(path: str | os.PathLike) -> TileGrid:
    """Read a grid written by :func:`save_grid_csv`; a malformed file raises ``ValueError`` naming it."""
    path = Path(path)
    with path.open(newline="") as f:
        first = f.readline()
        if not first.startswith("# "):
            raise ValueError(f"{path}: not a tile-grid CSV (first line must be '# {{parameters json}}')")
        try:
            params = json.loads(first[2:])
            reader = csv.reader(f)
            header = tuple(next(reader, ()))
            if header != _COLUMNS:
                raise ValueError(f"columns {header}, expected {_COLUMNS}")
            rows = [(int(x), int(y), float(frac)) for x, y, frac in reader]
            x, y, fraction = (np.array(col) for col in zip(*rows)) if rows else (np.zeros(0, np.int64),) * 3
            return TileGrid(
                x=x.astype(np.int64),
                y=y.astype(np.int64),
                level=int(params["level"]),
                tile_size=int(params["tile_size"]),
                overlap=int(params["overlap"]),
                tissue_fraction=fraction.astype(np.float64),
                slide=str(params["slide"]),
                downsample=float(params["downsample"]),
                min_tissue=float(params["min_tissue"]),
                tissue=dict(params.get("tissue", {})),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: malformed tile-grid CSV ({err})") from err


def grid_csv_path(slide: Slide, level: int, tile_size: int, overlap: int, cache_dir: str | os.PathLike) -> Path:
    """Where :func:`grid_for` caches the grid of these parameters."""
    return Path(cache_dir) / f"{Path(slide.path).stem}_level{level}_tile{tile_size}_overlap{overlap}.csv"


def grid_for(
    slide: Slide,
    level: int,
    tile_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.25,
    cache_dir: str | os.PathLike | None = None,
    **tissue_kwargs,
) -> TileGrid:
    """The slide's tile grid, reused from ``cache_dir`` when a CSV with the same parameters is there.

    Otherwise the tissue is detected (``tissue_kwargs`` go to :func:`detect_tissue`, and are part of the cache key),
    the grid made and saved.
    """
    select_level(slide, level=level)  # validates the level before it indexes anything
    path = grid_csv_path(slide, level, tile_size, overlap, cache_dir) if cache_dir is not None else None
    wanted = _params(slide.path, level, tile_size, overlap, float(slide.level_downsamples[level]), min_tissue,
                     tissue_kwargs)
    if path is not None and path.is_file():
        cached = load_grid_csv(path)
        if cached.params() == wanted:
            return cached
    grid = make_tile_grid(slide, detect_tissue(slide, **tissue_kwargs), level, tile_size, overlap, min_tissue)
    grid.tissue = dict(tissue_kwargs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid_csv(grid, path)
    return grid
