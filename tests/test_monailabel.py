# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label app (scripts/monailabel_app) run as a real server on loopback, answers checked against the network.

The network is the bundle's ``DWSMIL`` at the CPU width with a random trunk; its 1x1 side convolutions are set to a
linear probe of "purple vs white" features, so its map sits far from the threshold except at tissue edges and a
wrong crop, offset, scale or tile seam shows as a drop of IoU. The reference is one forward pass over the pixels
read with tifffile (an independent reader), thresholded as the bundle does.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from skimage.draw import polygon as fill_polygon
from skimage.io import imread, imsave

pytest.importorskip("monailabel", reason="MONAI Label is not installed: run `bash scripts/install_monailabel.sh`")
httpx = pytest.importorskip("httpx", reason="httpx comes with MONAI Label's dependencies")
psutil = pytest.importorskip("psutil", reason="psutil comes with MONAI Label's dependencies")

from pyramid_files import write_pyramid  # noqa: E402

from custom.data.synthetic import SyntheticSpec, generate_dataset  # noqa: E402
from custom.data.tissue import detect_tissue  # noqa: E402
from custom.inference import PlainImage  # noqa: E402
from custom.networks import DWSMIL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 0.25  # network_width of bundle/configs/cpu_inference.json, which the server is started with
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # bundle/configs/inference.json
PURPLE, WHITE = (150, 60, 170), (245, 245, 245)
SLIDE_HW = (1536, 2048)
START_TIMEOUT_S = 120


def _slide_pixels() -> np.ndarray:
    """White glass with a purple disk and a white hole in it: outlines, a hole, and a lot of background."""
    rows, cols = np.mgrid[0 : SLIDE_HW[0], 0 : SLIDE_HW[1]]
    image = np.full((*SLIDE_HW, 3), WHITE, np.uint8)
    disk = (rows - 760) ** 2 + (cols - 1000) ** 2 < 560**2
    hole = (rows - 700) ** 2 + (cols - 1050) ** 2 < 150**2
    image[disk & ~hole] = PURPLE
    return image


def _normalise(pixels: np.ndarray) -> torch.Tensor:
    """The bundle's preprocessing of an RGB uint8 array, as a (1, 3, H, W) batch."""
    scaled = (pixels.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(scaled.astype(np.float32)).permute(2, 0, 1)[None]


def _probe_network() -> DWSMIL:
    """A random-trunk DWSMIL whose side convs separate purple (logit +4) from white (logit -4)."""
    torch.manual_seed(0)
    network = DWSMIL(width=WIDTH).eval()
    purple, white = (_normalise(np.full((64, 64, 3), c, np.uint8)) for c in (PURPLE, WHITE))
    with torch.no_grad():
        for block, side in zip(network.blocks, network.side_convs):
            purple, white = block(purple), block(white)
            fp, fw = purple.mean((0, 2, 3)), white.mean((0, 2, 3))
            direction = (fp - fw) / (fp - fw).pow(2).sum()
            side.weight.copy_(8.0 * direction.view(1, -1, 1, 1))
            side.bias.fill_(-8.0 * float(direction @ (fp + fw) / 2))
    return network


def _direct_mask(network: DWSMIL, pixels: np.ndarray) -> np.ndarray:
    """The fused map of one forward pass over ``pixels``, thresholded at 0.5 (bundle threshold)."""
    with torch.no_grad():
        return network(_normalise(pixels))[0, -1].numpy() >= 0.5


def _rasterise(contours: dict[str, list], origin_xy: tuple[int, int], shape_hw: tuple[int, int]) -> np.ndarray:
    """Tumour outlines minus their exclusion holes, as a mask of the region at ``origin_xy`` (level 0)."""
    mask = np.zeros(shape_hw, bool)
    for label, value in (("tumour", True), ("exclusion", False)):
        for points in contours.get(label, []):
            xy = np.asarray(points, float)[:, :2] - origin_xy
            rr, cc = fill_polygon(xy[:, 1], xy[:, 0], shape_hw)
            mask[rr, cc] = value
    return mask


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks."""
    return float((a & b).sum() / max((a | b).sum(), 1))


def _free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``monailabel start_server`` in a child process, with its log, stopped by ``stop`` (terminate, then kill)."""

    def __init__(self, tmp: Path, studies: Path, model: Path, weak_data: Path) -> None:
        # the server writes into its app dir; what a server run in the checkout left there is not copied
        app = shutil.copytree(ROOT / "scripts" / "monailabel_app", tmp / "app",
                              ignore=shutil.ignore_patterns("train", "logs", "model", "bin", "__pycache__"))
        self.port, self.log = _free_port(), tmp / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
            "--host", "127.0.0.1", "--port", str(self.port), "--conf", "models", "tumour",
            "--conf", "configs", "inference.json,cpu_inference.json", "--conf", "ckpt_path", str(model),
            "--conf", "dataset_dir", str(weak_data),
        ]
        env = dict(os.environ, MONAI_LABEL_SESSION_PATH=str(tmp / "sessions"), MONAI_LABEL_TASKS_TRAIN="true",
                   OMP_NUM_THREADS="2")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp)

    def wait_ready(self) -> dict:
        """``/info/`` once it answers, or fail with the log's tail if the server dies or takes too long."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                return httpx.get(f"{self.url}/info/", timeout=2).json()
            except httpx.TransportError:
                time.sleep(0.5)
        pytest.fail(f"server did not answer /info/ within {START_TIMEOUT_S} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's output, for failure messages."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> int:
        """Terminate (Ctrl-C equivalent), kill after 20 s; the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


DECOYS = ("victim", "victim.png", "x.png", "y", "site/victim", "site/victim.png", "site/x.png",
          "site/labels/final/x.png")
"""Files around the studies folder (``root/site/studies``) where a traversing id or tag would land."""


def _decoys(root: Path) -> None:
    """Write the decoy files (and the served weights, ``root/model.pt``, are in the tree too)."""
    for name in DECOYS:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(f"decoy {name}".encode())


