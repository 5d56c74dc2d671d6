"""Mixed supervision: which training masks become strong labels, the stage-1 loss on them, the stage-2 targets."""

import json
import math
import re

import numpy as np
import pytest
import test_bundle_training
import torch
from monai.bundle import ConfigParser
from monai.utils.enums import CommonKeys as Keys
from PIL import Image
from test_bundle_training import CONFIGS, run_bundle
from tiny_mil_net import TinyMILNet
from torch.utils.data import DataLoader

from custom.checkpoints import init_networks
from custom.data import read_strong_datalist, with_strong_labels
from custom.engines import DistillationTrainer, PrepareWeakStrong
from custom.losses import DistillationLoss, MaskSupervisedLoss, MILPoolingLoss, MixedSupervisionLoss

tiny_data = test_bundle_training.tiny_data  # the bundle tests' module-scoped synthetic data set


def _items(n_masked: int = 20, n_unmasked: int = 5, n_neg: int = 6) -> list[dict]:
    """Training items: positives with and without a mask (one with an XML annotation), and negatives."""
    items = [{"image": f"p{i}.png", "label": 1, "mask": f"gt/p{i}.png", "name": f"p{i}"} for i in range(n_masked)]
    items[0] = {**items[0], "mask": None, "annotation": "p0.xml"}
    items += [{"image": f"u{i}.png", "label": 1, "mask": None, "name": f"u{i}"} for i in range(n_unmasked)]
    return items + [{"image": f"n{i}.png", "label": 0, "mask": None, "name": f"n{i}"} for i in range(n_neg)]


def test_strong_fraction_chooses_masked_positives_and_strips_every_other_mask():
    items = _items()
    before = json.dumps(items)
    out = with_strong_labels(items, 0.25, seed=3)
    strong = [item for item in out if item["strong"]]
    assert len(strong) == 5  # round(0.25 x 20 positives that have a mask or an annotation)
    assert all(item["label"] == 1 and (item.get("mask") or item.get("annotation")) for item in strong)
    weak = [item for item in out if not item["strong"]]
    assert len(weak) == len(items) - 5 and not any(item.get("mask") or item.get("annotation") for item in weak)
    assert json.dumps(items) == before  # the caller's items are not modified
    assert [i["name"] for i in with_strong_labels(items, 0.25, seed=3) if i["strong"]] == [i["name"] for i in strong]
    assert [i["name"] for i in with_strong_labels(items, 0.25, seed=4) if i["strong"]] != [i["name"] for i in strong]


@pytest.mark.parametrize("fraction, expected", [(0.0, 0), (0.01, 1), (0.05, 1), (0.5, 10), (1.0, 20)])
def test_strong_fraction_counts(fraction, expected):
    out = with_strong_labels(_items(), fraction, seed=0)
    assert sum(item["strong"] for item in out) == expected
    assert sum(bool(item.get("mask") or item.get("annotation")) for item in out) == expected


def test_strong_fraction_out_of_range_is_refused():
    with pytest.raises(ValueError, match="strong_fraction must be in"):
        with_strong_labels(_items(), 1.5)


def _png(path, array) -> str:
    Image.fromarray(array).save(path)
    return path.name


def test_strong_datalist_is_read_relative_to_its_folder_and_labelled_from_the_mask(tmp_path):
    image = np.full((8, 8, 3), 200, np.uint8)
    tumour, empty = np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.uint8)
    tumour[2:4, 2:4] = 255
    rows = [{"image": _png(tmp_path / "a.png", image), "mask": _png(tmp_path / "a_mask.png", tumour)},
            {"image": _png(tmp_path / "b.png", image), "mask": _png(tmp_path / "b_mask.png", empty), "name": "bee"}]
    (tmp_path / "strong.json").write_text(json.dumps(rows))
    items = read_strong_datalist(tmp_path / "strong.json")
    assert [(i["label"], i["name"], i["strong"]) for i in items] == [(1, "strong_a", True), (0, "bee", True)]
    assert items[0]["image"] == str(tmp_path / "a.png") and items[0]["mask"] == str(tmp_path / "a_mask.png")
    out = with_strong_labels(_items(), 0.0, datalist=tmp_path / "strong.json")
    assert [i["name"] for i in out if i["strong"]] == ["strong_a", "bee"]
    # a name that clashes with a training item would overwrite its pseudo-label file: refused
    with pytest.raises(ValueError, match="'p1' is used twice"):
        rows[1]["name"] = "p1"
        (tmp_path / "clash.json").write_text(json.dumps(rows))
        with_strong_labels(_items(), 0.0, datalist=tmp_path / "clash.json")


def test_strong_datalist_bad_input_names_the_entry(tmp_path):
    (tmp_path / "bad.json").write_text("[{")
    with pytest.raises(ValueError, match="invalid JSON"):
        read_strong_datalist(tmp_path / "bad.json")
    (tmp_path / "missing.json").write_text(json.dumps([{"image": "x.png", "mask": "x_mask.png"}]))
    with pytest.raises(FileNotFoundError, match="entry 0: image file not found"):
        read_strong_datalist(tmp_path / "missing.json")
    (tmp_path / "nomask.json").write_text(json.dumps([{"image": "x.png"}]))
    with pytest.raises(ValueError, match="'mask' must be a path"):
        read_strong_datalist(tmp_path / "nomask.json")
    with pytest.raises(FileNotFoundError, match="strong label list not found"):
        read_strong_datalist(tmp_path / "absent.json")


