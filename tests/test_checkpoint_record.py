# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints that carry their network: the record a training writes, the loader that builds the recorded network
when the config's differs (and refuses, naming the knob, when it cannot), and the README's rows run in order after
one tiny training with no architecture override."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from test_bundle_training import CONFIGS, ROOT, TINY, run_bundle, tiny_data  # noqa: F401 - the fixture

from custom.checkpoints import (
    RECORD_KEY,
    TrainingRecord,
    init_student,
    load_weights,
    network_definition,
    read_record,
    record_value,
    trained_network,
)
from custom.inference import WholeSlideInferer
from custom.networks import DWSMIL, SAMIL
from custom.report import is_student

WIDTH = TINY["network_width"]


def record_of(network: torch.nn.Module, **kwargs) -> dict:
    """A training record of ``network`` as train.json's ``report#record`` writes it."""
    record = TrainingRecord(network, image_size=64, mpp=1.0, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
                            threshold=0.4, smooth_sigma=3.0, selection_metric="val_area_contrast",
                            epochs={"stage1": 2, "stage2": 2}, metadata_path=CONFIGS / "metadata.json")
    return record.describe(source="best student", val_score=0.25, **kwargs)


def save(path: Path, network: torch.nn.Module, record: dict | None) -> Path:
    torch.save(network.state_dict() if record is None else {"network": network.state_dict(), RECORD_KEY: record}, path)
    return path


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_record_round_trip(tmp_path):
    torch.manual_seed(0)
    trained = DWSMIL(width=WIDTH, fusion_weights=(0.2, 0.3, 0.5))
    record = record_of(trained)
    path = save(tmp_path / "model.pt", trained, record)
    content = torch.load(path, weights_only=True)  # plain data only
    assert content[RECORD_KEY] == record == read_record(path)
    assert record["network_def"] == {"_target_": "custom.networks.DWSMIL", "in_channels": 3, "width": WIDTH,
                                     "fusion_weights": [0.2, 0.3, 0.5], "pretrained_path": None}
    assert (record["image_size"], record["mpp"], record["threshold"], record["smooth_sigma"]) == (64, 1.0, 0.4, 3.0)
    assert record["bundle_version"] == json.loads((CONFIGS / "metadata.json").read_text())["version"]
    assert record["normalize"]["std"] == [0.229, 0.224, 0.225] and record["weights"] == "network"
    assert {"source", "selection_metric", "val_score", "epochs", "date"} <= set(record["training"])
    loaded = load_weights(DWSMIL(width=WIDTH, fusion_weights=(0.2, 0.3, 0.5)), path)
    assert same_weights(loaded, trained) and network_definition(loaded) == record["network_def"]
    with pytest.raises(TypeError, match="plain data only"):
        TrainingRecord(trained, image_size=torch.ones(2)).describe()


def test_old_plain_state_dict_still_loads(tmp_path):
    torch.manual_seed(0)
    trained = DWSMIL(width=WIDTH)
    path = save(tmp_path / "old.pt", trained, None)
    network = DWSMIL(width=WIDTH)
    for rebuild in (False, True):
        assert load_weights(network, path, rebuild=rebuild) is network and same_weights(network, trained)
    assert read_record(path) == {} and trained_network(network, read_record(path)) is network


def test_a_differing_config_network_is_built_from_the_record(tmp_path, caplog):
    torch.manual_seed(0)
    trained = DWSMIL(width=WIDTH, fusion_weights=(0.2, 0.3, 0.5))
    path = save(tmp_path / "model.pt", trained, record_of(trained))
    config = DWSMIL(width=1.0)
    before = {k: v.clone() for k, v in config.state_dict().items()}
    with caplog.at_level(logging.WARNING, logger="custom.checkpoints"):
        loaded = load_weights(config, path, config_key="ckpt_path", rebuild=True)
    assert loaded is not config and same_weights(loaded, trained)
    assert all(torch.equal(before[k], v) for k, v in config.state_dict().items())  # the config's network untouched
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(x), trained.eval()(x))  # fusion weights too (not in the state dict)
    [line] = [r.getMessage() for r in caplog.records]
    assert ("built the network the checkpoint records (custom.networks.DWSMIL)" in line and "'ckpt_path'" in line
            and "fusion_weights [0.3, 0.3, 0.4] in the config, [0.2, 0.3, 0.5] in the checkpoint" in line
            and f"width 1.0 in the config, {WIDTH} in the checkpoint" in line)
    # the architecture alone (ckpt_export, verify_net_in_out), and another class of custom.networks
    assert network_definition(trained_network(config, read_record(path))) == network_definition(trained)
    samil = SAMIL(width=0.25, num_heads=2)
    path = save(tmp_path / "samil.pt", samil, record_of(samil))
    assert isinstance(load_weights(DWSMIL(width=WIDTH), path, rebuild=True), SAMIL)
    # training loads in place: the weights must fit the networks its trainers hold
    with pytest.raises(ValueError, match="set network_def#_target_ custom.networks.SAMIL, .*network_width 0.25$"):
        load_weights(DWSMIL(width=WIDTH), path, rebuild=False)


