"""Camelyon16-style ASAP XML annotations: reading polygons and rasterising them into label masks.

The format (what ASAP writes and Camelyon16 ships)::

    <ASAP_Annotations><Annotations>
      <Annotation Name="..." Type="Polygon" PartOfGroup="_0">
        <Coordinates><Coordinate Order="0" X="..." Y="..."/>...</Coordinates>
      </Annotation>
    </Annotations></ASAP_Annotations>

Coordinates are level-0 pixels as (x, y). Groups ``_0``, ``_1`` and ``Tumor`` mark tumour; ``_2`` marks regions
inside a tumour outline that are not tumour and are excluded from evaluation. The rasterised label mask uses
``BACKGROUND = 0``, ``TUMOUR = 1`` and ``EXCLUDED = 2``; evaluation ignores pixels equal to ``EXCLUDED``.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from skimage.draw import polygon as fill_polygon

__all__ = [
    "BACKGROUND",
    "TUMOUR",
    "EXCLUDED",
    "TUMOUR_GROUPS",
    "EXCLUSION_GROUPS",
    "Annotation",
    "read_asap_xml",
    "rasterize_annotations",
]

BACKGROUND, TUMOUR, EXCLUDED = 0, 1, 2
TUMOUR_GROUPS = ("_0", "_1", "Tumor")
EXCLUSION_GROUPS = ("_2",)
_AREA_TYPES = ("Polygon", "Spline", "Rectangle")


@dataclass(frozen=True)
class Annotation:
    """One closed outline: its level-0 (x, y) vertices and the label value it paints."""

    name: str
    group: str
    value: int
    xy: np.ndarray  # (n_vertices, 2) float64, columns (x, y) in level-0 pixels


def _parse_vertices(element: ElementTree.Element, path: str | os.PathLike, name: str) -> np.ndarray:
    """Read the Coordinate children in their Order, as (n, 2) level-0 (x, y)."""
    rows = []
    for coordinate in element.iter("Coordinate"):
        try:
            rows.append((int(coordinate.attrib["Order"]), float(coordinate.attrib["X"]), float(coordinate.attrib["Y"])))
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"{path}: annotation {name!r} has a Coordinate without a valid Order/X/Y ({dict(coordinate.attrib)})"
            ) from e
    if len(rows) < 3:
        raise ValueError(f"{path}: annotation {name!r} has {len(rows)} coordinate(s); a region needs at least 3")
    rows.sort(key=lambda row: row[0])
    return np.array([(x, y) for _, x, y in rows], dtype=np.float64)


def read_asap_xml(
    path: str | os.PathLike,
    tumour_groups: Sequence[str] = TUMOUR_GROUPS,
    exclusion_groups: Sequence[str] = EXCLUSION_GROUPS,
) -> list[Annotation]:
    """Read the region annotations of an ASAP XML file; an unknown group is an error so no outline is silently lost."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as e:
        raise ValueError(f"{path}: malformed XML ({e})") from e
    if root.tag != "ASAP_Annotations":
        raise ValueError(f"{path}: root element is <{root.tag}>, expected <ASAP_Annotations>")
    annotations = []
    for index, element in enumerate(root.iter("Annotation")):
        name = element.get("Name", f"#{index}")
        group, kind = element.get("PartOfGroup", ""), element.get("Type", "")
        if kind not in _AREA_TYPES:
            raise ValueError(f"{path}: annotation {name!r} has Type {kind!r}; expected one of {_AREA_TYPES}")
        if group in tumour_groups:
            value = TUMOUR
        elif group in exclusion_groups:
            value = EXCLUDED
        else:
            raise ValueError(
                f"{path}: annotation {name!r} is in group {group!r}, which is neither tumour {tuple(tumour_groups)} "
                f"nor exclusion {tuple(exclusion_groups)}; pass tumour_groups/exclusion_groups to map it"
            )
        annotations.append(Annotation(name, group, value, _parse_vertices(element, path, name)))
    return annotations


def rasterize_annotations(
    annotations: Sequence[Annotation],
    location_xy: tuple[float, float],
    size_wh: tuple[int, int],
    downsample: float = 1.0,
) -> np.ndarray:
    """Paint annotations into a (rows, cols) uint8 label mask of one region, the same box `Slide.read_region` reads.

    ``location_xy`` is the region's level-0 (x, y) top-left corner and ``size_wh`` its (width, height) in pixels at
    ``downsample``. A pixel is painted when its centre lies inside an outline; exclusions are painted after tumour,
    so they win where both overlap.
    """
    width, height = size_wh
    mask = np.zeros((height, width), dtype=np.uint8)
    for value in (TUMOUR, EXCLUDED):
        for annotation in annotations:
            if annotation.value != value:
                continue
            # level-0 (x, y) -> (row, col) of this grid; skimage puts pixel centres on integers, hence the -0.5.
            cols = (annotation.xy[:, 0] - location_xy[0]) / downsample - 0.5
            rows = (annotation.xy[:, 1] - location_xy[1]) / downsample - 0.5
            rr, cc = fill_polygon(rows, cols, shape=mask.shape)
            mask[rr, cc] = value
    return mask
