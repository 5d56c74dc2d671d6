"""PseudoLabelHandler writes the teacher's maps (read back with nibabel and scikit-image); LoadPseudoLabeld serves
them."""

import csv
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.data import CacheDataset, DataLoader, Dataset, MetaTensor
from monai.engines.utils import IterationEvents
from monai.transforms import Compose, RandFlipd
from monai.utils.enums import CommonKeys as Keys
from skimage.io import imread
from tiny_mil_net import TinyMILNet

from custom.engines.distillation_trainer import DistillationEvents, DistillationTrainer
from custom.handlers import SNAPSHOT_PREFIX, EpochWeightsSaver, epoch_weight_files
from custom.handlers.pseudo_labels import PseudoLabelHandler
from custom.losses.distillation import DistillationLoss
from custom.networks import MeanEnsemble
from custom.transforms import LoadPseudoLabeld

N, SIZE = 6, 16


def _items() -> list[dict]:
    """Tiny images with alternating labels; each image knows its (fake) source path through MONAI metadata."""
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "image": MetaTensor(torch.rand(3, SIZE, SIZE, generator=gen), meta={"filename_or_obj": f"/data/im{i}.png"}),
            "label": i % 2,
            "name": f"im{i}",
        }
        for i in range(N)
    ]


def _trainer(teacher, student, items, pseudo_dir, pseudo_key="pseudo", transform=None) -> DistillationTrainer:
    """One epoch of one batch, the handler on the plain (unaugmented) images."""
    train_data = Dataset(items, transform=transform or LoadPseudoLabeld(pseudo_dir)) if pseudo_key else items
    return DistillationTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=1,
        train_data_loader=DataLoader(train_data, batch_size=N),
        network=student,
        teacher=teacher,
        optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        loss_function=DistillationLoss(),
        pseudo_key=pseudo_key,
        train_handlers=[PseudoLabelHandler(DataLoader(items, batch_size=4), pseudo_dir)],
        decollate=False,
    )


def _teacher_fused(teacher, items) -> np.ndarray:
    with torch.no_grad():
        return teacher.eval()(torch.stack([item["image"].as_tensor() for item in items]))[:, -1].numpy()


def test_cache_files_equal_the_teacher_output(tmp_path):
    torch.manual_seed(0)
    teacher, items = TinyMILNet(), _items()
    trainer = _trainer(teacher, TinyMILNet(), items, tmp_path)
    expected = _teacher_fused(teacher, items)
    trainer.run()
    with open(tmp_path / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == [f"im{i}" for i in range(N)]
    for i, row in enumerate(rows):
        nifti = nib.load(row["nifti"]).get_fdata()
        np.testing.assert_allclose(nifti, expected[i], atol=1e-6)
        png = imread(row["png"])
        assert png.dtype == np.uint8 and png.shape == (SIZE, SIZE)
        np.testing.assert_allclose(png, np.round(expected[i] * 255), atol=1)
        assert row["image"] == f"/data/im{i}.png" and int(row["label"]) == i % 2
        assert row["round"] == "0" and float(row["mean_prob"]) == pytest.approx(expected[i].mean(), rel=1e-5)


def test_cached_and_teacher_forward_training_give_the_same_loss(tmp_path):
    torch.manual_seed(0)
    teacher, student, items = TinyMILNet(), TinyMILNet(), _items()
    losses = {}
    for pseudo_key in ("pseudo", None):
        trainer = _trainer(teacher, TinyMILNet(), items, tmp_path, pseudo_key)
        trainer.network.load_state_dict(student.state_dict())
        trainer.add_event_handler(
            IterationEvents.LOSS_COMPLETED, lambda e, k=pseudo_key: losses.setdefault(k, e.state.output[Keys.LOSS])
        )
        trainer.run()
    assert losses["pseudo"].item() == pytest.approx(losses[None].item(), rel=1e-5)


def test_augmentation_moves_image_and_pseudo_label_together(tmp_path):
    torch.manual_seed(0)
    teacher, items = TinyMILNet(), _items()
    PseudoLabelHandler(DataLoader(items, batch_size=4), tmp_path).write(teacher, "cpu")
    flip = Compose([LoadPseudoLabeld(tmp_path), RandFlipd(keys=["image", "pseudo"], prob=1.0, spatial_axis=1)])
    sample = Dataset(items, transform=flip)[1]
    expected = _teacher_fused(teacher, items)[1]
    assert sample["pseudo"].shape == (1, SIZE, SIZE)
    np.testing.assert_allclose(sample["pseudo"][0].numpy(), expected[:, ::-1], atol=1e-6)
    np.testing.assert_array_equal(sample["image"].numpy(), items[1]["image"].numpy()[:, :, ::-1])


def test_swap_regenerates_and_cache_dataset_never_serves_stale_maps(tmp_path):
    torch.manual_seed(0)
    teacher, items = TinyMILNet(), _items()
    trainer = _trainer(teacher, TinyMILNet(), items, tmp_path)
    trainer.run()
    cached = CacheDataset(items, transform=LoadPseudoLabeld(tmp_path), progress=False)
    before = cached[0]["pseudo"].clone()
    with torch.no_grad():
        teacher.heads[0].bias.add_(3.0)  # a different teacher, as after a swap
    trainer.fire_event(DistillationEvents.TEACHER_CHANGED)
    np.testing.assert_allclose(cached[0]["pseudo"][0].numpy(), _teacher_fused(teacher, items)[0], atol=1e-6)
    assert not torch.allclose(cached[0]["pseudo"], before)
    with open(tmp_path / "manifest.csv", newline="") as f:
        assert {row["round"] for row in csv.DictReader(f)} == {"1"}


def test_handler_state_round_trip():
    handler = PseudoLabelHandler([], "unused")
    handler.load_state_dict({"round": 3})
    assert handler.state_dict() == {"round": 3, "calibrations": [], "sources": []}
    calibration, source = {"round": 2, "threshold": 0.7}, {"round": 0, "maps": "teacher"}
    handler.load_state_dict({"round": 2, "calibrations": [calibration], "sources": [source]})
    assert handler.state_dict() == {"round": 2, "calibrations": [calibration], "sources": [source]}


def test_bad_names_and_missing_files_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="'im0'"):
        LoadPseudoLabeld(tmp_path)({"name": "im0"})
    with pytest.raises(ValueError, match="path separator"):
        LoadPseudoLabeld(tmp_path)({"name": "../im0"})


