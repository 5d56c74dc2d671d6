# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Checks of every MONAI Label request before its route runs: a 4xx with the reason instead of a 500 or a write
outside the studies folder.

MONAI Label's routes parse some fields themselves and crash on bad ones (``json.loads`` of ``wsi``, ``params`` and
``info``; pydantic on floats, NaN or ``1e308`` in ``wsi``; a null byte in a path): a 500 that says nothing. Some
routes reach past the studies folder whatever the ids (``PUT``/``DELETE /model/{model}`` replace or move the served
weights, ``/session`` stores uploads in the session folder) or start tasks the app does not have (``/scoring``,
``/batch``): they are refused (``REFUSED``). A training request (``POST /train/{model}``) must name a model the app
trains, run in the background (``run_sync`` would block the server for the whole training) and carry only known,
bounded parameters (``check_train_params``); the app can then refuse it too (no corrections to learn from).

Every route except ``/``, ``/static`` and ``/auth`` depends on MONAI Label's ``get_current_user`` (through its RBAC
checks), so ``install`` overrides that dependency (FastAPI's ``dependency_overrides``, read at every request) with
``checked_user``: MONAI Label's authentication, then ``check_request``. The datastore applies the same name rules
again (``StudiesDatastore``).
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable, Collection, Mapping
from pathlib import PurePath
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from monailabel.config import settings
from monailabel.endpoints.user.auth import User, get_current_user, oauth2_scheme
from starlette.datastructures import FormData, UploadFile

from .request_checks import check_name, check_train_params, name_problem

__all__ = ["ID_QUERY_KEYS", "JSON_FORM_KEYS", "TrainCheck", "check_request", "check_train", "check_wsi", "install",
           "json_object"]

ID_QUERY_KEYS = ("image", "id", "label", "tag")
"""Query parameters that MONAI Label joins to the studies folder (image and label ids, label tags)."""
JSON_FORM_KEYS = ("params", "info")
"""Form fields that MONAI Label reads with ``json.loads`` and uses as a dict."""
WSI_INTS, WSI_PAIRS = ("level", "min_poly_area"), ("location", "size", "tile_size")
"""Fields of the ``wsi`` form that MONAI Label's ``WSIInput`` types as an int and as a sequence of ints."""
MAX_INT = 2**31 - 1
"""Largest integer accepted in ``wsi``: far past any slide, and a bound that MONAI Label's pydantic model parses."""
REFUSED = (
    ("PUT", "/model/", 403, "this server does not replace the weights it serves: retrain, then restart it"),
    ("DELETE", "/model/", 403, "this server does not delete the weights it serves"),
    ("*", "/session/", 403, "sessions are not used by this app: ask for an image of the studies folder by its id"),
    ("POST", "/scoring/", 403, "this app has no scoring methods"),
    ("POST", "/batch/infer/", 403, "batch inference is not served (MONAI Label's fails on a CPU): run the bundle's "
                                   "inference on the studies folder instead (bundle/configs/inference.json)"),
    ("*", "/proxy/", 404, "there is no DICOMweb server behind this app"),
)
"""(method, route prefix, status, reason) of the routes this app does not serve: they write or remove files outside
the studies folder (weights, sessions), start processes for tasks the app does not have, or fail with a 500."""
FALSE_WORDS = ("", "false", "0", "off", "no", "f", "n")
"""Query values FastAPI reads as a false bool."""
TrainCheck = Callable[[str, dict], None]
"""The app's own check of a train request (model, checked parameters): raises an ``HTTPException`` to refuse it."""


def _finite(text: str) -> float:
    """A JSON number as a float, refusing the ones Python reads as infinite (``1e400``)."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is not a finite number")
    return value


def _no_constant(name: str) -> None:
    """Refuse ``NaN`` and ``Infinity``, which Python's JSON reader accepts and JSON does not define."""
    raise ValueError(f"{name} is not a JSON number")


def json_object(text: Any, key: str) -> dict:
    """The JSON object in form field ``key``, or a 400 that names the field and the problem."""
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite) if isinstance(text, str) else text
    except ValueError as err:
        raise HTTPException(400, f"'{key}' is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise HTTPException(400, f"'{key}' must be a JSON object, got {type(value).__name__}")
    return value


def _is_int(value: Any) -> bool:
    """An integer (not a bool, not a float such as 256.0) small enough for MONAI Label's model."""
    return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= MAX_INT


def check_wsi(text: Any) -> dict:
    """The ``wsi`` form of ``/infer/wsi_v2`` as MONAI Label's ``WSIInput`` can take it, or a 400 naming the field."""
    wsi = json_object(text, "wsi")
    for key in WSI_INTS:
        if key in wsi and not _is_int(wsi[key]):
            raise HTTPException(400, f"'wsi.{key}' must be an integer, got {wsi[key]!r}")
    for key in WSI_PAIRS:
        value = wsi.get(key, [0, 0])
        if not (isinstance(value, list) and len(value) == 2 and all(_is_int(v) for v in value)):
            raise HTTPException(400, f"'wsi.{key}' must be two integers below {MAX_INT + 1}, got {value!r}")
    if not isinstance(wsi.get("params", {}), dict):
        raise HTTPException(400, f"'wsi.params' must be a JSON object, got {wsi['params']!r}")
    return wsi


def _check_upload(upload: UploadFile, key: str, infer: bool) -> None:
    """Uploads to ``/infer`` are refused (only studies images are served); others need a file name MONAI Label can
    store (it builds a temporary file's suffix from it: a null byte there is a 500)."""
    if infer:
        raise HTTPException(400, f"'{key}': uploads are not inferred; put the image in the studies folder and send "
                                 "its id as 'image'")
    name = PurePath(upload.filename or "").name
    problem = name_problem(name) if name else ""
    if problem:
        raise HTTPException(400, f"'{key}' has the file name {upload.filename!r}, which {problem}")


def _route_path(request: Request) -> str:
    """The matched route's path template (``/infer/{model}``), without MONAI Label's API prefix."""
    route = request.scope.get("route")
    path = getattr(route, "path", request.url.path)
    prefix = settings.MONAI_LABEL_API_STR
    return path[len(prefix):] if prefix and path.startswith(prefix) else path


async def _form(request: Request) -> FormData:
    """The request's form (already parsed and cached by FastAPI for routes with form fields), else empty."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return await request.form()
    return FormData()


def _check_route(method: str, path: str, params: Mapping[str, Any], tasks: Mapping[str, Collection[str]]) -> None:
    """A 403 or 404 for a route this app does not serve, or a model or strategy it does not have."""
    for refused_method, prefix, status, reason in REFUSED:
        if refused_method in ("*", method) and path.startswith(prefix):
            raise HTTPException(status, reason)
    for key, names in tasks.items():
        if key in params and params[key] not in names:
            raise HTTPException(404, f"no {key} {params[key]!r}; this server has {sorted(names)}")


async def check_train(request: Request, trainers: Collection[str], app_check: TrainCheck | None = None) -> None:
    """A ``POST /train/...`` the app can run in the background with checked parameters, or a 4xx saying why."""
    if _route_path(request) != "/train/{model}":
        raise HTTPException(400, f"name the model to train: POST /train/<model>, one of {sorted(trainers)}")
    model = request.path_params.get("model")
    if model not in trainers:
        reason = f"this server trains {sorted(trainers)}" if trainers else \
            "this server does not train (it was started with MONAI_LABEL_TASKS_TRAIN=false)"
        raise HTTPException(404, f"no trainer for model {model!r}: {reason}")
    if request.query_params.get("run_sync", "false").lower() not in FALSE_WORDS:
        raise HTTPException(400, "'run_sync': training runs in the background (it would stop the server from "
                                 "answering until it ends); follow it with GET /train/")
    body = await request.body()
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(400, "'params': the body must be a UTF-8 JSON object") from None
    params = check_train_params(json_object(text, "params") if text.strip() else {})
    if app_check is not None:
        app_check(model, params)


async def check_request(
    request: Request, tasks: Mapping[str, Collection[str]], trainers: Collection[str] = (),
    train_check: TrainCheck | None = None,
) -> None:
    """Refuse, with a 4xx that says why, what MONAI Label would answer with a 500 or let reach outside the studies.

    ``tasks`` maps route parameters to the names the app serves, e.g. ``{"model": {"tumour"}}``; ``trainers`` are
    the models it trains and ``train_check`` its own check of a train request (see ``check_train``).
    """
    path, method, query = _route_path(request), request.method, request.query_params
    _check_route(method, path, request.path_params, tasks)
    if method == "POST" and path.startswith("/train/"):
        await check_train(request, trainers, train_check)
    for key in ID_QUERY_KEYS:
        if key in query and (query[key] or key != "image"):
            check_name(query[key], key)
    infer = path.startswith("/infer/")
    if infer and query.get("session_id"):
        raise HTTPException(400, "'session_id': sessions are not used by this app; send an image id as 'image'")
    if infer and query.get("output") == "dicom_seg":
        raise HTTPException(400, "'output' dicom_seg needs a DICOMweb datastore; ask for 'image' or 'json'")
    form, parsed = await _form(request), {}
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            _check_upload(value, key, infer)
        elif key in JSON_FORM_KEYS:
            parsed[key] = json_object(value, key)
        elif key == "wsi":
            parsed[key] = check_wsi(value).get("params", {})
    named = [query.get("image")] + [fields.get("image") for fields in parsed.values()]
    if infer and not any(named):
        raise HTTPException(400, "'image' is required: the id of an image of the studies folder")


def install(
    tasks: Mapping[str, Collection[str]], trainers: Collection[str] = (), train_check: TrainCheck | None = None
) -> bool:
    """Check every request of the running MONAI Label server (``monailabel.app``) against the app's ``tasks``,
    ``trainers`` and ``train_check`` (see ``check_request``); False when there is none (the app was built by a
    script, a test or MONAI Label's training process, not by the server)."""
    server = sys.modules.get("monailabel.app")
    api: FastAPI | None = getattr(server, "app", None)
    if api is None:
        return False
    names = {key: frozenset(values) for key, values in tasks.items()}
    trained = frozenset(trainers)

    async def checked_user(
        request: Request, token: str = Depends(oauth2_scheme) if settings.MONAI_LABEL_AUTH_ENABLE else ""
    ) -> User:
        """MONAI Label's user of the request (its own authentication first), once the request passed the checks."""
        user = await get_current_user(token)
        await check_request(request, names, trained, train_check)
        return user

    api.dependency_overrides[get_current_user] = checked_user
    return True
