# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""MONAI Label's ``/train/{model}``: fine-tune the served model from the pathologist's corrections, then serve it.

One round, run by MONAI Label in its background training process (``python -m monailabel.interfaces.utils.app -m
train``, one at a time; ``DELETE /train/`` kills it), so the server keeps answering meanwhile:

1. the served ``model.pt`` is copied into a round folder of the app (``<app>/train/round-*``), and its network
   (``network_def``), ``image_size`` and ``mpp`` (when its record has them) become the training's, so the round
   starts from exactly the weights being served (``init_path``, teacher and student alike);
2. every image of the datastore with a ``final`` label is cut into strong tiles listed in ``strong.json`` there
   (``lib.corrections``): stage 1 adds a supervised Dice + BCE term on them, stage 2 distils their masks;
3. the bundle's own training runs: a ``monai.bundle.ConfigWorkflow`` of ``train.json`` and the app's
   ``train_configs`` (default ``cpu_train.json`` after it), with the weak-label data of ``dataset_dir`` and the
   request's checked parameters as overrides, writing checkpoints and reports into the round folder only;
4. the new ``model.pt`` is checked to load, then replaces the served one atomically (a temporary file in the same
   folder, then ``os.replace``), the previous one kept as ``<name>.previous.pt``; the inference task serves it from
   its next request (it watches the file).

A round that fails or is stopped leaves the served file untouched. The last two round folders are kept.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastapi import HTTPException
from monai.bundle import ConfigParser, ConfigWorkflow
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.train import TrainTask

from custom.checkpoints import build_network, load_weights, network_definition, read_record

from .corrections import corrections, write_strong_datalist
from .request_checks import MAX_REGION_PIXELS, check_train_params
from .tumour_infer import TumourSegmentation, file_stamp, process_alive

__all__ = ["DEFAULT_TRAIN_CONFIGS", "MONAI_LABEL_KEYS", "TumourTraining", "backup_path", "publish_checkpoint"]

logger = logging.getLogger(__name__)

DEFAULT_TRAIN_CONFIGS = ("train.json", "cpu_train.json")
"""Config files of ``bundle/configs`` a round merges, in order, unless the app's ``train_configs`` says otherwise."""
MONAI_LABEL_KEYS = frozenset({"model", "local_rank", "gpus", "bundle_path"})
"""Keys MONAI Label adds to a train request itself (not the client's parameters)."""
SHOWN_KNOBS = (
    "stage1_epochs", "stage2_epochs", "learning_rate", "batch_size", "strong_weight", "strong_share", "image_size",
    "seed",
)
"""The knobs a round's defaults are shown for in ``/info/`` (the ones a request may set, QuPath's names aside)."""
KEPT_ROUNDS = 2
"""Round folders kept in the app's ``train`` folder (the newest ones)."""
LAST_ROUND = "last_round.json"
"""File of the app's ``train`` folder that describes the last finished round (``/info/``'s ``train_stats``)."""


def backup_path(served: Path) -> Path:
    """Where the weights a round replaced are kept: ``model.pt`` -> ``model.previous.pt``."""
    return served.with_name(f"{served.stem}.previous{served.suffix}")


def _temporary(dest: Path) -> Path:
    """A temporary name beside ``dest`` that says which process writes it."""
    return dest.with_name(f".{dest.name}.{os.getpid()}.tmp")


