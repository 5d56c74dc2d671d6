"""custom.data.synthetic: the files it writes, read back with independent tools, and the properties promised."""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile
from matplotlib.path import Path as MplPath
from PIL import Image
from scipy.ndimage import uniform_filter
from skimage.color import rgb2hsv

from custom.data.annotations import rasterize_annotations, read_asap_xml
from custom.data.he_renderer import make_layout, render_mask, render_tile, tissue_fraction
from custom.data.synthetic import COMPLETE_MARKER, SyntheticSpec, ensure_sample_data, generate_dataset

SPEC = SyntheticSpec(n_slides=4, size=1024, seed=5, patches_per_slide=6)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """One small data set (2 positive + 2 negative slides of 1024 px) shared by the tests of this file."""
    out = tmp_path_factory.mktemp("synthetic") / "data"
    generate_dataset(out, SPEC)
    return out


def _rows(dataset: Path) -> list[dict]:
    with open(dataset / "slides.csv", newline="") as f:
        return list(csv.DictReader(f))


def _xml_polygons(path: Path) -> list[np.ndarray]:
    """(x, y) vertices of each ASAP annotation, ordered by @Order."""
    polygons = []
    for annotation in ET.parse(path).getroot().iter("Annotation"):
        coords = sorted(annotation.iter("Coordinate"), key=lambda c: int(c.get("Order")))
        polygons.append(np.array([[float(c.get("X")), float(c.get("Y"))] for c in coords]))
    return polygons


def _best_threshold_accuracy(values: np.ndarray, is_tumour: np.ndarray) -> float:
    """Balanced accuracy of the best single threshold (either direction) = 0.5 + KS distance / 2."""
    bins = np.linspace(values.min(), values.max() + 1e-6, 257)
    cdf_t = np.cumsum(np.histogram(values[is_tumour], bins)[0]) / is_tumour.sum()
    cdf_n = np.cumsum(np.histogram(values[~is_tumour], bins)[0]) / (~is_tumour).sum()
    return 0.5 + np.abs(cdf_t - cdf_n).max() / 2


def test_slides_csv_and_files(dataset):
    rows = _rows(dataset)
    assert list(rows[0]) == ["slide", "label", "mask", "annotation", "split"]
    assert [r["label"] for r in rows] == ["1", "0", "1", "0"]
    for split in ("train", "test"):  # the split column names the slides whose crops are in that patch split
        slides = {Path(r["slide"]).stem for r in rows if r["split"] == split}
        crops = {p.name.split("_x")[0] for p in (dataset / "patches" / split).glob("*/*.png")}
        assert crops and crops <= slides
    for row in rows:
        slide = openslide.OpenSlide(dataset / row["slide"])
        assert slide.level_count >= 3 and slide.dimensions == (SPEC.size, SPEC.size)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(SPEC.mpp)
        with tifffile.TiffFile(dataset / row["mask"]) as tif:
            mask = tif.series[0].levels[0].asarray()
            assert tif.pages[0].tilewidth == SPEC.tile and len(tif.series[0].levels) == slide.level_count
        assert set(np.unique(mask)) <= {0, 255}
        assert (mask.max() == 255) == (row["label"] == "1")
    assert (dataset / COMPLETE_MARKER).exists() and "split=test" in (dataset / "README.txt").read_text()


def test_xml_polygons_match_mask(dataset):
    for row in _rows(dataset):
        polygons = _xml_polygons(dataset / row["annotation"])
        with tifffile.TiffFile(dataset / row["mask"]) as tif:
            mask = tif.series[0].levels[0].asarray() > 0
        if row["label"] == "0":
            assert polygons == [] and not mask.any()
            continue
        assert polygons
        cols, rows = np.meshgrid(np.arange(SPEC.size), np.arange(SPEC.size))
        points = np.stack([cols.ravel(), rows.ravel()], axis=1) + 0.5  # pixel centres, (x, y) = (col, row) + 0.5
        raster = np.logical_or.reduce([MplPath(p).contains_points(points) for p in polygons]).reshape(mask.shape)
        dice = 2 * (raster & mask).sum() / (raster.sum() + mask.sum())
        assert dice > 0.99
        # the project's own XML reader and rasteriser give the mask TIFF's pixels (same pixel-centre convention)
        ours = rasterize_annotations(read_asap_xml(dataset / row["annotation"]), (0, 0), (SPEC.size, SPEC.size)) > 0
        assert (ours != mask).sum() <= 0.001 * mask.sum()


