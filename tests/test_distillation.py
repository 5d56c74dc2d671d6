"""DistillationLoss against hand-computed values, and DistillationTrainer iterations on tiny data."""

import copy
import math

import pytest
import torch
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from tiny_mil_net import TinyMILNet
from torch.utils.data import DataLoader

from custom.engines.distillation_trainer import DistillationTrainer
from custom.losses.distillation import DistillationLoss

# One side map + fused map (S = 1), 1x2 pixels. Image 0 positive, image 1 negative.
STUDENT = torch.tensor([[[[0.8, 0.2]], [[0.6, 0.4]]], [[[0.1, 0.3]], [[0.2, 0.0]]]])
TEACHER = torch.tensor([[[[0.9, 0.1]]], [[[0.9, 0.9]]]])  # the negative's teacher map must be ignored
LABEL = torch.tensor([1, 0])
# Dice = 1 - (2 sum(p t) + 1) / (sum p + sum t + 1), smoothing 1 as in stage 1.
# positive, side:  1 - (2 (0.72 + 0.02) + 1) / (1.0 + 1.0 + 1) = 1 - 2.48 / 3;  fused: 1 - (2 (0.54 + 0.04) + 1) / 3
# negative, on 1 - p against ones: side 1 - p = [0.9, 0.7]: 1 - (3.2 + 1) / (3.6 + 1);  fused [0.8, 1.0]: 1 - 4.6 / 4.8
KD = ((1 - 2.48 / 3) + (1 - 2.16 / 3) + (1 - 4.2 / 4.6) + (1 - 4.6 / 4.8)) / 4
# WCE on the fused maps. Positive: mask [1, 0], ce = -ln 0.6 at both pixels, equal weights -> -ln 0.6.
# Negative: target all zero (single class, weight 1), ce = [-ln 0.8, -ln(1 - 1e-6)] -> their mean.
WCE = (-math.log(0.6) + (-math.log(0.8) - math.log(1 - 1e-6)) / 2) / 2


def test_loss_hand_computed_with_negative():
    terms = DistillationLoss(lambda_wce=2.0).components(STUDENT, TEACHER, LABEL)
    assert terms["loss_kd"].item() == pytest.approx(KD, rel=1e-4)
    assert terms["loss_wce"].item() == pytest.approx(WCE, rel=1e-4)
    assert terms[Keys.LOSS].item() == pytest.approx(KD + 2.0 * WCE, rel=1e-4)
    assert DistillationLoss().lambda_wce == 0.5  # the reference's balance for three side maps
    assert DistillationLoss(lambda_wce=2.0)(STUDENT, TEACHER, LABEL).item() == pytest.approx(KD + 2.0 * WCE, rel=1e-4)


def test_negative_ignores_teacher_and_full_teacher_output_is_accepted():
    loss = DistillationLoss()
    other = TEACHER.clone()
    other[1] = 0.1
    full = torch.cat([torch.rand_like(TEACHER), TEACHER], dim=1)  # (B, S + 1): only the fused (last) map is used
    reference = loss(STUDENT, TEACHER, LABEL).item()
    assert loss(STUDENT, other, LABEL).item() == pytest.approx(reference, rel=1e-6)
    assert loss(STUDENT, full, LABEL).item() == pytest.approx(reference, rel=1e-6)


def test_without_wce_and_batch_size_independence():
    loss = DistillationLoss(use_wce=False)
    terms = loss.components(STUDENT, TEACHER, LABEL)
    assert terms["loss_wce"].item() == 0.0 and terms[Keys.LOSS].item() == pytest.approx(KD, rel=1e-4)
    doubled = DistillationLoss()(torch.cat([STUDENT] * 2), torch.cat([TEACHER] * 2), torch.cat([LABEL] * 2))
    assert doubled.item() == pytest.approx(DistillationLoss()(STUDENT, TEACHER, LABEL).item(), rel=1e-6)


def test_side_target_learns_matching_teacher_maps():
    # binary maps: Dice(p, p) = 0, so a student equal to its teacher has zero L_kd only when side targets side
    maps = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]])
    assert DistillationLoss(use_wce=False, target="side")(maps, maps, torch.tensor([1])).item() < 1e-4
    assert DistillationLoss(use_wce=False, target="fused")(maps, maps, torch.tensor([1])).item() > 0.1
    with pytest.raises(ValueError, match="cache"):
        DistillationLoss(target="side")(maps, maps[:, -1:], torch.tensor([1]))


def test_loss_bad_input_raises():
    with pytest.raises(ValueError, match="target must be"):
        DistillationLoss(target="teacher")
    with pytest.raises(ValueError, match="one image-level label per image"):
        DistillationLoss()(STUDENT, TEACHER, torch.tensor([1]))
    with pytest.raises(ValueError, match="does not match"):
        DistillationLoss()(STUDENT, TEACHER[..., :1], LABEL)