def _copy_atomically(source: Path, dest: Path) -> None:
    """Copy ``source`` over ``dest`` so that a reader sees the old file or the whole new one, never a part."""
    temporary = _temporary(dest)
    try:
        with open(source, "rb") as reader, open(temporary, "wb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
            writer.flush()
            os.fsync(writer.fileno())
        os.replace(temporary, dest)
    finally:
        temporary.unlink(missing_ok=True)


def _remove_stale_temporaries(dest: Path) -> None:
    """Remove the temporary copies of ``dest`` that killed rounds left (their process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(\d+)\.tmp$")
    for path in dest.parent.iterdir():
        found = pattern.match(path.name)
        if found and not process_alive(int(found.group(1))):
            logger.warning("removing %s, left by a stopped training", path)
            path.unlink(missing_ok=True)


def publish_checkpoint(new: Path, served: Path) -> Path | None:
    """Serve ``new`` in place of ``served`` atomically, the previous file kept as ``backup_path(served)``; the backup
    (None when nothing was served before)."""
    _remove_stale_temporaries(served)
    backup = None
    if served.exists():
        backup = backup_path(served)
        _copy_atomically(served, backup)
    _copy_atomically(new, served)
    return backup


def _write_json(path: Path, content: Mapping[str, Any]) -> None:
    """Write a small JSON file atomically (the server reads it while a round may write it)."""
    temporary = _temporary(path)
    temporary.write_text(json.dumps(content, indent=2), encoding="utf-8")
    os.replace(temporary, path)


class TumourTraining(TrainTask):
    """Fine-tunes the served model with the bundle's ``train.json`` from the datastore's corrections (strong labels)
    and the bundle's weak-label data, then serves the new weights.

    Args:
        infer: the app's inference task (its weights file is the one replaced, its model the one fine-tuned).
        bundle_root: the bundle folder (``configs/`` there).
        config_files: config files of ``configs/`` merged in order.
        work_dir: the app's folder for round folders and ``last_round.json``.
        dataset_dir: the weak-label data (``train.json``'s ``dataset_dir``); None keeps the config's (the bundle's
            sample data, generated on first use).
        max_region_px: the largest corrected slide region, in pixels at its inference level.
    """

    def __init__(
        self, infer: TumourSegmentation, bundle_root: str | os.PathLike,
        config_files: Sequence[str] = DEFAULT_TRAIN_CONFIGS, work_dir: str | os.PathLike = "train",
        dataset_dir: str | None = None, max_region_px: int = MAX_REGION_PIXELS,
    ) -> None:
        self.infer, self.bundle_root = infer, Path(bundle_root).resolve()
        self.config_files = tuple(config_files)
        self.work_dir, self.dataset_dir, self.max_region_px = Path(work_dir).resolve(), dataset_dir, max_region_px
        self._defaults: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        missing = [name for name in self.config_files if not (self.bundle_root / "configs" / name).is_file()]
        if missing:
            raise FileNotFoundError(f"train_configs {missing} are not files of {self.bundle_root / 'configs'}")
        super().__init__("Fine-tunes the served model from the corrections of the datastore (the bundle's "
                         f"{', '.join(self.config_files)}), then serves it")

    def _config_paths(self) -> list[str]:
        """The merged config files, as paths."""
        return [os.fspath(self.bundle_root / "configs" / name) for name in self.config_files]

    def config(self) -> dict[str, Any]:
        """The defaults of a round's knobs (what a request without parameters trains with), read once per version of
        the served weights (``/info/`` asks for them at every call, and reading a record loads the checkpoint)."""
        stamp = file_stamp(self.infer.ckpt_path)
        if self._defaults is None or self._defaults[0] != stamp:
            self._defaults = stamp, self._read_defaults()
        return dict(self._defaults[1])

    def _read_defaults(self) -> dict[str, Any]:
        """The merged configs' values of ``SHOWN_KNOBS``, ``image_size`` the served record's when it has one."""
        parser = ConfigParser()
        parser.read_config(self._config_paths())
        defaults = {knob: parser.get(knob) for knob in SHOWN_KNOBS}
        record = read_record(self.infer.ckpt_path)
        if record.get("image_size") is not None:
            defaults["image_size"] = record["image_size"]
        return defaults

    def stats(self) -> dict[str, Any]:
        """The last finished round (when, how long, what it learnt from, what it replaced), {} before the first."""
        try:
            return json.loads((self.work_dir / LAST_ROUND).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def check_ready(self, datastore: Datastore) -> None:
        """A 409 when the datastore has no correction to learn from (before a round is started for nothing)."""
        if not corrections(datastore):
            raise HTTPException(409, "no image of the studies folder has a final label: submit a correction first "
                                     "(PUT /datastore/label, or QuPath's Submit Label)")

    def __call__(self, request: dict, datastore: Datastore) -> dict[str, Any]:
        """One round: corrections to strong tiles, the bundle's training, the new weights served."""
        start = time.monotonic()
        params = _request_params(request)
        round_dir = self._new_round_dir()
        overrides = self._overrides(params, round_dir)
        served = self.infer.served()
        listing, n_tiles = write_strong_datalist(
            corrections(datastore), round_dir / "corrections", int(overrides["image_size"]),
            served.inferer.select_level, self.max_region_px,
        )
        overrides["strong_datalist"] = os.fspath(listing)
        self._run_bundle(overrides)
        new = round_dir / "models" / "model.pt"
        self._check_loads(new, overrides["network_def"])
        backup = publish_checkpoint(new, Path(self.infer.ckpt_path))
        summary = self._summary(round_dir, params, n_tiles, backup, time.monotonic() - start)
        _write_json(self.work_dir / LAST_ROUND, summary)
        logger.info("round done in %.1f s: %s now serves %s (previous weights in %s)", summary["seconds"],
                    self.infer.ckpt_path, new, backup)
        return summary

    def _new_round_dir(self) -> Path:
        """A new round folder, the older ones beyond ``KEPT_ROUNDS`` removed (a stopped round's among them)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        round_dir = self.work_dir / f"round-{stamp}-{os.getpid()}"
        round_dir.mkdir()
        for old in sorted(self.work_dir.glob("round-*"), key=lambda p: p.stat().st_mtime)[:-KEPT_ROUNDS]:
            shutil.rmtree(old, ignore_errors=True)
        return round_dir

    def _overrides(self, params: Mapping[str, Any], round_dir: Path) -> dict[str, Any]:
        """``train.json`` overrides: the round's folders, the served weights and network as the start, the served
        record's input size and resolution, the weak data, then the request's parameters."""
        start = round_dir / "start.pt"
        shutil.copyfile(self.infer.ckpt_path, start)  # the weights served now, whatever replaces the file later
        network = load_weights(build_network(network_definition(self.infer.served().network)), start,
                               config_key="init_path", rebuild=True)
        overrides: dict[str, Any] = {
            "bundle_root": os.fspath(self.bundle_root), "ckpt_dir": os.fspath(round_dir / "models"),
            "output_dir": os.fspath(round_dir / "outputs"), "init_path": os.fspath(start),
            "network_def": network_definition(network),
        }
        if self.dataset_dir:
            overrides["dataset_dir"] = os.fspath(self.dataset_dir)
        record = read_record(start)
        for key in ("image_size", "mpp"):
            if record.get(key) is not None:
                overrides[key] = record[key]
        overrides.update(params)
        overrides.setdefault("image_size", self.config()["image_size"])
        return overrides

    def _run_bundle(self, overrides: Mapping[str, Any]) -> None:
        """The bundle's training (``initialize``, ``run``, ``finalize`` of ``train.json``) with ``overrides``."""
        logger.info("training with %s and %s", ", ".join(self.config_files),
                    json.dumps({k: v for k, v in overrides.items() if k != "network_def"}))
        workflow = ConfigWorkflow(
            config_file=self._config_paths(), meta_file=os.fspath(self.bundle_root / "configs" / "metadata.json"),
            workflow_type="train", **overrides,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()

    @staticmethod
    def _check_loads(new: Path, definition: Mapping[str, Any]) -> None:
        """Refuse to serve a round's output that is missing or does not load into the served network."""
        if not new.is_file():
            raise FileNotFoundError(f"the training wrote no {new}: the served weights are left as they are")
        load_weights(build_network(definition), new, config_key="init_path", rebuild=True)

    def _summary(self, round_dir: Path, params: Mapping[str, Any], n_tiles: int, backup: Path | None,
                 seconds: float) -> dict[str, Any]:
        """What ``last_round.json`` (and ``/info/``) says of a finished round."""
        try:
            final = json.loads((round_dir / "outputs" / "metrics.json").read_text(encoding="utf-8"))["final_model"]
        except (OSError, ValueError, KeyError):
            final = {}
        return {
            "finished": datetime.datetime.now().isoformat(timespec="seconds"), "seconds": round(seconds, 1),
            "params": dict(params), "strong_tiles": n_tiles, "round_dir": os.fspath(round_dir),
            "served": self.infer.ckpt_path, "backup": os.fspath(backup) if backup else None,
            "final_model": {k: final.get(k) for k in ("source", "val_score")},
        }


def _request_params(request: Mapping[str, Any]) -> dict[str, Any]:
    """The client's parameters of a train request (MONAI Label's own keys left out), checked again: the training
    process gets them on its command line, past the server's checks."""
    try:
        return check_train_params({k: v for k, v in request.items() if k not in MONAI_LABEL_KEYS})
    except HTTPException as err:
        raise ValueError(err.detail) from None
