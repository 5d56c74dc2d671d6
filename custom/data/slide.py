# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Open whole-slide images through ``monai.data.WSIReader`` with a per-file backend fallback.

Coordinate conventions at this boundary:

* ``Slide.read_region`` takes a location in LEVEL-0 ``(x, y)`` pixels (OpenSlide / QuPath order) and a size
  ``(width, height)`` in pixels AT the requested level; it returns a ``(rows, cols, 3)`` uint8 RGB array.
* ``level_dimensions`` are ``(width, height)``; ``mpp`` is ``(x, y)`` microns per level-0 pixel.
* MONAI's ``WSIReader.get_data`` takes ``(row, col)`` locations and ``(height, width)`` sizes; it is only used
  here to validate a file, never exposed.

Reading goes straight to the object that ``WSIReader.read`` returned (``CuImage``, ``OpenSlide`` or
``TiffFile``): ``get_data`` copies every patch again (``np.take`` to drop alpha: a third of cuCIM's time per
256 px tile, profiled) and re-validates the level on every call (the cost is measured by ``scripts/bench_read.py``;
figures in bundle/docs/README.md, "Slide reading"); MONAI's tifffile backend decodes the whole level for every
patch, so this module decodes only the TIFF tiles a region touches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from monai.data import WSIReader
from tifffile.tifffile import svs_description_metadata

from custom.data.tiff import read_tiff_region
from custom.errors import InputError, MissingInputError

__all__ = ["SLIDE_SUFFIXES", "PLAIN_SUFFIXES", "ASSUMED_LEVEL0_MPP", "SlideReadError", "Slide", "level0_mpp",
           "mpp_or_assumed", "open_slide", "select_level"]

BACKENDS = ("cucim", "openslide", "tifffile")
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".bif", ".vms", ".vmu", ".svslide")
"""File suffixes taken as whole-slide images when a folder is listed (OpenSlide's formats and pyramidal TIFF)."""
PLAIN_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
"""File suffixes of plain images (one level, read whole), which inference treats apart from slides."""
ASSUMED_LEVEL0_MPP = 0.5
"""Level-0 microns per pixel (20x) assumed for files without mpp metadata, only to size masks, areas and tags."""
_PROBE_SIZE = 64  # pixels of the test read that proves a backend can decode the file


class SlideReadError(InputError, RuntimeError):
    """No backend could open and decode a slide; the message names the file and each backend's error."""


