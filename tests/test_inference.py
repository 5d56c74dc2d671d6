# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Whole-slide inference: every output file read back with an independent reader and checked against the network's
direct output on the same pixels; blank, corrupt and small inputs; resume; unwritable output; bad checkpoints."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import nibabel as nib
import numpy as np
import openslide
import pytest
import tifffile
import torch
from PIL import Image
from shapely.geometry import Point, shape
from shapely.ops import unary_union

from custom.data.grid import make_tile_grid
from custom.data.slide import open_slide
from custom.data.synthetic import SyntheticSpec, generate_dataset
from custom.data.tissue import detect_tissue
from custom.inference import SlideInferenceError, SlideInferenceRunner, StripMerger, WholeSlideInferer
from custom.inference.outputs import _overlay, top_k_mean
from custom.inference.streaming import RasterStats
from custom.networks import DWSMIL
from custom.writers.pyramid_tiff import write_pyramid

TILE, OVERLAP, LEVEL = 128, 32, 1
MEAN, STD = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


def normalise(image: torch.Tensor) -> torch.Tensor:
    """The bundle's ImageNet normalisation, written out so the test does not share the engine's code path."""
    return (image - MEAN) / STD


def direct(network: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    """The network's fused map on one RGB tile, computed here without the engine."""
    x = normalise(torch.from_numpy(rgb).permute(2, 0, 1).float() / 255.0)[None]
    with torch.inference_mode():
        return network(x)[0, -1].numpy()


@pytest.fixture(scope="module")
def network() -> torch.nn.Module:
    torch.manual_seed(0)
    return DWSMIL(width=0.125).eval()


def split_threshold(network: torch.nn.Module, path) -> float:
    """A threshold at the median of the network's output over a slide's tissue, so the mask has both classes."""
    slide = open_slide(path)
    grid = make_tile_grid(slide, detect_tissue(slide), LEVEL, TILE, OVERLAP, 0.5)
    values = [direct(network, slide.read_region((int(x), int(y)), (TILE, TILE), LEVEL)) for x, y in
              zip(grid.x[:4], grid.y[:4])]
    return round(float(np.median(values)) * 255) / 255  # a stored uint8 step: tumour where stored >= it


@pytest.fixture(scope="module")
def run(tmp_path_factory, network):
    """Infer two synthetic slides, a blank slide, a corrupt file and a plain image smaller than the window."""
    root = tmp_path_factory.mktemp("inference")
    data = root / "data"
    generate_dataset(data, SyntheticSpec(n_slides=2, size=1280, patches_per_slide=1, test_fraction=0.5))
    inputs = root / "inputs"
    inputs.mkdir()
    for name in ("slide_000", "slide_001"):
        (inputs / f"{name}.tif").symlink_to(data / "slides" / f"{name}.tif")
    white = np.full((512, 512, 3), 255, np.uint8)
    write_pyramid(inputs / "blank.tif", lambda r, c, h, w: white[:h, :w], (512, 512), 3, mpp=0.5)
    (inputs / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 64)
    small = data / "patches" / "train" / "pos"
    patch = next(small.glob("*.png"), None) or next((data / "patches").rglob("*.png"))
    Image.open(patch).convert("RGB").crop((0, 0, 100, 90)).save(inputs / "small.png")
    out = root / "out"
    torch.set_num_threads(2)
    threshold = split_threshold(network, inputs / "slide_000.tif")
    inferer = WholeSlideInferer(tile_size=TILE, overlap=OVERLAP, level=LEVEL, batch_size=4, num_workers=1,
                                progress=False)
    runner = SlideInferenceRunner(network, inferer, inputs, out, preprocessing=normalise, threshold=threshold,
                                  min_area_um2=0.0)
    with pytest.raises(SlideInferenceError) as failure:
        runner.run()
    return {"inputs": inputs, "out": out, "runner": runner, "error": str(failure.value), "threshold": threshold}


def summary(out, name: str) -> dict:
    return json.loads((out / name / f"{name}_summary.json").read_text())


def test_corrupt_slide_is_named_and_others_done(run):
    assert "broken.tif" in run["error"] and "slide_000" not in run["error"]
    report = json.loads((run["out"] / "run_summary.json").read_text())
    assert [f["slide"].endswith("broken.tif") for f in report["failed"]] == [True]
    assert sorted(p.rsplit("/", 1)[-1] for p in report["done"]) == ["blank.tif", "slide_000.tif", "slide_001.tif",
                                                                     "small.png"]


@pytest.mark.parametrize("name", ["slide_000", "slide_001"])
def test_probability_tiff_matches_network(run, network, name):
    """Tile centres are covered by one window only, so there the stored map is the network's output to 1/255."""
    prob_path = run["out"] / name / f"{name}_prob.tif"
    with tifffile.TiffFile(prob_path) as tif:
        stored = tif.pages[0].asarray()
        levels = [p.shape for p in tif.pages]
    slide = open_slide(run["inputs"] / f"{name}.tif")
    assert stored.shape == tuple(reversed(slide.level_dimensions[LEVEL])) and len(levels) >= 2
    grid = make_tile_grid(slide, detect_tissue(slide), LEVEL, TILE, OVERLAP, 0.01)
    assert len(grid) == summary(run["out"], name)["n_tiles"] > 0
    covered = np.zeros(stored.shape, bool)
    ds = slide.level_downsamples[LEVEL]
    for x, y in zip(grid.x, grid.y):
        row, col = round(y / ds), round(x / ds)
        expected = direct(network, slide.read_region((int(x), int(y)), (TILE, TILE), LEVEL))
        inner = slice(OVERLAP, TILE - OVERLAP)
        got = stored[row:row + TILE, col:col + TILE][inner, inner] / 255.0
        np.testing.assert_allclose(got, expected[inner, inner][: got.shape[0], : got.shape[1]], atol=0.6 / 255)
        covered[row:row + TILE, col:col + TILE] = True
    assert not stored[~covered].any()  # glass never run stays 0
    osl = openslide.OpenSlide(str(prob_path))
    via_openslide = np.asarray(osl.read_region((0, 0), 0, osl.dimensions).convert("L"))
    np.testing.assert_array_equal(via_openslide, stored)
    assert float(osl.properties["openslide.mpp-x"]) == pytest.approx(0.5 * ds)


def test_mask_tiff_is_thresholded_probability(run):
    name = "slide_000"
    prob = tifffile.imread(run["out"] / name / f"{name}_prob.tif", level=0)
    mask = tifffile.imread(run["out"] / name / f"{name}_mask.tif", level=0)
    np.testing.assert_array_equal(mask, np.where(prob >= round(run["threshold"] * 255), 255, 0))
    s = summary(run["out"], name)
    assert s["tumour_area_mm2"] == pytest.approx((mask > 0).sum() * (0.5 * 2) ** 2 / 1e6)
    assert s["max_probability"] == pytest.approx(prob.max() / 255)
    top = np.sort(prob.ravel())[-1000:] / 255
    assert s["score"] == pytest.approx(top.mean())
    assert s["level0_mpp"] == 0.5 and s["output_mpp"] == 1.0 and s["downsample"] == 2.0


def test_geojson_and_asap_xml_trace_the_mask(run):
    name = "slide_000"
    mask = tifffile.imread(run["out"] / name / f"{name}_mask.tif", level=0) > 0
    assert mask.any() and not mask.all(), "the threshold should split this map into tumour and background"
    collection = json.loads((run["out"] / name / f"{name}.geojson").read_text())
    assert collection["type"] == "FeatureCollection"
    props = [f["properties"] for f in collection["features"]]
    assert all(p["objectType"] == "annotation" and p["classification"]["name"] == "Tumor" for p in props)
    polygons = [shape(f["geometry"]) for f in collection["features"]]
    assert all(p.is_valid for p in polygons)
    tumour = unary_union(polygons)
    ds = 2.0
    assert tumour.area == pytest.approx(mask.sum() * ds * ds, rel=0.1)  # level-0 px^2
    rows, cols = np.nonzero(mask)
    pick = np.random.default_rng(0).choice(len(rows), 300)
    centres = [Point((cols[i] + 0.5) * ds, (rows[i] + 0.5) * ds) for i in pick]
    assert np.mean([tumour.buffer(ds).contains(p) for p in centres]) > 0.97
    root = ElementTree.parse(run["out"] / name / f"{name}.xml").getroot()
    annotations = root.findall("./Annotations/Annotation")
    n_holes = sum(len(p.interiors) for p in polygons)
    assert len(annotations) == len(polygons) + n_holes
    assert [a.get("PartOfGroup") for a in annotations] == ["_0"] * len(polygons) + ["_2"] * n_holes
    first = np.array([(float(c.get("X")), float(c.get("Y"))) for c in annotations[0].iter("Coordinate")])
    np.testing.assert_allclose(first, np.asarray(polygons[0].exterior.coords)[:-1], atol=1e-3)


def test_overlay_png(run):
    name = "slide_000"
    overlay = np.asarray(Image.open(run["out"] / name / f"{name}_overlay.png"))
    assert overlay.ndim == 3 and overlay.shape[2] == 3
    assert ((overlay[..., 0] == 200) & (overlay[..., 1] == 0) & (overlay[..., 2] == 0)).any()  # tumour outline


def test_overlay_tints_and_outlines_the_mask_by_hand():
    """A 2x2 mask with its top-left pixel tumour on a 6x6 grey thumbnail: the top-left 3x3 block is tumour; its
    pixels next to background (the block's last row and column) are the outline, the other four are tinted."""
    thumbnail = np.full((6, 6, 3), 100, np.uint8)
    out = _overlay(thumbnail, np.array([[True, False], [False, False]]))
    tint = (int(0.55 * 100 + 0.45 * 255), 55, 55)  # 169.75 -> 169
    expected = thumbnail.copy()
    expected[:2, :2] = tint
    expected[2, :3] = expected[:3, 2] = (200, 0, 0)
    np.testing.assert_array_equal(out, expected)
    assert np.array_equal(thumbnail, np.full((6, 6, 3), 100, np.uint8))  # the thumbnail itself is untouched


def test_blank_slide_gives_empty_outputs(run):
    s = summary(run["out"], "blank")
    assert not s["tissue_found"] and s["n_tiles"] == 0 and "no tissue" in s["message"]
    assert s["tumour_area_mm2"] == 0 and s["n_regions"] == 0
    assert not tifffile.imread(run["out"] / "blank" / "blank_mask.tif").any()
    assert json.loads((run["out"] / "blank" / "blank.geojson").read_text())["features"] == []


def test_plain_image_smaller_than_window(run, network):
    folder = run["out"] / "small"
    rgb = np.asarray(Image.open(run["inputs"] / "small.png").convert("RGB"))
    padded = np.full((TILE, TILE, 3), 255, np.uint8)
    padded[: rgb.shape[0], : rgb.shape[1]] = rgb
    expected = direct(network, padded)[: rgb.shape[0], : rgb.shape[1]]
    prob = nib.load(folder / "small_prob.nii.gz").get_fdata()
    assert prob.shape == rgb.shape[:2]
    np.testing.assert_allclose(prob, expected, atol=0.6 / 255)
    mask = np.asarray(Image.open(folder / "small_mask.png"))
    stored = np.rint(prob * 255)  # the NIfTI holds the stored uint8 steps / 255
    np.testing.assert_array_equal(mask, np.where(stored >= round(run["threshold"] * 255), 255, 0))


def test_resume_skips_completed(run):
    before = {p: p.stat().st_mtime_ns for p in run["out"].glob("*/*")}
    run["runner"].raise_on_failure = False
    report = run["runner"].run()
    assert len(report["skipped"]) == 4 and report["done"] == [] and len(report["failed"]) == 1
    assert before == {p: p.stat().st_mtime_ns for p in run["out"].glob("*/*")}


def test_unwritable_output_fails_before_work(tmp_path, network):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    runner = SlideInferenceRunner(network, WholeSlideInferer(), tmp_path / "missing_input", blocker / "out")
    with pytest.raises(PermissionError, match="not writable"):
        runner.run()  # the missing input would fail later: the output folder is checked first


def test_checkpoint_mismatch_names_config_keys(tmp_path, network):
    ckpt = tmp_path / "model.pt"
    torch.save(DWSMIL(width=0.25).state_dict(), ckpt)
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    runner = SlideInferenceRunner(network, WholeSlideInferer(), image, tmp_path / "out", ckpt_path=ckpt)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    with pytest.raises(ValueError, match="'ckpt_path'.*'network_def'.*size mismatch"):
        runner.run()
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())  # refused, not half loaded
    runner.ckpt_path = tmp_path / "absent.pt"
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        runner.run()


