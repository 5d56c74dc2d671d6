# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The bundle's one loader of trained weights, the record a checkpoint keeps of its network, and what is wrong with
a file ``torch.load`` cannot read.

Training (``train.json``'s stage-1 teacher), evaluation (``evaluate.json``), inference (``SlideInferenceRunner``),
the MONAI Label app and the scripts all load weights with :func:`load_weights`.
PyTorch's messages do not name the file, and the weights-only reader's one advises loading again with
``weights_only=False``, which runs whatever code the file holds: the wrong advice for a corrupt download.
:func:`load_weights` raises ``UnreadableCheckpoint`` instead, naming the file and the problem.

**What a checkpoint holds.** Every checkpoint a training writes (``model.pt``, ``teacher_best.pt``, the stage
checkpoints) is a dict of named entries, one of them ``"record"`` (:data:`RECORD_KEY`, plain data written by
:meth:`TrainingRecord.describe`): the network the weights belong to (``network_def``: its ``_target_`` and every
argument, as ``custom.networks`` records them in ``definition``), the input side (``image_size``), the microns per
pixel (``mpp``), the normalisation, the evaluation ``threshold`` and ``smooth_sigma``, the bundle version and a
training summary; ``record["weights"]`` names the entry that holds the network's weights (``"network"`` in
``model.pt``, ``"teacher"`` in the others). Files without a record (a plain state dict, the bundle before 0.5.0)
still load.

**Building the network from the record.** A ``_target_`` read from a file is never imported: only the networks of
``custom.networks`` (:data:`BUILDABLE`) are built from a record, with its plain-data arguments (weights-only
loading admits nothing else), so a checkpoint stays data, never code. That is why this module imports
``custom.networks`` and nothing else of the package.
"""

from __future__ import annotations

import copy
import datetime
import json
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from custom.errors import InputError, MissingInputError
from custom.networks import DWSMIL, SAMIL

__all__ = [
    "BUILDABLE",
    "RECORD_KEY",
    "WEIGHTS_KEY",
    "TrainingRecord",
    "UnreadableCheckpoint",
    "build_network",
    "definition_differences",
    "init_networks",
    "init_student",
    "load_problem",
    "load_weights",
    "network_definition",
    "read_record",
    "record_value",
    "state_mismatch",
    "trained_network",
]

logger = logging.getLogger(__name__)

RECORD_KEY = "record"
"""Entry of a bundle checkpoint that holds its :class:`TrainingRecord` (plain data)."""
WEIGHTS_KEY = "network"
"""Entry of ``model.pt`` that holds the network's state dict (``--key_in_ckpt`` of MONAI's ``ckpt_export``)."""
RECORD_FORMAT = 1
"""Layout version of the record, raised when its fields change meaning."""
BUILDABLE: dict[str, type[torch.nn.Module]] = {"custom.networks.DWSMIL": DWSMIL, "custom.networks.SAMIL": SAMIL}
"""The ``_target_`` values a record may name: the only networks ever built from a checkpoint file."""
INIT_ONLY = ("pretrained_path",)
"""Network arguments that only choose the starting weights: the checkpoint's weights replace them, so they are not
compared and are dropped when a network is built from a record (the file they name may not exist here)."""
NETWORK_KNOBS = {"_target_": "network_def#_target_", "width": "network_width"}
"""The config knob that sets each network argument (``network_def#<argument>`` for the others)."""


class UnreadableCheckpoint(InputError):
    """A checkpoint file that cannot be read: empty, truncated, corrupt, not a PyTorch checkpoint, or not readable."""

    def __init__(self, path: str | os.PathLike, err: BaseException, note: str = "") -> None:
        where = f" ({note})" if note else ""
        super().__init__(f"checkpoint {os.fspath(path)}{where} cannot be read: {load_problem(err)}")


def load_problem(err: BaseException) -> str:
    """The problem in ``torch.load``'s exception, in one line, without its advice to set ``weights_only=False``."""
    again = "; copy or save it again"
    if isinstance(err, OSError) and err.filename is not None:  # the file system's refusal (permissions, a folder)
        return err.strerror or str(err)
    if isinstance(err, EOFError):
        return f"the file is empty or truncated{again}"
    text = str(err)
    if isinstance(err, OSError) or "PytorchStreamReader" in text:  # torch's zip reader: EINVAL or its own message
        detail = text.split(". This is an internal", 1)[0].replace("PytorchStreamReader failed ", "")
        return f"it is not a complete PyTorch checkpoint archive, truncated or corrupted ({detail}){again}"
    if "WeightsUnpickler error:" in text:
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0].split())
        return f"it is not a PyTorch checkpoint of plain weights ({detail}){again}"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"it is not a PyTorch checkpoint ({type(err).__name__}{': ' + first if first else ''}){again}"


