# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""MONAI Label's local datastore confined to the studies folder.

``LocalDatastore`` joins the ids and tags it is given to the studies folder as they come: ``PUT /datastore/image``
with ``image=../x`` writes next to the folder, ``DELETE`` with ``id=../x`` removes that file, and a label ``tag``
of ``../../y`` creates a folder outside. Here every id and tag must be one plain name (``check_name``: no separator,
no leading ``.``, no null byte or control character), an upload must have an extension the datastore lists (so
``datastore_v2.json`` or ``.lock`` cannot be overwritten), and an id that is not listed is a 404, before
``LocalDatastore`` touches the disk. Entries with such names left in ``datastore_v2.json`` by an earlier server are
dropped when it is read.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from fastapi import HTTPException
from monailabel.datastore.local import LocalDatastore

from .request_checks import check_name, name_problem

__all__ = ["StudiesDatastore"]

logger = logging.getLogger(__name__)


class StudiesDatastore(LocalDatastore):
    """A ``LocalDatastore`` whose every operation (images, labels, tags, infos, deletes) stays in the studies folder."""

    def extensions(self) -> list[str]:
        """The file extensions the datastore lists (``MONAI_LABEL_DATASTORE_FILE_EXT``), e.g. ``.tif``."""
        return [pattern.replace("*", "") for pattern in self._extensions]

    def _upload_ext(self, filename: str, key: str) -> str:
        """The extension of an uploaded file, if the datastore lists files with it; else a 400 naming ``key``."""
        _, ext = self._to_id(os.path.basename(filename))
        if ext not in self.extensions():
            raise HTTPException(400, f"'{key}' must be a file with one of the extensions {self.extensions()}, "
                                     f"got {ext or 'none'!r}")
        return ext

    def _listed(self, image_id: Any) -> str:
        """``image_id`` if it is a valid id the datastore lists; else a 400 (not a name) or a 404 (not listed)."""
        check_name(image_id, "image")
        if image_id not in self._datastore.objects:
            raise HTTPException(404, f"image {image_id!r} is not an image of the studies folder")
        return image_id

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Copy an upload into the studies folder under a checked id and a listed extension."""
        self._upload_ext(image_filename, "file")
        image_id = image_id or self._to_id(os.path.basename(image_filename))[0]
        check_name(image_id, "image")
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        """Delete a listed image and its labels (never a file the id only points at)."""
        super().remove_image(self._listed(image_id))

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any]) -> str:
        """Store a label of a listed image under ``labels/<tag>/`` of the studies folder."""
        self._listed(image_id)
        check_name(label_tag, "tag")
        self._upload_ext(label_filename, "label")
        return super().save_label(image_id, label_filename, label_tag, label_info)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        """Delete one stored label (ids and tags are names, so nothing outside ``labels/`` is reached)."""
        check_name(label_id, "id")
        check_name(label_tag, "tag")
        super().remove_label(label_id, label_tag)

    def get_image_uri(self, image_id: str) -> str:
        """The file of a listed image ('' when not listed, as ``LocalDatastore``); a path is refused."""
        return super().get_image_uri(check_name(image_id, "image"))

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        """The stored info of an image; a path is refused."""
        return super().get_image_info(check_name(image_id, "image"))

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        """The file of a stored label; paths as id or tag are refused."""
        return super().get_label_uri(check_name(label_id, "label"), check_name(label_tag, "tag"))

    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        """The stored info of a label; paths as id or tag are refused."""
        return super().get_label_info(check_name(label_id, "label"), check_name(label_tag, "tag"))

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        """Merge ``info`` into a listed image's info (a 404, not MONAI Label's 500, for an unknown id)."""
        super().update_image_info(self._listed(image_id), info)

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        """Merge ``info`` into a stored label's info (a 404 for an unknown label)."""
        if self._datastore.label(check_name(label_id, "label"), check_name(label_tag, "tag")) is None:
            raise HTTPException(404, f"no label {label_id!r} with tag {label_tag!r} in the studies folder")
        super().update_label_info(label_id, label_tag, info)

    def get_dataset_archive(self, limit_cases: int | None) -> str:
        """MONAI Label's ZIP of the labelled images; a 404 when there is none (its own check is an assert: a 500)."""
        if not self.datalist():
            raise HTTPException(404, "no image of the studies folder has a final label: there is nothing to archive")
        return super().get_dataset_archive(limit_cases)

    def _init_from_datastore_file(self, throw_exception: bool = False) -> None:
        """Read ``datastore_v2.json`` as ``LocalDatastore`` does, without (and rewritten without) the entries whose id
        or tag is not a name."""
        super()._init_from_datastore_file(throw_exception)
        if self._drop_unsafe_entries():
            self._update_datastore_file()

    def _reconcile_datastore(self) -> None:
        """Match the listing to the files as ``LocalDatastore`` does, then drop ids and tags that are not names."""
        super()._reconcile_datastore()
        if self._drop_unsafe_entries():
            self._update_datastore_file()

    def _drop_unsafe_entries(self) -> int:
        """Forget listed ids and label tags that are not plain names (left by an unconfined server); how many."""
        objects, dropped = self._datastore.objects, 0
        for image_id in [i for i in objects if name_problem(i)]:
            logger.warning("datastore entry %r is not listed: its id %s", image_id, name_problem(image_id))
            del objects[image_id]
            dropped += 1
        for image_id, obj in objects.items():
            for tag in [t for t in obj.labels if name_problem(t)]:
                logger.warning("label tag %r of %r is not listed: it %s", tag, image_id, name_problem(tag))
                del obj.labels[tag]
                dropped += 1
        return dropped
