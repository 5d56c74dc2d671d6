# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""MONAI Label app serving the bundle's tumour segmentation to QuPath and Digital Slide Archive.

Start it (see ``bundle/docs/monailabel.md``)::

    monailabel start_server --app scripts/monailabel_app --studies SLIDES_DIR --conf models tumour

``--conf`` keys (all optional but ``models``):

* ``models``: the name clients see (one model: this bundle's network).
* ``bundle``: the bundle folder; default ``bundle/`` of the checkout that ``custom`` is installed from.
* ``configs``: comma-separated config files of ``bundle/configs`` merged in order; default ``inference.json``,
  which serves the network the checkpoint records (``inference.json,cpu_inference.json`` serves a quarter-width
  checkpoint that records none, saved before bundle 0.5.0).
* ``ckpt_path``: the weights; default the config's ``ckpt_path`` (``bundle/models/model.pt``).
* ``max_region_px``: the largest region a request may ask for, in pixels at its level.
* ``train_configs``: comma-separated config files of ``bundle/configs`` that ``/train`` merges in order; default
  ``train.json,cpu_train.json``.
* ``dataset_dir``: the weak-label data ``/train`` trains on beside the corrections (``train.json``'s ``dataset_dir``);
  default the config's (the bundle's sample data).

``POST /train/tumour`` fine-tunes the served model from the corrections saved with ``PUT /datastore/label`` and the
weak-label data, in MONAI Label's background training process, then replaces the served weights (``lib.tumour_train``;
the inference task serves them from its next request). ``POST /activelearning/entropy`` proposes the unlabelled image
the served model is least sure of (``lib.entropy``).

Every request is checked first: its fields and ids before MONAI Label's route runs (``lib.guard``), every datastore
operation again by the datastore (``lib.datastore``: ids and tags are plain names, so nothing outside the studies
folder is written, read or deleted), and an inference request by the app (``lib.request_checks``): only images the
datastore lists are read, by id, and a region must lie on the slide and stay within the pixel and tile budget.
Otherwise the client gets a 4xx with the reason.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from fastapi import HTTPException
from lib import (
    DEFAULT_TRAIN_CONFIGS,
    MAX_REGION_PIXELS,
    EntropyStrategy,
    Region,
    StudiesDatastore,
    TumourSegmentation,
    TumourTraining,
    check_region,
    install_guard,
    studies_image,
)
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

import custom
from custom.data.slide import PLAIN_SUFFIXES, SlideReadError, open_slide
from custom.inference import PlainImage

logger = logging.getLogger(__name__)

DEFAULT_BUNDLE = Path(custom.__file__).resolve().parents[1] / "bundle"


