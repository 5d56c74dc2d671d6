"""custom.data.virtual_slides and scripts/make_virtual_slides.py on small generated source tiles.

Every source tile carries a colour code in a 4-pixel frame (kept by flips and quarter turns), so the tests read back
from the slide's pixels which source tile, of which kind and patient, sits in each cell; a tumour tile is darker where
its gt mask is, so the slide's pixels and the mask TIFF can be checked against each other.
"""

from __future__ import annotations

import csv
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cucim
import numpy as np
import openslide
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from custom.data import load_slide_datalist
from custom.data.annotations import rasterize_annotations, read_asap_xml
from custom.data.virtual_slides import COMPLETE_MARKER, VirtualSlideSpec, generate_virtual_slides

ROOT = Path(__file__).resolve().parents[1]
CELL = 48
FRAME = 4
GLASS_RGB = np.array([240, 240, 242])
SPEC = VirtualSlideSpec(n_train_slides=6, n_test_slides=4, grid_min=10, grid_max=12, tumour_fraction=(0.05, 0.25),
                        tiff_tile=128, seed=7)
# split -> kind -> patients, each with two tiles (file names as in EBHI-Seg: patient id, then "-")
PATIENTS = {
    "train": {"tumour": ["TA1", "TA2", "TA3", "TA4", "TA5", "TA6"], "normal": ["NA1", "NA2"],
              "benign": ["BA1", "BA2", "BA3"]},
    "test": {"tumour": ["TB1", "TB2", "TB3", "TB4"], "normal": ["NB1"], "benign": ["BB1", "BB2"]},
}


