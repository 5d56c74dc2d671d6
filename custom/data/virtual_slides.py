"""Virtual slides of real tissue: real patch tiles laid out as a tissue-shaped mosaic on glass, with their masks.

Sources are patch folders: a tissue folder ``DIR/{train,test}/{pos,neg,gt}`` (pos = tumour tiles with their gt
masks, neg = normal tiles; EBHI-Seg's layout) and, optionally, a benign folder ``DIR/{train,test}/neg`` (benign
lesions: no tumour). Every source tile must be square and of one size, which becomes the cell of the slide grid.
What is written (``generate_virtual_slides``)::

    slides/<name>.tif       tiled JPEG pyramidal BigTIFF (custom.writers.pyramid_tiff), level-0 mpp in the tags
    masks/<name>.tif        tumour mask, uint8 0/255, LZW, same level-0 size and tiling as the slide
    annotations/<name>.xml  ASAP XML outlines of the mask (group _0; holes as exclusion group _2); empty on negatives
    slides.csv              slide,label,mask,annotation,split,patient (paths relative to the CSV)
    tiles.csv               every placed tile: slide, level-0 x, y, kind, source file, source patient, transform
    README.txt, .complete.json (the spec and sources, written last)

One slide: a grid of ``rows x cols`` cells (each side drawn from ``[grid_min, grid_max]``). The tissue is a smooth
blob, an ellipse of random axes and angle whose radius wobbles with a few random harmonics, covering a drawn
``tissue_fraction`` of the cells (its largest 4-connected piece, holes filled); the other cells are glass, near
white with slight noise. A positive slide holds ``clusters`` (1 to 3) separate clusters of tumour tiles, each
4-connected and grown cell by cell from a random seed (clusters never touch, not even at a corner), together
``tumour_fraction`` (a drawn share) of the tissue cells; the other tissue cells are benign where a smoothed random
field is highest (``benign_fraction`` of them) and normal elsewhere. A negative slide holds normal and benign tiles
only. Each placed tile is one of the eight flips / quarter turns of a source tile drawn at random, so the few normal
tiles (EBHI-Seg: 45 train images) are reused with variety; a tumour tile's gt mask goes with it, normal and benign
tiles have all-zero masks.

Patients. Train slides use only the sources' train split and test slides only their test split; a source patient
(``group_pattern`` over the file name, compared case-insensitively) found in both splits is an error. Within a
split, slide ``i`` belongs to virtual patient ``i // slides_per_patient`` (``<split>-vp<NN>``, the ``patient``
column, which validation splits keep whole); positives are assigned first to the first slide of every virtual
patient, then to the second, and so on, so with the defaults each virtual patient has one positive and one negative
slide. The split's tumour source patients are shuffled and dealt round-robin to the virtual patients that hold a
positive slide, so different virtual patients never share a tumour patient (an error when there are fewer tumour
patients than such virtual patients). A benign source patient who is also a tumour patient goes to the same virtual
patient; the other benign patients are dealt, one by one, to the virtual patient with the fewest benign tiles so
far; a virtual patient left without one draws on the split's whole benign pool. Normal tiles come from the split's
whole normal pool (EBHI-Seg has 7 train and 2 test normal patients: too few to deal out).

Slides are written tile by tile (``write_pyramid`` pulls TIFF tiles in row-major order; the painter keeps at most
the decoded cells of the grid rows the current TIFF row touches), so memory does not grow with the slide. The ASAP
outlines are traced per tumour cluster on its bounding box, at level 0 up to ``2**26`` pixels a cluster and at the
smallest power-of-two downsample (dividing the cell) that fits, beyond.

Everything is drawn from ``numpy`` generators seeded by (seed, split, slide index), and the glass noise by (seed,
slide, TIFF tile), so one seed gives the same files, byte for byte, with any number of workers. Arrays are numpy
``(row, col)``; level-0 pixel coordinates in files (XML, tiles.csv) are ``(x, y)``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from custom.data.datalist import EBHI_GROUP_PATTERN, patch_folder_datalist
from custom.data.images import read_mask, read_rgb
from custom.data.polygons import mask_polygons, outlines_and_holes
from custom.data.synthetic import COMPLETE_MARKER, building_dataset
from custom.writers.asap_xml import write_asap_xml
from custom.writers.pyramid_tiff import write_pyramid

__all__ = [
    "VirtualSlideSpec", "SourceTile", "SlidePlan", "SlidePainter", "COMPLETE_MARKER", "FORMAT_VERSION", "KIND_NAMES",
    "GLASS", "NORMAL", "BENIGN", "TUMOUR", "load_sources", "tissue_shape", "grow_clusters", "plan_split",
    "plan_dataset", "dihedral", "cluster_outlines", "write_slide", "generate_virtual_slides", "spec_from_knobs",
]

FORMAT_VERSION = 1
"""Stored in the marker with the spec: raise it when a change of this module changes what one spec writes, so that
an older output is not reused as if it were current."""

GLASS, NORMAL, BENIGN, TUMOUR = 0, 1, 2, 3
KIND_NAMES = {GLASS: "glass", NORMAL: "normal", BENIGN: "benign", TUMOUR: "tumour"}
SPLITS = ("train", "test")
_POLYGON_PIXELS = 2**26
"""Largest cluster box (in mask pixels) traced at once; bigger clusters are traced at a power-of-two downsample."""


@dataclass(frozen=True)
class VirtualSlideSpec:
    """Every knob of the virtual slide set; the defaults are the development set (48 train, 20 test slides)."""

    n_train_slides: int = 48
    """Slides composed from the sources' train split."""
    n_test_slides: int = 20
    """Slides composed from the sources' test split."""
    grid_min: int = 12
    """Smallest slide side, in source tiles (each side is drawn from [grid_min, grid_max])."""
    grid_max: int = 16
    """Largest slide side, in source tiles (16 x 224 px = 3584 px)."""
    tissue_fraction: tuple[float, float] = (0.5, 0.7)
    """Range of the share of grid cells the tissue blob covers (before its largest piece is kept)."""
    positive_fraction: float = 0.5
    """Share of each split's slides that hold tumour (rounded)."""
    tumour_fraction: tuple[float, float] = (0.03, 0.30)
    """Range of the share of a positive slide's tissue tiles that are tumour tiles."""
    clusters: tuple[int, int] = (1, 3)
    """Range of the number of separate tumour clusters on a positive slide."""
    benign_fraction: float = 0.5
    """Share of the non-tumour tissue tiles that are benign, when a benign source is given (else all normal)."""
    slides_per_patient: int = 2
    """Slides per virtual patient (the ``patient`` column)."""
    mpp: float = 0.5
    """Level-0 microns per pixel written in the TIFF tags (EBHI-Seg tiles are 224 px at 400x)."""
    jpeg_quality: int = 90
    """JPEG quality of the slides."""
    tiff_tile: int = 256
    """TIFF tile side in pixels (a multiple of 16)."""
    glass_rgb: tuple[int, int, int] = (240, 240, 242)
    """Mean colour of the glass."""
    glass_noise: float = 1.5
    """Standard deviation of the glass's per-pixel noise (grey levels)."""
    group_pattern: str = EBHI_GROUP_PATTERN
    """Regex over source file names whose first group is the source patient (the project's ``group_pattern``)."""
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("tissue_fraction", "tumour_fraction", "clusters", "glass_rgb"):  # a list from JSON or fire
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if min(self.n_train_slides, self.n_test_slides) < 0 or self.n_train_slides + self.n_test_slides < 1:
            problems.append("n_train_slides and n_test_slides must be >= 0 and not both 0")
        if not 1 <= self.grid_min <= self.grid_max:
            problems.append(f"need 1 <= grid_min <= grid_max, got {self.grid_min}, {self.grid_max}")
        for name, low, high in (("tissue_fraction", 0, 1), ("tumour_fraction", 0, 1)):
            value = getattr(self, name)
            if len(value) != 2 or not low < value[0] <= value[1] <= high:
                problems.append(f"{name} must be (low, high) with {low} < low <= high <= {high}, got {value}")
        if len(self.clusters) != 2 or not 1 <= self.clusters[0] <= self.clusters[1]:
            problems.append(f"clusters must be (low, high) with 1 <= low <= high, got {self.clusters}")
        for name in ("positive_fraction", "benign_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                problems.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.slides_per_patient < 1:
            problems.append(f"slides_per_patient must be >= 1, got {self.slides_per_patient}")
        if not self.mpp > 0:
            problems.append(f"mpp must be positive, got {self.mpp}")
        if not 1 <= self.jpeg_quality <= 100:
            problems.append(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.tiff_tile <= 0 or self.tiff_tile % 16:
            problems.append(f"tiff_tile must be a positive multiple of 16, got {self.tiff_tile}")
        if len(self.glass_rgb) != 3 or not all(0 <= v <= 255 for v in self.glass_rgb) or self.glass_noise < 0:
            problems.append(f"glass_rgb must be 3 values in 0..255 and glass_noise >= 0, got {self.glass_rgb}, "
                            f"{self.glass_noise}")
        if problems:
            raise ValueError("VirtualSlideSpec: " + "; ".join(problems))

    def as_json(self) -> dict:
        """The spec as JSON types (tuples become lists), as stored in the completion marker."""
        return json.loads(json.dumps(asdict(self)))


@dataclass(frozen=True)
class SourceTile:
    """One source image: its file, its gt mask (tumour tiles only), its kind, its source patient, and its path
    inside its source folder (as tiles.csv names it)."""

    image: str
    mask: str | None
    kind: int
    patient: str
    source: str


@dataclass(frozen=True)
class SlidePlan:
    """Everything drawn for one slide; rendering it needs nothing else (arrays are (rows, cols) of grid cells)."""

    name: str
    split: str
    index: int
    label: int
    patient: str
    cell: int
    kinds: np.ndarray
    """GLASS / NORMAL / BENIGN / TUMOUR per cell."""
    sources: np.ndarray
    """Index into ``tiles`` per cell, -1 on glass."""
    transforms: np.ndarray
    """0..7 per cell: ``t % 4`` counter-clockwise quarter turns (np.rot90), then a left-right mirror if ``t >= 4``."""
    clusters: np.ndarray
    """Tumour cluster number (1, 2, ...) per cell, 0 elsewhere."""
    tiles: tuple[SourceTile, ...]
    tumour_patients: tuple[str, ...]
    """The source patients this slide's virtual patient owns as tumour patients."""

    @property
    def shape_hw(self) -> tuple[int, int]:
        """Level-0 (height, width) in pixels."""
        return self.kinds.shape[0] * self.cell, self.kinds.shape[1] * self.cell


# ----------------------------------------------------------------------------------------------------------- sources
def _patient_of(item: dict, folder: Path) -> str:
    if not item["group"]:
        raise ValueError(f"{folder}: no source patient in the file name {Path(item['image']).name!r} (group_pattern "
                         "found nothing); pass a group_pattern that extracts the patient id")
    return item["group"]


def _tiles(items: Sequence[dict], kind: int, root: Path, folder: Path) -> list[SourceTile]:
    """Source tiles of datalist items; ``source`` is relative to ``root`` without following links."""
    return [SourceTile(item["image"], item["mask"] if kind == TUMOUR else None, kind, _patient_of(item, folder),
                       Path(item["image"]).relative_to(root).as_posix()) for item in items]


def load_sources(tissue_dir: str | os.PathLike, benign_dir: str | os.PathLike | None, split: str,
                 group_pattern: str = EBHI_GROUP_PATTERN) -> list[SourceTile]:
    """The source tiles of one split: tumour (pos with gt) and normal (neg) tiles, and benign (neg) tiles if given.

    Raises, naming the folder, when a folder is missing, holds no tumour or no normal tile, a tumour tile has no
    mask, the benign folder holds pos images or no neg image, or a file name carries no patient id.
    """
    tiles = []
    for role, root in (("tissue", tissue_dir), ("benign", benign_dir)):
        if root is None:
            continue
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{role} source folder not found: {root}")
        items = patch_folder_datalist(root, split, require_masks=role == "tissue", group_pattern=group_pattern)
        pos = [item for item in items if item["label"] == 1]
        neg = [item for item in items if item["label"] == 0]
        if role == "tissue":
            if not pos:
                raise ValueError(f"{root / split / 'pos'}: no tumour tiles (the tissue source needs pos images)")
            if not neg:
                raise ValueError(f"{root / split / 'neg'}: no normal tiles (the tissue source needs neg images)")
            tiles += _tiles(pos, TUMOUR, root, root / split / "pos") + _tiles(neg, NORMAL, root, root / split / "neg")
        else:
            if pos:
                raise ValueError(f"{root / split / 'pos'}: the benign source must hold only neg images (no tumour)")
            if not neg:
                raise ValueError(f"{root / split / 'neg'}: no benign tiles")
            tiles += _tiles(neg, BENIGN, root, root / split / "neg")
    return tiles


def _tile_side(tiles: Sequence[SourceTile]) -> int:
    """The one square size every source image and mask has (read from the file headers), else an error naming one."""
    side = None
    for tile in tiles:
        for path in (tile.image, tile.mask):
            if path is None:
                continue
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except OSError as e:
                raise ValueError(f"cannot read the source image {path}: {e}") from e
            if width != height:
                raise ValueError(f"{path}: source tiles must be square, got {width}x{height}")
            side = side or width
            if width != side:
                raise ValueError(f"{path}: {width}x{height} px, but the other source tiles are {side}x{side}; "
                                 "the cells of a virtual slide are one size")
    return side


# ----------------------------------------------------------------------------------------------------------- layout
def tissue_shape(rng: np.random.Generator, rows: int, cols: int, fraction: float) -> np.ndarray:
    """A smooth blob of about ``fraction`` of the grid's cells: a wobbly ellipse, largest 4-connected piece, filled."""
    y, x = np.mgrid[0:rows, 0:cols] + 0.5
    cy, cx = rows * (0.5 + rng.uniform(-0.05, 0.05)), cols * (0.5 + rng.uniform(-0.05, 0.05))
    angle, aspect = rng.uniform(0, np.pi), rng.uniform(0.6, 1.0)
    dy, dx = (y - cy) / rows, (x - cx) / cols
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = (-dx * np.sin(angle) + dy * np.cos(angle)) / aspect
    theta = np.arctan2(v, u)
    wobble = 1.0 + sum(rng.uniform(0, 0.15) / k**0.5 * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
                       for k in range(2, 6))
    score = np.hypot(u, v) / wobble
    n_cells = max(1, round(fraction * rows * cols))
    mask = np.zeros(rows * cols, bool)
    mask[np.argsort(score, axis=None, kind="stable")[:n_cells]] = True
    labels, count = ndimage.label(mask.reshape(rows, cols))
    if count > 1:
        sizes = ndimage.sum_labels(np.ones_like(labels), labels, range(1, count + 1))
        labels = np.where(labels == 1 + int(np.argmax(sizes)), 1, 0)
    return ndimage.binary_fill_holes(labels > 0)


def _split_sizes(rng: np.random.Generator, total: int, parts: int) -> list[int]:
    """``parts`` positive integers adding up to ``total`` (parts <= total), of random relative sizes."""
    extra = rng.multinomial(total - parts, rng.dirichlet(np.full(parts, 2.0)))
    return sorted((1 + extra).tolist(), reverse=True)


_FOUR = ndimage.generate_binary_structure(2, 1)
_EIGHT = ndimage.generate_binary_structure(2, 2)


def grow_clusters(rng: np.random.Generator, tissue: np.ndarray, sizes: Sequence[int], attempts: int = 50) -> np.ndarray:
    """Cluster numbers (1..len(sizes)) of separate 4-connected clusters of the given sizes inside ``tissue``.

    Each cluster grows from a random free cell by adding a frontier cell drawn with weight (its cluster
    neighbours)^2, which keeps clusters compact; cells touching another cluster (8-neighbourhood) are not free.
    """
    rows, cols = tissue.shape
    for _ in range(attempts):
        labels = np.zeros(tissue.shape, np.int32)
        for number, size in enumerate(sizes, start=1):
            free = tissue & ~ndimage.binary_dilation(labels > 0, _EIGHT)
            candidates = np.flatnonzero(free)
            if not len(candidates):
                break
            cluster = np.zeros(tissue.shape, bool)
            cluster.flat[rng.choice(candidates)] = True
            for _ in range(size - 1):
                neighbours = ndimage.convolve(cluster.astype(np.int32), _FOUR.astype(np.int32), mode="constant")
                frontier = np.flatnonzero(free & ~cluster & (neighbours > 0))
                if not len(frontier):
                    break
                weights = neighbours.flat[frontier].astype(float) ** 2
                cluster.flat[rng.choice(frontier, p=weights / weights.sum())] = True
            if cluster.sum() < size:
                break
            labels[cluster] = number
        else:
            return labels
    raise ValueError(f"could not place tumour clusters of sizes {list(sizes)} in a tissue of {int(tissue.sum())} "
                     f"cells ({rows}x{cols} grid); lower tumour_fraction or clusters, or raise the grid size")


def _field(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A smooth random field over the grid (Gaussian-filtered white noise)."""
    return ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(1.0, min(shape) / 6), mode="reflect")


def _tumour_count(rng: np.random.Generator, n_tissue: int, spec: VirtualSlideSpec, name: str) -> int:
    """Tumour tiles of a positive slide: a drawn share of its tissue tiles, always inside ``tumour_fraction``."""
    low, high = spec.tumour_fraction
    lowest, highest = max(1, int(np.ceil(low * n_tissue - 1e-9))), int(np.floor(high * n_tissue + 1e-9))
    if lowest > highest:
        raise ValueError(f"{name}: {n_tissue} tissue tiles allow no tumour tile count within tumour_fraction "
                         f"{spec.tumour_fraction}; raise grid_min or widen tumour_fraction")
    return int(np.clip(round(rng.uniform(low, high) * n_tissue), lowest, highest))


def _deal_patients(tiles: Sequence[SourceTile], n_patients: int, with_positive: Sequence[int],
                   rng: np.random.Generator, split: str) -> tuple[dict[str, int], dict[str, int]]:
    """Owners (virtual patient) of the tumour and the benign source patients (lower-cased ids), see the docstring."""
    tumour = sorted({t.patient.lower() for t in tiles if t.kind == TUMOUR})
    if with_positive and len(tumour) < len(with_positive):
        raise ValueError(f"split {split}: {len(tumour)} tumour source patient(s) for {len(with_positive)} virtual "
                         "patients with a positive slide, which need one each; lower the number of slides or "
                         "positive_fraction, or raise slides_per_patient")
    dealt = rng.permutation(tumour).tolist() if with_positive else []
    tumour_owner = {p: with_positive[i % len(with_positive)] for i, p in enumerate(dealt)}
    benign_tiles: dict[str, int] = {}
    for tile in tiles:
        if tile.kind == BENIGN:
            benign_tiles[tile.patient.lower()] = benign_tiles.get(tile.patient.lower(), 0) + 1
    benign_owner = {p: tumour_owner[p] for p in benign_tiles if p in tumour_owner}
    load = np.zeros(n_patients, int)
    for patient, owner in benign_owner.items():
        load[owner] += benign_tiles[patient]
    for patient in rng.permutation(sorted(set(benign_tiles) - set(benign_owner))).tolist():
        benign_owner[patient] = int(np.argmin(load))
        load[benign_owner[patient]] += benign_tiles[patient]
    return tumour_owner, benign_owner


def plan_split(tiles: Sequence[SourceTile], split: str, n_slides: int, cell: int,
               spec: VirtualSlideSpec) -> list[SlidePlan]:
    """Draw every slide of one split (labels, virtual patients, tissue, clusters, the tile of every cell)."""
    split_code = SPLITS.index(split)
    k = spec.slides_per_patient
    n_patients = -(-n_slides // k)
    n_pos = round(spec.positive_fraction * n_slides)
    order = sorted(range(n_slides), key=lambda i: (i % k, i // k))  # first slide of each patient, then the second
    labels = np.zeros(n_slides, int)
    labels[order[:n_pos]] = 1
    with_positive = sorted({i // k for i in range(n_slides) if labels[i]})
    tumour_owner, benign_owner = _deal_patients(tiles, n_patients, with_positive, np.random.default_rng(
        [spec.seed, split_code, 1_000_003]), split)
    normal_pool = [i for i, t in enumerate(tiles) if t.kind == NORMAL]
    benign_all = [i for i, t in enumerate(tiles) if t.kind == BENIGN]
    tiles = tuple(tiles)
    plans = []
    for index in range(n_slides):
        name, vp = f"{split}_{index:03d}", index // k
        rng = np.random.default_rng([spec.seed, split_code, index])
        rows, cols = (int(rng.integers(spec.grid_min, spec.grid_max + 1)) for _ in range(2))
        tissue = tissue_shape(rng, rows, cols, rng.uniform(*spec.tissue_fraction))
        kinds = np.where(tissue, NORMAL, GLASS).astype(np.uint8)
        clusters = np.zeros((rows, cols), np.int32)
        if labels[index]:
            n_tumour = _tumour_count(rng, int(tissue.sum()), spec, name)
            n_clusters = min(int(rng.integers(spec.clusters[0], spec.clusters[1] + 1)), n_tumour)
            clusters = grow_clusters(rng, tissue, _split_sizes(rng, n_tumour, n_clusters))
            kinds[clusters > 0] = TUMOUR
        others = np.flatnonzero(kinds == NORMAL)
        if benign_all and spec.benign_fraction > 0 and len(others):
            n_benign = round(spec.benign_fraction * len(others))
            field = _field(rng, (rows, cols)).flat[others]
            kinds.flat[others[np.argsort(-field, kind="stable")[:n_benign]]] = BENIGN
        own_tumour = sorted(p for p, owner in tumour_owner.items() if owner == vp)
        pools = {
            NORMAL: normal_pool,
            BENIGN: [i for i in benign_all if benign_owner.get(tiles[i].patient.lower()) == vp] or benign_all,
            TUMOUR: [i for i, t in enumerate(tiles) if t.kind == TUMOUR and t.patient.lower() in own_tumour],
        }
        sources = np.full((rows, cols), -1, np.int32)
        for kind, pool in pools.items():
            cells = np.flatnonzero(kinds == kind)
            if len(cells):
                sources.flat[cells] = np.asarray(pool)[rng.integers(0, len(pool), len(cells))]
        transforms = np.where(tissue, rng.integers(0, 8, (rows, cols)), 0).astype(np.uint8)
        plans.append(SlidePlan(name, split, index, int(labels[index]), f"{split}-vp{vp:02d}", cell, kinds, sources,
                               transforms, clusters, tiles, tuple(own_tumour)))
    return plans


def plan_dataset(tissue_dir: str | os.PathLike, benign_dir: str | os.PathLike | None,
                 spec: VirtualSlideSpec) -> list[SlidePlan]:
    """Check the sources and draw every slide, before anything is written; raises naming the folder at fault."""
    wanted = [(split, n) for split, n in zip(SPLITS, (spec.n_train_slides, spec.n_test_slides)) if n > 0]
    sources = {split: load_sources(tissue_dir, benign_dir, split, spec.group_pattern) for split, _ in wanted}
    if len(sources) == 2:
        shared = ({t.patient.lower() for t in sources["train"]} & {t.patient.lower() for t in sources["test"]})
        if shared:
            raise ValueError(f"{tissue_dir}, {benign_dir}: source patient(s) {sorted(shared)[:5]} appear in both the "
                             "train and the test split; train and test slides must draw on disjoint patients")
    cell = _tile_side([t for split in sources for t in sources[split]])
    return [plan for split, n in wanted for plan in plan_split(sources[split], split, n, cell, spec)]


# ---------------------------------------------------------------------------------------------------------- painting
def dihedral(array: np.ndarray, transform: int) -> np.ndarray:
    """One of the 8 flips / quarter turns of an image or mask (see ``SlidePlan.transforms``)."""
    out = np.rot90(array, transform % 4)
    return np.ascontiguousarray(out[:, ::-1] if transform >= 4 else out)


@lru_cache(maxsize=128)
def _source_rgb(path: str) -> np.ndarray:
    return read_rgb(path)


@lru_cache(maxsize=128)
def _source_mask(path: str) -> np.ndarray:
    return read_mask(path) * np.uint8(255)


class SlidePainter:
    """The level-0 tile source of one slide (``f(row, col, height, width)``) for ``write_pyramid``, RGB or mask.

    Calls come in row-major order; the decoded cells of grid rows above the current request are dropped, so at most
    the cells of the grid rows one TIFF row touches are held. ``tumour_pixels`` counts the mask's tumour pixels.
    """

    def __init__(self, plan: SlidePlan, spec: VirtualSlideSpec, mask: bool,
                 progress: Callable[[str], None] | None = None):
        self.plan, self.spec, self.mask, self.progress = plan, spec, mask, progress
        self.cells: dict[tuple[int, int], np.ndarray] = {}
        self.peak_cells = 0
        self.tumour_pixels = 0
        height, width = plan.shape_hw
        self.n_tiles = -(-height // spec.tiff_tile) * -(-width // spec.tiff_tile)
        self.done, self.start = 0, time.perf_counter()

    def _cell(self, r: int, c: int) -> np.ndarray | None:
        plan = self.plan
        kind = int(plan.kinds[r, c])
        if kind == GLASS or (self.mask and kind != TUMOUR):
            return None
        if (r, c) not in self.cells:
            tile = plan.tiles[int(plan.sources[r, c])]
            array = _source_mask(tile.mask) if self.mask else _source_rgb(tile.image)
            if array.shape[:2] != (plan.cell, plan.cell):
                raise ValueError(f"{tile.mask if self.mask else tile.image}: decoded as {array.shape}, expected "
                                 f"{plan.cell}x{plan.cell} like the other source tiles")
            self.cells[(r, c)] = dihedral(array, int(plan.transforms[r, c]))
        return self.cells[(r, c)]

    def _background(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        if self.mask:
            return np.zeros((height, width), np.uint8)
        rng = np.random.default_rng([self.spec.seed, SPLITS.index(self.plan.split), self.plan.index, row, col])
        glass = np.asarray(self.spec.glass_rgb, float) + rng.normal(0, self.spec.glass_noise, (height, width, 1))
        return np.clip(np.rint(glass), 0, 255).astype(np.uint8)

    def __call__(self, row: int, col: int, height: int, width: int) -> np.ndarray:
        cell = self.plan.cell
        top, bottom = row // cell, (row + height - 1) // cell
        for key in [key for key in self.cells if key[0] < top]:
            del self.cells[key]
        out = self._background(row, col, height, width)
        for r in range(top, bottom + 1):
            for c in range(col // cell, (col + width - 1) // cell + 1):
                array = self._cell(r, c)
                if array is None:
                    continue
                y0, x0 = max(row, r * cell), max(col, c * cell)
                y1, x1 = min(row + height, (r + 1) * cell), min(col + width, (c + 1) * cell)
                out[y0 - row : y1 - row, x0 - col : x1 - col] = array[y0 - r * cell : y1 - r * cell,
                                                                      x0 - c * cell : x1 - c * cell]
        self.peak_cells = max(self.peak_cells, len(self.cells))
        if self.mask:
            self.tumour_pixels += int(np.count_nonzero(out))
        self.done += 1
        if self.progress and self.n_tiles >= 2000 and self.done % (self.n_tiles // 10) == 0:
            rate = self.done / (time.perf_counter() - self.start)
            self.progress(f"  {self.plan.name} {'mask' if self.mask else 'slide'}: {self.done}/{self.n_tiles} tiles, "
                          f"{rate:.0f} tiles/s, ETA {(self.n_tiles - self.done) / rate:.0f} s")
        return out


def cluster_outlines(plan: SlidePlan) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """ASAP rings of the tumour mask, traced cluster by cluster on its bounding box: (outlines, holes), level-0 (x, y).

    Clusters never touch (not even diagonally), so their masks are traced apart without changing the result.
    """
    cell = plan.cell
    outlines, holes = [], []
    for number in range(1, int(plan.clusters.max()) + 1):
        cells = np.argwhere(plan.clusters == number)
        (r0, c0), (r1, c1) = cells.min(axis=0), cells.max(axis=0) + 1
        area = (r1 - r0) * (c1 - c0) * cell * cell
        ds = 1
        while area / ds**2 > _POLYGON_PIXELS and cell % (2 * ds) == 0:
            ds *= 2
        side = cell // ds
        mask = np.zeros(((r1 - r0) * side, (c1 - c0) * side), bool)
        for r, c in cells:
            tile = dihedral(_source_mask(plan.tiles[int(plan.sources[r, c])].mask), int(plan.transforms[r, c])) > 0
            if ds > 1:
                tile = tile.reshape(side, ds, side, ds).mean(axis=(1, 3)) >= 0.5
            mask[(r - r0) * side : (r - r0 + 1) * side, (c - c0) * side : (c - c0 + 1) * side] = tile
        rings, its_holes = outlines_and_holes(mask_polygons(mask, ds, simplify_px=0.5))
        offset = np.array([c0 * cell, r0 * cell], float)
        outlines += [ring + offset for ring in rings]
        holes += [ring + offset for ring in its_holes]
    return outlines, holes


def write_slide(plan: SlidePlan, spec: VirtualSlideSpec, out: Path,
                progress: Callable[[str], None] | None = None) -> dict:
    """Write one slide, its mask and its XML into ``out``; return its summary row."""
    start = time.perf_counter()
    shape = plan.shape_hw
    slide_painter = SlidePainter(plan, spec, mask=False, progress=progress)
    write_pyramid(out / "slides" / f"{plan.name}.tif", slide_painter, shape, channels=3, mpp=spec.mpp,
                  tile=spec.tiff_tile, jpeg_quality=spec.jpeg_quality)
    mask_painter = SlidePainter(plan, spec, mask=True, progress=progress)
    write_pyramid(out / "masks" / f"{plan.name}.tif", mask_painter, shape, channels=1, mpp=spec.mpp,
                  tile=spec.tiff_tile)
    outlines, holes = cluster_outlines(plan)
    write_asap_xml(out / "annotations" / f"{plan.name}.xml", outlines + holes,
                   ["_0"] * len(outlines) + ["_2"] * len(holes))
    counts = {KIND_NAMES[k]: int((plan.kinds == k).sum()) for k in (NORMAL, BENIGN, TUMOUR)}
    n_tissue = sum(counts.values())
    return {
        "slide": plan.name, "label": plan.label, "split": plan.split, "patient": plan.patient,
        "grid": list(plan.kinds.shape), "size_wh": [shape[1], shape[0]], "tissue_tiles": n_tissue,
        **{f"{kind}_tiles": n for kind, n in counts.items()},
        "clusters": int(plan.clusters.max()),
        "tumour_tile_fraction": round(counts["tumour"] / n_tissue, 4),
        "tumour_pixel_fraction": round(mask_painter.tumour_pixels / (n_tissue * plan.cell**2), 4),
        "tumour_patients": list(plan.tumour_patients) if plan.label else [],
        "source_patients": sorted({plan.tiles[i].patient for i in plan.sources[plan.sources >= 0].tolist()}),
        "peak_cached_cells": max(slide_painter.peak_cells, mask_painter.peak_cells),
        "slide_bytes": (out / "slides" / f"{plan.name}.tif").stat().st_size,
        "seconds": round(time.perf_counter() - start, 2),
    }


# ----------------------------------------------------------------------------------------------------------- output
def _write_csvs(folder: Path, plans: Sequence[SlidePlan], rows: Sequence[dict]) -> None:
    with open(folder / "slides.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "label", "mask", "annotation", "split", "patient"])
        for r in rows:
            name = r["slide"]
            writer.writerow([f"slides/{name}.tif", r["label"], f"masks/{name}.tif", f"annotations/{name}.xml",
                             r["split"], r["patient"]])
    with open(folder / "tiles.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide", "x", "y", "kind", "source", "patient", "transform"])
        for plan in plans:
            for r, c in np.argwhere(plan.sources >= 0).tolist():
                tile = plan.tiles[plan.sources[r, c]]
                writer.writerow([plan.name, c * plan.cell, r * plan.cell, KIND_NAMES[tile.kind], tile.source,
                                 tile.patient, int(plan.transforms[r, c])])


def _readme(spec: VirtualSlideSpec, sources: dict, rows: Sequence[dict], cell: int) -> str:
    lines = [
        "Virtual slides of real tissue, composed by custom.data.virtual_slides (scripts/make_virtual_slides.py).",
        f"Spec: {json.dumps(spec.as_json())}",
        f"Sources: {json.dumps(sources)}",
        "If the sources are EBHI-Seg (Shi, Li, Hu et al., Frontiers in Medicine 2023; figshare 21540159), these",
        "slides are derived from it under CC BY 4.0: keep that attribution wherever they or numbers from them appear.",
        "",
        f"slides/*.tif       tiled JPEG pyramidal BigTIFF, {spec.mpp} um/px at level 0, cells of {cell} px = one "
        "source tile (flipped / rotated), glass elsewhere.",
        "masks/*.tif        tumour mask, uint8 0/255, LZW, same geometry as the slide (tumour tiles keep their gt "
        "mask).",
        "annotations/*.xml  ASAP XML outlines of the mask (group _0; holes as exclusion group _2); negatives: none.",
        "slides.csv         slide,label,mask,annotation,split,patient (virtual patient: disjoint tumour source "
        "patients).",
        "tiles.csv          slide,x,y (level-0 top-left),kind,source (path in its source folder),patient,transform "
        "(0-7: t%4 quarter turns, mirrored if t>=4).",
        "",
    ]
    for r in rows:
        lines.append(f"  {r['slide']}  label={r['label']}  split={r['split']}  patient={r['patient']}  "
                     f"grid={r['grid'][0]}x{r['grid'][1]}  tissue={r['tissue_tiles']}  tumour={r['tumour_tiles']}  "
                     f"benign={r['benign_tiles']}  normal={r['normal_tiles']}  clusters={r['clusters']}")
    return "\n".join(lines) + "\n"


def _split_summary(rows: Sequence[dict]) -> dict:
    out = {}
    for split in SPLITS:
        part = [r for r in rows if r["split"] == split]
        if not part:
            continue
        positive = [r for r in part if r["label"]]
        fractions = [r["tumour_tile_fraction"] for r in positive]
        pixel = [r["tumour_pixel_fraction"] for r in positive]
        out[split] = {
            "slides": len(part), "positive": len(positive), "virtual_patients": len({r["patient"] for r in part}),
            "tissue_tiles": sum(r["tissue_tiles"] for r in part),
            **{f"{kind}_tiles": sum(r[f"{kind}_tiles"] for r in part) for kind in ("tumour", "benign", "normal")},
            "tumour_tile_fraction": [min(fractions), max(fractions)] if fractions else None,
            "tumour_pixel_fraction": [min(pixel), max(pixel)] if pixel else None,
            "source_patients": len({p for r in part for p in r["source_patients"]}),
            "tumour_source_patients": len({p for r in part for p in r["tumour_patients"]}),
            "slide_bytes": sum(r["slide_bytes"] for r in part),
        }
    return out


def generate_virtual_slides(
    out: str | os.PathLike,
    tissue_dir: str | os.PathLike,
    benign_dir: str | os.PathLike | None = None,
    spec: VirtualSlideSpec | None = None,
    workers: int = 1,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Compose the virtual slides into ``out`` and return the summary (also stored in ``out/.complete.json``).

    ``out`` must not exist, be empty, or hold a complete set made from the same spec and sources (which is reused:
    the stored summary comes back with ``reused`` True). Sources are checked and every slide is drawn before
    anything is written; the set is built in a temporary sibling folder renamed when complete, so a failed or killed
    run leaves no partial ``out``. ``workers`` > 1 writes slides in parallel processes (same bytes either way).
    ``progress`` receives one line per finished slide (rate, ETA), and per 10 % of a large slide's tiles.
    """
    spec = spec or VirtualSlideSpec()
    out = Path(out)
    roots = {"tissue": Path(tissue_dir).resolve(), "benign": Path(benign_dir).resolve() if benign_dir else None}
    request = {"version": FORMAT_VERSION, "spec": spec.as_json(),
               "sources": {k: str(v) if v else None for k, v in roots.items()}}
    marker = out / COMPLETE_MARKER
    if marker.is_file():
        made = json.loads(marker.read_text())
        if {key: made.get(key) for key in request} == request:
            return made | {"reused": True}
        raise FileExistsError(f"{out}: holds virtual slides made with {json.dumps({k: made.get(k) for k in request})}"
                              f", not the requested {json.dumps(request)}; remove it or choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: already exists and is not empty (no {COMPLETE_MARKER}: an unfinished or "
                              "foreign folder); remove it or choose another folder")
    plans = plan_dataset(tissue_dir, benign_dir, spec)
    say = progress or (lambda line: None)
    say(f"{len(plans)} slides planned ({sum(p.label for p in plans)} positive), cells of {plans[0].cell} px")
    start = time.perf_counter()
    with building_dataset(out) as building:
        for sub in ("slides", "masks", "annotations"):
            (building / sub).mkdir()
        rows: list[dict | None] = [None] * len(plans)

        def finished(index: int, row: dict, done: int) -> None:
            rows[index] = row
            elapsed = time.perf_counter() - start
            px = sum(r["size_wh"][0] * r["size_wh"][1] for r in rows if r) / 1e6
            say(f"slide {done}/{len(plans)} {row['slide']} ({row['size_wh'][0]}x{row['size_wh'][1]} px, label "
                f"{row['label']}): {done / elapsed:.2f} slides/s, {px / elapsed:.1f} MP/s, "
                f"ETA {(len(plans) - done) * elapsed / done:.0f} s")

        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                futures = {pool.submit(write_slide, plan, spec, building, progress): i for i, plan in enumerate(plans)}
                for done, future in enumerate(as_completed(futures), start=1):
                    finished(futures[future], future.result(), done)
        else:
            for i, plan in enumerate(plans):
                finished(i, write_slide(plan, spec, building, progress), i + 1)
        _write_csvs(building, plans, rows)
        (building / "README.txt").write_text(_readme(spec, request["sources"], rows, plans[0].cell))
        summary = {**request, "splits": _split_summary(rows), "slides": rows,
                   "seconds": round(time.perf_counter() - start, 2)}
        (building / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2))
    return summary


def spec_from_knobs(**knobs) -> VirtualSlideSpec:
    """A spec with the given fields replaced (unknown names are an error listing the known ones)."""
    names = [f.name for f in fields(VirtualSlideSpec)]
    if unknown := sorted(set(knobs) - set(names)):
        raise ValueError(f"unknown knob(s) {unknown}; the knobs are {names}")
    return VirtualSlideSpec(**{k: v for k, v in knobs.items() if v is not None})
