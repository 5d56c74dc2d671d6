"""Mask-free selection: each criterion against hand-computed values, the group split, and the pre-training checks."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from PIL import Image

from custom.data.checks import check_training_data
from custom.data.datalist import EBHI_GROUP_PATTERN, load_slide_datalist, patch_folder_datalist, split_train_val
from custom.engines.evaluation import selection_evaluator, selection_key
from custom.metrics.selection import (
    CRITERION_FLOOR,
    MIN_POS_AREA,
    SelectionHandler,
    flip_maps,
    selection_rows,
    summarise_selection,
)


def _map(value_left: float, value_right: float, size: int = 8) -> np.ndarray:
    """A map with one value on its left half and another on its right half."""
    prob = np.full((size, size), value_left, np.float32)
    prob[:, size // 2 :] = value_right
    return prob


def test_rows_and_criteria_by_hand():
    # positives: A half at 0.9 (gm4 = (0.5 * 0.9^4)^(1/4) = 0.7568, area 0.5), B all at 0.8 (score 0.8, area 1)
    # negatives: C all at 0.1 (0.1, area 0), D all at 0.6 (0.6, area 1)
    maps = np.stack([_map(0.0, 0.9), _map(0.8, 0.8), _map(0.1, 0.1), _map(0.6, 0.6)])
    rows = selection_rows(maps, [1, 1, 0, 0], smooth_sigma=None, threshold=0.5)
    assert rows[:, 1].tolist() == pytest.approx([0.5 ** 0.25 * 0.9, 0.8, 0.1, 0.6], abs=1e-6)
    assert rows[:, 2].tolist() == [0.5, 1.0, 0.0, 1.0]
    assert all(math.isnan(v) for v in rows[:, 3].tolist())  # no transformed maps given
    scores = summarise_selection(rows, threshold=0.5)
    assert scores["auc"] == pytest.approx(1.0)  # both positives score above both negatives
    # called positive at score >= 0.5: A, B, D -> sensitivity 1, specificity 1/2
    assert scores["balanced_accuracy"] == pytest.approx(0.75)
    # mean area on positives 0.75, on negatives 0.5
    assert scores["area_contrast"] == pytest.approx(0.25)
    assert scores["fp_area"] == pytest.approx(0.5) and scores["pos_area"] == pytest.approx(0.75)
    assert (scores["n_pos"], scores["n_neg"]) == (2, 2)


def test_auc_counts_ties_as_half():
    maps = np.stack([_map(0.5, 0.5), _map(0.5, 0.5), _map(0.2, 0.2)])
    scores = summarise_selection(selection_rows(maps, [1, 0, 0], smooth_sigma=None))
    assert scores["auc"] == pytest.approx((0.5 + 1.0) / 2)  # one tie, one win


def test_flip_consistency_by_hand():
    # soft Dice of p and q: 2 * sum(pq) / (sum p^2 + sum q^2)
    p, q = _map(0.0, 1.0), _map(1.0, 1.0)  # sum p^2 = 32, sum q^2 = 64, sum pq = 32 -> 64 / 96
    rows = selection_rows(np.stack([p, p, p]), [1, 1, 0], np.stack([q, p, q]), smooth_sigma=None)
    assert rows[:, 3].tolist() == pytest.approx([2 / 3, 1.0, 2 / 3])
    soft = selection_rows(np.stack([_map(0.5, 0.5)]), [1], np.stack([_map(0.5, 0.25)]), smooth_sigma=None)
    assert soft[0, 3].item() == pytest.approx(2 * (32 * 0.25 + 32 * 0.125) / (64 * 0.25 + 32 * 0.25 + 32 * 0.0625))
    assert summarise_selection(rows)["flip_consistency"] == pytest.approx((2 / 3 + 1.0) / 2)  # positives only
    empty = selection_rows(np.zeros((1, 8, 8)), [1], np.zeros((1, 8, 8)), smooth_sigma=None)
    assert empty[0, 3].item() == 0.0  # finding nothing earns nothing


def test_one_label_gives_nan_for_two_label_criteria():
    scores = summarise_selection(selection_rows(np.stack([_map(0.9, 0.9)]), [1], smooth_sigma=None))
    assert math.isnan(scores["auc"]) and math.isnan(scores["balanced_accuracy"]) and math.isnan(scores["area_contrast"])


def _spots(n_pixels: int, size: int = 64) -> np.ndarray:
    """A map at 0.1 with ``n_pixels`` pixels of its first row at 0.9."""
    prob = np.full((size, size), 0.1, np.float32)
    prob[0, :n_pixels] = 0.9
    return prob


def test_a_model_that_finds_nothing_scores_every_floor():
    labels = [1, 1, 0, 0]
    # anti-correlated: positives called on a quarter (area 0.25 each), negatives on half (0.5): contrast -0.25
    anti = summarise_selection(selection_rows(
        np.stack([_map(0.1, 0.1), _map(0.1, 0.9), _map(0.1, 0.9), _map(0.1, 0.9)]), labels, smooth_sigma=None))
    assert anti["area_contrast"] == pytest.approx(0.25 - 0.5) and anti["auc"] < 0.5
    # empty: 0.1 everywhere -> raw contrast 0, AUC 0.5 and balanced accuracy 0.5 (ties), each replaced by its floor
    empty = summarise_selection(selection_rows(np.full((4, 8, 8), 0.1, np.float32), labels, smooth_sigma=None))
    assert empty["pos_area"] == 0.0 and empty["fp_area"] == 0.0
    assert (empty["auc"], empty["balanced_accuracy"], empty["area_contrast"]) == (0.0, 0.0, -1.0)
    assert all(empty[k] < anti[k] for k in ("auc", "balanced_accuracy", "area_contrast"))
    # positives' mean area (2/4096 + 0) / 2 = 0.000244 < MIN_POS_AREA: nothing found; 2 * 16/4096 / 2 = 0.0039: found
    rare = summarise_selection(selection_rows(
        np.stack([_spots(2), _spots(0), _spots(0), _spots(0)]), labels, smooth_sigma=None))
    assert rare["pos_area"] == pytest.approx(2 / 4096 / 2) and 2 / 4096 / 2 < MIN_POS_AREA
    assert rare["area_contrast"] == -1.0
    found = summarise_selection(selection_rows(
        np.stack([_spots(16), _spots(16), _spots(0), _spots(0)]), labels, smooth_sigma=None))
    assert found["area_contrast"] == pytest.approx(16 / 4096) and found["auc"] == 1.0
    # negatives only: nothing to find, the two-label criteria stay NaN, not a floor
    assert math.isnan(summarise_selection(selection_rows(np.full((2, 8, 8), 0.1), [0, 0]))["area_contrast"])


def test_handler_says_when_a_model_finds_nothing(caplog):
    maps = torch.full((4, 1, 8, 8), 0.1)
    batches = [{"image": torch.zeros(4, 3, 8, 8), "pred": maps, "label": torch.tensor([1.0, 1.0, 0.0, 0.0])}]
    engine = Engine(lambda engine, batch: batch)
    SelectionHandler(key="area_contrast", prefix="val_", smooth_sigma=None).attach(engine, "val_area_contrast")
    with caplog.at_level("INFO", logger="custom.metrics.selection"):
        engine.run(batches)
    assert engine.state.metrics["val_area_contrast"] == CRITERION_FLOOR["area_contrast"] == -1.0
    assert engine.state.metrics["val_pos_area"] == 0.0
    assert "val_area_contrast: the model calls 0.00000 of the validation positives' pixels" in caplog.text
    assert "it finds nothing and scores -1.0" in caplog.text


def test_flip_maps_undoes_the_transform():
    """A network that copies its first channel returns the original image's map, transformed back."""
    images = torch.rand(2, 3, 6, 6)
    identity = lambda x: x[:, :1]  # noqa: E731
    assert torch.equal(flip_maps(identity, images), images[:, 0])
    # a network that answers with the row index is not equivariant: its transformed-back map differs
    rows = lambda x: (  # noqa: E731
        torch.arange(x.shape[2], dtype=torch.float32).view(1, 1, -1, 1).expand(x.shape[0], 1, -1, x.shape[3])
    )
    assert not torch.equal(flip_maps(rows, images), rows(images)[:, 0])


