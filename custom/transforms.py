# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The bundle's own MONAI transforms and the normalisation constants the pipelines share.

``LoadPseudoLabeld`` serves the teacher maps that ``custom.handlers.PseudoLabelHandler`` caches, under the file
names of :func:`pseudo_label_path` (the one place both sides take them from). The loading transforms of patches and
slide tiles (``LoadPatchd``, ``LoadTiled``) stay in ``custom.data.datasets``: they are the readers those data sets
are built on, and ``custom.data`` importing this module while it imports ``custom.data`` would be a cycle.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.transforms import LoadImage, Transform
from monai.transforms.traits import RandomizableTrait

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "PSEUDO_KEY", "LoadPseudoLabeld", "pseudo_label_path"]

PSEUDO_KEY = "pseudo"
"""Batch key of the teacher map a student learns (cached by ``LoadPseudoLabeld`` or computed by the trainer)."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""Per-channel mean of ImageNet RGB in [0, 1]: the VGG16-BN trunk was pretrained on images normalised with it."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""Per-channel standard deviation of ImageNet RGB in [0, 1], the divisor that goes with :data:`IMAGENET_MEAN`."""


def pseudo_label_path(output_dir: str | os.PathLike, name: str, suffix: str) -> str:
    """``output_dir/name + suffix``; names come from data, so refuse ones that would leave the folder."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"image name {name!r} cannot name a pseudo-label file (empty, or holds a path separator).")
    return os.path.join(os.fspath(output_dir), name + suffix)


class LoadPseudoLabeld(Transform, RandomizableTrait):
    """
    Load the cached teacher map of ``data[name_key]`` into ``data[pseudo_key]`` as a (1, H, W) float32 tensor, so
    that dictionary augmentations listing both keys (``RandFlipd(keys=["image", "pseudo"])``) move image and
    pseudo-label together; put it before them.

    It declares ``RandomizableTrait`` although it draws no random numbers: its output changes whenever the teacher
    changes (after a role swap), and MONAI's ``CacheDataset`` / ``PersistentDataset`` cache a pipeline only up to
    the first such transform, so the pseudo-labels are never served stale from a cache.

    With ``keep_in_memory`` (the default) each decoded map is kept, keyed by its file's identity (inode, size and
    modification time in ns), and served as a copy until :class:`custom.handlers.PseudoLabelHandler` rewrites the
    file (it does on ``DistillationEvents.TEACHER_CHANGED``): the maps are decoded once per teacher instead of once
    per sample per epoch, and a stat per sample is what remains. The check is per file, so it also holds in
    DataLoader worker processes, which each keep their own copies (persistent workers keep them across epochs).
    Memory: one float32 map per training image (64 KiB at 128 px, 256 KiB at 256 px, per process).

    Args:
        pseudo_dir: the ``output_dir`` of :class:`custom.handlers.PseudoLabelHandler`.
        pseudo_key: key to write, default ``"pseudo"`` (the trainer's ``pseudo_key``).
        name_key: key of the image name.
        keep_in_memory: keep decoded maps until their file changes (False: decode the file on every call).
    """

    def __init__(
        self,
        pseudo_dir: str | os.PathLike,
        pseudo_key: Hashable = PSEUDO_KEY,
        name_key: str = "name",
        keep_in_memory: bool = True,
    ):
        self.pseudo_dir = pseudo_dir
        self.pseudo_key = pseudo_key
        self.name_key = name_key
        self.keep_in_memory = keep_in_memory
        self.loader = LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)
        self._maps: dict[str, tuple[tuple[int, int, int], Any]] = {}

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with the pseudo-label added."""
        d = dict(data)
        path = pseudo_label_path(self.pseudo_dir, str(d[self.name_key]), ".nii.gz")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"no pseudo-label {path} for image {d[self.name_key]!r}: "
                "PseudoLabelHandler writes it when stage 2 starts."
            )
        d[self.pseudo_key] = self._load(path)
        return d

    def _load(self, path: str) -> Any:
        """The decoded map of ``path``: a copy of the kept one while the file is unchanged, else read anew."""
        if not self.keep_in_memory:
            return self.loader(path)
        stat = os.stat(path)
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        kept = self._maps.get(path)
        if kept is None or kept[0] != identity:
            kept = (identity, self.loader(path))
            self._maps[path] = kept
        return kept[1].clone()
