"""Slide-bag MIL (slide_mil.json): bag pooling, the bag trainer, bags of slides and selection per slide."""

from __future__ import annotations

import copy
import logging
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader

from custom.data import SlideTileDataset
from custom.data.checks import check_training_data
from custom.data.datasets import SlideBagDataset
from custom.engines import BagMILTrainer, selection_evaluator
from custom.losses import BagMILLoss, DistillationLoss, bag_pool, gm_pool
from custom.metrics.selection import group_rows, slide_group_id, summarise_selection
from custom.networks import DWSMIL
from tests.pyramid_files import write_pyramid

CONFIGS = Path(__file__).resolve().parents[1] / "bundle" / "configs"

PURPLE, WHITE = (150, 60, 170), (245, 245, 245)


def test_bag_pool_over_every_pixel_of_the_bag_by_hand():
    flat = torch.full((1, 2, 2), 0.5)
    peaked = torch.tensor([[[1.0, 0.2], [0.2, 0.2]]])
    bag = torch.stack([flat, peaked])  # (k=2, C=1, 2, 2): eight pixels 0.5 x4, 1.0, 0.2 x3
    assert bag_pool(bag, "gm", r=1.0).item() == pytest.approx(3.6 / 8)
    assert bag_pool(bag, "gm", r=2.0).item() == pytest.approx(math.sqrt((4 * 0.25 + 1 + 3 * 0.04) / 8))
    assert bag_pool(bag, "top_fraction", top_fraction=0.25).item() == pytest.approx((1.0 + 0.5) / 2)  # top 2 of 8
    assert bag_pool(bag, "top_fraction", top_fraction=0.01).item() == pytest.approx(1.0)  # at least one pixel
    # top_tiles: tile scores are each tile's own GM; r = 1 makes them the tile means 0.5 and 1.6 / 4 = 0.4
    assert bag_pool(bag, "top_tiles", r=1.0, top_tiles=1).item() == pytest.approx(0.5)
    assert bag_pool(bag, "top_tiles", r=1.0, top_tiles=2).item() == pytest.approx((0.5 + 0.4) / 2)
    assert bag_pool(bag, "top_tiles", r=1.0, top_tiles=5).item() == pytest.approx((0.5 + 0.4) / 2)  # at most k
    assert bag_pool(bag, "top_tiles", r=2.0, top_tiles=1).item() == pytest.approx(math.sqrt((1 + 3 * 0.04) / 4))
    with pytest.raises(ValueError, match="top_tiles"):
        bag_pool(bag, "top_tiles", top_tiles=0)
    one = torch.rand(1, 3, 8, 8)
    torch.testing.assert_close(bag_pool(one, "gm", r=4.0), gm_pool(one[0], 4.0))  # a bag of one tile: the tile
    torch.testing.assert_close(bag_pool(one, "top_tiles", r=4.0), gm_pool(one[0], 4.0))
    with pytest.raises(ValueError, match="unknown bag pooling"):
        bag_pool(bag, "max")
    with pytest.raises(ValueError, match=r"\(k, C, H, W\)"):
        bag_pool(bag[0], "gm")


def test_bag_loss_is_bce_of_bag_scores_plus_background_on_negative_slides_by_hand():
    positive = torch.full((1, 1, 2, 2, 2), 0.8)  # one bag of one tile, two maps, constant 0.8: GM score 0.8
    negative = torch.full((1, 1, 2, 2, 2), 0.3)
    pred, label = torch.cat([positive, negative]), torch.tensor([1.0, 0.0])
    bce = (-math.log(0.8) - math.log(0.7)) / 2
    assert BagMILLoss(r=4.0)(pred, label).item() == pytest.approx(bce, rel=1e-5)
    background = 1 - (2 * 2.8 + 1) / (2.8 + 4 + 1)  # soft Dice of 1 - p = 0.7 over 4 pixels against ones, smooth 1
    assert BagMILLoss(r=4.0, background_weight=0.5)(pred, label).item() == pytest.approx(
        bce + 0.5 * background, rel=1e-5)
    both_positive = BagMILLoss(r=4.0, background_weight=0.5)(pred, torch.tensor([1.0, 1.0])).item()
    assert both_positive == pytest.approx((-math.log(0.8) - math.log(0.3)) / 2, rel=1e-5)  # no negative: no term
    with pytest.raises(ValueError, match="background_weight"):
        BagMILLoss(background_weight=-1)
    # top_tiles: a positive bag of a tumour-like tile (0.9) and three empty tiles scores 0.9 with one top tile
    tiles = torch.zeros(1, 4, 1, 2, 2)
    tiles[0, 0] = 0.9
    assert BagMILLoss(pooling="top_tiles", top_tiles=1)(tiles, torch.tensor([1.0])).item() == pytest.approx(
        -math.log(0.9), rel=1e-5)
    with pytest.raises(ValueError, match="top_tiles"):
        BagMILLoss(pooling="top_tiles", top_tiles=0)