def test_handler_on_an_engine_publishes_every_criterion():
    maps = torch.from_numpy(np.stack([_map(0.0, 0.9), _map(0.8, 0.8), _map(0.1, 0.1), _map(0.6, 0.6)]))[:, None]
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0])
    batches = [{"image": torch.zeros(2, 3, 8, 8), "pred": maps[:2], "label": labels[:2]},
               {"image": torch.zeros(2, 3, 8, 8), "pred": maps[2:], "label": labels[2:]}]
    engine = Engine(lambda engine, batch: batch)
    SelectionHandler(key="balanced_accuracy", prefix="val_", smooth_sigma=None).attach(engine, "val_balanced_accuracy")
    engine.run(batches)
    assert engine.state.metrics["val_balanced_accuracy"] == pytest.approx(0.75)
    assert engine.state.metrics["val_auc"] == pytest.approx(1.0)
    assert engine.state.metrics["val_area_contrast"] == pytest.approx(0.25)
    assert "val_flip_consistency" not in engine.state.metrics  # not computed, not published as NaN
    with pytest.raises(ValueError, match="key must be one of"):
        SelectionHandler(key="mask_f1")


def test_selection_evaluator_ranks_on_the_named_metric():
    """A SupervisedEvaluator from the factory, on a network whose map is its input's first channel."""

    class FirstChannel(torch.nn.Module):
        def forward(self, x):
            return x[:, :1]

    images = torch.stack([torch.full((3, 8, 8), v) for v in (0.9, 0.7, 0.2, 0.6)])
    data = [{"image": image, "label": torch.tensor(float(label))} for image, label in zip(images, [1, 1, 0, 0])]
    evaluator = selection_evaluator(
        FirstChannel(), torch.utils.data.DataLoader(data, batch_size=2), "cpu", "auc", smooth_sigma=None
    )
    evaluator.run()
    assert evaluator.state.key_metric_name == "val_auc" == selection_key("auc")
    assert evaluator.state.metrics["val_auc"] == pytest.approx(1.0)
    consistency = selection_evaluator(
        FirstChannel(), torch.utils.data.DataLoader(data, batch_size=2), "cpu", "flip_consistency", smooth_sigma=None
    )
    consistency.run()
    assert consistency.state.metrics["val_flip_consistency"] == pytest.approx(1.0)  # constant maps are flip-invariant
    with pytest.raises(ValueError, match="selection_metric must be one of"):
        selection_key("f1")