def _tree(root: Path, skip: Path) -> dict[str, str]:
    """Every path under ``root`` but ``skip``, with the SHA-256 of each file ('dir' for folders)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        if path == skip or skip in path.parents:
            continue
        tree[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return tree


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Studies (one pyramidal slide, one PNG) amid decoy files, the probe model, the weak-label data ``/train`` uses
    (the bundle tests' tiny synthetic set), and a running server; stopped even on failure."""
    tmp = tmp_path_factory.mktemp("monailabel")
    root = tmp / "root"
    studies = root / "site" / "studies"
    studies.mkdir(parents=True)
    _decoys(root)
    pixels = _slide_pixels()
    write_pyramid(studies / "slide_a.tif", pixels, levels=3, tile=256)
    imsave(studies / "patch_b.png", pixels[300:556, 500:756], check_contrast=False)
    (tmp / "outside.png").write_bytes((studies / "patch_b.png").read_bytes())
    network = _probe_network()
    torch.save(network.state_dict(), root / "model.pt")
    weak_data = tmp / "weak"
    generate_dataset(weak_data, SyntheticSpec(n_slides=4, size=1024, patches_per_slide=8, patch_size=64,
                                              test_fraction=0.5))
    server = Server(tmp, studies, root / "model.pt", weak_data)
    try:
        info = server.wait_ready()
        yield {"server": server, "info": info, "network": network, "studies": studies, "tmp": tmp, "root": root}
    finally:
        server.stop()


def _region(setup: dict, location_xy, size_wh, tile_size=(512, 512), output="dsa", level=0) -> httpx.Response:
    """POST /infer/wsi_v2/tumour for a region of slide_a."""
    wsi = {"level": level, "location": list(location_xy), "size": list(size_wh), "tile_size": list(tile_size)}
    return httpx.post(f"{setup['server'].url}/infer/wsi_v2/tumour", params={"image": "slide_a", "output": output},
                      data={"wsi": json.dumps(wsi)}, timeout=120)


def _dsa_contours(response: httpx.Response) -> dict[str, list]:
    """DSA JSON elements grouped by label."""
    contours: dict[str, list] = {}
    for element in response.json()["elements"]:
        assert element["type"] == "polyline" and element["closed"]
        contours.setdefault(element["group"], []).append(element["points"])
    return contours


def _asap_contours(response: httpx.Response) -> dict[str, list]:
    """ASAP XML polygons grouped by ``PartOfGroup``."""
    contours: dict[str, list] = {}
    for annotation in ET.fromstring(response.content).iter("Annotation"):
        points = [(float(c.get("X")), float(c.get("Y"))) for c in annotation.iter("Coordinate")]
        contours.setdefault(annotation.get("PartOfGroup"), []).append(points)
    return contours


def _reference(setup: dict, location_xy, size_wh) -> np.ndarray:
    """The direct mask of the region's level-0 pixels read with tifffile."""
    (x, y), (w, h) = location_xy, size_wh
    pixels = tifffile.imread(setup["studies"] / "slide_a.tif", key=0)[y : y + h, x : x + w]
    return _direct_mask(setup["network"], pixels)


def test_info_lists_a_pathology_model(setup):
    info = setup["info"]
    assert info["pathology"] is True
    assert info["models"]["tumour"]["pathology"] is True
    assert info["models"]["tumour"]["labels"] == {"tumour": 1}
    assert info["datastore"]["total"] == 2


def test_2d_mask_matches_the_network(setup):
    response = httpx.post(f"{setup['server'].url}/infer/tumour", params={"image": "patch_b", "output": "image"},
                          timeout=120)
    assert response.status_code == 200, response.text
    mask_file = setup["tmp"] / "answer.png"
    mask_file.write_bytes(response.content)
    mask = imread(mask_file)
    assert mask.shape == (256, 256) and set(np.unique(mask)) == {0, 1}
    direct = _direct_mask(setup["network"], imread(setup["studies"] / "patch_b.png")[..., :3])
    assert 0.1 < direct.mean() < 0.9  # the patch holds both tissue and glass
    assert _iou(mask == 1, direct) > 0.95


@pytest.mark.parametrize("output", ["dsa", "asap"])
def test_region_contours_match_the_network(setup, output):
    location, size = (300, 0), (1280, 1024)  # 3 x 2 tiles of 512: outlines cross seams, the hole lies in one tile
    response = _region(setup, location, size, output=output)
    assert response.status_code == 200, response.text
    contours = _dsa_contours(response) if output == "dsa" else _asap_contours(response)
    assert contours.get("exclusion"), "the hole of the disk must come back as an exclusion contour"
    reference = _reference(setup, location, size)
    assert 0.2 < reference.mean() < 0.8
    assert _iou(_rasterise(contours, location, size[::-1]), reference) > 0.95


def test_region_at_level_1_is_placed_in_level_0_pixels(setup):
    location, size = (200, 100), (640, 512)  # level-1 size: covers level-0 [200, 1480) x [100, 1124)
    response = _region(setup, location, size, tile_size=(320, 256), level=1)
    assert response.status_code == 200, response.text
    reference = _reference(setup, location, (size[0] * 2, size[1] * 2))
    mask = _rasterise(_dsa_contours(response), location, reference.shape)
    assert _iou(mask, reference) > 0.95


