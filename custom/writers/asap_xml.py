"""Writer of ASAP XML annotations, the Camelyon16 format that ASAP and the Camelyon16 tools open.

Layout: ``ASAP_Annotations/Annotations/Annotation[@Name, @Type="Polygon", @PartOfGroup, @Color]/Coordinates/
Coordinate[@Order, @X, @Y]`` and ``AnnotationGroups/Group[@Name]``. Groups ``_0`` and ``_1`` are tumour, ``_2`` is
an exclusion region (as in Camelyon16). Coordinates are level-0 pixels in ``(x, y)`` order.

The file is written as text line by line (every attribute value is generated here: numbers and the fixed group
names), which is several times faster than building an ElementTree for slides with a hundred thousand vertices.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["ASAP_GROUPS", "write_asap_xml"]

ASAP_GROUPS = {"_0": "#FF0000", "_1": "#FF0000", "_2": "#00FF00"}
"""Camelyon16 groups and their display colours: ``_0``/``_1`` tumour, ``_2`` exclusion."""


def _check_polygon(polygon_xy: np.ndarray, index: int, path: Path) -> np.ndarray:
    """Return the polygon as float (N, 2) (x, y), or raise naming the file and polygon."""
    polygon = np.asarray(polygon_xy, dtype=float)
    if polygon.ndim != 2 or polygon.shape[1] != 2 or len(polygon) < 3:
        raise ValueError(f"{path}: polygon {index} must be an (N>=3, 2) array of (x, y), got shape {polygon.shape}")
    if not np.isfinite(polygon).all():
        raise ValueError(f"{path}: polygon {index} has non-finite coordinates")
    return polygon


def write_asap_xml(
    path: str | os.PathLike, polygons_xy: Sequence[np.ndarray], groups: Sequence[str] | None = None
) -> Path:
    """Write polygons (level-0 ``(x, y)`` vertices, not closed) as an ASAP XML file; no polygons gives an empty list.

    Args:
        path: output ``.xml``.
        polygons_xy: one (N, 2) array of level-0 ``(x, y)`` vertices per annotation.
        groups: the group of each polygon (default ``_0``, tumour); one of ``ASAP_GROUPS``.
    """
    path = Path(path)
    groups = list(groups) if groups is not None else ["_0"] * len(polygons_xy)
    if len(groups) != len(polygons_xy):
        raise ValueError(f"{path}: {len(polygons_xy)} polygons but {len(groups)} groups")
    lines = ['<?xml version="1.0" encoding="utf-8"?>', "<ASAP_Annotations>", "  <Annotations>"]
    for index, (polygon_xy, group) in enumerate(zip(polygons_xy, groups)):
        if group not in ASAP_GROUPS:
            raise ValueError(f"{path}: polygon {index} has group {group!r}, expected one of {sorted(ASAP_GROUPS)}")
        polygon = _check_polygon(polygon_xy, index, path)
        lines.append(f'    <Annotation Name="Annotation {index}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        lines.append("      <Coordinates>")
        lines += [f'        <Coordinate Order="{order}" X="{x:.3f}" Y="{y:.3f}" />'
                  for order, (x, y) in enumerate(polygon.tolist())]
        lines += ["      </Coordinates>", "    </Annotation>"]
    lines += ["  </Annotations>", "  <AnnotationGroups>"]
    for name, color in ASAP_GROUPS.items():
        lines += [
            f'    <Group Name="{name}" PartOfGroup="None" Color="{color}">', "      <Attributes />", "    </Group>"
        ]
    lines += ["  </AnnotationGroups>", "</ASAP_Annotations>", ""]
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