def _data(teacher: torch.nn.Module, n: int = 8, size: int = 16) -> list[dict]:
    """Tiny images with alternating labels and the teacher's fused map as the cached pseudo-label."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, size, size, generator=gen)
    with torch.no_grad():
        pseudo = teacher.eval()(images)[:, -1:]
    return [{"image": images[i], "label": i % 2, "pseudo": pseudo[i], "name": f"im{i}"} for i in range(n)]


def _trainer(student, teacher, data, pseudo_key="pseudo", **kwargs) -> DistillationTrainer:
    """A CPU trainer over ``data`` with Adam on the student."""
    return DistillationTrainer(
        device="cpu",
        max_epochs=kwargs.pop("max_epochs", 2),
        train_data_loader=DataLoader(data, batch_size=4, shuffle=False),
        network=student,
        teacher=teacher,
        optimizer=torch.optim.Adam(student.parameters(), lr=1e-2),
        loss_function=DistillationLoss(),
        pseudo_key=pseudo_key,
        **kwargs,
    )


def test_trainer_trains_student_and_keeps_teacher_frozen():
    torch.manual_seed(0)
    teacher, student = TinyMILNet(), TinyMILNet()
    data = _data(teacher)
    teacher.train()  # the trainer must put it back in eval mode (BatchNorm statistics would move otherwise)
    teacher_before, student_before = copy.deepcopy(teacher.state_dict()), copy.deepcopy(student.state_dict())
    trainer = _trainer(student, teacher, data, pseudo_key=None)
    fired = []
    for event in (IterationEvents.FORWARD_COMPLETED, IterationEvents.LOSS_COMPLETED, IterationEvents.MODEL_COMPLETED):
        trainer.add_event_handler(event, lambda e, name=event.value: fired.append(name))
    trainer.run()
    assert trainer.state.iteration == 4 and len(fired) == 12
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in teacher_before.items())
    assert not all(torch.equal(v, student.state_dict()[k]) for k, v in student_before.items())
    assert not any(p.requires_grad for p in teacher.parameters())
    output = trainer.state.output[0]  # decollated per image
    assert {Keys.IMAGE, Keys.LABEL, Keys.PRED, Keys.LOSS, "loss_kd", "loss_wce", "pseudo"} <= set(output)
    assert output[Keys.PRED].shape == (3, 16, 16)


def test_cache_on_and_off_give_the_same_loss():
    torch.manual_seed(0)
    teacher, student = TinyMILNet(), TinyMILNet()
    data = _data(teacher)
    losses = {}
    for pseudo_key in ("pseudo", None):
        trainer = _trainer(copy.deepcopy(student), teacher, data, pseudo_key=pseudo_key, max_epochs=1, epoch_length=1)
        trainer.add_event_handler(
            IterationEvents.LOSS_COMPLETED, lambda e, k=pseudo_key: losses.setdefault(k, e.state.output[Keys.LOSS])
        )
        trainer.run()
    assert losses["pseudo"].item() == pytest.approx(losses[None].item(), rel=1e-6)


def test_trainer_refuses_misconfiguration():
    teacher, student = TinyMILNet(), TinyMILNet()
    data = [{k: v for k, v in item.items() if k != "pseudo"} for item in _data(teacher)]
    with pytest.raises(KeyError, match="LoadPseudoLabeld"):
        _trainer(student, teacher, data, max_epochs=1).run()
    with pytest.raises(ValueError, match="teacher parameters"):
        DistillationTrainer(
            device="cpu",
            max_epochs=1,
            train_data_loader=DataLoader(data),
            network=student,
            teacher=teacher,
            optimizer=torch.optim.SGD(teacher.parameters(), lr=0.1),
            loss_function=DistillationLoss(),
        )


def test_mil_term_is_stage_one_loss_on_the_student():
    # generalised mean, r = 4, of each map: (mean p^4)^(1/4); positive side [0.8, 0.2], fused [0.6, 0.4];
    # negative side [0.1, 0.3], fused [0.2, 0.0] -> BCE against labels 1 and 0, mean over the four (image, map) scores
    gm = [((0.8**4 + 0.2**4) / 2) ** 0.25, ((0.6**4 + 0.4**4) / 2) ** 0.25,
          ((0.1**4 + 0.3**4) / 2) ** 0.25, ((0.2**4 + 1e-6**4) / 2) ** 0.25]
    mil = (-math.log(gm[0]) - math.log(gm[1]) - math.log(1 - gm[2]) - math.log(1 - gm[3])) / 4
    terms = DistillationLoss(lambda_wce=2.0, lambda_mil=3.0).components(STUDENT, TEACHER, LABEL)
    assert terms["loss_mil"].item() == pytest.approx(mil, rel=1e-4)
    assert terms[Keys.LOSS].item() == pytest.approx(KD + 2.0 * WCE + 3.0 * mil, rel=1e-4)
    assert DistillationLoss().components(STUDENT, TEACHER, LABEL)["loss_mil"].item() == 0.0  # off by default
    with pytest.raises(ValueError, match="lambda_mil"):
        DistillationLoss(lambda_mil=-1.0)
