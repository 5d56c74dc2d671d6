"""Mixed supervision: which training items carry a pixel mask used as a strong label next to the weak ones.

Weak-label training must never read a mask, so every training item that is not chosen here loses its ``mask``
(and ``annotation``) path: the masks the test and the reference ``mask_f1`` need stay on the validation and test
items only. A chosen item keeps its mask and gets ``strong`` True; stage 1 then adds a supervised Dice + CE term on
it (``custom.losses.MixedSupervisionLoss``) and stage 2 distils its mask instead of the teacher's pseudo-mask
(``custom.engines.DistillationTrainer``).

Strong labels come from two places:

- ``fraction`` of the training positives that have a mask (a patch folder's ``train/gt``, a slide list's
  ``mask``/``annotation``), drawn reproducibly for a seed: "weak + 5 % masks" is ``fraction=0.05``;
- a JSON list of ``{"image": ..., "mask": ...}`` items (paths relative to the file's folder), e.g. the regions a
  pathologist corrected in MONAI Label; each is a strong item whose label is 1 when its mask holds any tumour.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from custom.data.images import read_mask
from custom.errors import InputError, MissingInputError

__all__ = ["STRONG_KEY", "with_strong_labels", "read_strong_datalist"]

STRONG_KEY = "strong"
"""Item and batch key: True where the item's mask is a strong (pixel) label."""

_MASK_KEYS = ("mask", "annotation")

logger = logging.getLogger(__name__)


def with_strong_labels(
    items: Sequence[dict], fraction: float = 0.0, seed: int = 0, datalist: str | os.PathLike | None = None
) -> list[dict]:
    """Training items with ``strong`` set, masks kept only where they are strong labels, plus ``datalist``'s items.

    ``fraction`` of the positives with a mask is drawn with ``seed`` (at least one when ``fraction`` > 0 and any
    exists, all of them at 1.0); the input items are not modified.
    """
    if not 0.0 <= fraction <= 1.0:
        raise InputError(f"strong_fraction must be in [0, 1], got {fraction}")
    candidates = [i for i, item in enumerate(items) if int(item["label"]) == 1 and _has_mask(item)]
    n = min(len(candidates), max(1, round(fraction * len(candidates)))) if fraction > 0 else 0
    chosen = set(np.random.default_rng(seed).permutation(candidates)[:n].tolist()) if n else set()
    out = []
    for index, item in enumerate(items):
        strong = index in chosen
        out.append({**item, **({} if strong else dict.fromkeys(item.keys() & set(_MASK_KEYS))), STRONG_KEY: strong})
    extra = read_strong_datalist(datalist) if datalist else []
    _check_unique_names(out, extra, datalist)
    if fraction > 0 or extra:
        positives = sum(int(item["label"]) for item in items)
        logger.info(
            "strong labels: masks of %d of %d training positives (%d with a mask, strong_fraction %g)%s; "
            "every other training item is weak (its mask is not read)",
            n, positives, len(candidates), fraction, f", plus {len(extra)} item(s) of {datalist}" if extra else "",
        )
    return out + extra


def read_strong_datalist(path: str | os.PathLike) -> list[dict]:
    """Items of a JSON list of ``{"image", "mask"}`` (relative to its folder), checked and labelled from the masks."""
    path = Path(path)
    if not path.is_file():
        raise MissingInputError(f"strong label list not found: {path}")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise InputError(f"{path}: expected a JSON list of {{'image': ..., 'mask': ...}} objects")
    items = []
    for index, row in enumerate(rows):
        where = f"{path} entry {index}"
        for key in ("image", "mask"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise InputError(f"{where}: {key!r} must be a path, got {row.get(key)!r}")
        files = {key: path.parent / row[key] for key in ("image", "mask")}
        for key, file in files.items():
            if not file.is_file():
                raise MissingInputError(f"{where}: {key} file not found: {file}")
        label = int(bool(read_mask(files["mask"]).any()))
        name = str(row.get("name") or f"strong_{files['image'].stem}")
        items.append(
            {"image": str(files["image"]), "mask": str(files["mask"]), "label": label, "name": name,
             "group": str(row.get("group", "")), STRONG_KEY: True}
        )
    return items


def _has_mask(item: dict) -> bool:
    """Whether an item has a pixel mask of its own (a mask file or an annotation)."""
    return any(item.get(key) for key in _MASK_KEYS)


def _check_unique_names(items: Sequence[dict], extra: Sequence[dict], source: object) -> None:
    """Refuse strong items whose names clash with each other or with training items (they name cache files)."""
    seen = {item["name"] for item in items}
    for item in extra:
        if item["name"] in seen:
            raise InputError(f"{source}: item name {item['name']!r} is used twice; give the entry a unique 'name'")
        seen.add(item["name"])