def _run_trainer(network: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, tile_batch: int) -> dict:
    """One step of BagMILTrainer with SGD; return the step's output."""
    trainer = BagMILTrainer(
        device="cpu", max_epochs=1, train_data_loader=[{"image": images, "label": labels}], network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=BagMILLoss(background_weight=0.5),
        tile_batch=tile_batch, decollate=False,
    )
    trainer.run()
    return trainer.state.output


@pytest.mark.parametrize("tile_batch", [12, 5])
def test_bag_trainer_step_equals_one_graph_over_the_same_micro_batches(tile_batch):
    """Two passes (tile_batch < tiles) give the gradient, weights and batch-norm statistics of one graph."""
    torch.manual_seed(0)
    network = DWSMIL(width=0.125)
    reference = copy.deepcopy(network)
    images, labels = torch.rand(2, 6, 3, 32, 32), torch.tensor([1.0, 0.0])
    output = _run_trainer(network, images, labels, tile_batch)

    reference.train()
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    maps = torch.cat([reference(chunk) for chunk in images.flatten(0, 1).split(tile_batch)]).unflatten(0, (2, 6))
    loss = BagMILLoss(background_weight=0.5)(maps, labels)
    loss.backward()
    optimizer.step()
    assert output["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    assert tuple(output["pred"].shape) == (2, 6, 4, 32, 32)
    for (name, a), b in zip(network.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=f"weight {name} differs")
    for (name, a), b in zip(network.named_buffers(), reference.buffers()):
        torch.testing.assert_close(a, b, msg=f"buffer {name} differs (running statistics updated twice?)")


def test_bag_trainer_refuses_tiles_that_are_not_bags():
    with pytest.raises(ValueError, match="tile_batch"):
        BagMILTrainer(device="cpu", max_epochs=1, train_data_loader=[], network=DWSMIL(width=0.125),
                      optimizer=None, loss_function=BagMILLoss(), tile_batch=0)
    network = DWSMIL(width=0.125)
    with pytest.raises(ValueError, match=r"bags of tiles \(B, k, 3, H, W\)"):
        _run_trainer(network, torch.rand(4, 3, 32, 32), torch.tensor([1.0, 0.0, 0.0, 1.0]), 8)


def _bags(n_bags: int, k: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags of smooth noise tiles; in every positive bag one tile holds a checkerboard patch (the "tumour")."""
    g = torch.Generator().manual_seed(seed)
    images = 0.4 + 0.1 * torch.rand(n_bags, k, 3, size, size, generator=g)
    labels = torch.tensor([float(i % 2 == 0) for i in range(n_bags)])
    rows, cols = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    board = ((rows // 2 + cols // 2) % 2).float()
    for b in range(0, n_bags, 2):
        tile = int(torch.randint(k, (1,), generator=g))
        images[b, tile, :, 10:22, 10:22] = board
    return images, labels


def test_a_fixed_set_of_bags_is_overfitted():
    """Slide labels alone teach the segmenter where the tumour tile is: bag scores separate, the positive tile's
    patch lights up and the other tiles of the positive bag stay dark."""
    torch.manual_seed(0)
    images, labels = _bags(4)
    network = DWSMIL(width=0.125)
    loss = BagMILLoss(r=4.0)
    trainer = BagMILTrainer(
        device="cpu", max_epochs=60, train_data_loader=[{"image": images, "label": labels}], network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=3e-3), loss_function=loss, tile_batch=8,
    )
    trainer.run()
    network.train()  # batch statistics of the bags, as in training
    with torch.no_grad():
        maps = torch.cat([network(chunk) for chunk in images.flatten(0, 1).split(8)]).unflatten(0, (4, 4))
    scores = loss.bag_scores(maps)[:, -1]
    # GM (r = 4) of a bag whose 3.5 % of pixels are 1 and the rest 0 is 0.035 ** 0.25 = 0.43
    assert bool((scores[labels > 0.5] > 0.5).all() and (scores[labels < 0.5] < 0.2).all()), scores
    patch = images[:, :, 0, 10:22, 10:22].std(dim=(-2, -1)) > 0.3  # (bag, tile): which tile holds the board
    fused = maps[:, :, -1]
    inside = fused[patch][:, 10:22, 10:22].mean()
    outside = fused[labels > 0.5][~patch[labels > 0.5]].mean()
    assert inside > 0.5 > outside, (inside, outside)


def _slide(path: Path, tissue: bool, size: int = 1024) -> Path:
    """A 1024-px slide (0.5 um/px) whose left half is stained tissue, or only glass."""
    image = np.full((size, size, 3), WHITE, np.uint8)
    if tissue:
        image[:, : size // 2] = PURPLE
    return write_pyramid(path, image, levels=1, tile=64)


def _entry(path: Path, label: int) -> dict:
    return {"slide": str(path), "label": label, "mask": None, "annotation": None, "name": path.stem}


def _tiles(entries: list[dict], **kwargs) -> SlideTileDataset:
    return SlideTileDataset(
        entries, level=0, tile_size=256, min_tissue=0.5, **kwargs
    )


def test_bags_draw_tiles_of_one_slide_with_replacement_and_say_so_once(tmp_path, caplog):
    entries = [_entry(_slide(tmp_path / "a.tif", True), 1), _entry(_slide(tmp_path / "b.tif", True), 0)]
    tiles = _tiles(entries)
    assert len(tiles) == 16  # the left half of a 4 x 4 grid, per slide
    with caplog.at_level(logging.INFO, logger="custom.data.datasets"):
        bags = SlideBagDataset(tiles, tiles_per_bag=12, bags_per_slide=3)
    said = [r.getMessage() for r in caplog.records if "draw with replacement" in r.getMessage()]
    assert len(said) == 1 and "a.tif (8)" in said[0] and "b.tif (8)" in said[0]
    assert len(bags) == 6
    torch.manual_seed(0)
    bag = bags[1]
    assert bag["image"].shape == (12, 3, 256, 256) and bag["location"].shape == (12, 2) and bag["label"] == 0.0
    assert bag["slide"] == entries[1]["slide"]
    assert bool((bag["location"][:, 0] < 512).all())  # every tile from the tissue half: (x, y), x < 512
    small = SlideBagDataset(tiles, tiles_per_bag=4)[0]
    assert len({tuple(xy) for xy in small["location"].tolist()}) == 4  # enough tiles: drawn without replacement


def test_a_positive_slide_without_tissue_is_refused_and_a_negative_one_left_out(tmp_path, caplog):
    tissue, glass = _slide(tmp_path / "tissue.tif", True), _slide(tmp_path / "glass.tif", False)
    with pytest.raises(ValueError, match=r"positive slide\(s\) without a tissue tile: .*glass\.tif.*min_tissue"):
        SlideBagDataset(_tiles([_entry(tissue, 0), _entry(glass, 1)]))
    with caplog.at_level(logging.WARNING, logger="custom.data.datasets"):
        bags = SlideBagDataset(_tiles([_entry(tissue, 1), _entry(glass, 0)]))
    assert len(bags) == 1 and any("glass.tif" in r.getMessage() for r in caplog.records)


def test_an_unreadable_slide_stops_before_training_unless_skipped(tmp_path, caplog):
    good = _slide(tmp_path / "good.tif", True)
    broken = tmp_path / "broken.tif"
    broken.write_bytes(b"II*\x00 this is not a slide")
    entries = [_entry(good, 1), _entry(broken, 0)]
    with pytest.raises(ValueError, match=r"broken\.tif[\s\S]*skip_unreadable"):
        _tiles(entries)
    with caplog.at_level(logging.ERROR, logger="custom.data.datasets"):
        tiles = _tiles(entries, skip_unreadable=True)
    assert {t["slide"] for t in tiles.data} == {str(good)}
    assert any("leaving out slide" in r.getMessage() and "broken.tif" in r.getMessage() for r in caplog.records)


def test_every_tile_of_a_negative_slide_trains_towards_an_all_zero_map(tmp_path):
    """Tiles take their slide's label, and the distillation target of a negative tile is zero whatever the teacher
    says: the loss is that of an all-zero pseudo-label."""
    tiles = _tiles([_entry(_slide(tmp_path / "neg.tif", True), 0)])
    labels = torch.stack([tiles[i]["label"] for i in range(len(tiles))])
    assert bool((labels == 0).all())
    student = torch.rand(len(labels), 4, 16, 16)
    loss = DistillationLoss()
    confident_teacher = loss.components(student, torch.ones(len(labels), 1, 16, 16), labels)
    zero_teacher = loss.components(student, torch.zeros(len(labels), 1, 16, 16), labels)
    for key in ("loss", "loss_kd", "loss_wce"):
        torch.testing.assert_close(confident_teacher[key], zero_teacher[key])
    grad_target = student.clone().requires_grad_(True)
    loss.components(grad_target, torch.ones(len(labels), 1, 16, 16), labels)["loss"].backward()
    assert bool((grad_target.grad >= 0).all()) and grad_target.grad.abs().sum() > 0  # only ever pushed down


def test_selection_rows_grouped_into_slides_by_hand():
    a, b, c = slide_group_id("a.tif"), slide_group_id("b.tif"), slide_group_id("c.tif")
    nan = math.nan
    rows = torch.tensor([
        [1, 0.8, 0.5, nan, a], [1, 0.4, 0.1, nan, a],  # positive slide: tiles score 0.8 and 0.4
        [0, 0.2, 0.0, nan, b], [0, 0.6, 0.2, nan, b],  # negative slide
        [0, 0.1, 0.0, nan, c],  # negative slide of one tile
    ], dtype=torch.float64)
    slides = group_rows(rows, r=1.0)
    assert len(slides) == 3
    by_group = {row[4].item(): row for row in slides}
    assert by_group[a][1].item() == pytest.approx(0.6) and by_group[a][2].item() == pytest.approx(0.3)
    assert by_group[b][1].item() == pytest.approx(0.4) and by_group[c][1].item() == pytest.approx(0.1)
    assert group_rows(rows, r=4.0)[:, 1].max().item() == pytest.approx(((0.8**4 + 0.4**4) / 2) ** 0.25)
    scores = summarise_selection(rows, threshold=0.5, r=1.0)
    assert (scores["n_pos"], scores["n_neg"]) == (1, 2)
    assert scores["auc"] == 1.0 and scores["fp_area"] == pytest.approx(0.05)
    assert scores["area_contrast"] == pytest.approx(0.3 - 0.05)
    assert scores["balanced_accuracy"] == pytest.approx((1.0 + 1.0) / 2)  # 0.6 >= 0.5 called; 0.4 and 0.1 not
    # top_tiles: a slide's score is the mean of its highest tile scores (top 2 of slide c's one tile: that tile)
    top1, top2 = group_rows(rows, top_tiles=1), group_rows(rows, top_tiles=2)
    assert sorted(top1[:, 1].tolist()) == pytest.approx([0.1, 0.6, 0.8])
    assert sorted(top2[:, 1].tolist()) == pytest.approx([0.1, 0.4, 0.6])
    # top 1: a 0.8 and b 0.6 are called, c 0.1 is not: sensitivity 1, specificity 1/2
    assert summarise_selection(rows, threshold=0.5, top_tiles=1)["balanced_accuracy"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="top_tiles must be >= 1, got 0"):
        group_rows(rows, top_tiles=0)
    mixed = rows.clone()
    mixed[2, 0] = 1
    with pytest.raises(ValueError, match="both labels"):
        group_rows(mixed)
    images = torch.tensor([[1, 0.9, 0.5, nan, nan], [0, 0.1, 0.0, nan, nan], [0, 0.2, 0.0, nan, nan]])
    assert summarise_selection(images)["n_neg"] == 2  # rows without a group: each image is its own unit


class _MeanMap(torch.nn.Module):
    """A 'network' whose two maps are the input's first channel: each tile scores its own pixel value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1].repeat(1, 2, 1, 1)


def test_the_validator_scores_slides_not_tiles_with_group_key():
    items = []
    for slide, label, values in (("pos.tif", 1, (0.9, 0.1, 0.1)), ("neg1.tif", 0, (0.2, 0.2)), ("neg2.tif", 0, (0.3,))):
        for value in values:
            items.append({"image": torch.full((3, 8, 8), value), "label": torch.tensor(float(label)), "slide": slide})
    loader = DataLoader(items, batch_size=2)
    scores = {}
    for group_key in (None, "slide"):
        evaluator = selection_evaluator(
            _MeanMap(), loader, "cpu", "area_contrast", smooth_sigma=None, threshold=0.5, group_key=group_key)
        evaluator.run()
        scores[group_key] = evaluator.state.metrics
    assert (scores[None]["val_n_pos"], scores[None]["val_n_neg"]) == (3, 3)  # tiles
    assert (scores["slide"]["val_n_pos"], scores["slide"]["val_n_neg"]) == (1, 2)  # slides
    assert scores["slide"]["val_pos_area"] == pytest.approx(1 / 3)  # one of the positive slide's three tiles
    assert scores["slide"]["val_area_contrast"] == pytest.approx(1 / 3)
    slide_score = ((0.9**4 + 2 * 0.1**4) / 3) ** 0.25
    assert scores["slide"]["val_auc"] == 1.0 and slide_score > 0.3  # the positive slide outranks both negatives


def test_the_validator_scores_a_slide_by_its_top_tiles_when_training_did():
    """A positive slide with one tumour tile among two empty ones: its GM (r = 4) over all pixels,
    ((0.6^4 + 2 * 0.1^4) / 3)^(1/4) = 0.456, misses the 0.5 threshold; its top tile, 0.6, does not."""
    items = []
    for slide, label, values in (("pos.tif", 1, (0.6, 0.1, 0.1)), ("neg.tif", 0, (0.2, 0.2))):
        for value in values:
            items.append({"image": torch.full((3, 8, 8), value), "label": torch.tensor(float(label)), "slide": slide})
    accuracy = {}
    for top_tiles in (None, 1):
        evaluator = selection_evaluator(_MeanMap(), DataLoader(items, batch_size=2), "cpu", "balanced_accuracy",
                                        smooth_sigma=None, group_key="slide", slide_top_tiles=top_tiles)
        evaluator.run()
        accuracy[top_tiles] = evaluator.state.metrics["val_balanced_accuracy"]
    assert ((0.6**4 + 2 * 0.1**4) / 3) ** 0.25 == pytest.approx(0.456, abs=1e-3)
    assert accuracy == {None: 0.5, 1: 1.0}  # sensitivity 0 then 1; the negative slide (0.2) is never called


@pytest.mark.parametrize("pooling, expected", [("gm", None), ("top_fraction", None), ("top_tiles", 3)])
def test_slide_mil_scores_validation_slides_as_it_pools_bags(pooling, expected):
    parser = ConfigParser()
    names = ("train.json", "cpu_train.json", "slides.json", "slide_mil.json")
    parser.read_config([str(CONFIGS / name) for name in names])
    parser.update({"bag_pooling": pooling, "bag_top_tiles": 3})
    assert parser.get_parsed_content("validate#evaluator_def#slide_top_tiles") == expected


def test_slide_bag_training_needs_negative_slides():
    slides = [{"slide": f"s{i}.tif", "label": 1, "mask": None} for i in range(3)]
    val = [{"slide": "v0.tif", "label": 1, "mask": None}, {"slide": "v1.tif", "label": 0, "mask": None}]
    with pytest.raises(ValueError, match="all 3 slides are labelled positive"):
        check_training_data(slides, val, val, "area_contrast", unit="slide")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_training_data(slides, val, val, "area_contrast")  # images: a warning only
    assert any("all 3 images are positive" in str(w.message) for w in caught)


def test_the_all_tissue_floor_by_hand(tmp_path):
    """Tissue = the left half of the slide, tumour = its upper quarter: Dice 2 x 1/4 / (1/4 + 1/2) = 2/3."""
    import json
    import subprocess
    import sys

    from custom.metrics import all_tissue_floor
    from custom.writers.pyramid_tiff import write_pyramid as write_label_pyramid

    slide = _slide(tmp_path / "pos.tif", True)
    truth = np.zeros((1024, 1024), np.uint8)
    truth[:512, :512] = 255
    mask = write_label_pyramid(tmp_path / "pos_mask.tif", lambda r, c, h, w: truth[r:r + h, c:c + w, None],
                               (1024, 1024), channels=1, mpp=0.5)
    negative = _slide(tmp_path / "neg.tif", True)
    listing = tmp_path / "slides.csv"
    listing.write_text(f"slide,label,mask\n{slide.name},1,{mask.name}\n{negative.name},0,\n")
    floor = all_tissue_floor(listing)
    assert floor["dice_pos"] == pytest.approx(2 / 3, abs=0.02)
    assert floor["fp_area_neg"] == 0.0 and floor["auc"] == 1.0 and floor["n_slides"] == 2
    run = tmp_path / "run"
    run.mkdir()
    (run / "slide_metrics.json").write_text(json.dumps({"dice_pos": 0.5, "fp_area_neg": 0.01, "auc": 0.75,
                                                       "froc": 0.4, "n_slides": 2}))
    script = Path(__file__).resolve().parents[1] / "scripts" / "slide_benchmark.py"
    out = subprocess.run([sys.executable, str(script), "--datalist", str(listing), "--runs", f"mine={run}"],
                         capture_output=True, text=True, check=True).stdout
    mine = next(line for line in out.splitlines() if line.startswith("mine"))
    assert mine.split()[1:5] == ["0.500", "0.0100", "0.750", "0.400"]
    floor_line = next(line for line in out.splitlines() if line.startswith("floor: all tissue"))
    assert abs(float(floor_line.split(")")[-1].split()[0]) - 2 / 3) < 0.02
