"""Datalists: the lists of dicts that MONAI datasets consume, built from a patch folder or a slide list file.

Patch-folder layout (the reference method's)::

    root/{split}/pos/*   images with tumour (label 1)
    root/{split}/neg/*   images without tumour (label 0)
    root/{split}/gt/*    a mask for each pos image, matched by file stem (not by sort order)

Slide lists (CSV, or JSON as a list of dicts or MONAI-style ``{"training": [...]}``) have the columns ``slide``
and ``label`` and optionally ``mask`` (a pyramidal mask TIFF) and ``annotation`` (an ASAP XML). Relative paths are
relative to the list's folder. Labels are strict: 0, 1, "0", "1" or Camelyon16's "normal" / "tumor"
(case-insensitive); anything else is an error naming the row.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from custom.errors import InputError, MissingInputError

__all__ = [
    "IMAGE_SUFFIXES", "SPLIT_MODES", "EBHI_GROUP_PATTERN", "patch_folder_datalist", "load_slide_datalist",
    "assign_groups", "split_train_val",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_LABELS = {"0": 0, "1": 1, "normal": 0, "tumor": 1}
SPLITS = ("train", "test")
_SLIDE_PATH_KEYS = ("slide", "mask", "annotation")
SPLIT_MODES = ("auto", "group", "label-stratified", "random")
# EBHI-Seg file names start with the patient id ("GT2001837-1-400-001"); the benign lesions add a type prefix
# ("low-grade_GT2001804-1-400-001"), which is skipped so that one patient's images form one group.
EBHI_GROUP_PATTERN = r"^(?:[A-Za-z-]+_)?([^_-]+)-"


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """Map file stem -> image path in one folder, refusing two files that share a stem (their names would clash)."""
    found: dict[str, Path] = {}
    if not folder.is_dir():
        return found
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in found:
            raise InputError(f"two images share the stem {path.stem!r}: {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


def patch_folder_datalist(
    root: str | os.PathLike, split: str, require_masks: bool | None = None, group_pattern: str | None = None
) -> list[dict]:
    """List ``{"image", "label", "mask", "name", "group"}`` items of one split; masks are matched to pos images by stem.

    ``require_masks`` (default: True only for the "test" split, which is scored against masks) makes a pos image
    without a gt file an error; otherwise its mask is None, as training uses only image-level labels.
    Negatives have mask None (all-zero by definition). A gt file without a pos image is warned about and ignored.
    ``name`` is the file stem, prefixed ``pos_`` / ``neg_`` when both folders hold that stem (EBHI-Seg does), so
    names stay unique for output files. ``group`` (the patient, for validation splits that keep patients apart) is
    the first capture group of ``group_pattern`` searched in the file stem, "" where it does not match (a string,
    so that batches collate).
    """
    folder = Path(root) / split
    if not folder.is_dir():
        raise MissingInputError(f"patch folder split not found: {folder}")
    require_masks = split == "test" if require_masks is None else require_masks
    pos, neg, gt = (_images_by_stem(folder / name) for name in ("pos", "neg", "gt"))
    if not pos and not neg:
        raise InputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder / 'pos'} or {folder / 'neg'}")
    if require_masks and (missing := sorted(pos.keys() - gt.keys())):
        raise InputError(f"{folder / 'pos'}: {len(missing)} image(s) have no mask in {folder / 'gt'}: {missing[:5]}")
    if orphans := sorted(gt.keys() - pos.keys()):
        warnings.warn(f"{folder / 'gt'}: {len(orphans)} mask(s) without a pos image are ignored: {orphans[:5]}")
    shared = pos.keys() & neg.keys()

    def name(folder_name: str, stem: str) -> str:
        return f"{folder_name}_{stem}" if stem in shared else stem

    items = [
        {"image": str(p), "label": 1, "mask": str(gt[s]) if s in gt else None, "name": name("pos", s)}
        for s, p in pos.items()
    ]
    items += [{"image": str(p), "label": 0, "mask": None, "name": name("neg", s)} for s, p in neg.items()]
    return assign_groups(items, group_pattern)


def assign_groups(items: list[dict], pattern: str | None) -> list[dict]:
    """Set each item's ``group`` from ``pattern`` over its image's file stem ("" where it does not match)."""
    regex = re.compile(pattern) if pattern else None
    for item in items:
        match = regex.search(Path(item["image"]).stem) if regex else None
        item["group"] = (match.group(1) if match.groups() else match.group(0)) if match else ""
    return items


def _read_rows(path: Path, key: str) -> list[tuple[str, dict]]:
    """Read (row description, raw dict) pairs from a CSV or JSON list, so errors can point at the row."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: spreadsheets save a byte-order mark
            reader = csv.DictReader(f)
            return [(f"{path} line {reader.line_num}", row) for row in reader]
    if path.suffix.lower() == ".json":
        try:
            content = json.loads(path.read_text(encoding="utf-8-sig"))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}: invalid JSON ({e})") from e
        if isinstance(content, dict):
            if key not in content:
                raise InputError(f"{path}: no {key!r} list in the JSON object (keys: {sorted(content)})")
            content = content[key]
        if not isinstance(content, list) or not all(isinstance(row, dict) for row in content):
            raise InputError(f"{path}: expected a list of objects (or {{{key!r}: [...]}})")
        return [(f"{path} entry {index}", row) for index, row in enumerate(content)]
    raise InputError(f"{path}: unknown slide list format {path.suffix!r}; use .csv or .json")


def _parse_label(value: object, where: str) -> int:
    """Map the accepted label spellings to 0/1; anything else (e.g. "2", "yes", "") is an error naming the row."""
    if isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    if isinstance(value, str) and value.strip().lower() in _LABELS:
        return _LABELS[value.strip().lower()]
    raise InputError(f"{where}: unknown label {value!r}; expected 0/1 or normal/tumor")