def test_an_impossible_rebuild_is_refused_naming_the_knob(tmp_path):
    trained = DWSMIL(width=WIDTH)
    config = DWSMIL(width=1.0)
    record = record_of(trained)
    record["network_def"]["_target_"] = "os.system"  # a name from a file is never imported
    unknown = save(tmp_path / "unknown.pt", trained, record)
    with pytest.raises(ValueError) as refused:
        load_weights(config, unknown, config_key="ckpt_path", rebuild=True)
    message = str(refused.value)
    assert "'ckpt_path'" in message and "size mismatch" in message and "never imported" in message
    assert message.endswith(f"set network_def#_target_ os.system, network_width {WIDTH}")
    assert trained_network(config, read_record(unknown)) is config  # left to the loader, which refuses
    plain = save(tmp_path / "plain.pt", trained, None)
    with pytest.raises(ValueError, match=rf"records no network .* set network_width {WIDTH}$"):  # from the shapes
        load_weights(config, plain, config_key="ckpt_path", rebuild=True)
    with pytest.raises(ValueError, match=rf"set --width {WIDTH}$"):  # a command line's flag instead of the knob
        load_weights(config, plain, rebuild=True, knobs={"width": "--width"})


def test_checkpoint_saver_layout_picks_the_recorded_entry(tmp_path):
    """teacher_best.pt: the network under its own name, the record naming it, Ignite's checkpointer beside them."""
    torch.manual_seed(0)
    trained = DWSMIL(width=WIDTH)
    path = tmp_path / "teacher_best.pt"
    torch.save({"teacher": trained.state_dict(), RECORD_KEY: record_of(trained, weights="teacher"),
                "checkpointer": {"saved": [(0.3, "teacher_best.pt")]}}, path)
    assert same_weights(load_weights(DWSMIL(width=1.0), path, rebuild=True), trained)
    assert same_weights(load_weights(DWSMIL(width=WIDTH), path, "teacher"), trained)


def test_record_values_fill_only_what_the_config_leaves_unset():
    record = {"mpp": 1.0, "smooth_sigma": None}
    assert record_value(record, "mpp", None, 0.5) == 1.0 and record_value(record, "mpp", 0.25, 0.5) == 0.25
    assert record_value({}, "mpp", None, 0.5) == 0.5 and record_value(None, "threshold", None, 0.5) == 0.5
    assert record_value(record, "smooth_sigma", None, 3.0) is None  # recorded as no smoothing


def test_inference_at_another_resolution_than_trained_is_warned(caplog):
    class Level:
        path = "slide.tif"

    inferer = WholeSlideInferer(trained_mpp=1.0)
    with caplog.at_level(logging.WARNING, logger="custom.inference.wsi"):
        inferer.check_resolution(Level(), 1, 1.05)  # within mpp_tolerance
        inferer.check_resolution(Level(), 0, 0.5)
        WholeSlideInferer().check_resolution(Level(), 0, 0.5)  # nothing recorded: nothing to compare
    [line] = [r.getMessage() for r in caplog.records]
    assert "slide.tif: inferred at 0.5 um/px (level 0), but the network was trained at 1 um/px" in line