def test_patches_layout_split_and_content(dataset):
    rows = _rows(dataset)
    slide_split = {}
    for split in ("train", "test"):
        root = dataset / "patches" / split
        pos = sorted(p.stem for p in (root / "pos").glob("*.png"))
        assert pos == sorted(p.stem for p in (root / "gt").glob("*.png"))
        neg = sorted((root / "neg").glob("*.png"))
        assert pos and neg
        fractions = []
        for stem in pos:
            gt = Image.open(root / "gt" / f"{stem}.png")
            assert gt.mode == "L" and gt.size == (256, 256)
            values = np.asarray(gt)
            assert set(np.unique(values)) <= {0, 255}
            fractions.append((values > 0).mean())
        assert 0.05 <= min(fractions) < max(fractions) <= 0.95  # partial and varied
        for path in (root / "pos").glob("*.png"):
            crop = np.asarray(Image.open(path))
            assert crop.shape == (256, 256, 3)
            assert (rgb2hsv(crop)[..., 1] > 0.15).mean() > 0.7  # mostly (saturated) tissue, not white background
        for path in [*(root / "pos").glob("*.png"), *neg]:
            slide_split.setdefault(path.stem.split("_x")[0], set()).add(split)
    assert all(len(splits) == 1 for splits in slide_split.values())  # patient-disjoint
    assert {s for s, splits in slide_split.items() if "test" in splits} == {"slide_002", "slide_003"}
    negative_slides = {Path(r["slide"]).stem for r in rows if r["label"] == "0"}
    assert negative_slides <= set(slide_split)


def test_crop_matches_slide_and_mask(dataset):
    stem = sorted((dataset / "patches" / "train" / "pos").glob("*.png"))[0].stem
    slide_name, x, y = stem.split("_x")[0], int(stem.split("_x")[1].split("_y")[0]), int(stem.split("_y")[1])
    crop = np.asarray(Image.open(dataset / "patches" / "train" / "pos" / f"{stem}.png")).astype(int)
    slide = openslide.OpenSlide(dataset / "slides" / f"{slide_name}.tif")
    region = np.asarray(slide.read_region((x, y), 0, (256, 256)))
    assert np.abs(crop - region[..., :3]).mean() < 4  # lossless crop vs the JPEG slide at the same (x, y)
    with tifffile.TiffFile(dataset / "masks" / f"{slide_name}.tif") as tif:
        mask = tif.series[0].levels[0].asarray()[y : y + 256, x : x + 256]
    np.testing.assert_array_equal(np.asarray(Image.open(dataset / "patches" / "train" / "gt" / f"{stem}.png")), mask)


def test_deterministic_bytes(tmp_path):
    spec = SyntheticSpec(n_slides=2, size=512, seed=11, patches_per_slide=2)
    generate_dataset(tmp_path / "a", spec)
    generate_dataset(tmp_path / "b", spec)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) > 10
    for rel in files_a:
        if rel.name != COMPLETE_MARKER:  # holds the run time
            assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_rendering_is_tile_local():
    layout = make_layout(seed=2, index=0, size=1024, positive=True)
    whole = render_tile(layout, 300, 200, 512, 512)
    for row, col in [(300, 200), (300, 456), (556, 200), (556, 456)]:
        expected = whole[row - 300 : row - 300 + 256, col - 200 : col - 200 + 256]
        np.testing.assert_array_equal(render_tile(layout, row, col, 256, 256), expected)
    np.testing.assert_array_equal(render_tile(layout, 337, 251, 50, 70), whole[37:87, 51:121])
    other_seed = make_layout(seed=3, index=0, size=1024, positive=True)
    assert not np.array_equal(render_tile(other_seed, 300, 200, 64, 64), whole[:64, :64])


def test_tumour_inside_tissue_and_tissue_fraction():
    for seed in range(4):
        layout = make_layout(seed=seed, index=0, size=1024, positive=True)
        assert 0.3 <= tissue_fraction(layout) <= 0.5
        assert 1 <= len(layout.tumours_xy) <= 3
        for polygon in layout.tumours_xy:
            assert layout.in_tissue(polygon[:, 0], polygon[:, 1]).all()
    assert make_layout(seed=0, index=1, size=1024, positive=False).tumours_xy == ()
    with pytest.raises(ValueError, match="at least 512"):
        make_layout(seed=0, index=0, size=100, positive=True)


def test_tumour_differs_by_morphology_not_colour():
    layout = make_layout(seed=3, index=0, size=1024, positive=True)
    image = render_tile(layout, 0, 0, 1024, 1024)
    tumour = render_mask(layout, 0, 0, 1024, 1024) > 0
    cols, rows = np.meshgrid(np.arange(1024.0), np.arange(1024.0))
    tissue = layout.in_tissue(cols, rows, margin=40)
    assert tumour[tissue].mean() > 0.05
    channels = {"R": image[..., 0], "G": image[..., 1], "B": image[..., 2], "S": rgb2hsv(image)[..., 1]}
    for name, values in channels.items():
        assert _best_threshold_accuracy(values[tissue], tumour[tissue]) < 0.75, name
    # the density of nuclei (dark pixels) in a 48-pixel neighbourhood, a morphological feature, separates far better
    density = uniform_filter((image[..., 1] < 120).astype(np.float32), 48)
    assert _best_threshold_accuracy(density[tissue], tumour[tissue]) > 0.9


def test_ensure_sample_data_reuses_complete_folder(tmp_path, dataset):
    marker = dataset / COMPLETE_MARKER
    stamp = marker.stat().st_mtime_ns
    assert ensure_sample_data(dataset, SPEC) == dataset
    assert marker.stat().st_mtime_ns == stamp  # not regenerated
    with pytest.raises(FileExistsError, match="made with"):
        ensure_sample_data(dataset, SyntheticSpec(n_slides=2, size=512))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_dataset(tmp_path / "busy", SPEC)