def _items(groups_labels: list[tuple[str, int]]) -> list[dict]:
    return [{"image": f"/x/{g}-{i}.png", "name": f"{g}-{i}", "label": label, "group": g, "mask": None}
            for i, (g, label) in enumerate(groups_labels)]


@pytest.mark.parametrize("seed", range(6))
def test_group_split_keeps_groups_whole_and_strata(seed):
    layout = [(f"P{p}", 1) for p in range(6) for _ in range(4)] + [(f"N{p}", 0) for p in range(5) for _ in range(3)]
    items = _items(layout)
    train, val = split_train_val(items, 0.25, seed)
    train_groups, val_groups = {i["group"] for i in train}, {i["group"] for i in val}
    assert not train_groups & val_groups and train_groups | val_groups == {g for g, _ in layout}
    # each stratum gives round(0.25 * images) images or the first group past it: 6 of 24 positives, 4 of 15 negatives
    assert sum(i["label"] for i in val) == 8 and sum(1 - i["label"] for i in val) == 6  # 2 groups of 4, 2 groups of 3
    assert len(train) + len(val) == len(items)
    assert split_train_val(items, 0.25, seed) == (train, val)  # reproducible


def test_group_split_never_takes_a_whole_stratum():
    items = _items([("P0", 1), ("P0", 1), ("N0", 0), ("N1", 0)])
    train, val = split_train_val(items, 0.9, 0, by="group")
    assert [i["group"] for i in val] == ["N0"] or [i["group"] for i in val] == ["N1"]  # P0 is the only positive group
    assert {i["group"] for i in train} >= {"P0"}