def bundle(*args: str) -> str:
    """``python -m monai.bundle ...`` from the repository root; its log."""
    done = subprocess.run([sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def configs(*names: str) -> str:
    return json.dumps([str(CONFIGS / name) for name in names])


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory) -> Path:  # noqa: F811 - the fixture imported above
    """The README's training command (train.json + cpu_train.json) at the tiny size, threshold 0.4: the network,
    input side and threshold every later row must take from the checkpoint, since none of them is passed again."""
    run = tmp_path_factory.mktemp("readme")
    run_bundle(run, tiny_data, stage1_epochs=1, stage2_epochs=1, swap_policy="off", threshold=0.4)
    return run


def test_readme_rows_in_order_without_architecture_overrides(trained, tiny_data):  # noqa: F811
    models, slide = trained / "models", tiny_data / "slides" / "slide_000.tif"
    where = ["--ckpt_dir", str(models)]
    # every checkpoint of the training records its network and loads as plain data, the stage checkpoints with
    # their training curves too (custom.handlers.TrainingHistory, not MetricLogger's Enum keys and defaultdict)
    for name in ("model.pt", "teacher_best.pt", "stage1_checkpoint_epoch=1.pt", "stage2_checkpoint_epoch=1.pt"):
        record = torch.load(models / name, weights_only=True)[RECORD_KEY]
        assert record["network_def"]["width"] == WIDTH and record["image_size"] == TINY["image_size"], name
        assert record["mpp"] == 1.0 and record["threshold"] == 0.4 and record["training"]["epochs"]["stage1"] == 1
    best = torch.load(models / "teacher_best.pt", weights_only=True)[RECORD_KEY]
    assert best["weights"] == "teacher" and best["training"]["source"] == "stage-1 MIL teacher (best validation)"
    assert best["training"]["selection_metric"] == "val_area_contrast" and best["training"]["val_score"] is not None
    report = json.loads((trained / "out" / "metrics.json").read_text())
    model = read_record(models / "model.pt")
    assert model["training"]["source"] == report["final_model"]["source"]
    assert model["training"]["val_score"] == pytest.approx(report["final_model"]["val_score"])

    # evaluate a checkpoint on the test split: train.json + evaluate.json, scored as the training scored it
    bundle("run", "--config_file", configs("train.json", "evaluate.json"), *where, "--dataset_dir", str(tiny_data),
           "--output_dir", str(trained / "eval"))
    evaluated = json.loads((trained / "eval" / "eval_metrics.json").read_text())
    reported = report["student" if is_student(report["final_model"]["source"]) else "teacher"]
    assert {k: evaluated[k] for k in reported} == pytest.approx(reported, nan_ok=True)
    # a stage checkpoint evaluates too: its record names the network it scores, in stage 2 the teacher, which
    # without a swap is the stage-1 teacher the report scored
    bundle("run", "--config_file", configs("train.json", "evaluate.json"), *where, "--dataset_dir", str(tiny_data),
           "--output_dir", str(trained / "eval2"), "--ckpt_path", str(models / "stage2_checkpoint_epoch=1.pt"))
    evaluated = json.loads((trained / "eval2" / "eval_metrics.json").read_text())
    assert {k: evaluated[k] for k in report["teacher"]} == pytest.approx(report["teacher"], nan_ok=True)

    # whole-slide inference: inference.json alone, at the trained resolution and threshold
    log = bundle("run", "--config_file", str(CONFIGS / "inference.json"), *where, "--input", str(slide),
                 "--output_dir", str(trained / "pt"), "--num_workers", "0")
    assert f"built the network the checkpoint records (custom.networks.DWSMIL), not the config's 'network_def', " \
           f"which differs: width 1.0 in the config, {WIDTH} in the checkpoint" in log
    summary = json.loads((trained / "pt" / "slide_000" / "slide_000_summary.json").read_text())
    assert summary["output_mpp"] == pytest.approx(1.0) and summary["threshold"] == 0.4
    prob = tifffile.imread(trained / "pt" / "slide_000" / "slide_000_prob.tif", level=0)
    mask = tifffile.imread(trained / "pt" / "slide_000" / "slide_000_mask.tif", level=0)
    np.testing.assert_array_equal(mask > 0, prob >= round(255 * 0.4))

    # check the network's input/output, then export to TorchScript with the model's metadata
    meta = ["--meta_file", str(models / "model_metadata.json"), "--config_file", str(CONFIGS / "inference.json")]
    assert "verified with no error" in bundle("verify_net_in_out", "network", *meta, *where)
    bundle("ckpt_export", "network", "--filepath", str(models / "model.ts"), "--ckpt_file", str(models / "model.pt"),
           "--key_in_ckpt", "network", *meta, *where)
    with zipfile.ZipFile(models / "model.ts") as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith("/extra/metadata.json")]
        exported = json.loads(archive.read(metadata))
    assert exported["trained"]["network_def"] == model["network_def"] and read_record(models / "model.ts") == {
        k: v for k, v in exported["trained"].items()}
    assert exported["network_data_format"]["inputs"]["image"]["spatial_shape"] == [TINY["image_size"]] * 2
    network = load_weights(DWSMIL(), models / "model.pt", rebuild=True).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(torch.jit.load(models / "model.ts")(x), network(x))

    # inference from the TorchScript export: the same map, resolution and threshold
    bundle("run", "--config_file", configs("inference.json", "inference_ts.json"), *where, "--input", str(slide),
           "--output_dir", str(trained / "ts"), "--num_workers", "0")
    from_ts = tifffile.imread(trained / "ts" / "slide_000" / "slide_000_prob.tif", level=0)
    difference = np.abs(from_ts.astype(np.int16) - prob)
    assert difference.max() <= 1 and np.count_nonzero(difference) <= 1e-3 * difference.size
    summary = json.loads((trained / "ts" / "slide_000" / "slide_000_summary.json").read_text())
    assert summary["output_mpp"] == pytest.approx(1.0) and summary["threshold"] == 0.4


def test_the_student_starts_from_scratch_or_from_the_teacher(tmp_path):
    teacher, student = DWSMIL(width=0.125), DWSMIL(width=0.125)
    path = tmp_path / "teacher_best.pt"
    torch.save({"teacher": teacher.state_dict()}, path)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    init_student(student, path, "scratch")
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    init_student(student, path, "teacher")
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in student.state_dict().items())
    with pytest.raises(ValueError, match="student_init"):
        init_student(student, path, "imagenet")