def _plain(value: Any) -> Any:
    """``value`` as weights-only-loadable plain data: tuples as lists, tensor and numpy scalars as Python numbers."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.device):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint record holds plain data only, not {type(value).__name__} ({value!r})")


def network_definition(network: torch.nn.Module) -> dict[str, Any]:
    """The network's config entry: ``_target_`` and every argument (``definition`` of ``custom.networks``), or only
    the ``_target_`` of its class for a network that keeps no definition. A DDP wrapper is looked through."""
    if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        network = network.module
    definition = getattr(network, "definition", None)
    if isinstance(definition, Mapping) and "_target_" in definition:
        return _plain(definition)
    cls = type(network)
    return {"_target_": f"{cls.__module__}.{cls.__qualname__}"}


def _canonical_target(target: Any) -> Any:
    """``custom.networks.dws_mil.DWSMIL`` and ``custom.networks.DWSMIL`` name one class: the short form."""
    for name, cls in BUILDABLE.items():
        if target in (name, f"{cls.__module__}.{cls.__qualname__}"):
            return name
    return target


def definition_differences(config: Mapping[str, Any], trained: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``argument -> (config's value, record's value)`` for every argument the two definitions set differently
    (``_target_`` included; :data:`INIT_ONLY` arguments left out). A definition that lists only its ``_target_``
    (a network without ``definition``) is compared on that alone."""
    config = {**config, "_target_": _canonical_target(config.get("_target_"))}
    trained = {**trained, "_target_": _canonical_target(trained.get("_target_"))}
    keys = set(trained) | set(config) if len(config) > 1 and len(trained) > 1 else {"_target_"}
    return {key: (config.get(key), trained.get(key)) for key in sorted(keys, key=lambda k: (k != "_target_", k))
            if key not in INIT_ONLY and _plain(config.get(key)) != _plain(trained.get(key))}


def build_network(definition: Mapping[str, Any]) -> torch.nn.Module:
    """A new network from a record's ``network_def``; ``ValueError`` naming why when it cannot be built (a
    ``_target_`` that is not one of :data:`BUILDABLE`, arguments it does not take)."""
    target = _canonical_target(definition.get("_target_"))
    if target not in BUILDABLE:
        raise ValueError(f"{definition.get('_target_')!r} is not a network of custom.networks "
                         f"({', '.join(BUILDABLE)}), and a name read from a file is never imported")
    arguments = {k: _plain(v) for k, v in definition.items() if k != "_target_"}
    arguments.update({k: None for k in INIT_ONLY if k in arguments})
    try:
        return BUILDABLE[target](**arguments)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{target} cannot be built from the recorded arguments {arguments}: {err}") from None


def _knob(argument: str, knobs: Mapping[str, str] | None = None) -> str:
    """The config knob (or command-line flag, with ``knobs``) that sets a network argument."""
    return {**NETWORK_KNOBS, **(knobs or {})}.get(argument, f"network_def#{argument}")


def _advice(differences: Mapping[str, tuple[Any, Any]], knobs: Mapping[str, str] | None = None) -> str:
    """``set network_width 0.25, network_def#fusion_weights [0.2, 0.3, 0.5]``: the overrides that rebuild it."""
    return "set " + ", ".join(f"{_knob(k, knobs)} {v if isinstance(v, str) else json.dumps(v)}"
                              for k, (_, v) in differences.items())


def _describe(differences: Mapping[str, tuple[Any, Any]]) -> str:
    """``width 1.0 in the config, 0.25 in the checkpoint; ...``."""
    return "; ".join(f"{k} {json.dumps(c)} in the config, {json.dumps(t)} in the checkpoint"
                     for k, (c, t) in differences.items())


def _device(network: torch.nn.Module) -> torch.device:
    """Where ``network``'s weights are (the CPU for a network without any)."""
    return next((p.device for p in network.parameters()), torch.device("cpu"))


def _rebuilt(network: torch.nn.Module, trained: Mapping[str, Any], differences: Mapping, where: str) -> torch.nn.Module:
    """The record's network, on ``network``'s device and in its mode, with the one log line that says so."""
    built = build_network(trained).to(_device(network)).train(network.training)
    logger.warning(f"{where}: built the network the checkpoint records ({_canonical_target(trained['_target_'])}), "
                   f"not the config's 'network_def', which differs: {_describe(differences)}")
    return built