def test_region_not_a_multiple_of_the_tile_size_is_served(setup):
    location, size = (200, 100), (300, 300)  # level 1: tiles of 256 and of the 44 pixels left, both ways
    tiles = _region(setup, location, size, tile_size=(256, 256), level=1, output="json")
    assert tiles.status_code == 200, tiles.text
    assert [(a["annotation"]["location"], a["annotation"]["size"]) for a in tiles.json()["annotations"]] == [
        ([200, 100], [256, 256]), ([712, 100], [44, 256]), ([200, 612], [256, 44]), ([712, 612], [44, 44])]
    response = _region(setup, location, size, tile_size=(256, 256), level=1)
    assert response.status_code == 200, response.text
    (x, y), (w, h) = location, size  # the network's map of the level-1 pixels, shown at level 0
    pixels = tifffile.imread(setup["studies"] / "slide_a.tif", key=1)[y // 2 : y // 2 + h, x // 2 : x // 2 + w]
    reference = _direct_mask(setup["network"], pixels).repeat(2, axis=0).repeat(2, axis=1)
    assert 0.2 < reference.mean() < 0.9 and reference[512:, 512:].all()  # the 44 x 44 corner tile is all tumour
    assert _iou(_rasterise(_dsa_contours(response), location, reference.shape), reference) > 0.95


def test_region_past_the_slide_edge_is_clipped_and_served(setup):
    location, size = (1000, 0), (1100, 512)  # the slide is 2048 wide: 1048 columns are left, the last tile is 24
    response = _region(setup, location, size, tile_size=(512, 512))
    assert response.status_code == 200, response.text
    assert response.json()["name"].endswith("for [1000, 0, 1048, 512]")
    reference = _reference(setup, location, (1048, 512))
    assert 0.2 < reference.mean() < 0.9
    assert _iou(_rasterise(_dsa_contours(response), location, reference.shape), reference) > 0.95


def test_eight_concurrent_regions_are_all_right(setup):
    locations = [(100 + 200 * i, 150 + 100 * (i % 4)) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda xy: _region(setup, xy, (384, 384)), locations))
    for location, response in zip(locations, responses):
        assert response.status_code == 200, response.text
        reference = _reference(setup, location, (384, 384))
        mask = _rasterise(_dsa_contours(response), location, (384, 384))
        assert _iou(mask, reference) > 0.95 or (reference.sum() == 0 and mask.sum() == 0), location


@pytest.mark.parametrize(
    "wsi, reason",
    [
        ({"location": [-5, 0], "size": [256, 256]}, "must lie on the slide"),
        ({"location": [0, 0], "size": [0, 256]}, "must be positive"),
        ({"location": [0, 0], "size": [256, -1]}, "must be positive"),
        ({"location": [5000, 0], "size": [256, 256]}, "must lie on the slide"),
        ({"location": [0, 0], "size": [100000, 100000]}, "larger than the limit"),
        ({"location": [0, 0], "size": [256, 256], "level": 9}, "'level' must be"),
        ({"location": [0, 0], "size": [2048, 2048], "tile_size": [1, 1]}, "'tile_size' must be at least"),
        ({"location": [0, 0], "size": [256, 256], "params": {"location": ["a", 0]}}, "must be two integers"),
        ({"location": [0, 0], "size": [256, 256], "params": {"wsi_tiles": [{"location": [0, 0],
                                                                            "size": [10**6, 10**6]}]}}, None),
    ],
)
def test_bad_regions_get_a_400_with_a_reason(setup, wsi, reason):
    response = httpx.post(f"{setup['server'].url}/infer/wsi_v2/tumour", params={"image": "slide_a"},
                          data={"wsi": json.dumps(wsi)}, timeout=60)
    if reason is None:  # a client's own tile list is replaced by the checked one
        assert response.status_code == 200, response.text
        return
    assert response.status_code == 400, response.text
    assert reason in response.json()["detail"]


@pytest.mark.parametrize("image", ["../outside", "../outside.png", "/etc/passwd", "slide_a/../../outside", "listed"])
def test_images_outside_the_studies_or_named_by_path_are_refused(setup, image):
    paths = {"../outside.png": setup["tmp"] / "outside.png", "listed": setup["studies"] / "patch_b.png"}
    outside = str(paths.get(image, image))
    for endpoint, form in (("infer/tumour", {}), ("infer/wsi_v2/tumour", {"wsi": json.dumps({"size": [64, 64]})})):
        response = httpx.post(f"{setup['server'].url}/{endpoint}", params={"image": outside}, data=form, timeout=60)
        assert response.status_code == 400, (endpoint, response.text)
        assert response.json()["detail"].startswith("'image' must be a plain name of the studies folder (no path)")
    smuggled = httpx.post(f"{setup['server'].url}/infer/tumour", params={"image": "patch_b"},
                          data={"params": json.dumps({"image": outside})}, timeout=60)
    assert smuggled.status_code == 400 and "holds a path separator" in smuggled.json()["detail"]


def test_whole_slide_on_plain_2d_endpoint_is_refused(setup):
    response = httpx.post(f"{setup['server'].url}/infer/tumour", params={"image": "slide_a"}, timeout=60)
    assert response.status_code == 400 and "/infer/wsi_v2" in response.json()["detail"]


NAME = "must be a plain name of the studies folder (no path)"
JSON = {"content-type": "application/json"}


