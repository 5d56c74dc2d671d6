# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Writer of QuPath-compatible GeoJSON: a FeatureCollection of classified annotation polygons.

QuPath (File > Import objects) reads ``properties.objectType`` ("annotation" or "detection") and
``properties.classification`` (``{"name", "color"}``). Coordinates are level-0 pixels in ``(x, y)`` order;
holes are the polygons' interior rings. Tumour (``custom.inference.outputs``) and tissue (``custom.writers.tissue``)
features are both built here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from shapely.geometry import Polygon, mapping

__all__ = ["qupath_features", "write_qupath_geojson"]


def _feature(polygon: Polygon, name: str, color: Sequence[int], properties: Mapping[str, Any] | None) -> dict:
    """One QuPath annotation: the polygon classified as ``name``, with ``properties`` shown as measurements."""
    return {
        "type": "Feature",
        "geometry": mapping(polygon),
        "properties": {"objectType": "annotation", "classification": {"name": name, "color": list(color)},
                       **(properties or {})},
    }


def qupath_features(
    polygons: Sequence[Polygon], name: str = "Tumor", color: Sequence[int] = (200, 0, 0),
    properties: Mapping[str, Any] | None = None,
) -> dict:
    """A FeatureCollection with one annotation per polygon, classified as ``name``, with ``properties`` added to each
    (e.g. the tissue detection's threshold) so QuPath shows them as measurements."""
    return {"type": "FeatureCollection", "features": [_feature(p, name, color, properties) for p in polygons]}


def write_qupath_geojson(
    path: str | os.PathLike, polygons: Sequence[Polygon], name: str = "Tumor", color: Sequence[int] = (200, 0, 0),
    properties: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``polygons`` (level-0 ``(x, y)``) as a QuPath GeoJSON FeatureCollection; none gives an empty one.

    Streamed one feature at a time (the bytes ``json.dumps`` of :func:`qupath_features` gives): a noisy map's
    thousands of outlines never exist as one document in memory."""
    path = Path(path)
    with path.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [')
        for index, polygon in enumerate(polygons):
            f.write(", " if index else "")
            json.dump(_feature(polygon, name, color, properties), f)
        f.write("]}")
    return path
