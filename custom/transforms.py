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
import torch
from monai.config import KeysCollection
from monai.transforms import LoadImage, MapTransform, RandomizableTransform, Transform
from monai.transforms.traits import RandomizableTrait
from monai.utils import convert_to_tensor
from skimage.color import hed_from_rgb, rgb_from_hed

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PSEUDO_KEY",
    "LoadPseudoLabeld",
    "RandFlipRotate90Batchd",
    "RandStainJitterBatchd",
    "pseudo_label_path",
]

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

    def _load(self, path: str) -> torch.Tensor:
        """The decoded map of ``path``: a copy of the kept one while the file is unchanged, else read anew.

        A plain tensor: the map's NIfTI header carries nothing a trainer uses, and collating MetaTensors costs more
        than the map itself."""
        if not self.keep_in_memory:
            return convert_to_tensor(self.loader(path), track_meta=False)
        stat = os.stat(path)
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        kept = self._maps.get(path)
        if kept is None or kept[0] != identity:
            kept = (identity, convert_to_tensor(self.loader(path), track_meta=False))
            self._maps[path] = kept
        return kept[1].clone()


class _PerImageBatchd(MapTransform, RandomizableTransform):
    """A random transform of collated (B, C, rows, cols) batches: one draw per image (``randomize(batch_size)``),
    shared by every listed key of that image (``_apply(batch)``)."""

    def randomize(self, batch_size: int) -> None:  # type: ignore[override]
        raise NotImplementedError

    def _apply(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """A copy of ``data`` with the listed batch tensors transformed, each image on its own draw."""
        d = dict(data)
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        self.randomize(int(d[keys[0]].shape[0]))
        for key in keys:
            d[key] = self._apply(d[key])
        return d


class RandFlipRotate90Batchd(_PerImageBatchd):
    """
    Flip and turn every image of a collated batch on its own draw, the listed keys of one image together.

    Per image: a flip of the rows with probability ``prob`` (``RandFlipd(spatial_axis=0)``), then, with probability
    ``prob``, a turn by k x 90 degrees in the (row, col) plane with k drawn from 1 to ``max_k``
    (``RandRotate90d(max_k=3)``): the same distribution as those two per-sample transforms, but applied to
    (B, C, rows, cols) tensors after collation, at most eight tensor operations per key and batch instead of
    four dictionary transforms per image. Square images only when a turn can happen (a batch keeps one shape).

    Draws come from ``self.R``; ``custom.handlers.EpochSeedHandler(randomizable=[...])`` reseeds it at each epoch
    so that a resumed stage flips the same images as an uninterrupted one.

    Args:
        keys: batch keys to transform alike, e.g. ``["image", "mask", "pseudo"]``.
        prob: probability of the flip, and separately of the turn.
        max_k: largest number of quarter turns.
        allow_missing_keys: skip listed keys the batch lacks (``pseudo`` when the teacher runs live).
    """

    def __init__(self, keys: KeysCollection, prob: float = 0.5, max_k: int = 3, allow_missing_keys: bool = True):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if max_k < 1:
            raise ValueError(f"max_k must be at least 1, got {max_k}")
        self.max_k = max_k
        self._flip = np.zeros(0, bool)
        self._turns = np.zeros(0, int)
        self._groups: list[tuple[bool, int, np.ndarray]] = []

    def randomize(self, batch_size: int) -> None:
        """Draw, per image, whether its rows flip and how many quarter turns (0 = none) it takes, and group the
        images that move alike (every key of the batch is moved group by group)."""
        self._flip = self.R.random_sample(batch_size) < self.prob
        turn = self.R.random_sample(batch_size) < self.prob
        self._turns = np.where(turn, self.R.randint(1, self.max_k + 1, batch_size), 0)
        moves = sorted({(bool(f), int(k)) for f, k in zip(self._flip, self._turns)} - {(False, 0)})
        self._groups = [(f, k, np.flatnonzero((self._flip == f) & (self._turns == k))) for f, k in moves]

    def _apply(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` with each image's drawn flip and turn, one operation per distinct (flip, turns) group."""
        if batch.ndim != 4:
            raise ValueError(f"expected a (B, C, rows, cols) batch, got shape {tuple(batch.shape)}")
        if len(self._flip) != batch.shape[0]:
            raise ValueError(f"batch keys differ in size: {batch.shape[0]} images, {len(self._flip)} draws")
        if self._turns.any() and batch.shape[-1] != batch.shape[-2]:
            raise ValueError(f"a quarter turn needs square images, got {tuple(batch.shape[-2:])} (rows, cols)")
        out = batch.clone()
        for flip, turns, images in self._groups:
            index = torch.from_numpy(images).to(batch.device)
            group = batch.index_select(0, index)
            if flip:
                group = group.flip(-2)
            if turns:
                group = group.rot90(turns, (-2, -1))
            out.index_copy_(0, index, group)
        return out


class RandStainJitterBatchd(_PerImageBatchd):
    """
    Jitter the amount of haematoxylin, eosin and the residual (DAB) stain of every image of a collated batch on its
    own draw: the stain shift between patients, labs and scanners, which a segmenter must not read as tumour.

    Per image, with probability ``prob``: the normalised image is taken back to RGB in [0, 1], to optical density
    ``OD = -ln(RGB)`` (RGB floored at 1/255), deconvolved into stain amounts with scikit-image's H&E-DAB stain vectors
    (``skimage.color.hed_from_rgb``), each stain amount ``c`` becomes ``c * alpha + beta`` with ``alpha`` drawn from
    U(1 - ``sigma``, 1 + ``sigma``) and ``beta`` from U(-``bias``, ``bias``) per stain, and the result goes back
    through ``skimage.color.rgb_from_hed`` to RGB (clipped to [0, 1]) and the same normalisation. ``alpha = 1``,
    ``beta = 0`` returns the image (up to the 1/255 floor). It is the HED augmentation of Tellez et al. (Medical Image
    Analysis 58, 2019), in natural-log OD units (scikit-image's ``rgb2hed`` divides them by ln(10^6)).

    In stage 2 it makes the student learn the teacher's clean-image maps from stain-shifted copies (a noisy student,
    Xie et al., CVPR 2020): targets stay the teacher's, so the student has to find the tumour by what does not
    change with the stain. Draws come from ``self.R`` (reseeded per epoch by ``custom.handlers.EpochSeedHandler``).

    Args:
        keys: batch keys of (B, 3, rows, cols) normalised RGB images, e.g. ``"image"`` (never masks or maps).
        sigma: half-width of the multiplicative draw, in [0, 1).
        bias: half-width of the additive draw, in OD units (>= 0).
        prob: probability that an image is jittered.
        mean: per-channel mean the images were normalised with (RGB in [0, 1]).
        std: per-channel standard deviation the images were normalised with.
        allow_missing_keys: skip listed keys the batch lacks.
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        sigma: float = 0.2,
        bias: float = 0.1,
        prob: float = 1.0,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if not 0.0 <= sigma < 1.0:
            raise ValueError(f"sigma must lie in [0, 1), got {sigma}")
        if bias < 0.0:
            raise ValueError(f"bias must be >= 0, got {bias}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need three channels and a positive std, got {mean} and {std}")
        self.sigma = float(sigma)
        self.bias = float(bias)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._alpha = np.ones((0, 3))
        self._beta = np.zeros((0, 3))

    def randomize(self, batch_size: int) -> None:
        """Draw each image's per-stain scale and shift (1 and 0 for the images the ``prob`` draw leaves alone)."""
        chosen = self.R.random_sample(batch_size) < self.prob
        alpha = self.R.uniform(1.0 - self.sigma, 1.0 + self.sigma, (batch_size, 3))
        beta = self.R.uniform(-self.bias, self.bias, (batch_size, 3))
        self._alpha = np.where(chosen[:, None], alpha, 1.0)
        self._beta = np.where(chosen[:, None], beta, 0.0)

    def _apply(self, batch: torch.Tensor) -> torch.Tensor:
        """``batch`` with the drawn stain scales and shifts."""
        return self.jitter(batch, self._alpha, self._beta)

    def jitter(self, batch: torch.Tensor, alpha: np.ndarray, beta: np.ndarray) -> torch.Tensor:
        """``batch`` (normalised (B, 3, rows, cols)) with stain amounts ``c * alpha + beta``; alpha, beta (B, 3)."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (B, 3, rows, cols) RGB batch, got shape {tuple(batch.shape)}")
        if alpha.shape != (batch.shape[0], 3) or beta.shape != (batch.shape[0], 3):
            raise ValueError(f"{batch.shape[0]} images need (B, 3) draws, got {alpha.shape} and {beta.shape}")
        mean, std = self.mean.to(batch.device), self.std.to(batch.device)
        rgb = (batch.float() * std + mean).clamp(1.0 / 255.0, 1.0)
        stains = torch.einsum("bchw,cs->bshw", -torch.log(rgb), _matrix(hed_from_rgb, batch.device))
        scale = torch.as_tensor(alpha, dtype=torch.float32, device=batch.device).view(-1, 3, 1, 1)
        shift = torch.as_tensor(beta, dtype=torch.float32, device=batch.device).view(-1, 3, 1, 1)
        density = torch.einsum("bshw,sc->bchw", stains * scale + shift, _matrix(rgb_from_hed, batch.device))
        out = (torch.exp(-density).clamp(0.0, 1.0) - mean) / std
        return out.to(batch.dtype)


def _matrix(array: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """A scikit-image stain matrix as a float32 tensor on ``device``."""
    return torch.as_tensor(np.asarray(array), dtype=torch.float32, device=device)
