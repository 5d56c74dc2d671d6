"""RandFlipRotate90Batchd on collated batches, and its use by DistillationTrainer and EpochSeedHandler."""

import copy

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from tiny_mil_net import TinyMILNet
from torch.utils.data import DataLoader

from custom.engines.distillation_trainer import DistillationTrainer
from custom.handlers import EpochSeedHandler
from custom.losses.distillation import DistillationLoss
from custom.transforms import RandFlipRotate90Batchd

# a 2x2 image per batch item: rows (0, 1), cols (0, 1) hold 1 2 / 3 4
IMAGE = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
FLIPPED = torch.tensor([[3.0, 4.0], [1.0, 2.0]])  # rows swapped (spatial axis 0)
FLIPPED_TURNED = torch.tensor([[4.0, 2.0], [3.0, 1.0]])  # then one turn counter-clockwise in (row, col)


def _batch(n: int = 4) -> dict:
    image = IMAGE.expand(n, 3, 2, 2).clone()
    names = [str(i) for i in range(n)]
    return {"image": image, "pseudo": image[:, :1].clone(), "label": torch.arange(n), "name": names}


def test_flip_then_turn_by_hand_and_keys_move_together():
    augment = RandFlipRotate90Batchd(["image", "pseudo"], prob=1.0, max_k=1)
    out = augment(_batch())
    assert torch.equal(out["image"], FLIPPED_TURNED.expand(4, 3, 2, 2))
    assert torch.equal(out["pseudo"], FLIPPED_TURNED.expand(4, 1, 2, 2))
    assert torch.equal(out["label"], torch.arange(4)) and out["name"] == ["0", "1", "2", "3"]
    assert torch.equal(_batch()["image"], IMAGE.expand(4, 3, 2, 2))  # the input is not modified


def test_each_image_takes_its_own_draw_and_image_and_pseudo_agree():
    augment = RandFlipRotate90Batchd(["image", "pseudo"], prob=0.5).set_random_state(seed=3)
    batch = _batch(64)
    batch["image"] = torch.rand(64, 3, 8, 8)
    batch["pseudo"] = batch["image"][:, 1:2].clone()
    out = augment(batch)
    assert torch.equal(out["image"][:, 1:2], out["pseudo"])
    for i in range(64):  # each image is its original flipped (or not) and turned by the drawn count
        expected = batch["image"][i].flip(-2) if augment._flip[i] else batch["image"][i]
        assert torch.equal(out["image"][i], expected.rot90(int(augment._turns[i]), (-2, -1)))
    assert 0 < augment._flip.sum() < 64 and len(set(augment._turns.tolist())) == 4  # 0 (no turn) and 1, 2, 3


def test_draws_follow_flip_and_turn_probabilities():
    augment = RandFlipRotate90Batchd("image", prob=0.5).set_random_state(seed=0)
    augment.randomize(20000)
    assert augment._flip.mean() == pytest.approx(0.5, abs=0.02)
    assert (augment._turns == 0).mean() == pytest.approx(0.5, abs=0.02)
    for k in (1, 2, 3):  # a turn's count is uniform over 1..3: 1/6 of all images each
        assert (augment._turns == k).mean() == pytest.approx(1 / 6, abs=0.015)
    augment = RandFlipRotate90Batchd("image", prob=0.0)
    out = augment(_batch())
    assert torch.equal(out["image"], _batch()["image"]) and not augment._flip.any() and not augment._turns.any()


def test_same_seed_same_draws_and_missing_keys_skipped():
    first = RandFlipRotate90Batchd(["image", "pseudo"]).set_random_state(seed=7)(_batch(16))
    second = RandFlipRotate90Batchd(["image", "pseudo"]).set_random_state(seed=7)(_batch(16))
    assert torch.equal(first["image"], second["image"])
    no_pseudo = {k: v for k, v in _batch().items() if k != "pseudo"}
    assert "pseudo" not in RandFlipRotate90Batchd(["image", "pseudo"])(no_pseudo)
    with pytest.raises(KeyError):
        RandFlipRotate90Batchd(["image", "pseudo"], allow_missing_keys=False)(no_pseudo)


