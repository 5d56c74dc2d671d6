# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""A plain image (PNG, JPEG, ...) seen through the ``Slide`` reading interface, so one engine infers both.

It is a one-level "slide" held in memory (plain images are small); regions past its edge read as white, as on
a slide. Coordinates: ``read_region`` takes ``(x, y)`` and ``(width, height)`` like ``Slide.read_region``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from custom.data.images import read_rgb

__all__ = ["PlainImage"]


@dataclass
class PlainImage:
    """An RGB image with the attributes of ``custom.data.slide.Slide`` that inference uses."""

    path: str
    pixels: np.ndarray
    mpp: tuple[float, float] | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> PlainImage:
        """Read and validate ``path`` (8-bit RGB, see ``custom.data.images.read_rgb``)."""
        return cls(os.fspath(path), read_rgb(path))

    @property
    def level_dimensions(self) -> list[tuple[int, int]]:
        """One level, ``(width, height)``."""
        return [(self.pixels.shape[1], self.pixels.shape[0])]

    @property
    def level_downsamples(self) -> list[float]:
        """One level at full resolution."""
        return [1.0]

    @property
    def level_count(self) -> int:
        """A plain image has one level."""
        return 1

    def read_region(self, location_xy: tuple[int, int], size_wh: tuple[int, int], level: int = 0) -> np.ndarray:
        """A ``(height, width, 3)`` uint8 crop, white where it reaches past the image."""
        if level != 0:
            raise ValueError(f"{self.path}: a plain image has only level 0, got level {level}")
        (x, y), (width, height) = (int(v) for v in location_xy), (int(v) for v in size_wh)
        out = np.full((height, width, 3), 255, np.uint8)
        rows, cols = self.pixels.shape[:2]
        r0, r1, c0, c1 = max(y, 0), min(y + height, rows), max(x, 0), min(x + width, cols)
        if r0 < r1 and c0 < c1:
            out[r0 - y : r1 - y, c0 - x : c1 - x] = self.pixels[r0:r1, c0:c1]
        return out

    def close(self) -> None:
        """Nothing to release (the interface of ``Slide``)."""
