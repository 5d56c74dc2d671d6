# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Slide-level evaluation: Dice / IoU against XML and mask-TIFF truth (exclusions ignored), slide AUC and the
Camelyon16 FROC, each checked against values worked out by hand on inference outputs written here."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from monai.bundle import ConfigParser

from custom.data.annotations import rasterize_annotations, read_asap_xml
from custom.data.synthetic import SyntheticSpec, generate_dataset
from custom.metrics import SlideEvaluator
from custom.writers.asap_xml import write_asap_xml
from custom.writers.pyramid_tiff import write_pyramid

MPP = 0.5
CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"


def rect(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """A level-0 (x, y) rectangle outline."""
    return np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], float)


def write_outputs(out: Path, name: str, mask: np.ndarray, prob: np.ndarray, score: float, ds: float,
                  level0_wh: tuple[int, int]) -> None:
    """What inference.json writes for one slide, reduced to what evaluation reads: both TIFFs and the summary."""
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    shape = mask.shape
    values = np.where(mask, 255, 0).astype(np.uint8)
    write_pyramid(folder / f"{name}_mask.tif", lambda r, c, h, w: values[r:r + h, c:c + w], shape, 1, MPP * ds)
    write_pyramid(folder / f"{name}_prob.tif", lambda r, c, h, w: prob[r:r + h, c:c + w], shape, 1, MPP * ds,
                  downsample="mean")
    summary = {"name": name, "score": score, "downsample": ds, "output_mpp": MPP * ds, "level0_mpp": MPP,
               "output_size_wh": [shape[1], shape[0]], "level0_size_wh": list(level0_wh),
               "files": {"mask": f"{name}_mask.tif", "prob": f"{name}_prob.tif"}}
    (folder / f"{name}_summary.json").write_text(json.dumps(summary))


def write_datalist(path: Path, rows: list[dict]) -> Path:
    """A slide CSV; each slide path gets an empty file (the evaluator reads only the inference outputs)."""
    for row in rows:
        (path.parent / row["slide"]).touch()
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["slide", "label", "mask", "annotation"])
        writer.writeheader()
        writer.writerows([{"mask": "", "annotation": ""} | row for row in rows])
    return path


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "data"
    generate_dataset(root, SyntheticSpec(n_slides=2, size=1024, patches_per_slide=1))
    return root