def test_mixed_loss_by_hand():
    pred = torch.full((2, 1, 2, 2), 0.5)  # constant maps: gm score 0.5, BCE ln 2 whatever the label
    label = torch.tensor([1.0, 0.0])
    mask = torch.ones(2, 1, 2, 2)
    weak_only = MixedSupervisionLoss(strong_weight=2.0)(pred, {"label": label, "strong": torch.tensor([False, False])})
    assert weak_only.item() == pytest.approx(math.log(2), rel=1e-5)
    # image 0 strong with an all-tumour mask: Dice 1 - (2 x 2 + 1) / (2 + 4 + 1) = 2 / 7, BCE ln 2
    loss = MixedSupervisionLoss(strong_weight=2.0)(pred, {"label": label, "mask": mask,
                                                         "strong": torch.tensor([True, False])})
    assert loss.item() == pytest.approx(math.log(2) + 2.0 * (2 / 7 + math.log(2)), rel=1e-5)
    # it is the weak loss plus the supervised one on the strong images only, for any maps
    maps = torch.rand(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    masks = (torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    target = {"label": torch.tensor([1.0, 1.0, 0.0]), "mask": masks, "strong": torch.tensor([False, True, True])}
    expected = MILPoolingLoss()(maps, target["label"]) + 0.5 * MaskSupervisedLoss()(maps[1:], masks[1:])
    assert MixedSupervisionLoss(strong_weight=0.5)(maps, target).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="one strong flag per image"):
        MixedSupervisionLoss()(maps, {**target, "strong": torch.tensor([True])})


def test_prepare_weak_strong_batches():
    batch = {"image": torch.zeros(2, 3, 4, 4), "label": torch.tensor([1.0, 0.0]), "mask": torch.ones(2, 1, 4, 4)}
    image, target = PrepareWeakStrong()(batch, "cpu")
    assert image.shape == (2, 3, 4, 4) and target["strong"].tolist() == [False, False] and "mask" not in target
    _, target = PrepareWeakStrong()({**batch, "strong": torch.tensor([True, False])}, "cpu")
    assert target["strong"].tolist() == [True, False] and target["mask"].shape == (2, 1, 4, 4)


def test_distillation_uses_strong_masks_instead_of_the_teacher():
    torch.manual_seed(0)
    teacher, student = TinyMILNet(), TinyMILNet()
    images = torch.rand(4, 3, 16, 16)
    masks = torch.zeros(4, 1, 16, 16)
    masks[0, :, :8] = 1.0
    pseudo = torch.full((4, 1, 16, 16), 0.3)
    data = [{"image": images[i], "label": 1, "mask": masks[i], "pseudo": pseudo[i], "strong": i == 0, "name": f"i{i}"}
            for i in range(4)]
    trainer = DistillationTrainer(
        device="cpu", max_epochs=1, train_data_loader=DataLoader(data, batch_size=4), network=student,
        teacher=teacher, optimizer=torch.optim.Adam(student.parameters()), loss_function=DistillationLoss(),
        decollate=False,
    )
    trainer.run()
    used = trainer.state.output["pseudo"]
    assert torch.equal(used[0], masks[0]) and torch.equal(used[1:], pseudo[1:])
    expected = DistillationLoss().components(trainer.state.output[Keys.PRED], used, torch.ones(4))[Keys.LOSS]
    assert trainer.state.output[Keys.LOSS].item() == pytest.approx(expected.item(), rel=1e-6)
    without = {k: v for k, v in next(iter(DataLoader(data, batch_size=4))).items() if k != "strong"}
    assert trainer.with_strong_masks(without, pseudo) is pseudo


def test_init_networks_starts_every_network_from_the_checkpoint(tmp_path):
    torch.manual_seed(0)
    source, teacher, student = TinyMILNet(), TinyMILNet(), TinyMILNet()
    torch.save(source.state_dict(), tmp_path / "model.pt")
    init_networks([teacher, student], tmp_path / "model.pt")
    for network in (teacher, student):
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in network.state_dict().items())
    init_networks([teacher], None)  # nothing to load: unchanged
    with pytest.raises(FileNotFoundError, match="init_path"):
        init_networks([teacher], tmp_path / "absent.pt")


def _parsed(data, extra: tuple[str, ...] = (), **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / c) for c in ("train.json", "cpu_train.json", *extra)])
    parser.update({"dataset_dir": str(data), **overrides})
    return parser


def test_the_supervised_upper_bound_trains_on_every_training_mask(tiny_data):
    # a regression once trained the upper bound on empty masks: the weak default stripped them before the loss
    items = _parsed(tiny_data, ("supervised.json",)).get_parsed_content("train#datalist")
    positives = [item for item in items if item["label"] == 1]
    assert positives and all(item["mask"] and item["strong"] for item in positives)


def test_weak_training_reads_no_mask_and_augmentation_moves_the_masks(tiny_data):
    parser = _parsed(tiny_data)
    items = parser.get_parsed_content("train#datalist")
    assert items and not any(item["strong"] or item["mask"] for item in items)
    assert any(item["mask"] for item in parser.get_parsed_content("test#datalist"))
    augment = parser.get_parsed_content("distill#augment")
    assert set(augment.keys) == {"image", "mask", "pseudo"}
    assert parser.get_parsed_content("distill#trainer").batch_transform.transforms == (augment,)


def test_training_with_all_masks_runs_and_says_how_many(tiny_data, tmp_path):
    log = run_bundle(tmp_path, tiny_data, strong_fraction=1.0)
    assert re.search(r"strong labels: masks of (\d+) of \1 training positives \(\1 with a mask", log)
    assert "start from the weights" not in log
    # fine-tuning: a second run starts from the first one's model.pt
    log = run_bundle(tmp_path / "again", tiny_data, stage1_epochs=1, stage2_epochs=0,
                     init_path=str(tmp_path / "models" / "model.pt"))
    assert "2 network(s) start from the weights of" in log
