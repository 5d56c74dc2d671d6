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
bundle's inference (``custom.checkpoints``); a region is inferred at the level the client asks for. The weights file
is watched: when ``/train`` replaced it, the next request is answered by the new weights (``TumourSegmentation.
served``), and the entropy strategy infers whole images through ``predict_whole``.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
from custom.data.tissue import TissueMask, detect_tissue
from custom.inference import PlainImage
from custom.inference.stitch import read_raster_rows
from custom.inference.streaming import threshold_cut
from custom.inference.wsi import SlidePrediction

__all__ = [
    "LABELS", "LABEL_COLORS", "SCRATCH_PREFIX", "ServedModel", "TumourSegmentation", "file_stamp",
    "process_alive", "read_request_region", "remove_stale_scratch",
]

logger = logging.getLogger(__name__)

SCRATCH_PREFIX = "wsl-monailabel-"
"""Prefix of a request's scratch folder in the temporary folder, followed by the server's process id."""
LABELS = {"tumour": 1}
"""Label values of the 2D mask; whole-slide answers also carry ``exclusion`` contours (holes of a tumour)."""
LABEL_COLORS = {"tumour": [255, 0, 0], "exclusion": [0, 255, 0]}
"""Display colours (RGB), the colours of ``custom.writers.asap_xml.ASAP_GROUPS``."""


def process_alive(pid: int) -> bool:
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
        if path.is_dir() and pid.isdigit() and not process_alive(int(pid)):
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


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int]:
    """What tells one version of a file from the next: modification time, size and inode (``os.replace`` puts a new
    inode in place, so a replacement within one timestamp tick is seen too)."""
    stat = os.stat(path)
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


@dataclass(frozen=True)
class ServedModel:
    """One version of the served checkpoint and everything the bundle's inference config builds from it (its record
    sets the network, the mpp and the threshold); a request uses one version from start to end."""

    network: torch.nn.Module
    preprocessing: Any
    inferer: Any
    threshold: float
    min_area_um2: float
    mpp_override: float | None
    stamp: tuple[int, int, int]