def _hostile_requests(setup: dict) -> list[tuple[str, str, dict, int, str]]:
    """(method, route, httpx keywords, status, a phrase of the reason) of traversing and malformed requests."""
    png = (setup["studies"] / "patch_b.png").read_bytes()
    listed = str(setup["studies"] / "patch_b.png")

    def upload(image, name="v.png", **kw):
        return dict(params={"image": image} if image is not None else {}, files={"file": (name, png)}, **kw)

    def label(image, tag):
        return dict(params={"image": image, "tag": tag}, files={"label": ("l.png", png)})

    def wsi(text, image="slide_a"):
        return dict(params={"image": image}, data={"wsi": text})

    def infer(image="patch_b", params=None, **kw):
        return dict(params=params or ({"image": image} if image is not None else {}), **kw)

    def train(params, **query):
        return dict(json=params, params=query)

    return [
        ("PUT", "/datastore/", upload("../victim"), 400, f"'image' {NAME}: '../victim' holds a path separator"),
        ("PUT", "/datastore/image", upload("../victim"), 400, "holds a path separator"),
        ("PUT", "/datastore/image", upload("../../x"), 400, "holds a path separator"),
        ("PUT", "/datastore/image", upload(str(setup["root"] / "x")), 400, "holds a path separator"),
        ("PUT", "/datastore/image", upload("..\\victim"), 400, "holds a path separator"),
        ("PUT", "/datastore/image", upload(".."), 400, "starts with '.'"),
        ("PUT", "/datastore/image", upload(".lock"), 400, "starts with '.'"),
        ("PUT", "/datastore/image", upload("slide\x00a"), 400, "holds a null byte"),
        ("PUT", "/datastore/image", upload("a\nb"), 400, "holds a control character"),
        ("PUT", "/datastore/image", upload("a\u202eb"), 400, "holds a control character"),
        ("PUT", "/datastore/image", upload("x" * 300), 400, "longer than 200"),
        ("PUT", "/datastore/image", upload("datastore_v2", "v.json"), 400, "'file' must be a file with one of"),
        ("PUT", "/datastore/image", upload("ok", data={"params": "{not json"}), 400, "'params' is not valid JSON"),
        ("PUT", "/datastore/image", upload("ok", data={"params": "[1]"}), 400, "'params' must be a JSON object"),
        ("DELETE", "/datastore/", dict(params={"id": "../victim"}), 400, f"'id' {NAME}"),
        ("DELETE", "/datastore/image", dict(params={"id": "../../x"}), 400, "holds a path separator"),
        ("DELETE", "/datastore/image", dict(params={"id": "victim"}), 404, "not an image of the studies folder"),
        ("PUT", "/datastore/label", label("slide_a", "../../../y"), 400, f"'tag' {NAME}"),
        ("PUT", "/datastore/label", label("slide_a", ".."), 400, "starts with '.'"),
        ("PUT", "/datastore/label", label("slide_a", "/tmp"), 400, "holds a path separator"),
        ("PUT", "/datastore/label", label("../victim", "final"), 400, f"'image' {NAME}"),
        ("PUT", "/datastore/label", label("victim", "final"), 404, "not an image of the studies folder"),
        ("DELETE", "/datastore/label", dict(params={"id": "../x", "tag": "final"}), 400, f"'id' {NAME}"),
        ("DELETE", "/datastore/label", dict(params={"id": "x", "tag": "../../labels/final"}), 400, f"'tag' {NAME}"),
        ("GET", "/datastore/image", dict(params={"image": "../victim"}), 400, f"'image' {NAME}"),
        ("GET", "/datastore/label", dict(params={"label": "../x", "tag": "final"}), 400, f"'label' {NAME}"),
        ("PUT", "/datastore/image/info", dict(params={"image": "../victim"}, data={"info": "{}"}), 400, NAME),
        ("PUT", "/datastore/image/info", dict(params={"image": "slide_a"}, data={"info": "NaN"}), 400,
         "'info' is not valid JSON: NaN is not a JSON number"),
        ("PUT", "/datastore/image/info", dict(params={"image": "victim"}, data={"info": "{}"}), 404, "not an image"),
        ("PUT", "/datastore/label/info", dict(params={"label": "slide_a", "tag": "../y"}, data={"info": "{}"}), 400,
         f"'tag' {NAME}"),
        ("PUT", "/datastore/label/info", dict(params={"label": "slide_a", "tag": "final"}, data={"info": "{}"}), 404,
         "no label 'slide_a' with tag 'final'"),
        ("GET", "/datastore/dataset", {}, 404, "there is nothing to archive"),
        ("PUT", "/model/tumour", dict(files={"file": ("m.pt", b"not weights")}), 403, "does not replace the weights"),
        ("DELETE", "/model/tumour", {}, 403, "does not delete the weights"),
        ("PUT", "/session/", dict(files={"files": ("s.png", png)}), 403, "sessions are not used"),
        ("POST", "/train/tumour", train({"stage1_epochs": 10**6}), 400, "'stage1_epochs' must be an integer in [1,"),
        ("POST", "/train/tumour", train({"stage2_epochs": 1.5}), 400, "'stage2_epochs' must be an integer"),
        ("POST", "/train/tumour", train({"max_epochs": True}), 400, "'max_epochs' must be an integer"),
        ("POST", "/train/tumour", train({"epochs": 1}), 400, "unknown train parameter(s) ['epochs']"),
        ("POST", "/train/tumour", train({"gpus": "0"}), 400, "unknown train parameter(s) ['gpus']"),
        ("POST", "/train/tumour", train({"learning_rate": 0}), 400, "'learning_rate' must be a number in (0.0, 1.0]"),
        ("POST", "/train/tumour", train({"strong_weight": "1"}), 400, "'strong_weight' must be a number"),
        ("POST", "/train/tumour", train({"strong_share": 1.0}), 400, "'strong_share' must be a number in [0.0, 1.0)"),
        ("POST", "/train/tumour", train({"strong_share": "x"}), 400, "'strong_share' must be a number in [0.0, 1.0)"),
        ("POST", "/train/tumour", train({"image_size": 100}), 400, "multiple of 8"),
        ("POST", "/train/tumour", train({"batch_size": 4, "train_batch_size": 8}), 400, "differ"),
        ("POST", "/train/tumour", dict(content=b'{"learning_rate": NaN}', headers=JSON), 400, "NaN is not a JSON"),
        ("POST", "/train/tumour", dict(json=[1]), 400, "'params' must be a JSON object"),
        ("POST", "/train/tumour", train({}, run_sync="true"), 400, "'run_sync': training runs in the background"),
        ("POST", "/train/other", train({}), 404, "no model 'other'"),
        ("POST", "/train/", train({}), 400, "name the model to train"),
        ("POST", "/train/tumour", train({"max_epochs": 1}), 409, "no image of the studies folder has a final label"),
        ("POST", "/activelearning/entropy", dict(json={"image": "../victim"}), 400, f"'image' {NAME}"),
        ("POST", "/activelearning/entropy", dict(json={"image": "victim"}), 404, "not an image of the studies"),
        ("POST", "/activelearning/entropy", dict(json={"image": "slide_a", "patch_size": [8, 8]}), 400,
         "'patch_size' must be at least 64"),
        ("POST", "/batch/infer/tumour", {}, 403, "batch inference is not served"),
        ("GET", "/proxy/dicom/x", {}, 404, "no DICOMweb server"),
        ("POST", "/activelearning/first", {}, 404, "no strategy 'first'"),
        ("POST", "/infer/tumour", infer("../victim"), 400, f"'image' {NAME}"),
        ("POST", "/infer/tumour", infer(listed), 400, f"'image' {NAME}"),
        ("POST", "/infer/tumour", infer(data={"params": json.dumps({"image": listed})}), 400, NAME),
        ("POST", "/infer/tumour", infer(data={"params": "[]"}), 400, "'params' must be a JSON object"),
        ("POST", "/infer/tumour", infer(data={"params": json.dumps({"model": "x"})}), 404, "no model 'x'"),
        ("POST", "/infer/tumour", infer(None), 400, "'image' is required"),
        ("POST", "/infer/tumour", infer(files={"file": ("u.png", png)}), 400, "uploads are not inferred"),
        ("POST", "/infer/tumour", infer(params={"session_id": "s1"}), 400, "sessions are not used"),
        ("POST", "/infer/other", infer(), 404, "no model 'other'"),
        ("POST", "/infer/tumour", infer(params={"image": "patch_b", "output": "dicom_seg"}), 400, "dicom_seg"),
        ("POST", "/infer/wsi_v2/tumour", wsi("{not json"), 400, "'wsi' is not valid JSON"),
        ("POST", "/infer/wsi_v2/tumour", wsi("[0, 0]"), 400, "'wsi' must be a JSON object"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"location": [0.5, 0], "size": [256, 256]}'), 400,
         "'wsi.location' must be two integers"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"location": [0, 0], "size": [256.0, 256]}'), 400, "'wsi.size'"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"location": [NaN, 0], "size": [256, 256]}'), 400,
         "NaN is not a JSON number"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"location": [0, 0], "size": [1e308, 256]}'), 400, "'wsi.size'"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"location": [0, 0], "size": [1e400, 256]}'), 400, "not a finite"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"location": [0, 0], "size": [256, 256], "level": 1.5}'), 400,
         "'wsi.level' must be an integer"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"location": [0, 99999999999], "size": [256, 256]}'), 400,
         "'wsi.location'"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"size": [256, 256], "params": [1]}'), 400, "'wsi.params' must be"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"size": [256, 256], "params": {"size": [1e308, 1]}}'), 400,
         "larger than the limit"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"size": [64, 64]}', "slide_a\x00"), 400, "holds a null byte"),
        ("POST", "/infer/wsi_v2/tumour", wsi('{"size": [64, 64], "params": {"image": "../../victim"}}'), 400, NAME),
    ]