def test_strip_merger_blends_by_weight(tmp_path):
    """Two 4x4 tiles overlapping by 2 columns with constant weights average where they meet."""
    merger = StripMerger(tmp_path / "r.raw", (6, 6), np.ones((4, 4), np.float32))
    merger.add(0, 0, np.full((4, 4), 0.2, np.float32))
    merger.add(0, 2, np.full((4, 4), 0.6, np.float32))
    merger.add(2, 2, np.full((4, 4), 1.0, np.float32))
    merger.close()
    raster = np.fromfile(tmp_path / "r.raw", np.uint8).reshape(6, 6)
    expected = np.zeros((6, 6))
    expected[:2, :2], expected[:2, 2:4], expected[:2, 4:] = 0.2, 0.4, 0.6
    expected[2:4, :2], expected[2:4, 2:4], expected[2:4, 4:] = 0.2, 0.6, 0.8
    expected[4:, 2:] = 1.0
    np.testing.assert_array_equal(raster, np.rint(expected * 255))
    with pytest.raises(ValueError, match="arrived after"):
        late = StripMerger(tmp_path / "s.raw", (6, 6), np.ones((4, 4), np.float32))
        late.add(4, 0, np.zeros((4, 4), np.float32))
        late.add(0, 0, np.zeros((4, 4), np.float32))


