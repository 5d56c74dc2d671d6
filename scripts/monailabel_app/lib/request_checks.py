# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Checks of client requests before any pixel is read: which image, which region, how many tiles.

MONAI Label itself reads any existing path a client names (``image`` or ``params.image``) and hands any region to
the task. Here an image must be named by an id the datastore lists (an image of the studies folder; a path, even
one of a listed image, is refused), every id or tag is one plain name (``check_name``), and a region must be
non-empty, start on the slide, and stay under a pixel and tile budget; anything else is an HTTP 4xx with a reason.

Coordinates: ``location`` is LEVEL-0 ``(x, y)``; ``size`` and ``tile_size`` are ``(width, height)`` AT ``level``
(what QuPath's extension and ``Slide.read_region`` use).
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monailabel.interfaces.datastore import Datastore

__all__ = ["MAX_EPOCHS", "MAX_NAME_CHARS", "MAX_REGION_PIXELS", "MAX_TILES", "MIN_TILE", "TRAIN_KEYS", "Region",
           "StudiesFile", "check_name", "check_pair", "check_region", "check_train_params", "name_problem",
           "studies_image"]

MAX_NAME_CHARS = 200
"""Longest id or tag (a file or folder name of at most 255 bytes once MONAI Label adds the extension)."""

MAX_REGION_PIXELS = 4096 * 4096
"""Largest region, in pixels at its level (a 2048 x 2048 region takes a few seconds on a 2-core CPU)."""
MAX_TILES = 64
"""Most tiles one region may be split into (``tile_size`` far below ``size`` would queue thousands)."""
MIN_TILE = 64
"""Smallest accepted ``tile_size`` side."""
MAX_EPOCHS = 500
"""Most epochs of a training stage one ``/train`` request may ask for (``train.json``'s stage 2 on a GPU)."""
TRAIN_INTS = {
    "stage1_epochs": (1, MAX_EPOCHS), "stage2_epochs": (1, MAX_EPOCHS), "max_epochs": (1, MAX_EPOCHS),
    "batch_size": (1, 256), "train_batch_size": (1, 256), "val_batch_size": (1, 256), "image_size": (32, 1024),
    "seed": (0, 2**31 - 1),
}
"""Integer train parameters and their bounds (``max_epochs``, ``train_batch_size`` and ``val_batch_size`` are the
names QuPath's Run Training sends)."""
TRAIN_FLOATS = {"learning_rate": (0.0, 1.0), "strong_weight": (0.0, 100.0), "strong_share": (0.0, 1.0)}
"""Real-valued train parameters and their bounds (see ``OPEN_BOUNDS`` for the bounds a value may not take)."""
OPEN_BOUNDS = {"learning_rate": (True, False), "strong_share": (False, True)}
"""Per real-valued key, whether its (lower, upper) bound is excluded: a learning rate of 0 learns nothing, and the
corrections' share of an epoch's draws must leave room for the weak images (0 draws them like any other image)."""
TRAIN_KEYS = frozenset(TRAIN_INTS) | frozenset(TRAIN_FLOATS)
"""Every key a ``/train`` request may hold."""


def name_problem(value: str) -> str:
    """Why ``value`` cannot be one file or folder name inside the studies folder, or '' when it can."""
    if not value:
        return "is empty"
    if len(value) > MAX_NAME_CHARS:
        return f"is longer than {MAX_NAME_CHARS} characters"
    if "\x00" in value:
        return "holds a null byte"
    if any(unicodedata.category(c) in ("Cc", "Cf", "Cs") for c in value):
        return "holds a control character"
    if "/" in value or "\\" in value:
        return "holds a path separator"
    if value.startswith("."):
        return "starts with '.' (so '..' and hidden files are refused)"
    return ""


def check_name(value: Any, key: str) -> str:
    """``value`` if it is one plain name (an image id, a label id or a tag), else a 400 naming ``key`` and why:
    MONAI Label joins ids and tags to the studies folder as they come, so ``../x`` would reach outside it."""
    if not isinstance(value, str):
        raise HTTPException(400, f"'{key}' must be a name of the studies folder, got {value!r}")
    problem = name_problem(value)
    if problem:
        raise HTTPException(400, f"'{key}' must be a plain name of the studies folder (no path): {value!r} {problem}")
    return value


class StudiesFile(str):
    """The file of a listed image as this app resolved it. MONAI Label hands it on to the tile requests of a region
    (deep copies keep the type); a client's JSON cannot make one, so a client cannot name an image by its path."""


def studies_image(datastore: Datastore, image: Any) -> StudiesFile:
    """The file of ``image``, an image id the datastore lists (or a file this app resolved); anything else is a 4xx."""
    if isinstance(image, StudiesFile):
        if image in {datastore.get_image_uri(i) for i in datastore.list_images()}:
            return image
        raise HTTPException(404, f"image {Path(image).name!r} is no longer an image of the studies folder")
    if not isinstance(image, str) or not image:
        raise HTTPException(400, f"'image' must be an image id of the studies folder, got {image!r}")
    check_name(image, "image")
    if image not in datastore.list_images():
        raise HTTPException(404, f"image {image!r} is not an image of the studies folder")
    return StudiesFile(datastore.get_image_uri(image))


def _train_number(key: str, value: Any) -> int | float:
    """One checked train parameter, or a 400 naming it and its bounds."""
    if key in TRAIN_INTS:
        low, high = TRAIN_INTS[key]
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise HTTPException(400, f"'{key}' must be an integer in [{low}, {high}], got {value!r}")
        if key == "image_size" and value % 8:
            raise HTTPException(400, f"'image_size' must be a multiple of 8 (the network pools 3 times), got {value}")
        return value
    low, high = TRAIN_FLOATS[key]
    open_low, open_high = OPEN_BOUNDS.get(key, (False, False))
    bounds = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not number or not low <= value <= high or (open_low and value == low) or (open_high and value == high):
        raise HTTPException(400, f"'{key}' must be a number in {bounds}, got {value!r}")
    return float(value)


def check_train_params(params: Any) -> dict[str, int | float]:
    """The bundle overrides a ``/train`` request asks for (``train.json`` knob names), or a 400 naming the bad key.

    Only ``TRAIN_KEYS`` are accepted, each bounded. QuPath's names are mapped: ``max_epochs`` sets both stages (unless
    a stage is named too), ``train_batch_size`` is ``batch_size``; ``val_batch_size`` is accepted and not used (the
    bundle validates with ``batch_size``).
    """
    if not isinstance(params, dict):
        raise HTTPException(400, f"train parameters must be a JSON object, got {type(params).__name__}")
    unknown = sorted(str(key) for key in params if key not in TRAIN_KEYS)
    if unknown:
        raise HTTPException(400, f"unknown train parameter(s) {unknown}; known: {sorted(TRAIN_KEYS)}")
    checked = {key: _train_number(key, value) for key, value in params.items()}
    batch = {checked[k] for k in ("batch_size", "train_batch_size") if k in checked}
    if len(batch) > 1:
        raise HTTPException(400, f"'batch_size' and 'train_batch_size' differ ({sorted(batch)}): give one")
    epochs = checked.pop("max_epochs", None)
    if epochs is not None:
        checked.setdefault("stage1_epochs", epochs)
        checked.setdefault("stage2_epochs", epochs)
    if "train_batch_size" in checked:
        checked["batch_size"] = checked.pop("train_batch_size")
    checked.pop("val_batch_size", None)
    return checked


def check_pair(request: dict, key: str) -> tuple[int, int]:
    """Two integers from ``request[key]``, or a 400 naming the key."""
    value = request.get(key)
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise HTTPException(400, f"'{key}' must be two integers, got {value!r}")
    try:
        pair = int(value[0]), int(value[1])
    except (TypeError, ValueError):
        raise HTTPException(400, f"'{key}' must be two integers, got {value!r}") from None
    if pair != (value[0], value[1]):
        raise HTTPException(400, f"'{key}' must be two integers, got {value!r}")
    return pair


@dataclass(frozen=True)
class Region:
    """A checked region, clipped to the slide, and the tiles it is inferred in (``wsi_tiles`` of MONAI Label)."""

    level: int
    location_xy: tuple[int, int]
    size_wh: tuple[int, int]
    tiles: list[dict]


def check_region(
    request: dict,
    level_dimensions: Sequence[tuple[int, int]],
    level_downsamples: Sequence[float],
    max_pixels: int = MAX_REGION_PIXELS,
    max_tiles: int = MAX_TILES,
) -> Region:
    """Validate ``level``, ``location``, ``size`` and ``tile_size`` against the slide; clip the region to it.

    The region is split into tiles of ``tile_size`` from its origin; the last column and row of tiles keep what is
    left of the clipped region, however small (only the requested ``tile_size`` must be at least ``MIN_TILE``).
    """
    level = request.get("level", 0)
    if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level < len(level_dimensions):
        raise HTTPException(400, f"'level' must be an integer in [0, {len(level_dimensions) - 1}], got {level!r}")
    (x, y), (width, height) = check_pair(request, "location"), check_pair(request, "size")
    tiled = "tile_size" in request  # a client's split of the region; one region (a tile of it) has none
    tile_w, tile_h = check_pair(request, "tile_size") if tiled else (width, height)
    level0_w, level0_h = level_dimensions[0]
    if not (0 <= x < level0_w and 0 <= y < level0_h):
        raise HTTPException(400, f"'location' {(x, y)} must lie on the slide, level 0 is {level0_w} x {level0_h}")
    if width <= 0 or height <= 0:
        raise HTTPException(400, f"'size' must be positive, got {(width, height)}")
    if width * height > max_pixels:
        raise HTTPException(400, f"region {width} x {height} is larger than the limit of {max_pixels} pixels")
    if tiled and min(tile_w, tile_h) < MIN_TILE:
        raise HTTPException(400, f"'tile_size' must be at least {MIN_TILE}, got {(tile_w, tile_h)}")
    ds = float(level_downsamples[level])
    level_w, level_h = level_dimensions[level]
    width, height = min(width, level_w - math.floor(x / ds)), min(height, level_h - math.floor(y / ds))
    if width <= 0 or height <= 0:
        raise HTTPException(400, f"region at {(x, y)} lies past the edge of level {level} ({level_w} x {level_h})")
    cols, rows = math.ceil(width / tile_w), math.ceil(height / tile_h)
    if cols * rows > max_tiles:
        raise HTTPException(400, f"'tile_size' {(tile_w, tile_h)} splits the region into {cols * rows} tiles, "
                                 f"more than {max_tiles}")
    tiles = [
        {"location": [x + round(c * tile_w * ds), y + round(r * tile_h * ds)],
         "size": [min(tile_w, width - c * tile_w), min(tile_h, height - r * tile_h)]}
        for r in range(rows) for c in range(cols)
    ]
    return Region(level, (x, y), (width, height), tiles)