def test_hostile_requests_get_a_4xx_and_touch_nothing_outside_the_studies(setup):
    url, root, studies = setup["server"].url, setup["root"], setup["studies"]
    before, names_before = _tree(root, studies), sorted(p.name for p in setup["tmp"].iterdir())
    studies_before = sorted(p.name for p in studies.iterdir())
    requests = _hostile_requests(setup)
    assert len(requests) >= 30
    with httpx.Client(base_url=url, timeout=60) as client:
        for method, route, kwargs, status, reason in requests:
            response = client.request(method, route, **kwargs)
            assert response.status_code == status, (method, route, kwargs, response.text)
            assert reason in response.json()["detail"], (method, route, kwargs, response.text)
        assert _tree(root, studies) == before
        assert sorted(p.name for p in setup["tmp"].iterdir()) == names_before
        assert sorted(p.name for p in studies.iterdir()) == studies_before
        datastore = client.get("/datastore/", params={"output": "all"}).json()
        assert sorted(datastore["objects"]) == ["patch_b", "slide_a"]
        assert all(not obj["labels"] for obj in datastore["objects"].values())
        # the server still serves: a region, and an upload that stays a study of the folder until it is deleted
        assert _region(setup, (300, 0), (512, 512)).status_code == 200
        png = (studies / "patch_b.png").read_bytes()
        added = client.put("/datastore/image", params={"image": "added"}, files={"file": ("a.png", png)})
        assert added.status_code == 200 and added.json() == {"image": "added"}
        assert (studies / "added.png").read_bytes() == png
        assert client.request("DELETE", "/datastore/image", params={"id": "added"}).status_code == 200
        assert not (studies / "added.png").exists()
    assert _tree(root, studies) == before


AL_HW = (256, 256)  # one window of the inferer (tile_size 256): the server's map is one forward pass, rounded to 1/255


def _probability(network: DWSMIL, pixels: np.ndarray) -> np.ndarray:
    """The fused map of one forward pass, stored as the server stores it (``round(255 p)``)."""
    with torch.no_grad():
        return np.rint(255.0 * network(_normalise(pixels))[0, -1].numpy()).astype(np.uint8)


def _entropy_over_tissue(network: DWSMIL, pixels: np.ndarray) -> float:
    """Mean binary entropy (bits) of the stored map over the tissue the project's detection finds, by hand."""
    p = _probability(network, pixels).astype(np.float64) / 255.0
    with np.errstate(divide="ignore", invalid="ignore"):
        h = np.nan_to_num(-(p * np.log2(p) + (1 - p) * np.log2(1 - p)))
    tissue = detect_tissue(PlainImage("hand", pixels), level=0, min_area_um2=0.0, max_hole_um2=0.0,
                           mpp_override=0.5).mask
    return float(h[tissue].mean())


def _unsure_colour(network: DWSMIL) -> tuple[int, int, int]:
    """The blend of purple and white whose fused probability is nearest 0.5 (the probe is least sure of it)."""
    blends = [tuple(int(round(a + t * (b - a))) for a, b in zip(PURPLE, WHITE)) for t in np.linspace(0, 1, 21)]

    def distance(colour: tuple[int, ...]) -> float:
        return abs(float(_probability(network, np.full((64, 64, 3), colour, np.uint8)).mean()) - 127.5)

    return min(blends, key=distance)


