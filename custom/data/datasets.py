"""MONAI datasets of image patches and of whole-slide tiles, labelled per image or per slide.

Every item is a dict with at least ``{"image": (3, H, W) float32 in [0, 1], "label": float scalar tensor,
"mask": (1, H, W) float32, "has_mask": bool, "name": str}`` so that bundle configs can append their own MONAI
transforms (``NormalizeIntensityd`` with ImageNet statistics, random flips, ...) after the loading chain.
``has_mask`` is False where the mask is all-zero only for lack of ground truth (a positive without a gt file);
evaluation should skip those. Slide tiles add ``"slide"`` (path), ``"location"`` (level-0 ``(x, y)`` int64
tensor) and ``"level"``; their ``"label"`` is the slide's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import CacheDataset, Dataset, MetaTensor
from monai.transforms import Compose, MapTransform, Resized, ResizeWithPadOrCropd, Transform
from monai.utils import ensure_tuple, ensure_tuple_rep

from custom.data.annotations import Annotation, rasterize_annotations, read_asap_xml
from custom.data.grid import grid_for
from custom.data.images import check_mask_size, read_mask, read_rgb
from custom.data.slide import BACKENDS, Slide, open_slide, select_level

__all__ = [
    "LoadPatchd",
    "patch_transforms",
    "PatchFolderDataset",
    "LoadTiled",
    "slide_tile_datalist",
    "SlideTileDataset",
    "SlideBagDataset",
    "readable_slides",
]

RESIZE_MODES = ("resize", "center_crop", "none")

logger = logging.getLogger(__name__)


class LoadPatchd(MapTransform):
    """Load an H&E patch and its mask through the validating readers of ``custom.data.images``.

    The image becomes a (3, rows, cols) float32 MetaTensor in [0, 1] (its path kept as ``filename_or_obj``), the
    mask a (1, rows, cols) float32 tensor of 0/1, all-zero when the item's mask is None (negatives, and positives
    without a gt file, which get ``has_mask`` False so evaluation can skip them), and the label a float scalar
    tensor, the form BCE-style losses take.
    """

    def __init__(self, keys: KeysCollection = "image", mask_key: str = "mask", label_key: str = "label") -> None:
        super().__init__(keys)
        self.mask_key = mask_key
        self.label_key = label_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image_path = d[key]
            image = read_rgb(image_path)
            mask_path = d.get(self.mask_key)
            if mask_path is None:
                mask = np.zeros(image.shape[:2], np.uint8)
            else:
                mask = read_mask(mask_path)
                check_mask_size(mask.shape, mask_path, image.shape, image_path)
            pixels = torch.from_numpy(image).permute(2, 0, 1).float().div_(255.0)
            d[key] = MetaTensor(pixels, meta={"filename_or_obj": str(image_path)})
            d[self.mask_key] = torch.from_numpy(mask).unsqueeze(0).float()
            d["has_mask"] = mask_path is not None or int(d[self.label_key]) == 0
        d[self.label_key] = torch.tensor(float(d[self.label_key]))
        return d


def patch_transforms(
    image_size: Sequence[int] | int | None = None, resize_mode: str = "resize", keys: Sequence[str] = ("image", "mask")
) -> list[Transform]:
    """Loading plus sizing: ``resize`` (image bilinear with anti-aliasing, mask nearest), ``center_crop``
    (crops larger images and zero-pads smaller ones) or ``none``; ``image_size`` is (rows, cols) or one int."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; expected one of {RESIZE_MODES}")
    image_key, mask_key = keys
    transforms: list[Transform] = [LoadPatchd(image_key, mask_key=mask_key)]
    if resize_mode == "none" or image_size is None:
        return transforms
    size = ensure_tuple_rep(image_size, 2)
    if resize_mode == "resize":
        transforms.append(
            Resized(keys, spatial_size=size, mode=("bilinear", "nearest"), anti_aliasing=(True, False))
        )
    else:
        transforms.append(ResizeWithPadOrCropd(keys, spatial_size=size))
    return transforms


