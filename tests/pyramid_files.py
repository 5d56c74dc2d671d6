# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Small tiled pyramidal TIFFs for the slide-reading tests, written with tifffile alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def pattern(height: int = 768, width: int = 1024) -> np.ndarray:
    """An RGB image whose every pixel tells its position, so misplaced reads show."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([(cols // 4) % 256, (rows // 3) % 256, ((rows + cols) // 8) % 256], -1).astype(np.uint8)


def write_pyramid(
    path: Path,
    image: np.ndarray,
    levels: int = 3,
    tile: int = 128,
    compression: str = "zlib",
    mpp_xy: tuple[float, float] | None = (0.5, 0.5),
) -> Path:
    """Write ``image`` and its 2x, 4x... subsamples as one tiled TIFF page per level (generic pyramidal TIFF).

    ``mpp_xy`` is stored as resolution tags in pixels per centimetre; None writes no resolution unit.
    """
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for level in range(levels):
            step = 2**level
            resolution = {}
            if mpp_xy is not None:
                resolution = {"resolution": (1e4 / (mpp_xy[0] * step), 1e4 / (mpp_xy[1] * step)),
                              "resolutionunit": "CENTIMETER"}
            tif.write(
                image[::step, ::step],
                tile=(tile, tile),
                compression=compression,
                photometric="rgb",
                subfiletype=1 if level else 0,
                **resolution,
            )
    return path