def _parse_split(value: object, where: str) -> str:
    """A row's split: "train" or "test" (an empty cell is "train"); a typo such as "tset" is an error, not a drop."""
    split = str(value if value is not None else "").strip().lower() or "train"
    if split not in SPLITS:
        raise InputError(f"{where}: unknown split {value!r}; expected one of {SPLITS} (empty means train)")
    return split


def load_slide_datalist(path: str | os.PathLike, key: str = "training") -> list[dict]:
    """Read a slide list into ``{"slide", "label", "mask", "annotation", "name", ...}`` items with absolute paths.

    Extra columns are kept as they are; empty ``mask`` / ``annotation`` cells become None. ``key`` picks the list of
    a MONAI-style JSON object. ``name`` is the slide's file stem, which must be unique. ``group`` (what validation
    splits keep apart) is the ``patient`` column where it is filled, else the slide's name.
    """
    path = Path(path)
    items, names = [], {}
    for where, row in _read_rows(path, key):
        if "slide" not in row or "label" not in row:
            missing = [column for column in ("slide", "label") if column not in row]
            raise InputError(f"{where}: missing column(s) {missing}")
        item = dict(row)
        item["label"] = _parse_label(row["label"], where)
        if "split" in row:
            item["split"] = _parse_split(row["split"], where)
        for column in _SLIDE_PATH_KEYS:
            value = row.get(column)
            if value in (None, "") and column != "slide":
                item[column] = None
                continue
            if not isinstance(value, str) or not value:
                raise InputError(f"{where}: {column!r} must be a path, got {value!r}")
            resolved = path.parent / value
            if not resolved.exists():
                raise MissingInputError(f"{where}: {column} file not found: {resolved}")
            item[column] = str(resolved)
        item["name"] = Path(item["slide"]).stem
        if item["name"] in names:
            raise InputError(f"{where}: slide name {item['name']!r} repeats {names[item['name']]}")
        names[item["name"]] = where
        item["group"] = str(row["patient"]).strip() if str(row.get("patient") or "").strip() else item["name"]
        items.append(item)
    return items


def split_train_val(
    items: Sequence[dict], val_fraction: float, seed: int = 0, by: str = "auto"
) -> tuple[list[dict], list[dict]]:
    """Carve a validation split out of training items, reproducibly for a seed, keeping the input order in each part.

    ``by="group"`` keeps every ``group`` (patient or slide) on one side, so validation measures unseen patients:
    groups are stratified by label (a group with any positive counts as positive) and drawn in a seeded order until
    each stratum's validation part holds ``round(val_fraction * images)`` images (at least one group when the
    stratum has two or more, never all of them). ``by="label-stratified"`` does the same per image,
    ``by="random"`` per image ignoring labels. ``by="auto"`` (the default) groups whenever every item has a group
    and some group holds two or more images, else splits per image. The log says how many went to each side.
    Only ever pass training items: the test split is not to be touched by model selection.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if by not in SPLIT_MODES:
        raise InputError(f"unknown split mode {by!r}; expected one of {SPLIT_MODES}")
    if by == "auto":
        by = "group" if _groups_found(items) else "label-stratified"
    if by == "group" and not all(item.get("group") for item in items):
        missing = [item.get("name", item.get("image")) for item in items if not item.get("group")]
        raise InputError(
            f"split by group: {len(missing)} item(s) have no group (e.g. {missing[:3]}); check group_pattern"
        )
    units = _units(items, by)
    rng = np.random.default_rng(seed)
    val_indices: set[int] = set()
    for stratum in _strata(items, units, by):
        target = round(val_fraction * sum(len(units[u]) for u in stratum))
        if val_fraction > 0:
            target = max(target, 1)
        taken = 0
        for position, unit in enumerate(rng.permutation(len(stratum))):
            if taken >= target or position == len(stratum) - 1:  # never the whole stratum
                break
            val_indices.update(units[stratum[unit]])
            taken += len(units[stratum[unit]])
    train = [item for index, item in enumerate(items) if index not in val_indices]
    val = [item for index, item in enumerate(items) if index in val_indices]
    _log_split(train, val, by)
    return train, val


def _groups_found(items: Sequence[dict]) -> bool:
    """Whether grouping means something: every item has a group and at least one group has two items."""
    groups = [item.get("group") for item in items]
    return bool(groups) and all(groups) and len(set(groups)) < len(groups)


def _units(items: Sequence[dict], by: str) -> dict[object, list[int]]:
    """What is drawn whole: item indices per group, or one index per item."""
    units: dict[object, list[int]] = {}
    for index, item in enumerate(items):
        units.setdefault(item["group"] if by == "group" else index, []).append(index)
    return units


def _strata(items: Sequence[dict], units: dict[object, list[int]], by: str) -> list[list[object]]:
    """Units per label stratum (a unit's label: 1 when it holds a positive), in a fixed order."""
    if by == "random":
        return [list(units)]
    strata: dict[int, list[object]] = {}
    for unit, indices in units.items():
        strata.setdefault(max(int(items[i]["label"]) for i in indices), []).append(unit)
    return [strata[label] for label in sorted(strata)]


def _log_split(train: Sequence[dict], val: Sequence[dict], by: str) -> None:
    """Say how the validation split was made, with group and label counts for each side."""

    def describe(part: Sequence[dict]) -> str:
        pos = sum(int(item["label"]) for item in part)
        groups = f"{len({item['group'] for item in part})} groups, " if by == "group" else ""
        return f"{groups}{len(part)} images ({pos} positive, {len(part) - pos} negative)"

    logger.info(f"validation split by {by}: training {describe(train)}; validation {describe(val)}")