class PatchFolderDataset(CacheDataset):
    """Items of ``patch_folder_datalist`` (or a split of them) loaded, validated and sized, then ``transform``.

    The deterministic part (loading and sizing) is cached for ``cache_rate`` of the items (0 caches nothing);
    ``transform`` (a callable, a list or a ``Compose``) runs after it on every access, e.g. normalisation and flips.
    ``copy_cache`` False serves the cached items without a deep copy: only when every transform after the cache
    returns new tensors (MONAI's dictionary transforms and ``LoadPseudoLabeld`` do; an in-place one would alter the
    cache for every later epoch).
    """

    def __init__(
        self,
        data: Sequence[dict],
        image_size: Sequence[int] | int | None = None,
        resize_mode: str = "resize",
        transform: Callable | Sequence[Callable] | None = None,
        cache_rate: float = 0.0,
        num_workers: int | None = 1,
        copy_cache: bool = True,
    ) -> None:
        extra = ensure_tuple(transform) if transform is not None else ()
        chain = Compose([*patch_transforms(image_size, resize_mode), *extra]).flatten()
        super().__init__(
            data, transform=chain, cache_rate=cache_rate, num_workers=num_workers, progress=False,
            copy_cache=copy_cache,
        )

    def _fill_cache(self, indices: Sequence[int] | None = None) -> list:
        """MONAI's cache fill, except that a failing item waits for the pool's threads before it propagates.

        MONAI's ``with ThreadPool(...)`` only terminates the pool on an exception, and a thread still decoding the
        next item when the interpreter exits aborts it from inside torch (``terminate called without an active
        exception``, exit 134) right after the clear message about the bad file.
        """
        if self.cache_num <= 0:
            return []
        indices = list(range(self.cache_num)) if indices is None else indices
        pool = ThreadPool(self.num_workers)
        try:
            return list(pool.imap(self._load_cache_item, indices))
        finally:
            pool.terminate()
            pool.join()


class LoadTiled(MapTransform):
    """Read a tile of a slide, and its ground truth from a mask TIFF or an ASAP XML, for one tile item.

    A tile item (see ``slide_tile_datalist``) holds the slide path under ``keys``, ``location`` (level-0 ``(x, y)``),
    ``level``, ``tile_size``, ``label`` and the slide's ``mask`` / ``annotation`` paths (or None). Slides are opened
    on first use in each process and kept open (``Slide`` reopens its handle in a DataLoader worker), so the
    transform pickles without open files.
    The mask is 0/1 from a mask TIFF (any value > 0 is tumour) and 0/1/2 from XML (2 = excluded, see
    ``custom.data.annotations``); it is all-zero for a slide with neither.
    """

    def __init__(self, keys: KeysCollection = "slide", backends: Sequence[str] = BACKENDS) -> None:
        super().__init__(keys)
        self.backends = tuple(backends)
        self._slides: dict[str, Slide] = {}
        self._annotations: dict[str, list[Annotation]] = {}

    def _slide(self, path: str) -> Slide:
        """The opened slide (or mask TIFF) at ``path``, opened once per transform."""
        if path not in self._slides:
            self._slides[path] = open_slide(path, self.backends)
        return self._slides[path]

    def _mask(self, d: dict, image_slide: Slide) -> np.ndarray:
        """The tile's (rows, cols) ground truth, zero (background) where the tile reaches past the slide."""
        (x, y), level, size = d["location"], d["level"], d["tile_size"]
        downsample = image_slide.level_downsamples[level]
        if d.get("annotation"):
            if d["annotation"] not in self._annotations:
                self._annotations[d["annotation"]] = read_asap_xml(d["annotation"])
            return rasterize_annotations(self._annotations[d["annotation"]], (x, y), (size, size), downsample)
        if not d.get("mask"):
            return np.zeros((size, size), np.uint8)
        return _read_mask_region(self._slide(d["mask"]), (x, y), size, downsample)

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            slide = self._slide(d[key])
            x, y = (int(v) for v in d["location"])
            tile = slide.read_region((x, y), (d["tile_size"], d["tile_size"]), d["level"])
            pixels = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float().div_(255.0)
            d["image"] = MetaTensor(pixels, meta={"filename_or_obj": d[key], "location": (x, y)})
            d["has_mask"] = bool(d.get("mask") or d.get("annotation")) or int(d["label"]) == 0
            d["mask"] = torch.from_numpy(self._mask(d, slide)).unsqueeze(0).float()
            d.pop("annotation", None)
            d["location"] = torch.tensor((x, y), dtype=torch.int64)
        d["label"] = torch.tensor(float(d["label"]))
        return d


