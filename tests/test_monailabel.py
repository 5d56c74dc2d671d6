# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label app (scripts/monailabel_app) run as a real server on loopback, answers checked against the network.

The network is the bundle's ``DWSMIL`` at the CPU width with a random trunk; its 1x1 side convolutions are set to a
linear probe of "purple vs white" features, so its map sits far from the threshold except at tissue edges and a
wrong crop, offset, scale or tile seam shows as a drop of IoU. The reference is one forward pass over the pixels
read with tifffile (an independent reader), thresholded as the bundle does.
"""

from __future__ import annotations

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

from custom.networks import DWSMIL  # noqa: E402

from pyramid_files import write_pyramid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 0.25  # network_width of bundle/configs/cpu.json, which the server is started with
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

    def __init__(self, tmp: Path, studies: Path, model: Path) -> None:
        app = shutil.copytree(ROOT / "scripts" / "monailabel_app", tmp / "app")  # the server writes into its app dir
        self.port, self.log = _free_port(), tmp / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable, "-m", "monailabel.main", "start_server", "--app", str(app), "--studies", str(studies),
            "--host", "127.0.0.1", "--port", str(self.port), "--conf", "models", "tumour",
            "--conf", "configs", "inference.json,cpu.json", "--conf", "ckpt_path", str(model),
        ]
        env = dict(os.environ, MONAI_LABEL_SESSION_PATH=str(tmp / "sessions"), MONAI_LABEL_TASKS_TRAIN="false",
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


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Studies (one pyramidal slide, one PNG), the probe model, and a running server; stopped even on failure."""
    tmp = tmp_path_factory.mktemp("monailabel")
    studies = tmp / "studies"
    studies.mkdir()
    pixels = _slide_pixels()
    write_pyramid(studies / "slide_a.tif", pixels, levels=3, tile=256)
    imsave(studies / "patch_b.png", pixels[300:556, 500:756], check_contrast=False)
    (tmp / "outside.png").write_bytes((studies / "patch_b.png").read_bytes())
    network = _probe_network()
    torch.save(network.state_dict(), tmp / "model.pt")
    server = Server(tmp, studies, tmp / "model.pt")
    try:
        info = server.wait_ready()
        yield {"server": server, "info": info, "network": network, "studies": studies, "tmp": tmp}
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


@pytest.mark.parametrize("image", ["../outside", "../outside.png", "/etc/passwd", "slide_a/../../outside"])
def test_images_outside_the_studies_are_refused(setup, image):
    outside = str(setup["tmp"] / "outside.png") if image == "../outside.png" else image
    for endpoint, form in (("infer/tumour", {}), ("infer/wsi_v2/tumour", {"wsi": json.dumps({"size": [64, 64]})})):
        response = httpx.post(f"{setup['server'].url}/{endpoint}", params={"image": outside}, data=form, timeout=60)
        assert 400 <= response.status_code < 500, (endpoint, response.text)
    smuggled = httpx.post(f"{setup['server'].url}/infer/tumour", params={"image": "patch_b"},
                          data={"params": json.dumps({"image": str(setup["tmp"] / "outside.png")})}, timeout=60)
    assert smuggled.status_code == 404 and "not an image of the studies folder" in smuggled.json()["detail"]


def test_whole_slide_on_plain_2d_endpoint_is_refused(setup):
    response = httpx.post(f"{setup['server'].url}/infer/tumour", params={"image": "slide_a"}, timeout=60)
    assert response.status_code == 400 and "/infer/wsi_v2" in response.json()["detail"]


def test_server_stops_and_exits(setup):
    server = setup["server"]
    assert httpx.get(f"{server.url}/info/", timeout=10).status_code == 200  # still alive after the bad requests
    server.stop()
    assert server.process.poll() is not None
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{server.url}/info/", timeout=2)