def test_top_k_mean_from_histogram():
    values = np.array([255, 255, 128, 0, 0], np.uint8)
    histogram = np.bincount(values, minlength=256)
    assert top_k_mean(histogram, 3) == pytest.approx((255 + 255 + 128) / 3 / 255)
    assert top_k_mean(histogram, 100) == pytest.approx(values.mean() / 255)


def test_outputs_knob_writes_only_what_is_asked(run, network, tmp_path):
    """GeoJSON alone equals the full run's GeoJSON; the map alone equals the full run's map; the rest is absent."""
    slide = run["inputs"] / "slide_000.tif"
    inferer = WholeSlideInferer(tile_size=TILE, overlap=OVERLAP, level=LEVEL, batch_size=4, num_workers=0,
                                progress=False)
    for outputs in (("geojson",), ("prob",)):
        out = tmp_path / outputs[0]
        SlideInferenceRunner(network, inferer, [slide], out, preprocessing=normalise, threshold=run["threshold"],
                             min_area_um2=0.0, outputs=outputs).run()
        written = sorted(p.name for p in (out / "slide_000").iterdir())
        kept = {"geojson": "slide_000.geojson", "prob": "slide_000_prob.tif"}[outputs[0]]
        assert written == sorted([kept, "slide_000_summary.json"])
        s, full = summary(out, "slide_000"), summary(run["out"], "slide_000")
        assert s["files"] == {outputs[0]: kept}
        assert s["score"] == full["score"] and s["tumour_area_mm2"] == full["tumour_area_mm2"]
        if outputs == ("geojson",):
            assert s["n_regions"] == full["n_regions"]
            assert (out / "slide_000" / kept).read_text() == (run["out"] / "slide_000" / kept).read_text()
        else:
            assert s["n_regions"] is None
            np.testing.assert_array_equal(tifffile.imread(out / "slide_000" / kept),
                                          tifffile.imread(run["out"] / "slide_000" / kept))