def _read(path: str | os.PathLike, config_key: str | None) -> Any:
    """The checkpoint's content (weights only), or ``UnreadableCheckpoint``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's zip reader and unpicklers raise many types for one problem
        raise UnreadableCheckpoint(path, err, f"config key '{config_key}'" if config_key else "") from None


def _entries(content: Any, key: str | None) -> tuple[Any, dict[str, Any]]:
    """(the network's state dict, the record or {}) of a checkpoint's content: entry ``key``, else the one the record
    names, else the whole content (a plain state dict, or a single object saved with Ignite's ``checkpointer``)."""
    if not isinstance(content, Mapping):
        return content, {}
    record = content.get(RECORD_KEY)
    record = dict(record) if isinstance(record, Mapping) else {}
    content = {k: v for k, v in content.items() if k not in ("checkpointer", RECORD_KEY)}
    name = key if key is not None else record.get("weights")
    return (content[name] if name is not None and name in content else content), record


def read_record(path: str | os.PathLike | None) -> dict[str, Any]:
    """The record of a checkpoint, or of a TorchScript export (``trained`` in its ``metadata.json`` extra file, see
    :meth:`TrainingRecord.model_metadata`); ``{}`` when there is no file, no record, or the file cannot be read (its
    loader then says why). Used by the configs to default ``mpp``, ``threshold`` and ``image_size`` to the trained
    ones."""
    if path is None or not os.path.isfile(path):
        return {}
    try:
        with zipfile.ZipFile(path) as archive:
            extra = [n for n in archive.namelist() if n.endswith("/extra/metadata.json")]
            if extra:  # a TorchScript archive: its metadata, never its code
                trained = json.loads(archive.read(extra[0])).get("trained")
                return dict(trained) if isinstance(trained, Mapping) else {}
    except (zipfile.BadZipFile, OSError, ValueError):
        pass
    try:
        return _entries(torch.load(path, map_location="cpu", weights_only=True), None)[1]
    except Exception:  # noqa: BLE001 - the loader reports an unreadable file with its reason
        return {}


def record_value(record: Mapping[str, Any] | None, name: str, value: Any = None, default: Any = None) -> Any:
    """``value`` when the config sets it (not ``None``), else the record's ``name`` when the record has one (it may
    be ``None``: ``smooth_sigma`` ``null`` is no smoothing), else ``default``: how the inference and evaluation
    configs fill the knobs they leave ``null`` (``mpp``, ``threshold``, ``eval_image_size``, ...) from the
    checkpoint."""
    if value is not None:
        return value
    return record[name] if record and name in record else default


def trained_network(
    network: torch.nn.Module, record: Mapping[str, Any] | None, where: str | os.PathLike = "checkpoint"
) -> torch.nn.Module:
    """The network ``record`` (:func:`read_record`) says the weights were trained as, built anew when the config's
    ``network`` differs (one log line names the arguments that differ); ``network`` itself when there is no record,
    nothing differs, or the record cannot be built (then :func:`load_weights` refuses the weights if they do not
    fit, naming the knob to set). No weights are loaded: this is the architecture, for MONAI's ``ckpt_export`` and
    ``verify_net_in_out`` as for inference. ``where`` (the checkpoint's path) starts the log line."""
    where = os.fspath(where)
    trained = (record or {}).get("network_def")
    if not isinstance(trained, Mapping):
        return network
    differences = definition_differences(network_definition(network), trained)
    if not differences:
        return network
    try:
        return _rebuilt(network, trained, differences, where)
    except ValueError as err:
        logger.warning(f"{where}: the config's 'network_def' differs from the checkpoint's ({_describe(differences)}) "
                       f"and the recorded network is not built: {err}")
        return network


def load_weights(
    network: torch.nn.Module,
    path: str | os.PathLike,
    key: str | None = None,
    config_key: str | None = None,
    rebuild: bool = False,
    knobs: Mapping[str, str] | None = None,
) -> torch.nn.Module:
    """Load checkpointed weights into ``network`` and return the network that holds them: the one loader of the
    bundle's weights.

    The file holds a bundle checkpoint (named entries with a record, see the module's docstring; ``key`` picks the
    network's entry, by default the one the record names), a plain state dict (``model.pt`` before 0.5.0, the
    per-epoch weights) or what ``CheckpointSaver`` wrote: several objects keyed by name or a single object's state
    dict, with Ignite's ``"checkpointer"`` record when ``key_metric_save_state`` is set. Only plain weights are read
    (``weights_only=True``): a checkpoint is data, never code.

    With ``rebuild`` (inference, evaluation, export), when the record's network differs from ``network`` (its
    ``definition``), the recorded network is built (:func:`build_network`), loaded and returned instead, and one
    line says which arguments differed; ``network`` is left untouched. Without ``rebuild`` (training, which must
    load into the networks its trainers hold), ``network`` is loaded in place and returned.

    A missing file, an unreadable one (:class:`UnreadableCheckpoint`) and one whose weights do not fit (a network
    that cannot be built from its record: an unknown ``_target_``, no record) are refused before anything is loaded,
    naming ``config_key`` (the config key that gave ``path``) and the knob and value that would make them fit
    (``set network_width 0.25``; ``knobs`` renames knobs for a command line, e.g. ``{"width": "--width"}``).
    """
    where = f" (config key '{config_key}')" if config_key else ""
    if not os.path.isfile(path):
        advice = f": train one with bundle/configs/train.json, or set {config_key} to a checkpoint of 'network_def'"
        raise MissingInputError(f"no trained model at {os.fspath(path)}{where}{advice if config_key else ''}")
    state, record = _entries(_read(path, config_key), key)
    trained = record.get("network_def") if isinstance(record.get("network_def"), Mapping) else None
    differences = definition_differences(network_definition(network), trained) if trained else {}
    unbuilt = ""
    if differences and rebuild:
        try:
            built = build_network(trained)
        except ValueError as err:
            unbuilt = f" (it is not built from the file: {err})"
        else:
            if not state_mismatch(built, state):
                built = _rebuilt(network, trained, differences, f"{os.fspath(path)}{where}")
                built.load_state_dict(state)
                return built
            unbuilt = " (its recorded network does not fit its own weights)"
    problem = state_mismatch(network, state)
    if problem:  # checked before loading: a refused checkpoint leaves the network as it was
        if differences:
            advice = f"it was trained as {_canonical_target(trained['_target_'])} with {_describe(differences)}" \
                     f"{unbuilt}: {_advice(differences, knobs)}"
        else:
            advice = _advice_without_record(network, state, record, knobs)
        raise InputError(
            f"checkpoint {os.fspath(path)}{where} does not match the network ({type(network).__name__}) built by "
            f"'network_def' or its stage's definition: {problem}; {advice}"
        )
    if differences:
        logger.warning(f"{os.fspath(path)}{where}: loaded into the config's network, whose weights fit, although "
                       f"its definition differs from the checkpoint's: {_describe(differences)}")
    network.load_state_dict(state)
    return network


def init_networks(networks: Sequence[torch.nn.Module], path: str | os.PathLike | None) -> None:
    """Start every network of a training (teacher and student) from one trained checkpoint, to fine-tune it.

    ``path`` is the ``init_path`` knob (e.g. a served ``model.pt``), None for training from ``network_def``'s own
    initialisation; its recorded network must fit the config's (refused otherwise, naming the knob to set). A run
    that resumes from a stage checkpoint replaces these weights with the checkpoint's afterwards.
    """
    if path is None:
        return
    for network in networks:
        load_weights(network, path, config_key="init_path")
    logger.info(f"{len(networks)} network(s) start from the weights of {os.fspath(path)} (init_path)")


STUDENT_INITS = ("scratch", "teacher")


def init_student(student: torch.nn.Module, teacher_path: str | os.PathLike, student_init: str) -> None:
    """Where the first student starts (``student_init``): its own initialisation (``"scratch"``, the method) or the
    best stage-1 teacher's weights (``"teacher"``), so a short stage 2 refines the teacher instead of re-learning it.

    A resumed stage 2 then replaces these weights with its checkpoint's; role swaps are unaffected.
    """
    if student_init not in STUDENT_INITS:
        raise ValueError(f"student_init must be one of {STUDENT_INITS}, got {student_init!r}.")
    if student_init == "teacher":
        load_weights(student, teacher_path, "teacher")
        logger.info(f"the student starts from the stage-1 teacher's weights ({os.fspath(teacher_path)}; student_init)")


def _advice_without_record(
    network: torch.nn.Module, state: Any, record: Mapping[str, Any], knobs: Mapping[str, str] | None
) -> str:
    """What to set when the file does not say what it is: the width its first mismatched layer implies, if the
    network has one (every channel count of ``custom.networks`` scales with it)."""
    missing = "it records no network (a checkpoint older than bundle 0.5.0)" if not record else \
        "its record names the same network"
    width = network_definition(network).get("width")
    expected = network.state_dict()
    if isinstance(state, Mapping) and isinstance(width, (int, float)):
        for name, tensor in expected.items():
            saved = state.get(name)
            if getattr(saved, "ndim", 0) >= 1 and tensor.ndim >= 1 and saved.shape[0] != tensor.shape[0]:
                implied = round(width * saved.shape[0] / tensor.shape[0], 4)
                return (f"{missing}; its {name} has {saved.shape[0]} output channels where the config's network has "
                        f"{tensor.shape[0]} at width {width}: set {_knob('width', knobs)} {implied:g}")
    return f"{missing}: set {_knob('width', knobs)} and {_knob('_target_', knobs)} to the network it was trained as"


def state_mismatch(network: torch.nn.Module, state: object) -> str:
    """Why ``state`` cannot be loaded into ``network`` (missing, unexpected or differently shaped keys), or ''."""
    if not isinstance(state, Mapping):
        return f"it holds a {type(state).__name__}, not a state_dict"
    expected = network.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)]
    parts = [f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
             for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("size mismatch", shapes))
             if keys]
    return "; ".join(parts)


