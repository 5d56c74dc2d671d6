# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The bundle's tumour segmentation as a MONAI Label inference task, built from ``bundle/configs/inference.json``.

Nothing is re-implemented here: the network (``network_def`` + ``ckpt_path``), the normalisation
(``preprocessing``), the sliding window with Gaussian blending (``inferer``, ``custom.inference.WholeSlideInferer``),
the ``threshold`` and the outlines (``custom.data.polygons``) are the ones the bundle's own inference runs.
MONAI Label's ``BundleInferTask`` is not used: it imports torchvision (``monailabel.transform.post``), which has no
CPU build beside this project's torch, and it would rebuild the pipeline from MONAI transforms instead.

Two kinds of request reach ``__call__``:

* a region (``location`` LEVEL-0 ``(x, y)``, ``size`` ``(width, height)`` AT ``level``), from
  ``POST /infer/wsi_v2/{model}`` (one per tile of the requested region): read with ``custom.data.slide`` (cuCIM
  first), answered with contours in level-0 ``(x, y)``: label ``tumour`` for outlines and ``exclusion`` for their
  holes (Camelyon16's ``_2`` meaning), which MONAI Label turns into DSA JSON or ASAP XML;
* a whole plain image (PNG, JPEG), from ``POST /infer/{model}``: answered with a PNG mask, 1 = tumour, 0 = not.

The network, and the threshold where the config leaves it unset, come from the checkpoint's record, as in the
bundle's inference (``custom.checkpoints``); a region is inferred at the level the client asks for.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from scipy import ndimage
from shapely.geometry import Polygon
from skimage.io import imsave

from custom.checkpoints import load_weights
from custom.data.morphology import drop_small_pieces, fill_small_holes
from custom.data.polygons import mask_polygons, outlines_and_holes
from custom.data.slide import PLAIN_SUFFIXES, level0_mpp, mpp_or_assumed, open_slide
from custom.inference import PlainImage
from custom.inference.stitch import read_raster_rows
from custom.inference.streaming import threshold_cut

__all__ = [
    "LABELS", "LABEL_COLORS", "SCRATCH_PREFIX", "TumourSegmentation", "read_request_region", "remove_stale_scratch"
]

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = "wsl-monailabel-"
"""Prefix of a request's scratch folder in the temporary folder, followed by the server's process id."""
LABELS = {"tumour": 1}
"""Label values of the 2D mask; whole-slide answers also carry ``exclusion`` contours (holes of a tumour)."""
LABEL_COLORS = {"tumour": [255, 0, 0], "exclusion": [0, 255, 0]}
"""Display colours (RGB), the colours of ``custom.writers.asap_xml.ASAP_GROUPS``."""


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_scratch(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove the scratch folders that servers killed in the middle of a request left (their process is gone); those
    of running servers stay. ``root`` is the temporary folder by default."""
    stale = []
    for path in Path(root or tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*-*"):
        pid = path.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            stale.append(path)
    if stale:
        logger.warning("removed the scratch of stopped servers: %s", ", ".join(map(str, stale)))
    return stale


def parse_bundle(bundle_root: Path, config_files: Sequence[str]) -> ConfigParser:
    """The bundle's inference config (later files override earlier ones, as ``monai.bundle run`` merges them)."""
    configs = bundle_root / "configs"
    parser = ConfigParser()
    parser.read_config([os.fspath(configs / name) for name in config_files])
    parser.read_meta(os.fspath(configs / "metadata.json"))
    parser["bundle_root"] = os.fspath(bundle_root)
    # Requests already run in MONAI Label's threads: no DataLoader processes forked from them, no progress bars.
    parser["inferer"]["num_workers"] = 0
    parser["inferer"]["progress"] = False
    return parser


class TumourSegmentation(InferTask):
    """Serves ``network_def`` with the bundle's preprocessing, sliding window, threshold and outlines.

    Args:
        bundle_root: the bundle folder (holds ``configs/``; ``ckpt_path`` defaults to ``models/model.pt`` there).
        config_files: config files of ``configs/`` merged in order (``inference.json`` serves any checkpoint that
            records its network; ``cpu_inference.json`` after it for a quarter-width one without that record).
        ckpt_path: a checkpoint of the bundle; None takes the config's ``ckpt_path``.
    """

    def __init__(
        self, bundle_root: str | os.PathLike, config_files: Sequence[str] = ("inference.json",),
        ckpt_path: str | os.PathLike | None = None,
    ) -> None:
        remove_stale_scratch()
        parser = parse_bundle(Path(bundle_root), config_files)
        if ckpt_path:  # the config's network, mpp and threshold then follow this checkpoint's record
            parser["ckpt_path"] = os.fspath(ckpt_path)
        self.ckpt_path = os.fspath(parser.get_parsed_content("ckpt_path"))
        self.device = torch.device(parser.get_parsed_content("device"))
        network = parser.get_parsed_content("network")  # the network the checkpoint records
        self.network = load_weights(network, self.ckpt_path, config_key="ckpt_path", rebuild=True).eval()
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        # the runner's threshold: the config's, else the checkpoint's, else 0.5
        self.threshold = float(parser.get_parsed_content("evaluator#threshold"))
        self.min_area_um2 = float(parser.get_parsed_content("min_area_um2"))
        self.mpp_override = parser.get_parsed_content("mpp_override")
        meta = parser.get("_meta_", {})
        # MONAI Label pastes the description into its ASAP XML unescaped: "H&E" would make the answer unreadable.
        description = f"{meta.get('name', 'tumour segmentation')} {meta.get('version', '')}".strip()
        description = description.replace("&", " and ").translate({ord(c): None for c in "<>\"'"})
        config = {"threshold": self.threshold, "min_area_um2": self.min_area_um2}
        super().__init__(InferType.SEGMENTATION, dict(LABELS), 2, description, config)

    def info(self) -> dict[str, Any]:
        """MONAI Label's model info; ``pathology`` makes QuPath's extension list the model for slides."""
        return super().info() | {"pathology": True, "device": str(self.device)}

    def is_valid(self) -> bool:
        """Weights were loaded at start-up (a missing or mismatched file stops the server with the reason)."""
        return True

    def get_path(self, validate: bool = True) -> str:
        """The weights file, so ``GET /model/{name}`` can hand it out."""
        return self.ckpt_path

    def probabilities(self, image: PlainImage) -> np.ndarray:
        """The bundle's sliding-window probability map of ``image`` as uint8 (probability x 255), ``(rows, cols)``."""
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
            prediction = self.inferer(image, self.network, Path(scratch) / "prob.raw", self.preprocessing,
                                      plain_image=True)
            return read_raster_rows(prediction.raster, prediction.shape_hw, 0, prediction.shape_hw[0])

    def mask(self, probabilities: np.ndarray) -> np.ndarray:
        """Tumour where the stored probability is at least ``round(255 x threshold)``, as the bundle's outputs."""
        return probabilities >= threshold_cut(self.threshold)

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        """A region answers contours (no file); a whole plain image answers a PNG mask file."""
        if "location" in request or "size" in request:
            return None, self.infer_region(request)
        return self.infer_image(request["image"])

    def infer_image(self, path: str) -> tuple[str, dict]:
        """Mask of a whole plain image, written to a temporary PNG that MONAI Label sends and then removes."""
        start = time.perf_counter()
        image = PlainImage.read(path)
        read = time.perf_counter()
        mask = self.mask(self.probabilities(image)).astype(np.uint8)
        inferred = time.perf_counter()
        out = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
        imsave(out, mask, check_contrast=False)
        done = time.perf_counter()
        latencies = _latencies(start, read, inferred, done)
        return out, {"label_names": dict(LABELS), "tumour_fraction": float(mask.mean()), "latencies": latencies}

    def infer_region(self, request: dict) -> dict:
        """Contours of one region (checked by the app before it gets here) in level-0 ``(x, y)``."""
        start = time.perf_counter()
        level, location_xy, size_wh = int(request.get("level", 0)), request["location"], request["size"]
        image, downsample, mpp = read_request_region(request["image"], location_xy, size_wh, level, self.mpp_override)
        read = time.perf_counter()
        mask = self.mask(self.probabilities(image))
        inferred = time.perf_counter()
        min_area_px = max(float(request.get("min_poly_area") or 0), self.min_area_um2 / mpp**2)
        polygons = mask_polygons(_clean_tile(mask, min_area_px / downsample**2), downsample)
        elements = _elements(polygons, location_xy)
        done = time.perf_counter()
        annotation = {"location": list(location_xy), "size": list(size_wh), "elements": elements,
                      "labels": {e["label"]: LABEL_COLORS[e["label"]] for e in elements}}
        return {"annotation": annotation, "latencies": _latencies(start, read, inferred, done)}


def _clean_tile(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Pieces and holes under ``min_pixels`` removed, except those touching the tile's edge: they are parts of a region
    that the tiling cut (a last tile of 44 pixels would otherwise lose its whole share of a tumour)."""
    labels, _ = ndimage.label(mask)
    cut = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    kept = drop_small_pieces(mask, min_pixels) | np.isin(labels, cut[cut > 0])
    return fill_small_holes(kept, min_pixels, fill_border=False)


def read_request_region(path: str, location_xy: Sequence[int], size_wh: Sequence[int], level: int,
                 mpp_override: float | None = None) -> tuple:
    """Pixels of the region as a one-level image, its downsample to level 0 and the level-0 microns per pixel (the
    config's ``mpp_override`` when set, as the bundle's inference takes it)."""
    location, size = (int(location_xy[0]), int(location_xy[1])), (int(size_wh[0]), int(size_wh[1]))
    if Path(path).suffix.lower() in PLAIN_SUFFIXES:
        image = PlainImage.read(path)
        mpp = mpp_or_assumed(level0_mpp(image, mpp_override))
        return PlainImage(path, image.read_region(location, size, level)), 1.0, mpp
    with open_slide(path) as slide:
        pixels = slide.read_region(location, size, level)
        mpp = mpp_or_assumed(level0_mpp(slide, mpp_override))
        return PlainImage(path, pixels), float(slide.level_downsamples[level]), mpp


def _elements(polygons: list[Polygon], location_xy: Sequence[int]) -> list[dict]:
    """MONAI Label annotation elements: outlines as ``tumour``, their holes as ``exclusion``, shifted to level 0."""
    x0, y0 = float(location_xy[0]), float(location_xy[1])

    def ring(points: np.ndarray) -> list[list[float]]:
        return [[round(x + x0, 1), round(y + y0, 1)] for x, y in points.tolist()]

    outlines, holes = (list(map(ring, rings)) for rings in outlines_and_holes(polygons))
    return [{"label": label, "contours": contours}
            for label, contours in (("tumour", outlines), ("exclusion", holes)) if contours]


def _latencies(start: float, read: float, inferred: float, done: float) -> dict[str, float]:
    """The stage times MONAI Label sums over tiles: ``pre`` (read), ``infer``, ``post`` (mask, outlines)."""
    return {"pre": round(read - start, 4), "infer": round(inferred - read, 4), "post": round(done - inferred, 4),
            "total": round(done - start, 4)}