@pytest.mark.parametrize("truth", ["annotation", "mask"])
def test_ground_truth_as_prediction_scores_one(synthetic, tmp_path, truth):
    rows = list(csv.DictReader(open(synthetic / "slides.csv")))
    out = tmp_path / "inference"
    for row, score in zip(rows, (0.9, 0.2)):
        name = Path(row["slide"]).stem
        mask = tifffile.imread(synthetic / row["mask"], level=0) > 0
        write_outputs(out, name, mask, np.where(mask, 255, 0).astype(np.uint8), score, 1.0, mask.shape[::-1])
        row["mask" if truth == "annotation" else "annotation"] = ""  # the other source is not given
    datalist = tmp_path / "slides.csv"
    with open(datalist, "w", newline="") as f:
        writer = csv.DictWriter(f, ["slide", "label", "mask", "annotation"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows([r | {k: str(synthetic / r[k]) if r[k] else "" for k in ("slide", "mask", "annotation")}
                          for r in rows])
    report = SlideEvaluator(datalist, out).run()
    assert [r["label"] for r in report["slides"]] == [1, 0]
    assert report["slides"][0]["tumour_px"] > 1000  # the positive slide really has tumour to match
    assert [r["dice"] for r in report["slides"]] == [1.0, 1.0] and report["iou"] == 1.0
    assert report["auc"] == 1.0
    assert json.loads((out / "slide_metrics.json").read_text())["dice_pos"] == 1.0


# Truth: tumour x, y in [100, 300) (200 x 200 px), exclusion x in [200, 300), y in [100, 200) (100 x 100 px).
# Prediction: x in [200, 400), y in [100, 300). Overlap 100 x 200 = 20,000 px, of which 10,000 are excluded.
#   without exclusion: Dice = 2 * 20,000 / (40,000 + 40,000) = 1/2,  IoU = 20,000 / 60,000 = 1/3
#   with it:           Dice = 2 * 10,000 / (30,000 + 30,000) = 1/3,  IoU = 10,000 / 50,000 = 1/5
@pytest.mark.parametrize(
    "ds, truth, excluded, dice, iou",
    [(1, "annotation", False, 1 / 2, 1 / 3), (1, "annotation", True, 1 / 3, 1 / 5),
     (2, "annotation", True, 1 / 3, 1 / 5), (2, "mask", True, 1 / 3, 1 / 5), (1, "mask", False, 1 / 2, 1 / 3)],
)
def test_dice_iou_by_hand_with_exclusion(tmp_path, ds, truth, excluded, dice, iou):
    outlines, groups = [rect(100, 100, 300, 300)], ["_0"]
    if excluded:
        outlines, groups = outlines + [rect(200, 100, 300, 200)], groups + ["_2"]
    xml = write_asap_xml(tmp_path / "a.xml", outlines, groups)
    labels = rasterize_annotations(read_asap_xml(xml), (0, 0), (512, 512))  # 0 / 1 / 2 at level 0
    write_pyramid(tmp_path / "a_mask.tif", lambda r, c, h, w: labels[r:r + h, c:c + w], (512, 512), 1, MPP)
    side = int(512 // ds)
    predicted = np.zeros((side, side), bool)
    predicted[int(100 // ds):int(300 // ds), int(200 // ds):int(400 // ds)] = True
    write_outputs(tmp_path / "out", "a", predicted, np.zeros((side, side), np.uint8), 0.5, float(ds), (512, 512))
    source = {"annotation": "a.xml", "mask": "a_mask.tif"}[truth]
    datalist = write_datalist(tmp_path / "slides.csv", [{"slide": "a.tif", "label": 1, truth: source}])
    row = SlideEvaluator(datalist, tmp_path / "out").run()["slides"][0]
    assert row["dice"] == pytest.approx(dice) and row["iou"] == pytest.approx(iou)


def test_slide_auc_by_hand_and_missing_truth(tmp_path):
    # scores of positives 0.9, 0.3 against negatives 0.8, 0.1: 3 of the 4 pairs are ordered right -> AUC 0.75
    blank = np.zeros((256, 256), bool)
    rows = []
    for name, label, score in (("p1", 1, 0.9), ("n1", 0, 0.8), ("p2", 1, 0.3), ("n2", 0, 0.1)):
        write_outputs(tmp_path / "out", name, blank, blank.astype(np.uint8), score, 1.0, (256, 256))
        rows.append({"slide": f"{name}.tif", "label": label})
    report = SlideEvaluator(write_datalist(tmp_path / "slides.csv", rows), tmp_path / "out").run()
    assert report["auc"] == pytest.approx(0.75)
    by_name = {r["name"]: r for r in report["slides"]}
    assert by_name["p1"]["dice"] is None  # a positive slide without truth has no Dice
    assert by_name["n1"]["dice"] == 1.0  # a negative one is all background: an empty prediction is right
    assert report["n_with_truth"] == 2 and report["dice_pos"] is None


def test_froc_trivial_case(tmp_path):
    # Slide a (positive): lesions at x, y in [32, 160) and [320, 448); a peak 0.902 inside the first, a false
    # positive 0.6 outside both. Slide b (negative): a false positive 0.702. At every threshold one of the two
    # lesions is found, so the sensitivity is 1/2 at every FP rate -> FROC 0.5.
    write_asap_xml(tmp_path / "a.xml", [rect(32, 32, 160, 160), rect(320, 320, 448, 448)])
    prob_a, prob_b = np.zeros((512, 512), np.uint8), np.zeros((512, 512), np.uint8)
    prob_a[64:96, 64:96], prob_a[200:232, 200:232], prob_b[100:132, 300:332] = 230, 153, 179
    for name, prob in (("a", prob_a), ("b", prob_b)):
        write_outputs(tmp_path / "out", name, prob > 127, prob, 0.5, 1.0, (512, 512))
    datalist = write_datalist(tmp_path / "slides.csv", [{"slide": "a.tif", "label": 1, "annotation": "a.xml"},
                                                        {"slide": "b.tif", "label": 0}])
    evaluator = SlideEvaluator(datalist, tmp_path / "out", froc_mpp=8.0, grow_um=1.0, itc_um=0.0, nms_box_um=64.0)
    report = evaluator.run()
    a, b = report["slides"]
    assert (a["lesions"], a["lesions_detected"], a["false_positives"], b["false_positives"]) == (2, 1, 1, 1)
    x, y, p = max(a["detections_xy_prob"], key=lambda d: d[2])
    assert 64 <= x < 96 and 64 <= y < 96 and p == pytest.approx(230 / 255)  # level-0 (x, y) inside the peak
    assert report["froc"] == pytest.approx(0.5)


def test_bad_inputs_are_named(tmp_path):
    datalist = write_datalist(tmp_path / "slides.csv", [{"slide": "a.tif", "label": 0}])
    with pytest.raises(FileNotFoundError, match="a.tif.*run inference"):
        SlideEvaluator(datalist, tmp_path / "out").run()
    write_pyramid(tmp_path / "small.tif", lambda r, c, h, w: np.zeros((h, w), np.uint8), (128, 128), 1, MPP)
    write_outputs(tmp_path / "out", "a", np.zeros((256, 256), bool), np.zeros((256, 256), np.uint8), 0.5, 1.0,
                  (256, 256))
    datalist = write_datalist(tmp_path / "slides.csv", [{"slide": "a.tif", "label": 1, "mask": "small.tif"}])
    with pytest.raises(ValueError, match="small.tif.*geometry"):
        SlideEvaluator(datalist, tmp_path / "out").run()
    summary_file = tmp_path / "out" / "a" / "a_summary.json"
    summary = json.loads(summary_file.read_text())
    summary["files"] = {"prob": "a_prob.tif"}  # inference run with outputs ['prob']
    summary_file.write_text(json.dumps(summary))
    write_pyramid(tmp_path / "truth.tif", lambda r, c, h, w: np.zeros((h, w), np.uint8), (256, 256), 1, MPP)
    datalist = write_datalist(tmp_path / "slides.csv", [{"slide": "a.tif", "label": 1, "mask": "truth.tif"}])
    with pytest.raises(ValueError, match="a.tif: inference wrote no mask TIFF \\(config key 'outputs'\\)"):
        SlideEvaluator(datalist, tmp_path / "out").run()


def test_bundle_config_builds_the_evaluator(tmp_path):
    blank = np.zeros((256, 256), bool)
    write_outputs(tmp_path / "out", "n1", blank, blank.astype(np.uint8), 0.1, 1.0, (256, 256))
    datalist = write_datalist(tmp_path / "slides.csv", [{"slide": "n1.tif", "label": 0}])
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "inference.json"), str(CONFIGS / "evaluate_slides.json")])
    parser.update({"datalist": str(datalist), "output_dir": str(tmp_path / "out")})
    assert parser["input"] == "@datalist"  # inference runs over the same slide list
    report = parser.get_parsed_content("evaluate_slides")
    assert report["slides"][0]["dice"] == 1.0
    assert (tmp_path / "out" / "slide_metrics.json").is_file()