class TumourSegmentationApp(MONAILabelApp):
    """One bundle model, served for whole-slide regions (``/infer/wsi_v2``) and plain images (``/infer``), trained
    from the pathologist's corrections (``/train``), with an entropy strategy (``/activelearning/entropy``)."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        self.model_name = conf.get("models", "tumour")
        self.max_region_px = int(conf.get("max_region_px", MAX_REGION_PIXELS))
        self.bundle = Path(conf.get("bundle", DEFAULT_BUNDLE))
        super().__init__(app_dir, studies, conf, name="wsl-histo-seg",
                         description="Weakly supervised tumour segmentation of H&E slides (MONAI bundle)")
        tasks = {"model": self._infers, "strategy": self._strategies}
        if not install_guard(tasks, trainers=self._trainers, train_check=self._check_train):
            logger.info("no MONAI Label server in this process: requests are checked by the app and datastore only")

    def init_datastore(self) -> Datastore:
        """MONAI Label's local datastore confined to the studies folder (a remote one, e.g. DSA, as MONAI Label's)."""
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return StudiesDatastore(self.studies, extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
                                auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                                read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self) -> dict[str, InferTask]:
        """The bundle's model under the configured name."""
        configs = _names(self.conf.get("configs", "inference.json"))
        task = TumourSegmentation(self.bundle, configs, self.conf.get("ckpt_path"))
        logger.info("serving %s from %s (%s) on %s", self.model_name, self.bundle, ", ".join(configs), task.device)
        return {self.model_name: task}

    def init_trainers(self) -> dict[str, TrainTask]:
        """Fine-tuning of the served model from the corrections, with the bundle's training config."""
        configs = _names(self.conf.get("train_configs", ",".join(DEFAULT_TRAIN_CONFIGS)))
        trainer = TumourTraining(self._infers[self.model_name], self.bundle, configs, Path(self.app_dir) / "train",
                                 self.conf.get("dataset_dir"), self.max_region_px)
        return {self.model_name: trainer}

    def init_strategies(self) -> dict[str, Strategy]:
        """MONAI Label's ``random``, and ``entropy``: where the served model is least sure."""
        return super().init_strategies() | {"entropy": EntropyStrategy(self._infers[self.model_name],
                                                                       self.max_region_px)}

    def _check_train(self, model: str, params: dict) -> None:
        """Refuse (409) a training with no correction to learn from, before MONAI Label starts its process."""
        self._trainers[model].check_ready(self.datastore())

    def info(self) -> dict:
        """MONAI Label's app info, marked as a pathology app for QuPath's extension."""
        return super().info() | {"pathology": True}

    def infer(self, request: dict, datastore=None) -> dict:
        """2D inference of a studies image; a region (one tile of ``infer_wsi``, or a client's) is checked as one."""
        self._check_model(request)
        request = dict(request, image=studies_image(datastore or self.datastore(), request.get("image")))
        if "location" in request or "size" in request:
            self._check_region({k: v for k, v in request.items() if k != "tile_size"})
        elif Path(request["image"]).suffix.lower() not in PLAIN_SUFFIXES:
            raise HTTPException(400, f"{Path(request['image']).name} is a slide: ask /infer/wsi_v2 for a region")
        return super().infer(request, datastore)

    def infer_wsi(self, request: dict, datastore=None) -> dict:
        """Region inference of a studies slide, split into the checked tiles (MONAI Label runs one task per tile)."""
        self._check_model(request)
        request = dict(request, image=studies_image(datastore or self.datastore(), request.get("image")))
        region = self._check_region(request)
        # One network on one device (the bundle's): MONAI Label's default of spreading tiles over every GPU would
        # divide by zero on a CPU host.
        device = str(self._infers[self.model_name].device)
        request.update(level=region.level, location=list(region.location_xy), size=list(region.size_wh),
                       wsi_tiles=region.tiles, multi_gpu=False, device=device)
        return super().infer_wsi(request, datastore)

    def _check_model(self, request: dict) -> None:
        """A 404 for a model this app does not serve (a ``params`` field can rename it; MONAI Label answers a 500)."""
        if request.get("model") not in self._infers:
            raise HTTPException(404, f"no model {request.get('model')!r}; this server serves {sorted(self._infers)}")

    def _check_region(self, request: dict) -> Region:
        """The checked region of ``request`` on its image (a 400 if the file cannot be read as a slide)."""
        path = request["image"]
        try:
            dimensions, downsamples = _geometry(path, Path(path).stat().st_mtime_ns)
        except (SlideReadError, ValueError, OSError) as err:
            raise HTTPException(400, f"{Path(path).name} cannot be read: {err}") from err
        return check_region(request, list(dimensions), list(downsamples), self.max_region_px)


def _names(text: str) -> list[str]:
    """Comma-separated config file names as a list."""
    return [name.strip() for name in text.split(",") if name.strip()]


@functools.lru_cache(maxsize=64)
def _geometry(path: str, mtime_ns: int) -> tuple[tuple, tuple]:
    """Level sizes (w, h) and downsamples of an image, read and validated once per version of the file: MONAI Label
    checks the region again for every tile it infers."""
    if Path(path).suffix.lower() in PLAIN_SUFFIXES:
        image = PlainImage.read(path)
        return tuple(image.level_dimensions), tuple(image.level_downsamples)
    with open_slide(path) as slide:
        return tuple(slide.level_dimensions), tuple(slide.level_downsamples)