def _read_mask_region(mask_slide: Slide, location_xy: tuple[int, int], size: int, downsample: float) -> np.ndarray:
    """Read a (size, size) mask region at ``downsample`` from the finest mask level that is not coarser.

    A mask pyramid need not have the slide's levels; a finer level is subsampled by nearest neighbour (the centre
    pixel of each block), so label values never blend.
    """
    usable = [i for i, ds in enumerate(mask_slide.level_downsamples) if ds <= downsample * 1.001]
    level = usable[-1]
    factor = max(1, round(downsample / mask_slide.level_downsamples[level]))
    region = mask_slide.read_region(location_xy, (size * factor, size * factor), level, fill=0)
    region = region[factor // 2 :: factor, factor // 2 :: factor]
    return ((region[..., 0] if region.ndim == 3 else region) > 0).astype(np.uint8)


def readable_slides(slides: Sequence[dict], backends: Sequence[str] = BACKENDS) -> list[dict]:
    """The entries of ``slides`` whose slide and mask open; each one that does not is logged with its error."""
    readable = []
    for entry in slides:
        try:
            for path in (entry["slide"], entry.get("mask")):
                if path:
                    open_slide(path, backends).close()
        except (OSError, RuntimeError, ValueError) as err:
            logger.error("skip_unreadable: leaving out slide %s: %s", entry["slide"], err)
            continue
        readable.append(entry)
    if not readable:
        raise ValueError(f"no readable slide among {len(slides)} (skip_unreadable left every one out)")
    return readable


def slide_tile_datalist(
    slides: Sequence[dict],
    level: int | None = None,
    mpp: float | None = None,
    tile_size: int = 256,
    overlap: int = 0,
    min_tissue: float = 0.25,
    grid_dir: str | None = None,
    backends: Sequence[str] = BACKENDS,
    mpp_tolerance: float = 0.1,
    tissue_kwargs: dict | None = None,
) -> list[dict]:
    """One item per tile over the tissue of each slide of a ``load_slide_datalist`` list.

    The level is chosen per slide by index or mpp (``select_level``); grids are cached as CSV in ``grid_dir`` and
    reused. A mask TIFF must have its slide's level-0 size. Slides are closed again, to be reopened where read.
    """
    tiles = []
    for entry in slides:
        try:
            slide = open_slide(entry["slide"], backends)
        except (OSError, RuntimeError, ValueError) as err:
            raise ValueError(f"{err}\n(set skip_unreadable to train without this slide)") from None
        if entry.get("mask"):
            with open_slide(entry["mask"], backends) as mask:
                if tuple(mask.level_dimensions[0]) != tuple(slide.level_dimensions[0]):
                    raise ValueError(
                        f"mask {entry['mask']} has level-0 size (width, height) {mask.level_dimensions[0]} but its "
                        f"slide {entry['slide']} has {slide.level_dimensions[0]}"
                    )
        chosen = select_level(slide, level=level, mpp=mpp, tolerance=mpp_tolerance)
        grid = grid_for(slide, chosen, tile_size, overlap, min_tissue, cache_dir=grid_dir, **(tissue_kwargs or {}))
        slide.close()
        stem = Path(entry["slide"]).stem
        for x, y in zip(grid.x.tolist(), grid.y.tolist()):
            tiles.append(
                {
                    "slide": entry["slide"],
                    "label": entry["label"],
                    "mask": entry.get("mask"),
                    "annotation": entry.get("annotation"),
                    "strong": bool(entry.get("strong", False)),
                    "location": (x, y),
                    "level": chosen,
                    "tile_size": tile_size,
                    "name": f"{stem}_{x}_{y}",
                }
            )
    return tiles


class SlideTileDataset(Dataset):
    """Tiles over the tissue of whole slides, each labelled with its slide's label, read lazily per worker.

    ``data`` is a slide list (``load_slide_datalist``); ``tiling`` are the keyword arguments of
    ``slide_tile_datalist`` (``level``/``mpp``, ``tile_size``, ``overlap``, ``min_tissue``, ``grid_dir``,
    ``mpp_tolerance``, ``tissue_kwargs``). ``transform`` runs after ``LoadTiled``. ``self.data`` holds the tile
    items, in slide order, ``self.slide_entries`` the slides they come from. A slide (or its mask) that cannot be
    opened stops the construction, before any training, with the slide named; with ``skip_unreadable`` it is left
    out and named in the log instead.
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable | Sequence[Callable] | None = None,
        backends: Sequence[str] = BACKENDS,
        skip_unreadable: bool = False,
        **tiling: Any,
    ) -> None:
        if skip_unreadable:
            data = readable_slides(data, backends)
        tiles = slide_tile_datalist(data, backends=backends, **tiling)
        extra = ensure_tuple(transform) if transform is not None else ()
        super().__init__(tiles, transform=Compose([LoadTiled("slide", backends), *extra]).flatten())
        self.slide_entries = list(data)
        self.tiling = dict(tiling)

    def bags(self) -> dict[str, list[int]]:
        """Tile indices grouped by slide path: the bags of multiple-instance learning with slide labels."""
        groups: dict[str, list[int]] = {}
        for index, tile in enumerate(self.data):
            groups.setdefault(tile["slide"], []).append(index)
        return groups


class SlideBagDataset(torch.utils.data.Dataset):
    """The bags of multiple-instance learning with slide labels: one item per slide (``bags_per_slide`` per epoch),
    ``tiles_per_bag`` of its tissue tiles drawn at random (torch's RNG, so DataLoader seeding applies) and stacked
    to ``image`` (k, 3, H, W) (``mask`` (k, 1, H, W) and ``location`` (k, 2) level-0 ``(x, y)`` for evaluation only),
    with the slide's ``label``.

    A slide with fewer tissue tiles than ``tiles_per_bag`` draws with replacement (logged once, naming the slides).
    A positive slide without any tissue tile is refused (its label says tumour is there, but there is nothing to
    learn it from: lower ``min_tissue``, or check the slide); a negative one is left out with a warning.
    """

    def __init__(self, tiles: SlideTileDataset, tiles_per_bag: int = 16, bags_per_slide: int = 1) -> None:
        if tiles_per_bag < 1 or bags_per_slide < 1:
            raise ValueError(f"tiles_per_bag and bags_per_slide must be >= 1, got {tiles_per_bag}, {bags_per_slide}.")
        self.tiles = tiles
        self.tiles_per_bag = tiles_per_bag
        self.bags_per_slide = bags_per_slide
        groups = tiles.bags()
        labels = {entry["slide"]: int(entry["label"]) for entry in tiles.slide_entries}
        empty = [slide for slide in labels if slide not in groups]
        if any(labels[slide] == 1 for slide in empty):
            raise ValueError(
                "positive slide(s) without a tissue tile: "
                + ", ".join(slide for slide in empty if labels[slide] == 1)
                + f"; a slide-labelled bag needs tiles (lower min_tissue, now {tiles.tiling.get('min_tissue')}, or "
                "check the slide's tissue)"
            )
        if empty:
            logger.warning("negative slide(s) without a tissue tile left out of the bags: %s", ", ".join(empty))
        self.slides = list(groups.items())
        small = [f"{Path(s).name} ({len(indices)})" for s, indices in self.slides if len(indices) < tiles_per_bag]
        if small:
            logger.info(
                "%d of %d slides have fewer tissue tiles than tiles_per_bag=%d and draw with replacement: %s",
                len(small), len(self.slides), tiles_per_bag, ", ".join(small),
            )

    def __len__(self) -> int:
        return len(self.slides) * self.bags_per_slide

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):  # also ends plain iteration over the dataset
            raise IndexError(f"bag index {index} out of range for {len(self)} bags")
        slide, indices = self.slides[index % len(self.slides)]
        if len(indices) >= self.tiles_per_bag:
            picks = torch.randperm(len(indices))[: self.tiles_per_bag]
        else:
            picks = torch.randint(len(indices), (self.tiles_per_bag,))
        items = [self.tiles[indices[i]] for i in picks.tolist()]
        keys = ("image", "mask", "location")
        bag = {key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in keys}
        return {**bag, "label": items[0]["label"], "slide": slide, "name": Path(slide).stem}