def code_colour(index: int) -> np.ndarray:
    return np.array([60 + 40 * (index % 5), 60 + 40 * ((index // 5) % 5), 60 + 40 * (index // 25)])


def _write_tile(path: Path, colour: np.ndarray, mask: np.ndarray | None) -> None:
    image = np.broadcast_to(colour, (CELL, CELL, 3)).astype(np.uint8).copy()
    if mask is not None:
        image[mask > 0] = colour // 2
        Image.fromarray(mask * np.uint8(255)).save(path.parent.parent / "gt" / path.name)
    Image.fromarray(image).save(path)


def _tumour_mask(rng: np.random.Generator) -> np.ndarray:
    """An asymmetric blob inside the frame: a disk off the centre and a bar."""
    rows, cols = np.mgrid[0:CELL, 0:CELL]
    cy, cx = rng.integers(14, 30, 2)
    mask = (rows - cy) ** 2 + (cols - cx) ** 2 < rng.integers(36, 100)
    mask[10:14, 8 : rng.integers(20, 40)] = True
    return mask.astype(np.uint8)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[Path, Path, dict[int, tuple[str, str, str]]]:
    """(tissue folder, benign folder, colour code -> (split, kind, patient))."""
    root = tmp_path_factory.mktemp("sources")
    tissue, benign = root / "tissue", root / "benign"
    rng = np.random.default_rng(0)
    codes, index = {}, 0
    for split, kinds in PATIENTS.items():
        for folder in (tissue / split / "pos", tissue / split / "neg", tissue / split / "gt", benign / split / "neg"):
            folder.mkdir(parents=True)
        for kind, patients in kinds.items():
            for patient in patients:
                for n in (1, 2):
                    name = f"{patient}-1-400-{n:03d}.png"
                    if kind == "tumour":
                        path, mask = tissue / split / "pos" / name, _tumour_mask(rng)
                    elif kind == "normal":
                        path, mask = tissue / split / "neg" / name, None
                    else:
                        path, mask = benign / split / "neg" / f"polyp_{name}", None
                    _write_tile(path, code_colour(index), mask)
                    codes[index] = (split, kind, patient)
                    index += 1
    return tissue, benign, codes


@pytest.fixture(scope="module")
def dataset(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("vslides") / "data"
    generate_virtual_slides(out, sources[0], sources[1], SPEC)
    return out


def _rows(dataset: Path) -> list[dict]:
    with open(dataset / "slides.csv", newline="") as f:
        return list(csv.DictReader(f))


def _decode_cells(image: np.ndarray, codes: dict) -> tuple[np.ndarray, np.ndarray]:
    """(code per cell, -1 for glass; distance of its frame colour to that code) from a level-0 RGB slide."""
    rows, cols = image.shape[0] // CELL, image.shape[1] // CELL
    palette = np.array([GLASS_RGB] + [code_colour(i) for i in sorted(codes)], float)
    labels = np.array([-1] + sorted(codes))
    found, distance = np.zeros((rows, cols), int), np.zeros((rows, cols))
    for r in range(rows):
        for c in range(cols):
            cell = image[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].astype(float)
            frame = np.concatenate([cell[:FRAME].reshape(-1, 3), cell[-FRAME:].reshape(-1, 3),
                                    cell[:, :FRAME].reshape(-1, 3), cell[:, -FRAME:].reshape(-1, 3)])
            median = np.median(frame, axis=0)
            gaps = np.linalg.norm(palette - median, axis=1)
            found[r, c], distance[r, c] = labels[np.argmin(gaps)], gaps.min()
    return found, distance


def _level0(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.series[0].levels[0].asarray()


def test_slides_and_masks_read_back_through_cucim_openslide_and_tifffile(dataset):
    rows = _rows(dataset)
    assert list(rows[0]) == ["slide", "label", "mask", "annotation", "split", "patient"]
    items = load_slide_datalist(dataset / "slides.csv")
    assert [item["group"] for item in items] == [row["patient"] for row in rows]
    assert [row["split"] for row in rows] == ["train"] * 6 + ["test"] * 4
    assert [int(row["label"]) for row in rows] == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    for row in rows:
        path, mask_path = dataset / row["slide"], dataset / row["mask"]
        slide, image = openslide.OpenSlide(path), cucim.CuImage(str(path))
        width, height = slide.dimensions
        assert width % CELL == 0 and 10 * CELL <= min(width, height) <= max(width, height) <= 12 * CELL
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(SPEC.mpp)
        assert image.spacing()[:2] == pytest.approx([SPEC.mpp, SPEC.mpp])
        assert image.resolutions["level_count"] == slide.level_count >= 3
        with tifffile.TiffFile(path) as tif:
            assert tif.is_bigtiff and tif.pages[0].compression == tifffile.COMPRESSION.JPEG
            assert tif.pages[0].tilewidth == SPEC.tiff_tile
            assert tif.pages[0].get_resolution(tifffile.RESUNIT.MICROMETER) == pytest.approx((2.0, 2.0))
            ours = tif.series[0].levels[1].asarray()
        h, w = ours.shape[:2]
        from_openslide = np.asarray(slide.read_region((0, 0), 1, (w, h)))[..., :3].astype(int)
        from_cucim = np.asarray(image.read_region((0, 0), (w, h), level=1)).astype(int)
        assert np.abs(from_openslide - ours).mean() < 1 and np.abs(from_cucim - ours).mean() < 1
        with tifffile.TiffFile(mask_path) as tif:
            mask = tif.series[0].levels[0].asarray()
            assert len(tif.series[0].levels) == slide.level_count
            assert tif.pages[0].get_resolution(tifffile.RESUNIT.MICROMETER) == pytest.approx((2.0, 2.0))
        assert mask.shape == (height, width) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        mask_cucim = np.asarray(cucim.CuImage(str(mask_path)).read_region((0, 0), (width, height), level=0))
        np.testing.assert_array_equal(mask_cucim[..., 0], mask)
        assert (mask.max() == 255) == (row["label"] == "1")
    assert (dataset / COMPLETE_MARKER).is_file() and "CC BY 4.0" in (dataset / "README.txt").read_text()


def test_mask_agrees_with_the_rasterised_asap_xml(dataset):
    for row in _rows(dataset):
        mask = _level0(dataset / row["mask"]) > 0
        annotations = read_asap_xml(dataset / row["annotation"])
        if row["label"] == "0":
            assert annotations == [] and not mask.any()
            continue
        raster = rasterize_annotations(annotations, (0, 0), (mask.shape[1], mask.shape[0]))
        tumour = raster == 1
        assert (tumour & mask).sum() / (tumour | mask).sum() > 0.98


def test_composition_read_from_the_pixels(dataset, sources):
    codes = sources[2]
    rows = _rows(dataset)
    with open(dataset / "tiles.csv", newline="") as f:
        placed = {(t["slide"], int(t["x"]), int(t["y"])): t for t in csv.DictReader(f)}
    patients_by_split = {"train": set(), "test": set()}
    tumour_patients_by_vp: dict[str, set[str]] = {}
    for row in rows:
        name, split = Path(row["slide"]).stem, row["split"]
        image = _level0(dataset / row["slide"])
        mask = _level0(dataset / row["mask"]) > 0
        found, distance = _decode_cells(image, codes)
        assert distance.max() < 12, (name, distance.max())
        glass, tissue = found == -1, found >= 0
        kinds = np.vectorize(lambda i: codes[i][1] if i >= 0 else "glass")(found)
        assert 0.4 <= tissue.mean() <= 0.75, (name, tissue.mean())
        assert ndimage.label(tissue)[1] == 1
        glass_pixels = image[np.kron(glass, np.ones((CELL, CELL), bool))].astype(float)
        assert np.abs(glass_pixels.mean(axis=0) - GLASS_RGB).max() < 2 and 0.5 < glass_pixels.std() < 4
        for r, c in np.argwhere(tissue):
            split_of, kind, patient = codes[found[r, c]]
            assert split_of == split, (name, r, c)
            patients_by_split[split].add(patient)
            entry = placed.pop((name, c * CELL, r * CELL))
            assert (entry["kind"], entry["patient"]) == (kind, patient)
        tumour = kinds == "tumour"
        cell_has_mask = mask.reshape(tumour.shape[0], CELL, tumour.shape[1], CELL).any(axis=(1, 3))
        np.testing.assert_array_equal(cell_has_mask, tumour)
        assert (kinds == "benign").any() and (kinds == "normal").any()
        if row["label"] == "0":
            assert not tumour.any()
            continue
        assert SPEC.tumour_fraction[0] <= tumour.sum() / tissue.sum() <= SPEC.tumour_fraction[1]
        clusters, n_clusters = ndimage.label(tumour, ndimage.generate_binary_structure(2, 2))
        assert 1 <= n_clusters <= 3
        assert all(ndimage.label(clusters == k)[1] == 1 for k in range(1, n_clusters + 1))  # 4-connected each
        dark = (image.astype(int).sum(axis=-1) < np.kron(  # a tumour tile is darker where its gt mask is
            np.vectorize(lambda i: code_colour(i).sum() * 0.75 if i >= 0 else 0)(found), np.ones((CELL, CELL))))
        assert (dark & mask).sum() / (dark | mask).sum() > 0.9
        vp = tumour_patients_by_vp.setdefault(row["patient"], set())
        vp.update(codes[i][2] for i in found[tumour])
    assert not placed  # tiles.csv lists exactly the tissue cells
    assert patients_by_split["train"] and not patients_by_split["train"] & patients_by_split["test"]
    vps = list(tumour_patients_by_vp.values())
    assert len(vps) == 5 and all(not a & b for i, a in enumerate(vps) for b in vps[i + 1 :])
    split_of_vp = {row["patient"]: row["split"] for row in rows}
    assert {p for p, s in split_of_vp.items() if s == "train"} == {"train-vp00", "train-vp01", "train-vp02"}
    assert {p for p, s in split_of_vp.items() if s == "test"} == {"test-vp00", "test-vp01"}


def _digests(folder: Path) -> dict[str, str]:
    files = [p for sub in ("slides", "masks", "annotations") for p in sorted((folder / sub).iterdir())]
    files += [folder / "slides.csv", folder / "tiles.csv"]
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_one_seed_gives_the_same_bytes_and_another_seed_other_slides(dataset, sources, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_virtual_slides import main
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    knobs = {k: getattr(SPEC, k) for k in ("n_train_slides", "n_test_slides", "grid_min", "grid_max",
                                           "tumour_fraction", "tiff_tile")}
    main(str(tmp_path / "same"), str(sources[0]), str(sources[1]), workers=2, seed=SPEC.seed, **knobs)
    assert _digests(tmp_path / "same") == _digests(dataset)
    main(str(tmp_path / "other"), str(sources[0]), str(sources[1]), workers=1, seed=SPEC.seed + 1, **knobs)
    other = _digests(tmp_path / "other")
    assert other["tiles.csv"] != _digests(dataset)["tiles.csv"]
    assert other["slides/train_000.tif"] != _digests(dataset)["slides/train_000.tif"]


def test_a_complete_output_is_reused_and_a_different_one_refused(dataset, sources, tmp_path):
    stamps = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    summary = generate_virtual_slides(dataset, sources[0], sources[1], SPEC)
    assert summary["reused"] and {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == stamps
    assert summary["splits"]["train"]["slides"] == 6 and summary["splits"]["test"]["virtual_patients"] == 2
    with pytest.raises(FileExistsError, match="made with"):
        generate_virtual_slides(dataset, sources[0], sources[1], VirtualSlideSpec(**{**SPEC.as_json(), "seed": 8}))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_virtual_slides(foreign, sources[0], sources[1], SPEC)
    assert sorted(p.name for p in dataset.parent.iterdir()) == ["data"]  # no temporary sibling left behind


def test_large_slides_are_painted_a_few_grid_rows_at_a_time(sources, tmp_path):
    spec = VirtualSlideSpec(n_train_slides=1, n_test_slides=0, grid_min=30, grid_max=30, positive_fraction=1,
                            tiff_tile=128)
    row = generate_virtual_slides(tmp_path / "big", sources[0], None, spec)["slides"][0]
    assert row["size_wh"] == [30 * CELL, 30 * CELL] and row["benign_tiles"] == 0 and row["label"] == 1
    # a 128 px TIFF row touches at most 4 rows of 48 px cells
    assert row["peak_cached_cells"] <= 4 * 30 < row["tissue_tiles"]


def test_all_negative_slides_from_a_folder_of_links(sources, tmp_path):
    """positive_fraction 0 deals no tumour patient; a benign folder of symbolic links (as ebhi-hard is made) works."""
    links = tmp_path / "links"
    for path in sources[1].rglob("*.png"):
        (links / path.parent.relative_to(sources[1])).mkdir(parents=True, exist_ok=True)
        (links / path.relative_to(sources[1])).symlink_to(path)
    spec = VirtualSlideSpec(n_train_slides=2, n_test_slides=0, grid_min=8, grid_max=8, positive_fraction=0)
    rows = generate_virtual_slides(tmp_path / "out", sources[0], links, spec)["slides"]
    assert [row["label"] for row in rows] == [0, 0] and all(row["tumour_tiles"] == 0 for row in rows)
    with open(tmp_path / "out" / "tiles.csv", newline="") as f:
        benign = [t["source"] for t in csv.DictReader(f) if t["kind"] == "benign"]
    assert benign and all(s.startswith("train/neg/polyp_BA") for s in benign)


def _break(tissue: Path, benign: Path, case: str) -> dict:
    """Damage a copy of the sources; return keyword overrides for the call."""
    if case == "no tumour tiles":
        for p in (tissue / "train" / "pos").iterdir():
            p.unlink()
    elif case == "no normal tiles":
        for p in (tissue / "test" / "neg").iterdir():
            p.unlink()
    elif case == "tumour tile without mask":
        next((tissue / "train" / "gt").iterdir()).unlink()
    elif case == "tumour in the benign folder":
        (benign / "train" / "pos").mkdir()
        shutil.copy(next((tissue / "train" / "pos").iterdir()), benign / "train" / "pos")
    elif case == "patient in both splits":
        for sub in ("pos", "gt"):
            shutil.copy(tissue / "train" / sub / "TA1-1-400-001.png", tissue / "test" / sub / "TA1-1-400-009.png")
    elif case == "tile of another size":
        Image.new("RGB", (40, 40), (200, 100, 150)).save(tissue / "train" / "neg" / "NA1-1-400-009.png")
    elif case == "too few tumour patients":
        return {"n_train_slides": 20}
    return {}


@pytest.mark.filterwarnings("ignore:.*mask\\(s\\) without a pos image are ignored")
@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing folder", FileNotFoundError, "tissue source folder not found: .*nowhere"),
        ("no tumour tiles", ValueError, r"train/pos: no tumour tiles"),
        ("no normal tiles", ValueError, r"test/neg: no normal tiles"),
        ("tumour tile without mask", ValueError, r"train/pos: 1 image\(s\) have no mask in .*train/gt"),
        ("tumour in the benign folder", ValueError, r"benign/train/pos: the benign source must hold only neg"),
        ("patient in both splits", ValueError, r"\['ta1'\] appear in both the train and the test split"),
        ("tile of another size", ValueError, r"NA1-1-400-009.png: 40x40 px, but the other source tiles are 48x48"),
        ("too few tumour patients", ValueError, r"split train: 6 tumour source patient\(s\) for 10 virtual patients"),
    ],
)
def test_bad_input_is_refused_before_anything_is_written(sources, tmp_path, case, error, message):
    tissue, benign = tmp_path / "tissue", tmp_path / "benign"
    shutil.copytree(sources[0], tissue)
    shutil.copytree(sources[1], benign)
    overrides = _break(tissue, benign, case)
    if case == "missing folder":
        tissue = tmp_path / "nowhere"
    spec = VirtualSlideSpec(**{**SPEC.as_json(), **overrides})
    with pytest.raises(error, match=message):
        generate_virtual_slides(tmp_path / "out", tissue, benign, spec)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_the_command_exits_1_naming_the_missing_folder(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_virtual_slides.py"), "--out", str(tmp_path / "out"),
         "--tissue", str(tmp_path / "nowhere")],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 1 and f"error: tissue source folder not found: {tmp_path / 'nowhere'}" in result.stderr
    assert not (tmp_path / "out").exists()
