# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The pathologist's corrections in the datastore, written as the bundle's strong labels (``strong_datalist``).

A correction is an image of the studies folder with a ``final`` label (``PUT /datastore/label``):

* a plain image (PNG, JPEG) with a mask image of the same size (0/1 or 0/255: ``custom.data.images.read_mask``);
* a plain image with an ASAP XML, what QuPath's Submit Label sends for a selected region: it uploads the region's
  pixels as an image ``<slide>-patch-<x>_<y>_<w>_<h>`` and the outlines in it, in pixels of that image;
* a slide with an ASAP XML (QuPath's Submit Label for the whole slide): the outlines are level-0 pixels offset by the
  ``X``, ``Y`` of its ``Annotations`` element; the corrected region is that element's box when it has a size (``W``,
  ``H``), else the box around every outline, read at the level the served model infers the slide at.

In an XML, outlines of a tumour class (``tumour``, ``tumor`` in any case, Camelyon16's ``_0`` and ``_1``) are tumour;
outlines of every other class (``exclusion``, the holes this app answers, or a pathologist's ``Stroma``) are not,
and win where they overlap a tumour outline; the rest of the region is not tumour either.

Each region is cut into tiles of ``tile_size`` (the training's ``image_size``) at the pixels the served model
infers it at (a plain image at its own, a slide at its inference level), so the student learns the corrections at
the scale it is used at; a side shorter than a tile stays one tile (the bundle resizes it). The tiles and their masks
are PNG files of a folder of the app, listed in ``strong.json`` with paths relative to it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from monailabel.interfaces.datastore import Datastore
from skimage.io import imsave

from custom.data.annotations import TUMOUR, Annotation, rasterize_annotations, read_asap_xml
from custom.data.images import check_mask_size, read_mask, read_rgb
from custom.data.slide import PLAIN_SUFFIXES, Slide, open_slide

__all__ = ["LABEL_TAG", "MAX_STRONG_TILES", "TUMOUR_CLASSES", "Correction", "corrections", "write_strong_datalist"]

logger = logging.getLogger(__name__)

LABEL_TAG = "final"
"""The datastore tag of a pathologist's label (MONAI Label's ``DefaultLabelTag.FINAL``, QuPath's default)."""
TUMOUR_CLASSES = frozenset({"tumour", "tumor", "_0", "_1"})
"""XML classes (``PartOfGroup``, compared in lower case) that are tumour; every other class is not."""
MAX_STRONG_TILES = 4096
"""Most strong tiles one training takes (each is held in memory through the training, as the weak ones are)."""
STRONG_LIST = "strong.json"
"""File name of the strong-label list in its folder."""


@dataclass(frozen=True)
class Correction:
    """One labelled image of the datastore: its id, its file and its final label's file."""

    image_id: str
    image: str
    label: str


def corrections(datastore: Datastore) -> list[Correction]:
    """Every image of the datastore that has a final label, in id order (so a training's tiles are reproducible)."""
    found = []
    for image_id in sorted(datastore.get_labeled_images()):
        label_id = datastore.get_label_by_image_id(image_id, LABEL_TAG)
        label = datastore.get_label_uri(label_id, LABEL_TAG) if label_id else ""
        if label:
            found.append(Correction(image_id, datastore.get_image_uri(image_id), label))
    return found


def _xml_box(path: str) -> tuple[tuple[float, float], tuple[int, int], list[str]]:
    """The ``X``, ``Y`` offset and ``W``, ``H`` box of an XML's ``Annotations`` element (QuPath writes them; 0
    without) and every class its outlines use."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as err:
        raise ValueError(f"label {path}: malformed XML ({err})") from err
    element = root.find("Annotations")
    attrs = element.attrib if element is not None else {}
    try:
        offset = float(attrs.get("X", 0)), float(attrs.get("Y", 0))
        size = int(float(attrs.get("W", 0))), int(float(attrs.get("H", 0)))
    except ValueError as err:
        raise ValueError(f"label {path}: the Annotations element's X, Y, W, H are not numbers ({err})") from err
    classes = sorted({a.get("PartOfGroup", "") for a in root.iter("Annotation")})
    return offset, size, classes


def _xml_annotations(path: str, offset: tuple[float, float] = (0.0, 0.0)) -> list[Annotation]:
    """The outlines of an ASAP XML, tumour or not by class, moved by ``offset`` (level-0 pixels)."""
    _, _, classes = _xml_box(path)
    tumour = [c for c in classes if c.lower() in TUMOUR_CLASSES]
    other = [c for c in classes if c.lower() not in TUMOUR_CLASSES]
    if other:
        logger.info("label %s: classes %s are read as not tumour", path, other)
    annotations = read_asap_xml(path, tumour_groups=tumour, exclusion_groups=other)
    if not annotations:
        raise ValueError(f"label {path} holds no outline: draw the tumour (or outline the region as not tumour)")
    return [replace(a, xy=a.xy + np.asarray(offset)) for a in annotations]


def _outlines_mask(annotations: list[Annotation], location_xy: tuple[float, float], size_wh: tuple[int, int],
                   downsample: float) -> np.ndarray:
    """Tumour (1) and not tumour (0) of a region from its outlines."""
    return (rasterize_annotations(annotations, location_xy, size_wh, downsample) == TUMOUR).astype(np.uint8)


def plain_region(correction: Correction) -> tuple[np.ndarray, np.ndarray]:
    """The pixels and the 0/1 mask of a corrected plain image (a mask image, or an XML in the image's pixels)."""
    image = read_rgb(correction.image)
    if Path(correction.label).suffix.lower() == ".xml":
        size_wh = (image.shape[1], image.shape[0])
        return image, _outlines_mask(_xml_annotations(correction.label), (0.0, 0.0), size_wh, 1.0)
    mask = read_mask(correction.label)
    check_mask_size(mask.shape, correction.label, image.shape, correction.image)
    return image, mask


def slide_region(correction: Correction, level_of: Callable[[Slide], int], max_pixels: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The pixels and the 0/1 mask of the corrected region of a slide, at the level the served model reads it at."""
    if Path(correction.label).suffix.lower() != ".xml":
        raise ValueError(f"label {correction.label} of slide {correction.image_id!r} is an image: a mask of a whole "
                         "slide is not read; submit the corrected region as its own image (QuPath's Submit Label "
                         "with a region selected does) or outline it in an ASAP XML")
    offset, box_wh, _ = _xml_box(correction.label)
    annotations = _xml_annotations(correction.label, offset)
    with open_slide(correction.image) as slide:
        if box_wh[0] > 0 and box_wh[1] > 0:
            (x0, y0), (x1, y1) = offset, (offset[0] + box_wh[0], offset[1] + box_wh[1])
        else:
            points = np.concatenate([a.xy for a in annotations])
            (x0, y0), (x1, y1) = points.min(axis=0), points.max(axis=0)
        width0, height0 = slide.level_dimensions[0]
        x0, y0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        x1, y1 = min(width0, math.ceil(x1)), min(height0, math.ceil(y1))
        level = level_of(slide)
        ds = float(slide.level_downsamples[level])
        size_wh = (math.ceil((x1 - x0) / ds), math.ceil((y1 - y0) / ds))
        if min(size_wh) <= 0:
            raise ValueError(f"label {correction.label}: its region lies outside slide {correction.image_id!r}")
        if size_wh[0] * size_wh[1] > max_pixels:
            raise ValueError(f"label {correction.label}: its region of {size_wh[0]} x {size_wh[1]} pixels at level "
                             f"{level} is larger than the limit of {max_pixels}; submit smaller regions")
        pixels = slide.read_region((x0, y0), size_wh, level)
    return pixels, _outlines_mask(annotations, (x0, y0), size_wh, ds)


def _starts(length: int, tile: int) -> list[int]:
    """Tile origins along one side: every ``tile`` pixels, the last one flush with the end (so tiles overlap rather
    than reach past the region); one tile when the side is shorter."""
    if length <= tile:
        return [0]
    return sorted(set(range(0, length - tile, tile)) | {length - tile})


def tiles(pixels: np.ndarray, mask: np.ndarray, tile: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The region cut into ``tile`` x ``tile`` crops of pixels and mask (smaller where the region is)."""
    rows, cols = mask.shape
    for r in _starts(rows, tile):
        for c in _starts(cols, tile):
            yield pixels[r : r + tile, c : c + tile], mask[r : r + tile, c : c + tile]


def write_strong_datalist(
    found: list[Correction], folder: Path, tile_size: int, level_of: Callable[[Slide], int], max_pixels: int
) -> tuple[Path, int]:
    """Write the tiles of every correction and ``strong.json`` listing them into ``folder``; the list and how many
    tiles it holds. A correction that cannot be read stops the training with the reason (naming its files)."""
    if not found:
        raise ValueError("no image of the studies folder has a final label: submit a correction first "
                         "(PUT /datastore/label, or QuPath's Submit Label)")
    (folder / "tiles").mkdir(parents=True, exist_ok=True)
    rows = []
    for index, correction in enumerate(found):
        plain = Path(correction.image).suffix.lower() in PLAIN_SUFFIXES
        pixels, mask = plain_region(correction) if plain else slide_region(correction, level_of, max_pixels)
        for number, (tile_pixels, tile_mask) in enumerate(tiles(pixels, mask, tile_size)):
            if len(rows) == MAX_STRONG_TILES:
                raise ValueError(f"the corrections make more than {MAX_STRONG_TILES} tiles of {tile_size} pixels; "
                                 "remove some labels (DELETE /datastore/label) or train with a larger image_size")
            stem = f"tiles/{index:05d}_{number:04d}"
            imsave(folder / f"{stem}.png", np.ascontiguousarray(tile_pixels), check_contrast=False)
            imsave(folder / f"{stem}_mask.png", tile_mask, check_contrast=False)
            rows.append({"image": f"{stem}.png", "mask": f"{stem}_mask.png",
                         "name": f"correction-{correction.image_id}-{number:04d}", "group": correction.image_id})
    listing = folder / STRONG_LIST
    listing.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    logger.info("%d correction(s) cut into %d strong tile(s) of %d pixels: %s", len(found), len(rows), tile_size,
                os.fspath(listing))
    return listing, len(rows)
