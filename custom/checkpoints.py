# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The bundle's one loader of trained weights, and what is wrong with a file ``torch.load`` cannot read.

Training (``train.json``'s stage-1 teacher), evaluation (``evaluate.json``), inference (``SlideInferenceRunner``),
the MONAI Label app and ``scripts/selection_study.py`` all load weights with :func:`load_weights`.
PyTorch's messages do not name the file, and the weights-only reader's one advises loading again with
``weights_only=False``, which runs whatever code the file holds: the wrong advice for a corrupt download.
:func:`load_weights` raises ``UnreadableCheckpoint`` instead, naming the file and the problem.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

__all__ = ["UnreadableCheckpoint", "load_problem", "load_weights", "state_mismatch"]


class UnreadableCheckpoint(ValueError):
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


def load_weights(
    network: torch.nn.Module, path: str | os.PathLike, key: str | None = None, config_key: str | None = None
) -> torch.nn.Module:
    """Load checkpointed weights into ``network``, in place, and return it: the one loader of the bundle's weights.

    The file holds a state dict (``model.pt``, the per-epoch weights) or what ``CheckpointSaver`` wrote: several
    objects keyed by name (``key`` picks the network's entry) or a single object's state dict, with Ignite's
    ``"checkpointer"`` record when ``key_metric_save_state`` is set. Only plain weights are read
    (``weights_only=True``): a checkpoint is data, never code. A missing file, an unreadable one
    (:class:`UnreadableCheckpoint`) and one that does not fit the network are refused before anything is loaded,
    naming ``config_key`` (the config key that gave ``path``) when there is one.
    """
    where = f" (config key '{config_key}')" if config_key else ""
    if not os.path.isfile(path):
        advice = f": train one with bundle/configs/train.json, or set {config_key} to a state_dict of 'network_def'"
        raise FileNotFoundError(f"no trained model at {os.fspath(path)}{where}{advice if config_key else ''}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch's zip reader and unpicklers raise many types for one problem
        raise UnreadableCheckpoint(path, err, f"config key '{config_key}'" if config_key else "") from None
    if isinstance(state, Mapping):
        state = {k: v for k, v in state.items() if k != "checkpointer"}
        state = state[key] if key is not None and key in state else state
    problem = state_mismatch(network, state)
    if problem:  # checked before loading: a refused checkpoint leaves the network as it was
        raise ValueError(
            f"checkpoint {os.fspath(path)}{where} does not match the network ({type(network).__name__}) built by "
            f"'network_def' or its stage's definition (check e.g. 'network_width'): {problem}"
        )
    network.load_state_dict(state)
    return network


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
