"""The synthetic data set: whole-slide images with tumour masks, ASAP XML annotations and a 256x256 crop data set.

The slides are painted by ``custom.data.he_renderer`` tile by tile; this module lays out the data set (which slides
are positive, the train/test split, which crops are taken) and writes it: ``slides/*.tif``, ``masks/*.tif``,
``annotations/*.xml``, ``slides.csv``, ``patches/{train,test}/{pos,neg,gt}``, a README and a completion marker.
Arrays and tile requests are in numpy ``(row, col)`` order; polygons and crop names are ``(x, y)``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from custom.data.he_renderer import SlideLayout, make_layout, render_mask, render_tile
from custom.writers.asap_xml import write_asap_xml
from custom.writers.pyramid_tiff import write_pyramid

__all__ = ["SyntheticSpec", "generate_dataset", "ensure_sample_data", "COMPLETE_MARKER", "building_dataset"]

COMPLETE_MARKER = ".complete.json"
"""Written last into a finished data set folder; holds the spec it was generated from."""


@contextmanager
def building_dataset(out: Path) -> Iterator[Path]:
    """A temporary sibling folder of ``out`` to write a data set into; renamed to ``out`` when the block ends
    normally, removed when it raises, so a failed or killed run never leaves a partial ``out``. The block writes
    ``COMPLETE_MARKER`` last. ``out`` must not exist or be an empty folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    building.chmod(0o755)  # mkdtemp makes it private; the data set is meant to be shared
    try:
        yield building
        if out.exists():
            out.rmdir()
        os.replace(building, out)
    finally:
        shutil.rmtree(building, ignore_errors=True)


@dataclass(frozen=True)
class SyntheticSpec:
    """Every knob of the synthetic data set; its defaults are the project's embedded sample data."""

    n_slides: int = 8
    size: int = 4096
    seed: int = 0
    mpp: float = 0.5
    patches_per_slide: int = 32
    patch_size: int = 256
    test_fraction: float = 0.25
    tile: int = 256


_PATCH_FOLDERS = tuple(f"patches/{split}/{kind}" for split in ("train", "test") for kind in ("pos", "neg", "gt"))


def _slide_labels(spec: SyntheticSpec) -> list[tuple[str, int, str]]:
    """(name, label, split) per slide: alternating positive/negative, the last of each label held out for test."""
    slides = [(f"slide_{i:03d}", 1 - i % 2) for i in range(spec.n_slides)]
    splits = {}
    for label in (0, 1):
        names = [name for name, lab in slides if lab == label]
        n_test = max(1, round(spec.test_fraction * len(names))) if len(names) >= 2 else 0
        splits.update({name: "test" if i >= len(names) - n_test else "train" for i, name in enumerate(names)})
    return [(name, label, splits[name]) for name, label in slides]


def _crop_fractions(layout: SlideLayout, row: int, col: int, size: int) -> tuple[float, float]:
    """(tissue, tumour) fractions of a crop, the tissue one estimated every 8 pixels."""
    centres = np.arange(4, size, 8, dtype=float)
    tissue = layout.in_tissue(col + centres[None, :], row + centres[:, None]).mean()
    tumour = (render_mask(layout, row, col, size, size) > 0).mean() if layout.tumours_xy else 0.0
    return float(tissue), float(tumour)


def _crop_origins(
    layout: SlideLayout, rng: np.random.Generator, size: int, want_tumour: bool, count: int
) -> list[tuple[int, int]]:
    """Top-left (row, col) of crops that are mostly tissue: with a partial tumour fraction, or with no tumour."""
    found: list[tuple[int, int]] = []
    for _ in range(200 * count):
        if len(found) == count:
            break
        if want_tumour:  # near a random boundary vertex, so the tumour fraction varies from crop to crop
            polygon = layout.tumours_xy[rng.integers(len(layout.tumours_xy))]
            x, y = polygon[rng.integers(len(polygon))] + rng.uniform(-0.9, 0.9, 2) * size - size / 2
        else:
            x, y = rng.uniform(0, layout.size - size, 2)
        row, col = int(np.clip(y, 0, layout.size - size)), int(np.clip(x, 0, layout.size - size))
        tissue, tumour = _crop_fractions(layout, row, col, size)
        wanted = 0.05 <= tumour <= 0.95 if want_tumour else tumour == 0
        if tissue >= 0.8 and wanted and (row, col) not in found:
            found.append((row, col))
    return found


def _write_patches(
    layout: SlideLayout, name: str, label: int, index: int, split: str, spec: SyntheticSpec, out: Path
) -> dict[str, int]:
    """Write this slide's crops (and the masks of positive ones) into ``patches/<split>/{pos,neg,gt}``."""
    rng = np.random.default_rng([spec.seed, index, spec.size, 1])
    n_pos = round(0.75 * spec.patches_per_slide) if label else 0
    folder, size = out / "patches" / split, spec.patch_size
    counts = {}
    for kind, want_tumour, count in (("pos", True, n_pos), ("neg", False, spec.patches_per_slide - n_pos)):
        origins = _crop_origins(layout, rng, size, want_tumour, count)
        for row, col in origins:
            stem = f"{name}_x{col}_y{row}"  # level-0 (x, y) of the crop's top-left pixel
            crop = Image.fromarray(render_tile(layout, row, col, size, size))
            crop.save(folder / kind / f"{stem}.png", compress_level=1)
            if want_tumour:
                Image.fromarray(render_mask(layout, row, col, size, size), mode="L").save(folder / "gt" / f"{stem}.png")
        counts[kind] = len(origins)
    return counts


