# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Inference over a list of slides and images: checkpoint loading, resume, per-slide failures, a run summary.

This is the ``evaluator`` of ``bundle/configs/inference.json``: ``run()`` checks that the output folder is writable,
that no two inputs share a name (``x.tif`` and ``x.png`` would write one folder) and that the checkpoint can be read
and fits the network BEFORE any slide is read, skips slides whose summary JSON exists (it is written last), records
a slide that fails (file name and error; its partial outputs are removed) and goes on with the others, and writes
``run_summary.json`` listing what was done, skipped and failed. The hidden scratch a killed run left in a slide's
folder is removed when that slide is inferred again.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from custom.checkpoints import load_weights
from custom.data.datalist import load_slide_datalist
from custom.data.slide import BACKENDS, PLAIN_SUFFIXES, SLIDE_SUFFIXES, open_slide
from custom.inference.heap import heap_reuse
from custom.inference.outputs import (
    SLIDE_OUTPUTS,
    check_outputs,
    summary_path,
    write_image_outputs,
    write_slide_outputs,
)
from custom.inference.plain_image import PlainImage
from custom.inference.streaming import PyramidStreamer
from custom.inference.wsi import WholeSlideInferer

__all__ = ["SlideInferenceError", "inference_items",
           "SlideInferenceRunner", "raise_for_failures"]

logger = logging.getLogger(__name__)


class SlideInferenceError(RuntimeError):
    """Some slides failed; the message lists each with its error (the other slides were completed)."""


def _item(path: Path) -> dict:
    """An inference item for one file: plain images by suffix, everything else is read as a slide."""
    kind = "image" if path.suffix.lower() in PLAIN_SUFFIXES else "slide"
    return {"path": str(path), "name": path.stem, "kind": kind}


def _listed(entry: str | os.PathLike | dict) -> dict:
    """An item for one list entry: a path, a datalist dict (``slide`` key) or an item made here (``path`` key)."""
    if isinstance(entry, dict):
        if "slide" not in entry and "path" not in entry:
            raise ValueError(f"inference list entry {entry} has neither a 'slide' nor a 'path' key")
        return _item(Path(entry.get("slide", entry.get("path")))) | {k: entry[k] for k in ("label",) if k in entry}
    return _item(Path(entry))


def inference_items(source: str | os.PathLike | Sequence) -> list[dict]:
    """Resolve the ``input`` of inference.json into ``{"path", "name", "kind"}`` items.

    ``source`` is a slide list (CSV/JSON read by ``custom.data.load_slide_datalist``), a folder (its slides and
    plain images, sorted), one slide or image file, or a list of paths or of datalist dicts (``slide`` key).
    """
    if isinstance(source, (list, tuple)):
        return _unique_names([_listed(entry) for entry in source])
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES + PLAIN_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"input folder {path} holds no slide {SLIDE_SUFFIXES} or image {PLAIN_SUFFIXES}")
        return _unique_names([_item(p) for p in files])
    if path.suffix.lower() in (".csv", ".json"):
        return _unique_names([_listed(row) for row in load_slide_datalist(path)])
    if not path.is_file():
        raise FileNotFoundError(f"inference input not found: {path} (config key 'input')")
    return [_item(path)]


def _unique_names(items: list[dict]) -> list[dict]:
    """``items``, refused when two share a name (``x.tif`` and ``x.png``): both would write ``<output_dir>/x/``, and
    the second would be skipped as already done."""
    seen: dict[str, str] = {}
    for item in items:
        if item["name"] in seen:
            raise ValueError(f"inputs {seen[item['name']]} and {item['path']} have the same name {item['name']!r}: "
                             f"their outputs would both go to {item['name']}/ (config key 'input'); rename one")
        seen[item["name"]] = item["path"]
    return items


def remove_scratch(folder: Path, name: str) -> list[Path]:
    """Remove the hidden scratch that a killed inference of ``name`` left in its folder (the raw probability raster,
    the pyramid writers' ``.raw`` folders and ``.partial`` TIFFs), which would otherwise stay there for good."""
    stem = glob.escape(f".{name}")
    stale = [*folder.glob(f"{stem}.prob.raw"), *folder.glob(f"{stem}_*.tif.partial"),
             *(p for p in folder.glob(f"{stem}_*.tif.*") if p.is_dir())]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if stale:
        logger.warning("removed the scratch of an interrupted run: %s", ", ".join(str(p) for p in stale))
    return stale


def _check_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written there, before any work is done."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise PermissionError(f"output folder {folder} is not writable (config key 'output_dir'): {err}") from err