def _al_images(network: DWSMIL) -> dict[str, np.ndarray]:
    """Three 256 x 256 images from sure to unsure: all purple, purple and glass halves (edges), the unsure colour."""
    half = np.full((*AL_HW, 3), WHITE, np.uint8)
    half[:, : AL_HW[1] // 2] = PURPLE
    return {"al_sure": np.full((*AL_HW, 3), PURPLE, np.uint8), "al_edge": half,
            "al_unsure": np.full((*AL_HW, 3), _unsure_colour(network), np.uint8)}


def _put_png(client: httpx.Client, route: str, params: dict, key: str, pixels: np.ndarray, tmp: Path) -> None:
    """Upload ``pixels`` as a PNG (an image or a label) and require a 200."""
    path = tmp / f"upload_{params['image']}_{key}.png"
    imsave(path, pixels, check_contrast=False)
    response = client.put(route, params=params, files={key: (path.name, path.read_bytes())})
    assert response.status_code == 200, response.text


def test_entropy_proposes_the_unlabelled_image_the_model_is_least_sure_of(setup):
    url, network, tmp = setup["server"].url, setup["network"], setup["tmp"]
    images = _al_images(network)
    by_hand = {name: _entropy_over_tissue(network, pixels) for name, pixels in images.items()}
    assert by_hand["al_sure"] < by_hand["al_edge"] < by_hand["al_unsure"]
    with httpx.Client(base_url=url, timeout=300) as client:
        for name, pixels in images.items():
            _put_png(client, "/datastore/image", {"image": name}, "file", pixels, tmp)
        first = client.post("/activelearning/entropy", json={})
        assert first.status_code == 200, first.text
        answer = first.json()
        scores = dict(answer["ranking"])
        assert set(scores) == {"al_sure", "al_edge", "al_unsure", "patch_b", "slide_a"}  # every unlabelled image
        assert answer["id"] == "al_unsure" == max(scores, key=scores.get)
        assert answer["computed"] == 5 and answer["cached"] == 0
        for name, value in by_hand.items():
            assert scores[name] == pytest.approx(value, abs=0.01), name
        # labelled images are not proposed again; the other scores come from the cache
        mask = np.ones(AL_HW, np.uint8)  # the pathologist's answer: all tumour
        _put_png(client, "/datastore/label", {"image": "al_unsure", "tag": "final"}, "label", mask, tmp)
        second = client.post("/activelearning/entropy", json={}).json()
        assert "al_unsure" not in dict(second["ranking"]) and second["id"] != "al_unsure"
        assert second["computed"] == 0 and second["cached"] == 4
        # QuPath's Next Sample for the open slide: the most uncertain patch of it, from the cached map
        patch = client.post("/activelearning/entropy", json={"image": "slide_a", "patch_size": [512, 512]}).json()
        x, y, w, h = patch["bbox"]
        assert patch["id"] == "slide_a" and patch["cached"] == 1
        assert 0 <= x < SLIDE_HW[1] and 0 <= y < SLIDE_HW[0] and (w, h) == (512, 512)


def _qupath_xml(box: tuple[int, int, int, int]) -> bytes:
    """What QuPath's Submit Label sends for a selected region: outlines in the region's pixels, its box on the
    slide in the ``Annotations`` element; a tumour square with a hole outlined as ``exclusion``."""
    def polygon(name: str, x0: int, y0: int, x1: int, y1: int) -> str:
        corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
        points = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(corners))
        return f'<Annotation Name="{name}" Type="Polygon" PartOfGroup="{name}"><Coordinates>{points}</Coordinates>' \
               "</Annotation>"

    x, y, w, h = box
    return (f'<?xml version="1.0"?><ASAP_Annotations><Annotations X="{x}" Y="{y}" W="{w}" H="{h}">'
            f'{polygon("tumour", 32, 32, 224, 224)}{polygon("exclusion", 96, 96, 160, 160)}</Annotations>'
            "<AnnotationGroups/></ASAP_Annotations>").encode()


def _mask_answer(client: httpx.Client, tmp: Path) -> np.ndarray:
    """The served mask of patch_b."""
    response = client.post("/infer/tumour", params={"image": "patch_b", "output": "image"})
    assert response.status_code == 200, response.text
    path = tmp / "answer_patch_b.png"
    path.write_bytes(response.content)
    return imread(path)


def _train_status(client: httpx.Client, running: bool = False) -> dict | None:
    """MONAI Label's last train task (``running``: the running one, None when none runs)."""
    response = client.get("/train/", params={"check_if_running": running})
    assert response.status_code in (200, 404), response.text
    return response.json() if response.status_code == 200 else None


def _wait_train(client: httpx.Client, timeout_s: float, until_running: bool = False) -> dict:
    """Poll ``/train/`` until a round runs (``until_running``) or the last one ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        task = _train_status(client, running=until_running)
        if task and (until_running or task["status"] in ("DONE", "ERROR", "STOPPED")):
            return task
        time.sleep(0.5)
    pytest.fail(f"training did not {'start' if until_running else 'end'} in {timeout_s} s: {_train_status(client)}")


TINY_ROUND = {"stage1_epochs": 1, "stage2_epochs": 1, "image_size": 64, "batch_size": 8}
"""One round at the bundle tests' tiny configuration (the served network's width: the probe's 0.25)."""