class TumourSegmentation(InferTask):
    """Serves ``network_def`` with the bundle's preprocessing, sliding window, threshold and outlines.

    The weights file is watched: when a training replaces it (``lib.tumour_train`` does so atomically), the next
    request rebuilds the model from it; a file that cannot be loaded leaves the previous version served.

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
        self.bundle_root, self.config_files = Path(bundle_root), tuple(config_files)
        parser = self._parser(ckpt_path)
        self.ckpt_path = os.fspath(parser.get_parsed_content("ckpt_path"))
        self.device = torch.device(parser.get_parsed_content("device"))
        self._lock, self._refused_stamp = threading.Lock(), None
        self._served = self._build(parser)
        meta = parser.get("_meta_", {})
        # MONAI Label pastes the description into its ASAP XML unescaped: "H&E" would make the answer unreadable.
        description = f"{meta.get('name', 'tumour segmentation')} {meta.get('version', '')}".strip()
        description = description.replace("&", " and ").translate({ord(c): None for c in "<>\"'"})
        config = {"threshold": self.threshold, "min_area_um2": self.min_area_um2}
        super().__init__(InferType.SEGMENTATION, dict(LABELS), 2, description, config)

    def _parser(self, ckpt_path: str | os.PathLike | None) -> ConfigParser:
        """A fresh parse of the inference config for ``ckpt_path`` (parsed content is cached per parser)."""
        parser = parse_bundle(self.bundle_root, self.config_files)
        if ckpt_path:  # the config's network, mpp and threshold then follow this checkpoint's record
            parser["ckpt_path"] = os.fspath(ckpt_path)
        return parser

    def _build(self, parser: ConfigParser) -> ServedModel:
        """The model of the checkpoint now at ``ckpt_path`` (stamped before loading: a file replaced while it loads
        is loaded again by the next request)."""
        stamp = file_stamp(self.ckpt_path)
        network = parser.get_parsed_content("network")  # the network the checkpoint records
        network = load_weights(network, self.ckpt_path, config_key="ckpt_path", rebuild=True).eval()
        # the runner's threshold: the config's, else the checkpoint's, else 0.5
        return ServedModel(
            network, parser.get_parsed_content("preprocessing"), parser.get_parsed_content("inferer"),
            float(parser.get_parsed_content("evaluator#threshold")), float(parser.get_parsed_content("min_area_um2")),
            parser.get_parsed_content("mpp_override"), stamp,
        )

    def served(self) -> ServedModel:
        """The model of the weights file as it is now, reloaded once when a training replaced the file."""
        try:
            stamp = file_stamp(self.ckpt_path)
        except OSError as err:  # replaced by hand and missing for a moment: keep what is loaded
            logger.error("%s cannot be read (%s); serving the weights loaded before", self.ckpt_path, err)
            return self._served
        if stamp in (self._served.stamp, self._refused_stamp):
            return self._served
        with self._lock:
            if file_stamp(self.ckpt_path) not in (self._served.stamp, self._refused_stamp):
                self._reload()
        return self._served

    def _reload(self) -> None:
        """Swap in the model of the new weights file, or keep the previous one when it cannot be loaded."""
        try:
            self._served = self._build(self._parser(self.ckpt_path))
        except (ValueError, OSError, RuntimeError) as err:
            self._refused_stamp = file_stamp(self.ckpt_path)
            logger.error("%s changed but cannot be loaded, the previous weights stay served: %s", self.ckpt_path, err)
            return
        logger.info("%s changed: serving its new weights", self.ckpt_path)

    @property
    def network(self) -> torch.nn.Module:
        """The network now served."""
        return self.served().network

    @property
    def inferer(self) -> Any:
        """The sliding-window inferer now served (its mpp follows the checkpoint's record)."""
        return self.served().inferer

    @property
    def threshold(self) -> float:
        """The tumour threshold now served."""
        return self.served().threshold

    @property
    def min_area_um2(self) -> float:
        """The smallest outline kept, in square microns."""
        return self.served().min_area_um2

    @property
    def mpp_override(self) -> float | None:
        """The configured level-0 microns per pixel for files without (or with wrong) metadata."""
        return self.served().mpp_override

    def info(self) -> dict[str, Any]:
        """MONAI Label's model info; ``pathology`` makes QuPath's extension list the model for slides."""
        return super().info() | {"pathology": True, "device": str(self.device)}

    def is_valid(self) -> bool:
        """Weights were loaded at start-up (a missing or mismatched file stops the server with the reason)."""
        return True

    def get_path(self, validate: bool = True) -> str:
        """The weights file, so ``GET /model/{name}`` can hand it out."""
        return self.ckpt_path

    def probabilities(self, image: PlainImage, served: ServedModel | None = None) -> np.ndarray:
        """The bundle's sliding-window probability map of ``image`` as uint8 (probability x 255), ``(rows, cols)``."""
        served = served or self.served()
        with tempfile.TemporaryDirectory(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-") as scratch:
            prediction = served.inferer(image, served.network, Path(scratch) / "prob.raw", served.preprocessing,
                                        plain_image=True)
            return read_raster_rows(prediction.raster, prediction.shape_hw, 0, prediction.shape_hw[0])

    def predict_whole(self, path: str, raster: Path, served: ServedModel) -> tuple[SlidePrediction, TissueMask]:
        """The probability raster (written to ``raster``) of a whole studies image and its tissue mask: a slide is
        inferred as the bundle's inference does (its tissue only, at the trained resolution); a plain image at its
        pixels, its tissue found by the same saturation rule at full resolution with no size filter (such an image
        is a crop: its pieces are parts of larger ones)."""
        if Path(path).suffix.lower() not in PLAIN_SUFFIXES:
            with open_slide(path) as slide:
                prediction = served.inferer(slide, served.network, raster, served.preprocessing)
            return prediction, prediction.tissue
        image = PlainImage.read(path)
        prediction = served.inferer(image, served.network, raster, served.preprocessing, plain_image=True)
        mpp = mpp_or_assumed(level0_mpp(image, served.mpp_override))  # sets no area here: silences the mpp warning
        tissue = detect_tissue(image, level=0, min_area_um2=0.0, max_hole_um2=0.0, mpp_override=mpp)
        return prediction, tissue

    def mask(self, probabilities: np.ndarray, served: ServedModel | None = None) -> np.ndarray:
        """Tumour where the stored probability is at least ``round(255 x threshold)``, as the bundle's outputs."""
        return probabilities >= threshold_cut((served or self.served()).threshold)

    def __call__(self, request: dict) -> tuple[str | None, dict]:
        """A region answers contours (no file); a whole plain image answers a PNG mask file."""
        served = self.served()
        if "location" in request or "size" in request:
            return None, self.infer_region(request, served)
        return self.infer_image(request["image"], served)

    def infer_image(self, path: str, served: ServedModel | None = None) -> tuple[str, dict]:
        """Mask of a whole plain image, written to a temporary PNG that MONAI Label sends and then removes."""
        served = served or self.served()
        start = time.perf_counter()
        image = PlainImage.read(path)
        read = time.perf_counter()
        mask = self.mask(self.probabilities(image, served), served).astype(np.uint8)
        inferred = time.perf_counter()
        out = tempfile.NamedTemporaryFile(suffix=".png", delete=False).name
        imsave(out, mask, check_contrast=False)
        done = time.perf_counter()
        latencies = _latencies(start, read, inferred, done)
        return out, {"label_names": dict(LABELS), "tumour_fraction": float(mask.mean()), "latencies": latencies}

    def infer_region(self, request: dict, served: ServedModel | None = None) -> dict:
        """Contours of one region (checked by the app before it gets here) in level-0 ``(x, y)``."""
        served = served or self.served()
        start = time.perf_counter()
        level, location_xy, size_wh = int(request.get("level", 0)), request["location"], request["size"]
        image, downsample, mpp = read_request_region(request["image"], location_xy, size_wh, level,
                                                     served.mpp_override)
        read = time.perf_counter()
        mask = self.mask(self.probabilities(image, served), served)
        inferred = time.perf_counter()
        min_area_px = max(float(request.get("min_poly_area") or 0), served.min_area_um2 / mpp**2)
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