def test_overlapping_rank_shards_are_refused():
    """A gathered manifest naming an image twice (a padded or unsharded loader under DDP) stops the run."""
    from custom.handlers.pseudo_labels import _check_written_once

    _check_written_once([{"name": "a"}, {"name": "b"}])
    with pytest.raises(RuntimeError, match=r"\['a'\] were written by several ranks.*DistributedSampler"):
        _check_written_once([{"name": "a"}, {"name": "b"}, {"name": "a"}])


def test_maps_kept_in_memory_train_exactly_as_maps_read_every_time(tmp_path):
    """Three epochs with flips and a teacher change after the second: the same losses and student weights whether
    LoadPseudoLabeld keeps decoded maps (re-reading only rewritten files) or decodes every sample every time."""
    losses, weights = {}, {}
    for keep in (True, False):
        torch.manual_seed(0)
        teacher, student, items = TinyMILNet(), TinyMILNet(), _items()
        pseudo_dir = tmp_path / str(keep)
        transform = Compose([
            LoadPseudoLabeld(pseudo_dir, keep_in_memory=keep),
            RandFlipd(keys=["image", "pseudo"], prob=0.5, spatial_axis=0),
        ]).set_random_state(seed=0)
        trainer = DistillationTrainer(
            device="cpu",
            max_epochs=3,
            train_data_loader=DataLoader(Dataset(items, transform=transform), batch_size=3),
            network=student,
            teacher=teacher,
            optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
            loss_function=DistillationLoss(),
            train_handlers=[PseudoLabelHandler(DataLoader(items, batch_size=4), pseudo_dir)],
            decollate=False,
        )
        recorded = losses.setdefault(keep, [])
        trainer.add_event_handler(
            IterationEvents.LOSS_COMPLETED, lambda e, r=recorded: r.append(e.state.output[Keys.LOSS])
        )

        def change_teacher(engine, t=teacher):
            if engine.state.epoch == 2:
                with torch.no_grad():
                    t.heads[0].bias.add_(3.0)
                engine.fire_event(DistillationEvents.TEACHER_CHANGED)

        trainer.add_event_handler(Events.EPOCH_COMPLETED, change_teacher)
        trainer.run()
        weights[keep] = student.state_dict()
    assert len(losses[True]) == 6
    assert [v.item() for v in losses[True]] == [v.item() for v in losses[False]]
    for name, value in weights[True].items():
        assert torch.equal(value, weights[False][name]), name