def test_corrections_train_a_model_that_is_served_at_once(setup):
    url, tmp, root = setup["server"].url, setup["tmp"], setup["root"]
    served, backup = root / "model.pt", root / "model.previous.pt"
    old_weights = served.read_bytes()
    with httpx.Client(base_url=url, timeout=300) as client:
        before = _mask_answer(client, tmp)
        _put_png(client, "/datastore/label", {"image": "patch_b", "tag": "final"}, "label", 1 - before, tmp)
        box = (300, 0, 256, 256)  # QuPath's Submit Label of a region: its pixels as an image, then its outlines
        pixels = tifffile.imread(setup["studies"] / "slide_a.tif", key=0)[: box[3], box[0] : box[0] + box[2]]
        patch = f"slide_a-patch-{box[0]}_{box[1]}_{box[2]}_{box[3]}"
        _put_png(client, "/datastore/image", {"image": patch}, "file", pixels, tmp)
        saved = client.put("/datastore/label", params={"image": patch, "tag": "final"},
                           files={"label": ("qupath.xml", _qupath_xml(box))})
        assert saved.status_code == 200, saved.text
        start = time.monotonic()
        started = client.post("/train/tumour", json=TINY_ROUND)
        assert started.status_code == 200, started.text
        _wait_train(client, 60, until_running=True)
        during = client.post("/infer/tumour", params={"image": "patch_b", "output": "image"})
        assert during.status_code == 200, during.text
        assert _train_status(client, running=True) is not None, "the answer must come while the round runs"
        assert client.post("/train/tumour", json=TINY_ROUND).status_code == 429  # one round at a time
        task = _wait_train(client, 300)
        elapsed = time.monotonic() - start
        assert task["status"] == "DONE", "\n".join(task.get("details", []))
        # the served file was replaced in one step, the previous weights kept, nothing half-written left behind
        assert backup.read_bytes() == old_weights and served.read_bytes() != old_weights
        assert not [p.name for p in root.iterdir() if p.name.endswith(".tmp")]
        new = torch.load(served, map_location="cpu", weights_only=True)
        assert new["record"]["image_size"] == 64 and new["record"]["network_def"]["width"] == WIDTH
        objects = client.get("/datastore/", params={"output": "all"}).json()["objects"]
        labelled = [i for i, obj in objects.items() if obj["labels"].get("final")]
        stats = client.get("/info/").json()["train_stats"]["tumour"]
        print(f"\none /train round at the tiny configuration: {elapsed:.1f} s from POST /train/tumour to status DONE, "
              f"{stats['seconds']:.1f} s of it in the round (the rest: MONAI Label starting its training process)")
        assert stats["strong_tiles"] == 16 * len(labelled) and stats["backup"] == str(backup)  # 256 px: 4 x 4 tiles
        after = _mask_answer(client, tmp)
        assert after.shape == before.shape and not np.array_equal(after, before)
        proposal = client.post("/activelearning/entropy", json={}).json()
        assert proposal["computed"] == len(objects) - len(labelled) and proposal["cached"] == 0  # new weights


