"""Patch datasets: tensors, sizing and validation; slide tile datasets: pixels, masks and labels of each tile."""

import re

import numpy as np
import pytest
import tifffile
import torch
from monai.data import DataLoader
from monai.transforms import NormalizeIntensityd, RandFlipd
from PIL import Image

from custom.data.datalist import load_slide_datalist, patch_folder_datalist
from custom.data.datasets import PatchFolderDataset, SlideBagDataset, SlideTileDataset, patch_transforms


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
    assert neg["label"].item() == 0.0 and not neg["mask"].any() and neg["has_mask"]


def test_positive_without_gt_is_flagged(patch_root):
    (patch_root / "test" / "gt" / "p2.png").unlink()
    dataset = PatchFolderDataset(patch_folder_datalist(patch_root, "test", require_masks=False))
    items = {item["name"]: item for item in dataset}
    assert not items["p2"]["has_mask"] and not items["p2"]["mask"].any() and items["p1"]["has_mask"]


def test_resize_keeps_masks_binary_and_in_place(patch_root):
    dataset = PatchFolderDataset(patch_folder_datalist(patch_root, "test"), image_size=(16, 24))
    item = dataset[0]
    assert item["image"].shape == (3, 16, 24) and item["mask"].shape == (1, 16, 24)
    assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
    assert item["mask"][0, :, :12].all() and not item["mask"][0, :, 12:].any()
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_center_crop_takes_the_middle(patch_root):
    items = patch_folder_datalist(patch_root, "test")
    dataset = PatchFolderDataset(items, image_size=(4, 6), resize_mode="center_crop")
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
        NormalizeIntensityd(
            "image", subtrahend=[0.485, 0.456, 0.406], divisor=[0.229, 0.224, 0.225], channel_wise=True
        ),
        RandFlipd(["image", "mask"], prob=1.0, spatial_axis=1),
    ]
    plain = PatchFolderDataset(patch_folder_datalist(patch_root, "test"), image_size=8, resize_mode="center_crop")
    dataset = PatchFolderDataset(
        patch_folder_datalist(patch_root, "test"),
        image_size=8,
        resize_mode="center_crop",
        transform=extra,
        cache_rate=1.0,
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


def _write_tiff(path, levels, photometric):
    """A tiled, LZW, pyramidal TIFF (reduced-resolution pages in the main IFD chain), 0.5 um/px at level 0."""
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, array in enumerate(levels):
            extra = {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"} if index == 0 else {"subfiletype": 1}
            tif.write(array, tile=(64, 64), photometric=photometric, compression="lzw", **extra)
    return path


@pytest.fixture(scope="module")
def slide_set(tmp_path_factory):
    """Slides 500 x 512 (w x h) with tissue at x >= 200 and tumour in x [300, 500), y [100, 300) (level 0).

    s1 has a pyramidal 0/255 mask TIFF, s2 is a negative, s3 has the tumour as ASAP XML, s4 a one-level mask.
    """
    root = tmp_path_factory.mktemp("slides")
    rng = np.random.default_rng(5)
    image = np.full((512, 500, 3), 244, np.uint8)
    image[:, 200:] = rng.integers(0, 60, (512, 300, 3), dtype=np.uint8) + np.array([170, 60, 140], np.uint8)
    mask = np.zeros((512, 500), np.uint8)
    mask[100:300, 300:500] = 255
    for name in ("s1", "s2", "s3", "s4"):
        _write_tiff(root / f"{name}.tif", [image, image[::2, ::2]], "rgb")
    _write_tiff(root / "s1_mask.tif", [mask, mask[::2, ::2]], "minisblack")
    _write_tiff(root / "s4_mask.tif", [mask], "minisblack")
    (root / "s3.xml").write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="t" Type="Polygon" PartOfGroup="_0"><Coordinates>'
        '<Coordinate Order="0" X="300" Y="100"/><Coordinate Order="1" X="500" Y="100"/>'
        '<Coordinate Order="2" X="500" Y="300"/><Coordinate Order="3" X="300" Y="300"/>'
        "</Coordinates></Annotation></Annotations></ASAP_Annotations>"
    )
    (root / "slides.csv").write_text(
        "slide,label,mask,annotation\ns1.tif,1,s1_mask.tif,\ns2.tif,0,,\ns3.tif,tumor,,s3.xml\ns4.tif,1,s4_mask.tif,\n"
    )
    # Level 1 padded with what read_region returns past the edge: white pixels, and no tumour.
    level1 = np.pad(image[::2, ::2], ((0, 64), (0, 64), (0, 0)), constant_values=255)
    mask1 = np.pad(mask[::2, ::2] > 0, ((0, 64), (0, 64)))
    return root, level1, mask1


def _tile_dataset(root, grid_dir, **kwargs):
    slides = load_slide_datalist(root / "slides.csv")
    return SlideTileDataset(slides, level=1, tile_size=64, min_tissue=0.5, grid_dir=str(grid_dir), **kwargs)


def test_slide_tiles_match_slide_and_mask_pixels_in_workers(slide_set, tmp_path):
    root, level1, mask1 = slide_set
    dataset = _tile_dataset(root, tmp_path)
    locations = {tuple(t["location"]) for t in dataset.data if t["name"].startswith("s1_")}
    # Tissue covers level-0 x >= 200: every tile at x 256 and 384 is kept, none at x 0.
    assert {(x, y) for x in (256, 384) for y in (0, 128, 256, 384)} <= locations
    assert all(x >= 128 for x, _ in locations)
    labels = {"s1": 1.0, "s2": 0.0, "s3": 1.0, "s4": 1.0}
    seen = 0
    for batch in DataLoader(dataset, batch_size=8, num_workers=2):
        for i, name in enumerate(batch["name"]):
            x, y = batch["location"][i].tolist()
            stem = name.split("_")[0]
            assert name == f"{stem}_{x}_{y}" and batch["slide"][i] == str(root / f"{stem}.tif")
            assert batch["label"][i].item() == labels[stem] and batch["level"][i].item() == 1
            r, c = y // 2, x // 2
            pixels = np.round(batch["image"][i].numpy() * 255).astype(np.uint8)
            np.testing.assert_array_equal(pixels, level1[r : r + 64, c : c + 64].transpose(2, 0, 1), err_msg=name)
            expected = mask1[r : r + 64, c : c + 64] if stem != "s2" else np.zeros((64, 64), bool)
            np.testing.assert_array_equal(batch["mask"][i, 0].numpy(), expected.astype(np.float32), err_msg=name)
            assert batch["has_mask"][i]
            seen += 1
    assert seen == len(dataset) == 4 * len(locations)
    edge = dataset[[t["name"] for t in dataset.data].index("s1_384_128")]
    # Level-1 rows 64..127 and columns 192..249 are tumour; columns 250..255 lie past the slide and must stay 0.
    assert edge["mask"][0, :, :58].all() and not edge["mask"][0, :, 58:].any()
    assert (edge["image"][:, :, 58:] == 1.0).all()  # past the slide's right edge: white


def test_tile_grids_are_cached_and_reused(slide_set, tmp_path, monkeypatch):
    root, _, _ = slide_set
    first = _tile_dataset(root, tmp_path)
    assert len(list(tmp_path.glob("*.csv"))) == 4

    def no_detection(*args, **kwargs):
        raise AssertionError("tissue detection ran although the grid was cached")

    monkeypatch.setattr("custom.data.grid.detect_tissue", no_detection)
    again = _tile_dataset(root, tmp_path)
    assert [t["name"] for t in again.data] == [t["name"] for t in first.data]


def test_bags_carry_the_slide_label(slide_set, tmp_path):
    root, _, _ = slide_set
    tiles = _tile_dataset(root, tmp_path)
    assert {len(indices) for indices in tiles.bags().values()} == {len(tiles) // 4}
    torch.manual_seed(0)
    bags = SlideBagDataset(tiles, tiles_per_bag=3)
    assert len(bags) == 4
    for bag in bags:
        assert bag["image"].shape == (3, 3, 64, 64) and bag["mask"].shape == (3, 1, 64, 64)
        assert bag["label"].item() == (0.0 if bag["name"] == "s2" else 1.0)
        assert (bag["location"][:, 0] >= 128).all()
    big = SlideBagDataset(tiles, tiles_per_bag=len(tiles))[0]
    assert big["image"].shape[0] == len(tiles)


def test_mask_of_another_size_is_refused(slide_set, tmp_path):
    root, _, _ = slide_set
    _write_tiff(tmp_path / "small_mask.tif", [np.zeros((256, 250), np.uint8)], "minisblack")
    (tmp_path / "s1.tif").symlink_to(root / "s1.tif")
    (tmp_path / "bad.csv").write_text("slide,label,mask\ns1.tif,1,small_mask.tif\n")
    with pytest.raises(ValueError, match=r"small_mask\.tif.*\(250, 256\).*s1\.tif.*\(500, 512\)"):
        SlideTileDataset(load_slide_datalist(tmp_path / "bad.csv"), level=1, tile_size=64)