def test_auto_split_groups_only_when_groups_exist():
    grouped = _items([("P0", 1), ("P0", 1), ("P1", 1), ("N0", 0), ("N1", 0)])
    _, val = split_train_val(grouped, 0.4, 0)
    assert len({i["group"] for i in val} & {"P0", "P1", "N0", "N1"}) >= 1
    ungrouped = [dict(i, group="") for i in grouped]
    train, val = split_train_val(ungrouped, 0.4, 0)  # per image, label-stratified: 1 of 3 pos, 1 of 2 neg
    assert sum(i["label"] for i in val) == 1 and sum(1 - i["label"] for i in val) == 1
    with pytest.raises(ValueError, match="have no group"):
        split_train_val(ungrouped, 0.4, 0, by="group")


def _write(path, size=(16, 16), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def test_ebhi_names_give_patient_groups(tmp_path):
    for name in ("GT2001837-1-400-001", "GT2001837-2-400-002", "GTxc2012508-1-400-001"):
        _write(tmp_path / "train" / "pos" / f"{name}.png")
    _write(tmp_path / "train" / "neg" / "low-grade_GT2001837-1-400-003.png")
    _write(tmp_path / "train" / "neg" / "mosaic_0001.png")
    items = patch_folder_datalist(tmp_path, "train", group_pattern=EBHI_GROUP_PATTERN)
    assert {i["name"]: i["group"] for i in items} == {
        "GT2001837-1-400-001": "GT2001837", "GT2001837-2-400-002": "GT2001837", "GTxc2012508-1-400-001": "GTxc2012508",
        "low-grade_GT2001837-1-400-003": "GT2001837", "mosaic_0001": "",
    }


def test_slide_list_groups_by_patient_then_slide(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.tif").write_bytes(b"x")
    (tmp_path / "list.csv").write_text(
        "\ufeffslide,label,patient,split\na.tif,1,P1,train\nb.tif,0,P1,\nc.tif,0,,test\n", encoding="utf-8"
    )
    items = load_slide_datalist(tmp_path / "list.csv")  # a byte-order mark does not hide the 'slide' column
    assert [(i["group"], i["split"]) for i in items] == [("P1", "train"), ("P1", "train"), ("c", "test")]
    (tmp_path / "bad.csv").write_text("slide,label,split\na.tif,1,tset\n")
    with pytest.raises(ValueError, match=r"bad.csv line 2: unknown split 'tset'"):
        load_slide_datalist(tmp_path / "bad.csv")


def _patch(tmp_path, name, label, mask_size=None):
    image = tmp_path / f"{name}.png"
    _write(image)
    item = {"image": str(image), "label": label, "mask": None, "name": name}
    if mask_size:
        mask = tmp_path / f"{name}_gt.png"
        _write(mask, mask_size, "L")
        item["mask"] = str(mask)
    return item


def test_checks_refuse_what_would_fail_after_training(tmp_path):
    pos, neg = _patch(tmp_path, "p", 1, (16, 16)), _patch(tmp_path, "n", 0)
    unmasked = _patch(tmp_path, "u", 1)
    check_training_data([pos, neg], [pos, neg], [pos, neg], "auc")  # fine
    with pytest.raises(
        ValueError, match=r"'mask_f1' needs a pixel mask for every positive image, but 1 of 2 have none"
    ):
        check_training_data([pos, neg], [pos, unmasked, neg], [pos, neg], "mask_f1")
    with pytest.raises(
        ValueError,
        match=(r"validation: selection_metric 'auc' compares positives with negatives but validation holds "
               r"0 positive and 1 negative"),
    ):
        check_training_data([pos, neg], [neg], [pos, neg], "auc")
    with pytest.raises(ValueError, match=r"validation: no image \(training has 2\)"):
        check_training_data([pos, neg], [], [pos, neg], "auc")
    wrong = _patch(tmp_path, "w", 1, (16, 12))
    with pytest.raises(
        ValueError,
        match=r"test: mask .*w_gt.png has size \(width, height\) \(16, 12\) but its image .*w.png has \(16, 16\)",
    ):
        check_training_data([pos, neg], [pos, neg], [pos, wrong], "auc")
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot read image file .*fake.png"):
        check_training_data([pos, neg], [pos, neg], [dict(pos, image=str(fake))], "auc")
    with pytest.raises(ValueError, match="training: no positive image"):
        check_training_data([neg], [pos, neg], [pos, neg], "auc")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_training_data([pos, unmasked], [pos, neg], [pos, neg], "auc")
    assert any("all 2 images are positive" in str(w.message) for w in caught)