def test_a_stopped_round_leaves_the_served_model(setup):
    url, root = setup["server"].url, setup["root"]
    served = root / "model.pt"
    weights = served.read_bytes()
    with httpx.Client(base_url=url, timeout=120) as client:
        started = client.post("/train/tumour", json=dict(TINY_ROUND, stage1_epochs=500))
        assert started.status_code == 200, started.text
        running = _wait_train(client, 60, until_running=True)
        time.sleep(3)  # into the round: its process has loaded the app and begun
        stopped = client.delete("/train/")
        assert stopped.status_code == 200 and stopped.json()["status"] == "STOPPED", stopped.text
        assert _train_status(client)["id"] == running["id"] and _train_status(client, running=True) is None
    deadline = time.monotonic() + 15
    while _training_processes(setup["server"].process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _training_processes(setup["server"].process.pid), "the stopped round's process still runs"
    assert served.read_bytes() == weights


def _training_processes(server_pid: int) -> list[int]:
    """Processes of MONAI Label's training task under the server that still run (a killed one not yet reaped, a
    zombie, runs nothing)."""
    running = []
    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            command = " ".join(child.cmdline()) if child.status() != psutil.STATUS_ZOMBIE else ""
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if "monailabel.interfaces.utils.app" in command:
            running.append(child.pid)
    return running


def test_server_stops_and_exits(setup):
    server = setup["server"]
    assert httpx.get(f"{server.url}/info/", timeout=10).status_code == 200  # still alive after the bad requests
    server.stop()
    assert server.process.poll() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/info/", timeout=2)


def test_datastore_drops_entries_an_unconfined_server_left_and_refuses_paths(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts" / "monailabel_app"))
    from fastapi import HTTPException
    from lib import StudiesDatastore

    studies = tmp_path / "site" / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    imsave(studies / "a.png", np.zeros((8, 8, 3), np.uint8), check_contrast=False)
    (tmp_path / "site" / "victim.png").write_bytes(b"victim")
    stale = {"ext": ".png", "info": {}}
    listing = {"name": "s", "description": "", "images_dir": ".", "labels_dir": "labels", "objects": {
        "a": {"image": stale, "labels": {"../../y": stale, "final": stale}}, "../victim": {"image": stale}}}
    (studies / "datastore_v2.json").write_text(json.dumps(listing))
    (studies / "labels" / "final" / "a.png").write_bytes(b"label")
    datastore = StudiesDatastore(str(studies), extensions=["*.png"])
    assert datastore.list_images() == ["a"]
    assert list(datastore.json()["objects"]["a"]["labels"]) == ["final"]
    assert "../victim" not in json.loads((studies / "datastore_v2.json").read_text())["objects"]
    for call, key in ((lambda: datastore.remove_image("../victim"), "image"),
                      (lambda: datastore.get_image_uri("../victim"), "image"),
                      (lambda: datastore.remove_label("a", "../../y"), "tag"),
                      (lambda: datastore.save_label("a", str(studies / "a.png"), "..", {}), "tag"),
                      (lambda: datastore.add_image("../victim", str(studies / "a.png"), {}), "image")):
        with pytest.raises(HTTPException) as refused:
            call()
        assert refused.value.status_code == 400 and refused.value.detail.startswith(f"'{key}' must be a plain name")
    with pytest.raises(HTTPException) as unknown:
        datastore.update_image_info("victim", {})
    assert unknown.value.status_code == 404
    assert (tmp_path / "site" / "victim.png").read_bytes() == b"victim"


def test_scratch_of_a_killed_server_is_removed_at_start_and_a_live_ones_kept(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts" / "monailabel_app"))
    from lib.tumour_infer import SCRATCH_PREFIX, remove_stale_scratch

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead, live = tmp_path / f"{SCRATCH_PREFIX}{int(gone.stdout)}-abc", tmp_path / f"{SCRATCH_PREFIX}{os.getpid()}-def"
    for folder in (dead, live):
        folder.mkdir()
        (folder / "prob.raw").write_bytes(b"\0" * 4096)
    other = tmp_path / "monailabel-notours"
    other.mkdir()
    assert remove_stale_scratch(tmp_path) == [dead]
    assert not dead.exists() and (live / "prob.raw").exists() and other.exists()


def test_region_mpp_is_the_slides_or_the_configs_override(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts" / "monailabel_app"))
    from lib.tumour_infer import read_request_region

    pixels = np.full((256, 256, 3), PURPLE, np.uint8)
    tagged = write_pyramid(tmp_path / "tagged.tif", pixels, levels=2, tile=64, mpp_xy=(0.25, 0.25))
    bare = write_pyramid(tmp_path / "bare.tif", pixels, levels=2, tile=64, mpp_xy=None)
    png = tmp_path / "plain.png"
    imsave(png, pixels, check_contrast=False)
    assert read_request_region(str(tagged), (0, 0), (32, 32), 1)[1:] == pytest.approx((2.0, 0.25))
    assert read_request_region(str(tagged), (0, 0), (32, 32), 1, mpp_override=1.0)[1:] == (2.0, 1.0)
    assert read_request_region(str(bare), (0, 0), (32, 32), 0)[1:] == (1.0, 0.5)  # none: 20x assumed
    assert read_request_region(str(bare), (0, 0), (32, 32), 0, mpp_override=1.0)[1:] == (1.0, 1.0)
    assert read_request_region(str(png), (0, 0), (32, 32), 0, mpp_override=0.25)[1:] == (1.0, 0.25)


def test_a_checkpoint_that_records_its_network_is_served_without_overrides(tmp_path):
    """inference.json alone serves a quarter-width model.pt with a record: its network, mpp and threshold."""
    sys.path.insert(0, str(ROOT / "scripts" / "monailabel_app"))
    from lib.tumour_infer import TumourSegmentation

    from custom.checkpoints import TrainingRecord

    torch.manual_seed(0)
    trained = DWSMIL(width=WIDTH)
    record = TrainingRecord(trained, image_size=128, mpp=1.0, threshold=0.4).describe()
    torch.save({"network": trained.state_dict(), "record": record}, tmp_path / "model.pt")
    task = TumourSegmentation(ROOT / "bundle", ("inference.json",), tmp_path / "model.pt")
    assert task.network.definition == trained.definition and task.threshold == 0.4 and task.inferer.mpp == 1.0
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in task.network.state_dict().items())


def test_corrections_are_cut_into_tiles_at_the_inference_level(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts" / "monailabel_app"))
    from lib.corrections import Correction, write_strong_datalist

    pixels = _slide_pixels()[:512, 700:1212]
    slide = write_pyramid(tmp_path / "s.tif", pixels, levels=2, tile=128)
    box = (64, 32, 256, 256)  # QuPath's box on the slide; outlines in its pixels, a "Stroma" one inside the tumour
    xml = _qupath_xml(box).replace(b'PartOfGroup="exclusion"', b'PartOfGroup="Stroma"')
    (tmp_path / "s.xml").write_bytes(xml)
    listing, count = write_strong_datalist([Correction("s", str(slide), str(tmp_path / "s.xml"))], tmp_path / "out",
                                           64, lambda _: 1, 10**6)
    rows = json.loads(listing.read_text())
    assert count == len(rows) == 4  # 256 level-0 pixels are 128 at level 1: 2 x 2 tiles of 64
    mosaic = np.zeros((128, 128), np.uint8)
    for row in rows:
        tile_r, tile_c = divmod(int(Path(row["image"]).stem.split("_")[1]), 2)  # tiles are numbered row-major
        mosaic[tile_r * 64 : tile_r * 64 + 64, tile_c * 64 : tile_c * 64 + 64] = imread(listing.parent / row["mask"])
        assert row["group"] == "s" and imread(listing.parent / row["image"]).shape == (64, 64, 3)
    expected = np.zeros((128, 128), np.uint8)
    expected[16:112, 16:112] = 1  # the tumour square 32..224 of the region, halved
    expected[48:80, 48:80] = 0  # the stroma square 96..160, not tumour
    assert (mosaic != expected).mean() < 0.02  # pixel centres on the outlines may fall either way
    (tmp_path / "m.png").write_bytes(b"")
    with pytest.raises(ValueError, match="a mask of a whole slide is not read"):
        write_strong_datalist([Correction("s", str(slide), str(tmp_path / "m.png"))], tmp_path / "o2", 64,
                              lambda _: 1, 10**6)
    imsave(tmp_path / "p.png", pixels[:100, :100], check_contrast=False)
    imsave(tmp_path / "small.png", np.zeros((50, 50), np.uint8), check_contrast=False)
    with pytest.raises(ValueError, match=r"mask .*small.png has size \(width, height\) \(50, 50\) but its image"):
        write_strong_datalist([Correction("p", str(tmp_path / "p.png"), str(tmp_path / "small.png"))],
                              tmp_path / "o3", 64, lambda _: 0, 10**6)
    with pytest.raises(ValueError, match="no image of the studies folder has a final label"):
        write_strong_datalist([], tmp_path / "o4", 64, lambda _: 0, 10**6)


def test_new_weights_are_published_atomically_and_served_by_the_next_request(tmp_path, caplog):
    sys.path.insert(0, str(ROOT / "scripts" / "monailabel_app"))
    from lib.tumour_infer import TumourSegmentation
    from lib.tumour_train import publish_checkpoint

    served, new = tmp_path / "model.pt", tmp_path / "new.pt"
    first, second = (DWSMIL(width=WIDTH) for _ in range(2))
    torch.save(first.state_dict(), served)
    torch.save(second.state_dict(), new)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".model.pt.{int(gone.stdout)}.tmp"  # left by a killed round
    stale.write_bytes(b"half")
    task = TumourSegmentation(ROOT / "bundle", ("inference.json", "cpu_inference.json"), served)
    old = served.read_bytes()
    assert publish_checkpoint(new, served) == tmp_path / "model.previous.pt"
    assert (tmp_path / "model.previous.pt").read_bytes() == old and served.read_bytes() == new.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.previous.pt", "model.pt", "new.pt"]
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in task.network.state_dict().items())
    served.write_bytes(b"not a checkpoint")  # a broken replacement: the loaded weights stay served
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in task.network.state_dict().items())
    assert "cannot be loaded, the previous weights stay served" in caplog.text
