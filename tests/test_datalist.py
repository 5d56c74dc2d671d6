"""Datalists: stem matching of patch-folder masks, row-naming errors of slide lists, deterministic splits."""

import json

import pytest

from custom.data.datalist import load_slide_datalist, patch_folder_datalist, split_train_val


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture
def patch_root(tmp_path):
    """pos names whose sort order differs from their gt names' (different suffixes and case), plus a stray file."""
    for name in ("b10.png", "B2.jpg", "a.tif"):
        _touch(tmp_path / "test" / "pos" / name)
    for name in ("a.png", "b10.png", "B2.png", "readme.txt"):
        _touch(tmp_path / "test" / "gt" / name)
    _touch(tmp_path / "test" / "neg" / "n1.png")
    return tmp_path


def test_masks_are_matched_by_stem(patch_root):
    items = patch_folder_datalist(patch_root, "test")
    by_name = {item["name"]: item for item in items}
    assert sorted(by_name) == ["B2", "a", "b10", "n1"]
    for stem in ("a", "b10", "B2"):
        assert by_name[stem]["label"] == 1
        assert by_name[stem]["mask"].endswith(f"gt/{stem}.png")
    assert by_name["a"]["image"].endswith("pos/a.tif")
    assert by_name["n1"] == {"image": str(patch_root / "test/neg/n1.png"), "label": 0, "mask": None, "name": "n1",
                             "group": ""}


def test_pos_without_mask_is_an_error_for_test_only(patch_root):
    (patch_root / "test" / "gt" / "b10.png").unlink()
    with pytest.raises(ValueError, match=r"no mask.*b10"):
        patch_folder_datalist(patch_root, "test")
    (patch_root / "test").rename(patch_root / "train")
    items = {item["name"]: item for item in patch_folder_datalist(patch_root, "train")}
    assert items["b10"]["mask"] is None and items["a"]["mask"] is not None


def test_mask_without_image_is_warned_about(patch_root):
    _touch(patch_root / "test" / "gt" / "ghost.png")
    with pytest.warns(UserWarning, match="ghost"):
        items = patch_folder_datalist(patch_root, "test")
    assert "ghost" not in {item["name"] for item in items}


def test_stem_in_pos_and_neg_gets_unique_names(patch_root):
    _touch(patch_root / "test" / "neg" / "a.png")
    items = {item["name"]: item for item in patch_folder_datalist(patch_root, "test")}
    assert items["pos_a"]["label"] == 1 and items["pos_a"]["mask"].endswith("gt/a.png")
    assert items["neg_a"]["label"] == 0 and items["neg_a"]["mask"] is None
    assert "b10" in items


def test_clashing_stems_and_missing_split(patch_root):
    _touch(patch_root / "test" / "pos" / "b10.jpg")
    with pytest.raises(ValueError, match=r"share the stem 'b10'"):
        patch_folder_datalist(patch_root, "test")
    with pytest.raises(FileNotFoundError, match="val"):
        patch_folder_datalist(patch_root, "val")


@pytest.fixture
def slide_dir(tmp_path):
    for name in ("s1.tif", "s2.tif", "s1_mask.tif", "s1.xml"):
        _touch(tmp_path / "slides" / name)
    return tmp_path


def test_csv_slide_list_resolves_relative_paths(slide_dir):
    (slide_dir / "list.csv").write_text(
        "slide,label,mask,annotation,centre\n"
        "slides/s1.tif,tumor,slides/s1_mask.tif,slides/s1.xml,A\n"
        "slides/s2.tif,0,,,B\n"
    )
    first, second = load_slide_datalist(slide_dir / "list.csv")
    assert first == {
        "slide": str(slide_dir / "slides/s1.tif"),
        "label": 1,
        "mask": str(slide_dir / "slides/s1_mask.tif"),
        "annotation": str(slide_dir / "slides/s1.xml"),
        "centre": "A",
        "name": "s1",
        "group": "s1",
    }
    assert second["label"] == 0 and second["mask"] is None and second["annotation"] is None


def test_json_slide_lists_plain_and_monai_style(slide_dir):
    rows = [{"slide": "slides/s1.tif", "label": 1}, {"slide": "slides/s2.tif", "label": "Normal"}]
    (slide_dir / "plain.json").write_text(json.dumps(rows))
    (slide_dir / "monai.json").write_text(json.dumps({"training": rows, "validation": rows[:1]}))
    assert [i["label"] for i in load_slide_datalist(slide_dir / "plain.json")] == [1, 0]
    assert [i["name"] for i in load_slide_datalist(slide_dir / "monai.json")] == ["s1", "s2"]
    assert len(load_slide_datalist(slide_dir / "monai.json", key="validation")) == 1


@pytest.mark.parametrize(
    "body, message",
    [
        ("slide,mask\nslides/s1.tif,\n", r"line 2: missing column\(s\) \['label'\]"),
        ("slide,label\nslides/s1.tif,1\nslides/s2.tif,2\n", r"line 3: unknown label '2'"),
        ("slide,label\nslides/s1.tif,1\nslides/s2.tif,yes\n", r"line 3: unknown label 'yes'"),
        ("slide,label\nslides/s1.tif,1\nslides/s9.tif,0\n", r"line 3: slide file not found: .*s9\.tif"),
        ("slide,label,mask\nslides/s1.tif,1,slides/nomask.tif\n", r"line 2: mask file not found"),
        ("slide,label\nslides/s1.tif,1\nslides/s1.tif,1\n", r"line 3: slide name 's1' repeats"),
    ],
)
def test_csv_errors_name_the_row(slide_dir, body, message):
    (slide_dir / "bad.csv").write_text(body)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_slide_datalist(slide_dir / "bad.csv")


def test_json_errors_name_the_entry(slide_dir):
    rows = [{"slide": "slides/s1.tif", "label": 1}, {"slide": "slides/s2.tif", "label": 1.0}]
    (slide_dir / "bad.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=r"entry 1: unknown label 1\.0"):
        load_slide_datalist(slide_dir / "bad.json")


def _labelled(n_pos, n_neg):
    return [{"name": f"p{i}", "label": 1} for i in range(n_pos)] + [{"name": f"n{i}", "label": 0} for i in range(n_neg)]


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    items = _labelled(20, 10)
    train, val = split_train_val(items, 0.2, seed=111)
    again_train, again_val = split_train_val(items, 0.2, seed=111)
    assert [i["name"] for i in val] == [i["name"] for i in again_val]
    assert [i["name"] for i in train] == [i["name"] for i in again_train]
    names_train, names_val = {i["name"] for i in train}, {i["name"] for i in val}
    assert not names_train & names_val and len(names_train | names_val) == 30
    assert sum(i["label"] for i in val) == 4 and sum(1 - i["label"] for i in val) == 2
    other_val = split_train_val(items, 0.2, seed=7)[1]
    assert {i["name"] for i in other_val} != names_val


def test_small_classes_keep_a_training_item():
    train, val = split_train_val(_labelled(1, 3), 0.1, seed=0)
    assert [i["name"] for i in train if i["label"] == 1] == ["p0"]
    assert sum(1 for i in val if i["label"] == 0) == 1
    assert split_train_val(_labelled(3, 3), 0.0, seed=0)[1] == []


def test_random_split_and_bad_arguments():
    train, val = split_train_val(_labelled(5, 5), 0.3, seed=1, by="random")
    assert len(val) == 3 and len(train) == 7
    with pytest.raises(ValueError, match="split mode"):
        split_train_val(_labelled(5, 5), 0.3, by="patient")
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(_labelled(5, 5), 1.0)