def _save_snapshots(networks, save_dir, keep_last):
    """Each network's weights as one stage-1 epoch (1, 2, ...), through the saver the bundle uses."""
    for epoch, network in enumerate(networks, start=1):
        saver = EpochWeightsSaver(network, save_dir, SNAPSHOT_PREFIX, keep_last=keep_last)
        saver(SimpleNamespace(state=SimpleNamespace(epoch=epoch)))


def test_first_round_is_the_mean_of_the_last_snapshots_and_a_swap_returns_to_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher, epochs, items = TinyMILNet(), [TinyMILNet() for _ in range(3)], _items()
    _save_snapshots(epochs, tmp_path / "models", keep_last=2)
    assert [p.name for p in epoch_weight_files(tmp_path / "models", SNAPSHOT_PREFIX)] == [
        "stage1_snapshot_epoch=2.pt", "stage1_snapshot_epoch=3.pt"]  # epoch 1 deleted by keep_last
    handler = PseudoLabelHandler(DataLoader(items, batch_size=4), tmp_path / "pseudo", snapshot_dir=tmp_path / "models",
                                 snapshots=2)
    handler(SimpleNamespace(teacher=teacher, state=SimpleNamespace(device="cpu", epoch=0)))
    expected = (_teacher_fused(epochs[1], items) + _teacher_fused(epochs[2], items)) / 2
    for i in range(N):
        np.testing.assert_allclose(nib.load(tmp_path / "pseudo" / f"im{i}.nii.gz").get_fdata(), expected[i], atol=1e-6)
    assert not np.allclose(expected, _teacher_fused(teacher, items), atol=1e-3)
    assert handler.sources == [{"round": 0, "maps": "mean of the stage-1 teacher's epochs [2, 3]"}]
    handler.on_swap(SimpleNamespace(teacher=teacher, state=SimpleNamespace(device="cpu", epoch=4)))
    np.testing.assert_allclose(nib.load(tmp_path / "pseudo" / "im0.nii.gz").get_fdata(),
                               _teacher_fused(teacher, items)[0], atol=1e-6)
    assert handler.sources[-1] == {"round": 1, "maps": "teacher"}


def test_missing_or_too_few_snapshots_are_said_and_the_files_found_used(tmp_path, caplog):
    torch.manual_seed(0)
    teacher, items = TinyMILNet(), _items()
    engine = SimpleNamespace(teacher=teacher, state=SimpleNamespace(device="cpu", epoch=0))
    handler = PseudoLabelHandler(DataLoader(items, batch_size=4), tmp_path / "pseudo", snapshot_dir=tmp_path / "none",
                                 snapshots=3)
    with caplog.at_level("WARNING"):
        handler(engine)
    assert "3 stage-1 snapshots asked (teacher_snapshots), 0 found" in caplog.text and "teacher alone" in caplog.text
    np.testing.assert_allclose(nib.load(tmp_path / "pseudo" / "im1.nii.gz").get_fdata(),
                               _teacher_fused(teacher, items)[1], atol=1e-6)
    only = TinyMILNet()
    _save_snapshots([only], tmp_path / "models", keep_last=3)
    handler = PseudoLabelHandler(DataLoader(items, batch_size=4), tmp_path / "pseudo", snapshot_dir=tmp_path / "models",
                                 snapshots=3)
    caplog.clear()
    with caplog.at_level("WARNING"):
        handler(engine)
    assert "1 found" in caplog.text and "using them" in caplog.text
    np.testing.assert_allclose(nib.load(tmp_path / "pseudo" / "im1.nii.gz").get_fdata(),
                               _teacher_fused(only, items)[1], atol=1e-6)


def test_bad_snapshot_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="snapshots must be at least 1"):
        PseudoLabelHandler([], tmp_path, snapshots=0)
    with pytest.raises(ValueError, match="needs the snapshot_dir"):
        PseudoLabelHandler([], tmp_path, snapshots=3)
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        EpochWeightsSaver(TinyMILNet(), tmp_path, SNAPSHOT_PREFIX, keep_last=0)


def test_mean_ensemble_averages_every_map():
    class Constant(torch.nn.Module):
        def __init__(self, value):
            super().__init__()
            self.value = value

        def forward(self, x):
            return torch.full((x.shape[0], 3, *x.shape[2:]), self.value)

    maps = MeanEnsemble([Constant(0.2), Constant(0.6), Constant(0.7)])(torch.zeros(2, 3, 4, 5))
    assert maps.shape == (2, 3, 4, 5)
    np.testing.assert_allclose(maps.numpy(), 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one member"):
        MeanEnsemble([])