def _generate_slide(spec: SyntheticSpec, index: int, name: str, label: int, split: str, out: Path) -> dict:
    """Write one slide, its mask, its XML and its crops; return its summary row."""
    layout = make_layout(spec.seed, index, spec.size, positive=bool(label))
    shape = (spec.size, spec.size)
    slide_tiles = partial(render_tile, layout)
    mask_tiles = partial(render_mask, layout)
    write_pyramid(out / "slides" / f"{name}.tif", slide_tiles, shape, channels=3, mpp=spec.mpp, tile=spec.tile)
    write_pyramid(out / "masks" / f"{name}.tif", mask_tiles, shape, channels=1, mpp=spec.mpp, tile=spec.tile)
    write_asap_xml(out / "annotations" / f"{name}.xml", layout.tumours_xy)
    counts = _write_patches(layout, name, label, index, split, spec, out)
    return {"slide": name, "label": label, "split": split, "tumours": len(layout.tumours_xy), **counts}


def _readme(spec: SyntheticSpec, rows: list[dict]) -> str:
    """Plain-text description of what was generated and how, written next to the data."""
    n = spec.patch_size
    lines = [
        "Synthetic H&E-like data generated by custom.data.synthetic (scripts/make_synthetic.py).",
        f"Spec: {json.dumps(asdict(spec))}",
        "",
        f"slides/*.tif       {spec.size}x{spec.size} px RGB, JPEG, tile {spec.tile}, pyramidal BigTIFF, "
        f"{spec.mpp} um/px at level 0.",
        "masks/*.tif        tumour ground truth, uint8 0 (background) / 255 (tumour), LZW, same geometry as the slide.",
        "annotations/*.xml  the same tumour polygons as ASAP XML (group _0), level-0 (x, y); negative slides: none.",
        "slides.csv         slide,label,mask,annotation,split (paths relative to this folder; label 1 = contains "
        "tumour;",
        "                   split = train / test, the same split as the patches).",
        f"patches/{{train,test}}/{{pos,neg,gt}}/*.png  {n}x{n} crops named <slide>_x<X>_y<Y> (level-0 top-left);",
        "                   pos = tumour covers 5-95% of the crop, gt/<same name>.png its 0/255 mask; neg = no tumour.",
        "                   Every crop is at least 80% tissue. Train/test are split by slide:",
        "",
    ]
    for r in rows:
        counts = f"tumours={r['tumours']}  pos={r['pos']}  neg={r['neg']}"
        lines.append(f"  {r['slide']}  label={r['label']}  split={r['split']}  {counts}")
    lines += [
        "",
        "Tumour differs from normal tissue by morphology (crowded, large, irregular nuclei; no glands), drawn with the",
        "same stain colours as normal tissue (pink stroma, purple nuclei, white gland lumens).",
    ]
    return "\n".join(lines) + "\n"


def _write_slides_csv(path: Path, rows: list[dict]) -> None:
    """slides.csv with paths relative to its own folder."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "mask", "annotation", "split"])
        for r in rows:
            name = r["slide"]
            writer.writerow(
                [f"slides/{name}.tif", r["label"], f"masks/{name}.tif", f"annotations/{name}.xml", r["split"]]
            )


def generate_dataset(out: str | os.PathLike, spec: SyntheticSpec | None = None, workers: int = 1) -> dict:
    """Generate the data set into ``out`` (built in a temporary folder, renamed when complete); return a summary.

    ``out`` must not exist or be empty. ``workers`` > 1 renders slides in parallel processes (same bytes either way).
    """
    spec = spec or SyntheticSpec()
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty; remove it or choose another folder")
    start = time.perf_counter()
    with building_dataset(out) as building:
        for sub in ("slides", "masks", "annotations", *_PATCH_FOLDERS):
            (building / sub).mkdir(parents=True)
        jobs = [(spec, i, name, label, split, building) for i, (name, label, split) in enumerate(_slide_labels(spec))]
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                rows = list(pool.map(_generate_slide, *zip(*jobs)))
        else:
            rows = [_generate_slide(*job) for job in jobs]
        _write_slides_csv(building / "slides.csv", rows)
        (building / "README.txt").write_text(_readme(spec, rows))
        summary = {"spec": asdict(spec), "slides": rows, "seconds": round(time.perf_counter() - start, 2)}
        (building / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2))
    return summary


def ensure_sample_data(out: str | os.PathLike, spec: SyntheticSpec | None = None) -> Path:
    """Return ``out`` holding the sample data set, generating it only if its completion marker is missing."""
    out, spec = Path(out), spec or SyntheticSpec()
    marker = out / COMPLETE_MARKER
    if not marker.exists():
        try:
            generate_dataset(out, spec, workers=min(2, os.cpu_count() or 1))
        except OSError:
            if not marker.exists():  # else another process (e.g. another rank) finished it first
                raise
    made_with = json.loads(marker.read_text())["spec"]
    if made_with != asdict(spec):
        raise FileExistsError(f"{out}: holds synthetic data made with {made_with}, not the requested {asdict(spec)}")
    return out