class SlideInferenceRunner:
    """Runs a ``WholeSlideInferer`` over every item and writes their outputs (see ``custom.inference.outputs``).

    Args:
        network: the segmenter (``network_def`` moved to the device), or a TorchScript module.
        inferer: the whole-slide engine with the tiling knobs.
        dataset: what ``inference_items`` accepts (a slide list, a folder, a file, a list).
        output_dir: one subfolder per slide is written here.
        ckpt_path: a checkpoint of ``network`` (``custom.checkpoints.load_weights``: the network it records is built
            instead when ``network`` differs); None uses the network as given (e.g. TorchScript).
        preprocessing: applied to each (3, H, W) float tile in [0, 1] (the training normalisation).
        threshold: tumour where the probability is at least this.
        min_area_um2: tumour regions smaller than this are left out of the GeoJSON and XML.
        simplify_px: outline simplification tolerance in output-map pixels.
        top_k: pixels averaged into the slide score (see ``outputs.SCORE_DEFINITION``).
        outputs: which slide files to write, from ``outputs.SLIDE_OUTPUTS`` (all by default); the summary always is.
        backends: slide reader backends, tried in order per file.
        overwrite: re-infer slides that already have a summary.
        raise_on_failure: after all slides, raise ``SlideInferenceError`` if any failed.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        inferer: WholeSlideInferer,
        dataset: str | os.PathLike | Sequence,
        output_dir: str | os.PathLike,
        ckpt_path: str | os.PathLike | None = None,
        preprocessing: Callable | None = None,
        threshold: float = 0.5,
        min_area_um2: float = 2_000.0,
        simplify_px: float = 1.0,
        top_k: int = 1000,
        outputs: Sequence[str] = SLIDE_OUTPUTS,
        backends: Sequence[str] = BACKENDS,
        overwrite: bool = False,
        raise_on_failure: bool = True,
    ) -> None:
        self.network, self.inferer, self.dataset = network, inferer, dataset
        self.output_dir, self.ckpt_path, self.preprocessing = Path(output_dir), ckpt_path, preprocessing
        self.threshold, self.min_area_um2, self.simplify_px, self.top_k = threshold, min_area_um2, simplify_px, top_k
        self.outputs = check_outputs(outputs)
        self.backends, self.overwrite, self.raise_on_failure = tuple(backends), overwrite, raise_on_failure

    def infer_item(self, item: dict) -> dict:
        """Infer one slide or image and write its outputs; the scratch raster is removed afterwards, and what a killed
        run of the same item left is removed first. With the inferer's ``heap_reuse``, freed memory stays in the heap
        for the outputs too (``custom.inference.heap``)."""
        with heap_reuse(getattr(self.inferer, "heap_reuse", False)):
            return self._infer_item(item)

    def _infer_item(self, item: dict) -> dict:
        """:meth:`infer_item` itself."""
        folder = self.output_dir / item["name"]
        folder.mkdir(parents=True, exist_ok=True)
        remove_scratch(folder, item["name"])
        raster = folder / f".{item['name']}.prob.raw"
        try:
            if item["kind"] == "image":
                image = PlainImage.read(item["path"])
                prediction = self.inferer(image, self.network, raster, self.preprocessing, plain_image=True)
                return write_image_outputs(prediction, self.output_dir, item["name"], self.threshold, self.top_k)
            streamer = PyramidStreamer(self.output_dir, item["name"], self.threshold, self.outputs)
            try:
                with open_slide(item["path"], self.backends) as slide:
                    prediction = self.inferer(slide, self.network, raster, self.preprocessing, on_start=streamer.start)
            except BaseException:
                streamer.discard()  # the threads read the raster: stop them before it is removed
                summary_path(self.output_dir, item["name"]).unlink(missing_ok=True)  # redone by the next run
                raise
            return write_slide_outputs(prediction, self.output_dir, item["name"], self.threshold, self.min_area_um2,
                                       self.simplify_px, self.top_k, pyramids=streamer, outputs=self.outputs)
        finally:
            raster.unlink(missing_ok=True)

    def run(self) -> dict:
        """Infer every item not yet done; return (and write as ``run_summary.json``) done/skipped/failed."""
        _check_writable(self.output_dir)
        items = self.assigned(inference_items(self.dataset))
        if self.ckpt_path is not None:  # the network the checkpoint records, when the given one differs
            self.network = load_weights(self.network, self.ckpt_path, config_key="ckpt_path", rebuild=True)
        report: dict[str, list] = {"done": [], "skipped": [], "failed": []}
        for item in items:
            if not self.overwrite and summary_path(self.output_dir, item["name"]).is_file():
                report["skipped"].append(item["path"])
                continue
            try:
                summary = self.infer_item(item)
            except Exception as err:  # one bad slide must not stop the run; it is named in the log and summary
                logger.error("inference failed for %s: %s: %s", item["path"], type(err).__name__, err)
                report["failed"].append({"slide": item["path"], "error": f"{type(err).__name__}: {err}"})
                continue
            report["done"].append(item["path"])
            logger.info("%s: score %.3f, tumour %.3f mm2", item["name"], summary["score"],
                        summary.get("tumour_area_mm2", 0.0))
        return self.conclude(report)

    def assigned(self, items: list[dict]) -> list[dict]:
        """The items this process infers: all of them (a sharded runner keeps its share)."""
        return items

    def conclude(self, report: dict) -> dict:
        """Write ``run_summary.json`` and, with ``raise_on_failure``, raise if any item failed; return ``report``."""
        (self.output_dir / "run_summary.json").write_text(json.dumps(report, indent=2))
        if self.raise_on_failure:
            raise_for_failures(report)
        return report


def raise_for_failures(report: dict) -> None:
    """Raise ``SlideInferenceError`` naming each failed input of a done/skipped/failed report, if any."""
    if report["failed"]:
        total = sum(len(report[k]) for k in ("done", "skipped", "failed"))
        listed = "\n  ".join(f"{f['slide']}: {f['error']}" for f in report["failed"])
        raise SlideInferenceError(f"{len(report['failed'])} of {total} inputs failed:\n  {listed}")