class TrainingRecord:
    """What a training says about the networks it saves: written into every checkpoint under :data:`RECORD_KEY`
    (``train.json``'s ``report#record``, shared by the report and the checkpoint savers).

    Args:
        network: the network whose ``definition`` is recorded (the report passes the one it saves).
        image_size: the training's input side (rows = cols).
        mpp: microns per pixel the network was trained at (the training knob ``mpp``: what ``slides.json`` reads
            tiles at; for patch folders, the resolution the resized patches stand for).
        mean, std: the per-channel normalisation of the inputs ([0, 1] RGB).
        threshold, smooth_sigma: the evaluation protocol the checkpoints were selected with.
        selection_metric: the validation score that selects checkpoints (e.g. ``val_area_contrast``).
        epochs: ``stage -> epochs`` the training is configured with (e.g. ``{"stage1": 12, "stage2": 12}``).
        metadata_path: the bundle's ``metadata.json`` (its ``version`` is recorded; see :meth:`model_metadata`).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        image_size: int | None = None,
        mpp: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        threshold: float | None = None,
        smooth_sigma: float | None = None,
        selection_metric: str | None = None,
        epochs: Mapping[str, int] | None = None,
        metadata_path: str | os.PathLike | None = None,
    ) -> None:
        self.network, self.image_size, self.mpp = network, image_size, mpp
        self.mean, self.std, self.threshold, self.smooth_sigma = mean, std, threshold, smooth_sigma
        self.selection_metric, self.epochs = selection_metric, dict(epochs or {})
        self.metadata = {}
        if metadata_path is not None and os.path.isfile(metadata_path):
            with open(metadata_path) as f:
                self.metadata = json.load(f)

    def epochs_until(self, stage: str | None, epoch: int | None) -> dict[str, int]:
        """The configured epochs of the stages before ``stage``, and ``epoch`` for ``stage`` (a checkpoint written
        during it); all configured epochs without a stage."""
        if stage is None:
            return dict(self.epochs)
        stages = list(self.epochs)
        before = stages[: stages.index(stage)] if stage in stages else stages
        return {**{s: self.epochs[s] for s in before}, stage: epoch}

    def describe(self, weights: str = WEIGHTS_KEY, network: torch.nn.Module | None = None, **training: Any) -> dict:
        """The record (plain data): ``weights`` names the checkpoint entry holding ``network``'s state dict (the
        record's own network by default); ``training`` holds the summary (``source``, ``val_score``, ``epochs``, ...;
        ``selection_metric`` and ``date`` are added)."""
        summary = {"selection_metric": self.selection_metric, **training,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        summary.setdefault("epochs", dict(self.epochs))
        return _plain({
            "format": RECORD_FORMAT,
            "weights": weights,
            "network_def": network_definition(network if network is not None else self.network),
            "image_size": self.image_size,
            "mpp": self.mpp,
            "normalize": {"mean": None if self.mean is None else list(self.mean),
                          "std": None if self.std is None else list(self.std)},
            "threshold": self.threshold,
            "smooth_sigma": self.smooth_sigma,
            "bundle_version": self.metadata.get("version"),
            "training": summary,
        })

    def model_metadata(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """The bundle's ``metadata.json`` for one trained model: ``trained`` holds ``record``, and the network's input
        and output shapes are the trained ``image_size``. Written beside ``model.pt`` as ``model_metadata.json``:
        MONAI's ``ckpt_export --meta_file`` stores it in the TorchScript file (extra file ``metadata.json``), where
        :func:`read_record` finds the record again."""
        metadata = copy.deepcopy(self.metadata)
        metadata["trained"] = _plain(record)
        side = record.get("image_size")
        for tensors in metadata.get("network_data_format", {}).values():
            for spec in tensors.values():
                if side and isinstance(spec, dict) and "spatial_shape" in spec:
                    spec["spatial_shape"] = [side, side]
        return metadata