@dataclass
class Slide:
    """An open whole-slide image: geometry and resolution metadata plus a lazily (re)opened backend handle.

    The handle (``CuImage`` is not picklable) is dropped when a ``Slide`` is pickled and reopened on first use
    in another process, so a ``Dataset`` can hold ``Slide`` objects and use them in DataLoader workers, whether
    they are started by fork or by spawn.
    """

    path: str
    backend: str
    level_dimensions: list[tuple[int, int]]
    level_downsamples: list[float]
    mpp: tuple[float, float] | None
    _handle: Any = field(default=None, repr=False, compare=False)
    _handle_pid: int | None = field(default=None, repr=False, compare=False)

    @property
    def level_count(self) -> int:
        """Number of pyramid levels."""
        return len(self.level_dimensions)

    @property
    def is_open(self) -> bool:
        """Whether this process holds the backend handle (a pickled copy reopens the file on its first read)."""
        return self._handle is not None and self._handle_pid == os.getpid()

    @property
    def handle(self) -> Any:
        """The backend object, reopened in a process that did not open it (DataLoader workers)."""
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = _open_handle(self.path, self.backend)
            self._handle_pid = os.getpid()
        return self._handle

    def read_region(self, location_xy: tuple[int, int], size_wh: tuple[int, int], level: int = 0,
                    fill: int = 255) -> np.ndarray:
        """Read an RGB region; the part outside the slide is padded with ``fill`` (white, as blank glass looks).

        Args:
            location_xy: top-left corner in LEVEL-0 ``(x, y)`` pixels; may be negative.
            size_wh: ``(width, height)`` in pixels at ``level``.
            level: pyramid level.
            fill: value of the pixels outside the slide (0 for a mask TIFF read as a slide: background).

        Returns:
            a writable, C-contiguous ``(height, width, 3)`` uint8 RGB array.
        """
        if not 0 <= level < self.level_count:
            raise InputError(f"{self.path}: level {level} requested but the slide has {self.level_count} levels")
        width, height = (int(s) for s in size_wh)
        if width <= 0 or height <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got (w, h)={size_wh}")
        x, y = (int(v) for v in location_xy)
        ds = self.level_downsamples[level]
        level_w, level_h = self.level_dimensions[level]
        col0, row0 = int(x // ds), int(y // ds)
        if col0 >= 0 and row0 >= 0 and col0 + width <= level_w and row0 + height <= level_h:
            return self._read_inside((x, y), (width, height), level)
        out = np.full((height, width, 3), fill, dtype=np.uint8)
        c_start, c_stop = max(col0, 0), min(col0 + width, level_w)
        r_start, r_stop = max(row0, 0), min(row0 + height, level_h)
        if c_start < c_stop and r_start < r_stop:
            inside_xy = (max(x, 0), max(y, 0))
            out[r_start - row0 : r_stop - row0, c_start - col0 : c_stop - col0] = self._read_inside(
                inside_xy, (c_stop - c_start, r_stop - r_start), level
            )
        return out

    def _read_inside(self, location_xy: tuple[int, int], size_wh: tuple[int, int], level: int) -> np.ndarray:
        """Read a region that lies wholly inside the slide with the backend's own call."""
        handle = self.handle
        if self.backend == "cucim":
            return np.asarray(handle.read_region(location=location_xy, size=size_wh, level=level))[..., :3]
        if self.backend == "openslide":
            return np.array(handle.read_region(location_xy, level, size_wh).convert("RGB"))  # PIL arrays are read-only
        ds = self.level_downsamples[level]
        page = handle.series[0].levels[level].keyframe
        return read_tiff_region(page, int(location_xy[1] // ds), int(location_xy[0] // ds), size_wh[1], size_wh[0])

    def close(self) -> None:
        """Release the backend handle (it is reopened if the slide is read again)."""
        if self._handle is not None and hasattr(self._handle, "close"):
            self._handle.close()
        self._handle = None
        self._handle_pid = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        """Drop the unpicklable handle; the receiving process reopens the file on first read."""
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = None
        return state


def level0_mpp(slide: Slide, override: float | None = None) -> float | None:
    """Level-0 microns per pixel of a slide (or ``PlainImage``): ``override`` when given (files without or with wrong
    metadata), else the file's x resolution, else None."""
    if override is not None:
        return override
    return slide.mpp[0] if slide.mpp else None


def mpp_or_assumed(mpp: float | None) -> float:
    """``mpp`` (a :func:`level0_mpp`), or :data:`ASSUMED_LEVEL0_MPP` when the file has none: the one fallback for
    sizing tissue masks, areas and resolution tags (selecting a level by mpp refuses such files instead)."""
    return mpp or ASSUMED_LEVEL0_MPP


def _open_handle(path: str, backend: str, reader: WSIReader | None = None) -> Any:
    """Open ``path`` with one MONAI WSIReader backend and return the backend's own slide object."""
    handle = (reader or WSIReader(backend=backend, channel_dim=-1)).read(path)
    if backend == "tifffile":
        handle.filehandle.set_lock(True)  # threads reading tiles share one file position
    return handle


def _geometry(handle: Any, backend: str, reader: WSIReader) -> tuple[list[tuple[int, int]], list[float]]:
    """Level sizes ``(width, height)`` and downsamples; tifffile levels come from the pyramid series.

    MONAI's tifffile backend counts every TIFF page as a level, which for SVS includes the thumbnail, label
    and macro images; ``TiffFile.series[0].levels`` holds only the pyramid.
    """
    if backend == "tifffile":
        shapes = [level.keyframe.shape for level in handle.series[0].levels]
        dims = [(int(s[1]), int(s[0])) for s in shapes]
        return dims, [dims[0][1] / h for _, h in dims]
    count = reader.get_level_count(handle)
    dims = [tuple(int(v) for v in reversed(reader.get_size(handle, lvl))) for lvl in range(count)]
    return dims, [float(reader.get_downsample_ratio(handle, lvl)) for lvl in range(count)]


def _level0_mpp(handle: Any, backend: str, reader: WSIReader) -> tuple[float, float] | None:
    """Level-0 microns per pixel ``(x, y)``, or None when the file does not record it.

    MONAI returns ``(y, x)`` for OpenSlide and tifffile, reports cuCIM's default spacing of 1.0 even when the
    file has no unit (so a unit-less cuCIM spacing is treated as missing), and its tifffile backend ignores the
    Aperio ``MPP`` field of SVS files.
    """
    if backend == "cucim" and "MPP" not in handle.metadata.get("aperio", {}):
        units = handle.metadata.get("cucim", {}).get("spacing_units", ["", ""])
        if not all(units[:2]):
            return None
    if backend == "tifffile" and handle.is_svs:
        aperio_mpp = svs_description_metadata(handle.pages[0].description).get("MPP")
        return (float(aperio_mpp),) * 2 if aperio_mpp else None
    try:
        first, second = reader.get_mpp(handle, 0)
    except ValueError:
        return None
    mpp_xy = (float(first), float(second)) if backend == "cucim" else (float(second), float(first))
    return mpp_xy if all(np.isfinite(mpp_xy)) and min(mpp_xy) > 0 else None


def _try_backend(path: str, backend: str) -> Slide:
    """Open ``path`` with one backend and prove it decodes: the lowest level's first pixels, level 0's last.

    Truncated files often still open (the headers are intact); their last tiles are what fails to decode.
    """
    reader = WSIReader(backend=backend, channel_dim=-1)
    handle = _open_handle(path, backend, reader)
    dims, downsamples = _geometry(handle, backend, reader)
    slide = Slide(path, backend, dims, downsamples, _level0_mpp(handle, backend, reader), handle, os.getpid())
    for level, corner in ((slide.level_count - 1, "first"), (0, "last")):
        probe_w, probe_h = (min(_PROBE_SIZE, s) for s in dims[level])
        location = (0, 0) if corner == "first" else (dims[0][0] - probe_w, dims[0][1] - probe_h)
        patch = slide.read_region(location, (probe_w, probe_h), level=level)
        if patch.shape != (probe_h, probe_w, 3) or patch.dtype != np.uint8:
            raise ValueError(f"test read gave {patch.shape} {patch.dtype}, expected ({probe_h}, {probe_w}, 3) uint8")
    return slide


def open_slide(path: str | os.PathLike, backends: Sequence[str] = BACKENDS) -> Slide:
    """Open a whole-slide image with the first backend that both opens it and decodes a test read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SlideReadError: every backend failed; the message lists each backend's error.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingInputError(f"slide not found: {path}")
    errors = []
    for backend in backends:
        if backend not in BACKENDS:
            raise InputError(f"unknown slide backend {backend!r}; choose from {BACKENDS}")
        try:
            return _try_backend(path, backend)
        except Exception as err:  # every backend raises its own types (RuntimeError, OpenSlideError, TiffFileError...)
            errors.append(f"{backend}: {type(err).__name__}: {err}")
    raise SlideReadError(f"cannot read slide {path}:\n  " + "\n  ".join(errors))


def select_level(
    slide: Slide,
    level: int | None = None,
    mpp: float | None = None,
    tolerance: float = 0.1,
    mpp_override: float | None = None,
) -> int:
    """Pick a pyramid level by index or by microns per pixel (x), within a relative ``tolerance``.

    Args:
        slide: the open slide.
        level: the level index; exclusive with ``mpp``.
        mpp: target microns per pixel; the level whose mpp is nearest, if within ``tolerance`` of it.
        tolerance: accepted relative difference between the level's mpp and ``mpp``.
        mpp_override: level-0 microns per pixel given by the user, for files without (or with wrong) metadata.
    """
    if (level is None) == (mpp is None):
        raise InputError(f"{slide.path}: give exactly one of level={level} or mpp={mpp}")
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise InputError(f"{slide.path}: level {level} requested but the slide has {slide.level_count} levels")
        return int(level)
    base = level0_mpp(slide, mpp_override)
    if base is None:
        raise InputError(
            f"{slide.path} has no microns-per-pixel metadata: select by level=, or pass mpp_override= "
            "(the level-0 mpp, e.g. 0.25 for 40x, 0.5 for 20x)"
        )
    level_mpps = [base * ds for ds in slide.level_downsamples]
    errors = [abs(m - mpp) / mpp for m in level_mpps]
    best = int(np.argmin(errors))
    if errors[best] > tolerance:
        listed = ", ".join(f"level {i}: {m:.3f}" for i, m in enumerate(level_mpps))
        raise InputError(f"{slide.path}: no level within {tolerance:.0%} of {mpp} um/px (available: {listed})")
    return best