def test_bad_batches_are_refused():
    augment = RandFlipRotate90Batchd(["image", "pseudo"], prob=1.0)
    with pytest.raises(ValueError, match="square"):
        augment({"image": torch.zeros(2, 3, 4, 6)})
    with pytest.raises(ValueError, match=r"\(B, C, rows, cols\)"):
        augment({"image": torch.zeros(3, 4, 4)})
    with pytest.raises(ValueError, match="differ in size"):
        augment({"image": torch.zeros(2, 3, 4, 4), "pseudo": torch.zeros(3, 1, 4, 4)})
    with pytest.raises(ValueError, match="max_k"):
        RandFlipRotate90Batchd("image", max_k=0)


def test_live_teacher_sees_the_augmented_batch():
    torch.manual_seed(0)
    teacher, student = TinyMILNet(), TinyMILNet()
    images = torch.rand(4, 3, 8, 8)
    seen = []
    teacher.register_forward_hook(lambda module, args, output: seen.append(args[0].clone()))
    trainer = DistillationTrainer(
        device="cpu", max_epochs=1, train_data_loader=DataLoader(
            [{"image": images[i], "label": i % 2} for i in range(4)], batch_size=4),
        network=student, teacher=teacher, optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
        loss_function=DistillationLoss(), pseudo_key=None,
        batch_transform=RandFlipRotate90Batchd(["image", "pseudo"], prob=1.0, max_k=1),
    )
    trainer.run()
    assert torch.equal(seen[0], images.flip(-2).rot90(1, (-2, -1)))
    assert torch.equal(trainer.state.output[0]["image"], seen[0][0])


def _flips_of_epochs(epochs: range, seed: int = 5) -> list[np.ndarray]:
    """The flips drawn in each of ``epochs`` by an augmentation that EpochSeedHandler reseeds, starting at
    ``epochs.start`` as a resumed stage does."""
    augment = RandFlipRotate90Batchd("image", prob=0.5)
    handler = EpochSeedHandler(seed, randomizable=[augment, None])  # None: a disabled config component
    engine = Engine(lambda e, b: None)
    draws = []
    for epoch in epochs:
        engine.state.epoch = epoch + 1  # EPOCH_STARTED sees the new epoch's number
        handler(engine)
        augment({"image": torch.zeros(32, 1, 2, 2)})
        draws.append(augment._flip.copy())
    return draws


def test_epoch_seed_handler_makes_a_resumed_stage_draw_the_same_flips():
    uninterrupted = _flips_of_epochs(range(0, 4))
    resumed = _flips_of_epochs(range(2, 4))
    assert all(np.array_equal(a, b) for a, b in zip(uninterrupted[2:], resumed))
    assert not np.array_equal(uninterrupted[0], uninterrupted[1])  # epochs differ


def test_batch_transform_keeps_student_training_reproducible():
    """Two identical runs of a trainer with the batch augmentation, reseeded per epoch, end with the same weights."""
    weights = []
    for _ in range(2):
        torch.manual_seed(0)
        teacher, student = TinyMILNet(), TinyMILNet()
        augment = RandFlipRotate90Batchd(["image", "pseudo"], prob=0.5)
        data = [{"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i)), "label": i % 2}
                for i in range(8)]
        trainer = DistillationTrainer(
            device="cpu", max_epochs=3, train_data_loader=DataLoader(data, batch_size=4, shuffle=True),
            network=student, teacher=teacher, optimizer=torch.optim.SGD(student.parameters(), lr=0.1),
            loss_function=DistillationLoss(), pseudo_key=None, batch_transform=augment,
            train_handlers=[EpochSeedHandler(11, randomizable=[augment])],
        )
        trainer.run()
        weights.append(copy.deepcopy(student.state_dict()))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
