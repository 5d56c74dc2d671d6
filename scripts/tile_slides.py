# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Detect tissue and lay a tile grid on every slide of a folder or a slide list.

    python scripts/tile_slides.py SLIDES OUT [--level 0 | --mpp 0.5] [--tile_size 256] [--overlap 0]
        [--min_tissue 0.25] [--tissue_mpp 8] [--threshold T] [--mpp_override M]

SLIDES is a folder (every file with a whole-slide suffix) or a slide list (CSV, or JSON list of dicts, with a
``slide`` column; paths relative to the list's folder). For each slide OUT receives:

    <name>_tissue.png           the tissue mask (0/255) at about ``tissue_mpp`` microns per pixel
    <name>_tissue_overlay.png   the slide thumbnail with the tissue tinted green, to check the mask at a glance
    <name>_tissue.geojson       the tissue outline for QuPath (File > Import objects), level-0 (x, y) pixels
    <name>_level<L>_tile<T>_overlap<O>.csv   the tile grid that later stages reuse (custom.data.grid.grid_for)

A slide that cannot be read or tiled is reported in the table and skipped; the others are still processed.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import fire

from custom.data.datalist import load_slide_datalist
from custom.data.grid import grid_csv_path, make_tile_grid, save_grid_csv
from custom.data.slide import SLIDE_SUFFIXES, SlideReadError, open_slide, select_level
from custom.data.tissue import detect_tissue
from custom.errors import report_input_errors
from custom.tables import Column, format_table
from custom.writers.tissue import save_tissue_geojson, save_tissue_png


def list_slides(source: str | Path) -> list[Path]:
    """Slides of a folder (by suffix, sorted) or of a CSV/JSON slide list."""
    source = Path(source)
    if source.is_dir():
        return sorted(p for p in source.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    if source.is_file():
        return [Path(item["slide"]) for item in load_slide_datalist(source)]
    raise FileNotFoundError(f"no slide folder or slide list at {source}")


def tile_slide(path: Path, out: Path, level: int | None, mpp: float | None, tile_size: int, overlap: int,
               min_tissue: float, tissue_mpp: float, threshold: float | None, mpp_override: float | None) -> dict:
    """Write one slide's tissue PNGs, GeoJSON and grid CSV; return its table row."""
    with open_slide(path) as slide:
        chosen = select_level(slide, level=level, mpp=mpp, mpp_override=mpp_override)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tissue = detect_tissue(slide, mpp=tissue_mpp, threshold=threshold, mpp_override=mpp_override)
            grid = make_tile_grid(slide, tissue, chosen, tile_size, overlap, min_tissue)
        grid.tissue = {"mpp": tissue_mpp, "threshold": threshold, "mpp_override": mpp_override}  # grid_for's key
        save_tissue_png(tissue, out / f"{path.stem}_tissue.png", tissue.thumbnail)
        save_tissue_geojson(tissue, out / f"{path.stem}_tissue.geojson")
        save_grid_csv(grid, grid_csv_path(slide, chosen, tile_size, overlap, out))
        width, height = slide.level_dimensions[0]
        return {
            "slide": path.name,
            "backend": slide.backend,
            "size": f"{width}x{height}",
            "mpp": f"{slide.mpp[0]:.3f}" if slide.mpp else "none",
            "level": chosen,
            "threshold": f"{tissue.threshold:.3f}",
            "tissue": f"{tissue.fraction():.1%}",
            "tiles": len(grid),
            "note": "; ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning)),
        }


def main(slides: str, out: str, level: int | None = None, mpp: float | None = None, tile_size: int = 256,
         overlap: int = 0, min_tissue: float = 0.25, tissue_mpp: float = 8.0, threshold: float | None = None,
         mpp_override: float | None = None) -> None:
    """Tile every slide of SLIDES into OUT and print a table (level-0 size is w x h) and a summary."""
    if level is None and mpp is None:
        level = 0
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for path in list_slides(slides):
        try:
            rows.append(tile_slide(path, out_dir, level, mpp, tile_size, overlap, min_tissue, tissue_mpp,
                                   threshold, mpp_override))
        except (FileNotFoundError, SlideReadError, ValueError) as err:
            rows.append({"slide": path.name, "backend": "FAILED", "note": str(err).replace("\n", " ")})
    columns = ("slide", "backend", "size", "mpp", "level", "threshold", "tissue", "tiles", "note")
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    print(format_table([Column(c, align="<") for c in columns], cells, sep="  ", strip=True))
    done = [r for r in rows if r["backend"] != "FAILED"]
    print(f"\n{len(done)} of {len(rows)} slides tiled, {sum(r['tiles'] for r in done)} tiles; outputs in {out_dir}")


if __name__ == "__main__":
    report_input_errors()
    fire.Fire(main)