def test_unknown_output_is_refused_before_work(tmp_path, network):
    with pytest.raises(ValueError, match=r"\['pdf'\] \(config key 'outputs'\)"):
        SlideInferenceRunner(network, WholeSlideInferer(), tmp_path, tmp_path / "out", outputs=("prob", "pdf"))


def test_raster_stats_histogram_and_majority_mask():
    """A 5x6 raster counted in two bands, reduced 2x2 (max side 3): a block is tumour when >= half its pixels are."""
    values = np.zeros((5, 6), np.uint8)
    values[0, 0] = values[1, 0] = 200  # 2 of 4 in block (0, 0): tumour
    values[0, 2] = 255  # 1 of 4 in block (0, 1): not
    values[4, 4] = 130  # 1 of 2 real pixels in the padded bottom block (2, 2): 1 of 4 with padding, not
    values[2:4, 4:6] = 128  # block (1, 2) all at the threshold: tumour
    expected = np.zeros((3, 3), bool)
    expected[0, 0] = expected[1, 2] = True
    for bands in ([0, 4, 5], [0, 1, 4, 5], [0, 3, 5]):  # bands split inside blocks too
        stats = RasterStats(values.shape, threshold=128, max_side=3)
        assert stats.factor == 2 and stats.mask.shape == (3, 3)
        for start, stop in zip(bands, bands[1:]):
            assert not stats.complete
            stats.add(start, values[start:stop])
        assert stats.complete
        np.testing.assert_array_equal(stats.mask, expected)
        np.testing.assert_array_equal(stats.histogram, np.bincount(values.ravel(), minlength=256))
    with pytest.raises(ValueError, match="in order"):
        RasterStats(values.shape, 128, 3).add(2, values[2:])


def test_strip_merger_equals_in_memory_blending(tmp_path):
    """Random tiles at row steps of 1, 3 and 8 (band shifts of every size): the raster is the full-size weighted
    mean."""
    rng = np.random.default_rng(1)
    weights = rng.uniform(0.1, 1.0, (8, 8)).astype(np.float32)
    shape = (30, 21)
    merger = StripMerger(tmp_path / "m.raw", shape, weights)
    total, weight_total = np.zeros(shape), np.zeros(shape)
    for row in (0, 1, 4, 12, 13, 20, 27):
        for col in (0, 5, 16):
            tile = rng.random((8, 8)).astype(np.float32)
            merger.add(row, col, tile)
            h, w = min(8, shape[0] - row), min(8, shape[1] - col)
            total[row:row + h, col:col + w] += tile[:h, :w] * weights[:h, :w]
            weight_total[row:row + h, col:col + w] += weights[:h, :w]
    merger.close()
    expected = np.divide(total, weight_total, out=np.zeros(shape), where=weight_total > 0)
    raster = np.fromfile(tmp_path / "m.raw", np.uint8).reshape(shape)
    np.testing.assert_allclose(raster, np.rint(expected * 255), atol=1)
    assert (raster[weight_total == 0] == 0).all()
