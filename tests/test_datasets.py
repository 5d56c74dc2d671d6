"""Patch datasets: tensors, sizing and validation; slide tile datasets: pixels, masks and labels of each tile."""

import re

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import NormalizeIntensityd, RandFlipd
from PIL import Image

from custom.data.datalist import patch_folder_datalist
from custom.data.datasets import PatchFolderDataset, patch_transforms


def _save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture
def patch_root(tmp_path):
    """Two 8x12 positives with left-half masks (one stored 0/1, one 0/255) and one negative."""
    rng = np.random.default_rng(3)
    mask = np.zeros((8, 12), np.uint8)
    mask[:, :6] = 1
    for name, scale in (("p1", 1), ("p2", 255)):
        _save(tmp_path / "test" / "pos" / f"{name}.png", rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
        _save(tmp_path / "test" / "gt" / f"{name}.png", mask * scale)
    _save(tmp_path / "test" / "neg" / "n1.png", rng.integers(0, 256, (8, 12, 3), dtype=np.uint8))
    return tmp_path


def test_items_hold_validated_tensors(patch_root):
    dataset = PatchFolderDataset(patch_folder_datalist(patch_root, "test"), resize_mode="none")
    items = {item["name"]: item for item in dataset}
    pos = items["p1"]
    assert pos["image"].shape == (3, 8, 12) and pos["image"].dtype == torch.float32
    original = np.asarray(Image.open(patch_root / "test/pos/p1.png"))
    np.testing.assert_allclose(pos["image"].numpy(), original.transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert pos["label"].shape == () and pos["label"].dtype == torch.float32 and pos["label"].item() == 1.0
    assert pos["mask"].shape == (1, 8, 12) and pos["mask"].sum().item() == 48 and pos["has_mask"]
    torch.testing.assert_close(items["p1"]["mask"], items["p2"]["mask"])
    neg = items["n1"]
    assert neg["label"].item() == 0.0 and not neg["mask"].any() and not neg["has_mask"]


def test_resize_keeps_masks_binary_and_in_place(patch_root):
    dataset = PatchFolderDataset(patch_folder_datalist(patch_root, "test"), image_size=(16, 24))
    item = dataset[0]
    assert item["image"].shape == (3, 16, 24) and item["mask"].shape == (1, 16, 24)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["mask"][0, :, :12].all() and not item["mask"][0, :, 12:].any()
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_center_crop_takes_the_middle(patch_root):
    dataset = PatchFolderDataset(patch_folder_datalist(patch_root, "test"), image_size=(4, 6), resize_mode="center_crop")
    item = dataset[0]
    original = np.asarray(Image.open(patch_root / "test/pos/p1.png")) / 255.0
    np.testing.assert_allclose(item["image"].numpy(), original[2:6, 3:9].transpose(2, 0, 1), atol=1e-6)
    assert item["mask"][0, :, :3].all() and not item["mask"][0, :, 3:].any()


def test_mask_of_the_wrong_size_names_both_files(patch_root):
    _save(patch_root / "test" / "gt" / "p1.png", np.zeros((8, 10), np.uint8))
    dataset = PatchFolderDataset(patch_folder_datalist(patch_root, "test"))
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps the reader's error, keeping it as the cause
        dataset[0]
    assert re.search(r"gt/p1\.png.*\(10, 8\).*pos/p1\.png.*\(12, 8\)", str(info.value.__cause__))


def test_config_transforms_append_and_batch(patch_root):
    extra = [
        NormalizeIntensityd("image", subtrahend=[0.485, 0.456, 0.406], divisor=[0.229, 0.224, 0.225], channel_wise=True),
        RandFlipd(["image", "mask"], prob=1.0, spatial_axis=1),
    ]
    plain = PatchFolderDataset(patch_folder_datalist(patch_root, "test"), image_size=8, resize_mode="center_crop")
    dataset = PatchFolderDataset(
        patch_folder_datalist(patch_root, "test"), image_size=8, resize_mode="center_crop", transform=extra, cache_rate=1.0
    )
    flipped, original = dataset[0], plain[0]
    expected = (original["image"][0] - 0.485) / 0.229
    torch.testing.assert_close(flipped["image"][0].as_tensor(), expected.flip(-1).as_tensor())
    torch.testing.assert_close(flipped["mask"].as_tensor(), original["mask"].flip(-1))
    batch = next(iter(DataLoader(dataset, batch_size=3)))
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].tolist() == [1.0, 1.0, 0.0]
    assert batch["name"] == ["p1", "p2", "n1"]


def test_unknown_resize_mode():
    with pytest.raises(ValueError, match="resize_mode"):
        patch_transforms(16, "stretch")
