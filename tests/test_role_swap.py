"""RoleSwapHandler: real swaps (defect 3), policies on scripted validation scores, no-best-student (defect 4),
resume."""

import copy

import pytest
import torch
from ignite.engine import Engine, Events
from tiny_mil_net import TinyMILNet
from torch.utils.data import DataLoader

from custom.engines.distillation_trainer import DistillationEvents, DistillationTrainer
from custom.handlers.role_swap import RoleSwapHandler
from custom.losses.distillation import DistillationLoss


class ScriptedValidator(Engine):
    """Stands in for the student's evaluator: each run reports the next scripted score as metric ``metric``."""

    def __init__(self, network: torch.nn.Module, scores: list[float], metric: str = "f1") -> None:
        super().__init__(lambda engine, batch: None)
        self.network = network
        self.metric = metric
        self.scores = list(scores)
        self.snapshots: list[dict] = []  # the student's weights at each validation
        self.add_event_handler(Events.EPOCH_COMPLETED, self._report)

    def run(self, global_epoch: int = 1) -> None:
        """One pass, called like ``monai.engines.Evaluator.run``."""
        super().run([0], max_epochs=1)

    def _report(self, engine: Engine) -> None:
        self.state.metrics[self.metric] = self.scores.pop(0)
        self.snapshots.append(copy.deepcopy(self.network.state_dict()))


def _trainer(max_epochs: int, seed: int = 0) -> DistillationTrainer:
    """A one-iteration-per-epoch CPU trainer on two 8x8 images, the teacher run every step."""
    torch.manual_seed(seed)
    student, teacher = TinyMILNet(), TinyMILNet()
    data = [{"image": torch.rand(3, 8, 8), "label": i % 2} for i in range(2)]
    return DistillationTrainer(
        device="cpu",
        max_epochs=max_epochs,
        train_data_loader=DataLoader(data, batch_size=2),
        network=student,
        teacher=teacher,
        optimizer=torch.optim.Adam(student.parameters(), lr=1e-2),
        loss_function=DistillationLoss(),
        pseudo_key=None,
        decollate=False,
    )


def _attach(trainer: DistillationTrainer, scores: list[float], **kwargs) -> tuple[RoleSwapHandler, ScriptedValidator]:
    """Validate every epoch (first), then decide (second), as train_handlers would order them."""
    validator = ScriptedValidator(trainer.network, scores)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: validator.run(engine.state.epoch))
    handler = RoleSwapHandler(validator, score_key="f1", **kwargs)
    handler.attach(trainer)
    return handler, validator


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_swap_exchanges_weights_without_sharing_storage():
    trainer = _trainer(max_epochs=1)
    swaps = []
    trainer.add_event_handler(DistillationEvents.ROLES_SWAPPED, lambda engine: swaps.append(engine.state.epoch))
    handler = RoleSwapHandler(ScriptedValidator(trainer.network, []), policy="periodic")
    student_before = copy.deepcopy(trainer.network.state_dict())
    teacher_before = copy.deepcopy(trainer.teacher.state_dict())
    assert not _equal(student_before, teacher_before)
    trainer.optimizer.state[next(trainer.network.parameters())]["step"] = torch.tensor(3.0)
    handler.swap(trainer)
    assert _equal(trainer.teacher.state_dict(), student_before)
    assert _equal(trainer.network.state_dict(), teacher_before)
    student_param, teacher_param = next(trainer.network.parameters()), next(trainer.teacher.parameters())
    assert student_param.data_ptr() != teacher_param.data_ptr()
    with torch.no_grad():
        student_param.add_(1.0)
    assert _equal(trainer.teacher.state_dict(), student_before)  # the teacher did not move with the student
    assert len(trainer.optimizer.state) == 0 and swaps == [0]
    assert trainer.optimizer.param_groups[0]["params"][0] is student_param  # optimizer still owns the student


def test_if_better_swaps_only_when_best_student_beats_teacher():
    trainer = _trainer(max_epochs=6)
    handler, validator = _attach(
        trainer, [0.3, 0.4, 0.6, 0.55, 0.5, 0.7], policy="if_better", interval=2, warmup=2, teacher_score=0.5
    )
    teacher_start = copy.deepcopy(trainer.teacher.state_dict())
    trainer.run()
    assert handler.rounds == [
        {"epoch": 2, "metric": "f1", "teacher_score": 0.5, "student_score": 0.4, "swapped": False},
        {"epoch": 4, "metric": "f1", "teacher_score": 0.5, "student_score": 0.6, "swapped": True},
        {"epoch": 6, "metric": "f1", "teacher_score": 0.6, "student_score": 0.7, "swapped": True},
    ]
    assert handler.teacher_score == 0.7 and handler.best_student_score is None
    # last swap (epoch 6): teacher <- student validated at epoch 6, student <- teacher of epoch 4 (student of epoch 3)
    assert _equal(trainer.teacher.state_dict(), validator.snapshots[5])
    assert _equal(trainer.network.state_dict(), validator.snapshots[2])
    assert not _equal(validator.snapshots[2], teacher_start)


def test_periodic_swaps_on_schedule_whatever_the_scores():
    trainer = _trainer(max_epochs=5)
    handler, _ = _attach(trainer, [0.3, 0.4, 0.2, 0.1, 0.0], policy="periodic", interval=2, warmup=2)
    trainer.run()
    assert handler.rounds == [
        {"epoch": 2, "metric": "f1", "teacher_score": None, "student_score": 0.4, "swapped": True},
        {"epoch": 4, "metric": "f1", "teacher_score": 0.4, "student_score": 0.2, "swapped": True},
    ]


def test_off_never_swaps():
    trainer = _trainer(max_epochs=3)
    handler, _ = _attach(trainer, [0.9, 0.9, 0.9], policy="off", interval=1, warmup=1)
    teacher_start = copy.deepcopy(trainer.teacher.state_dict())
    trainer.run()
    assert handler.rounds == [] and _equal(trainer.teacher.state_dict(), teacher_start)


def test_no_validated_student_does_not_crash():
    # defect 4: nothing was validated, so no best student exists at the decision
    trainer = _trainer(max_epochs=1)
    periodic = RoleSwapHandler(ScriptedValidator(trainer.network, []), policy="periodic", interval=1, warmup=1)
    if_better = RoleSwapHandler(ScriptedValidator(trainer.network, []), "if_better", 1, 1, teacher_score=0.5)
    for handler in (if_better, periodic):  # if_better decides first, on the same epoch
        handler.attach(trainer)
    teacher_start = copy.deepcopy(trainer.teacher.state_dict())
    trainer.run()
    assert if_better.rounds == [
        {"epoch": 1, "metric": "score", "teacher_score": 0.5, "student_score": None, "swapped": False}
    ]
    assert periodic.rounds == [
        {"epoch": 1, "metric": "score", "teacher_score": None, "student_score": None, "swapped": True}
    ]
    assert _equal(trainer.network.state_dict(), teacher_start)  # periodic swapped the current student in


def test_teacher_validator_scores_the_teacher_at_start():
    trainer = _trainer(max_epochs=2)
    teacher_validator = ScriptedValidator(trainer.teacher, [0.45])
    handler, _ = _attach(
        trainer, [0.4, 0.5], policy="if_better", interval=1, warmup=2, teacher_validator=teacher_validator
    )
    trainer.run()
    assert handler.rounds == [
        {"epoch": 2, "metric": "f1", "teacher_score": 0.45, "student_score": 0.5, "swapped": True}
    ]


@pytest.mark.parametrize("metric, score, warned", [
    ("val_area_contrast", -0.0316, True), ("val_area_contrast", 0.0, True), ("val_area_contrast", 0.02, False),
    ("val_auc", 0.5, True), ("val_auc", 0.56, False), ("val_balanced_accuracy", 0.31, True),
    ("val_flip_consistency", 0.0, False), ("val_mask_f1", 0.0, False),  # no chance level to compare with
])
def test_a_teacher_at_chance_is_named(caplog, metric, score, warned):
    trainer = _trainer(max_epochs=1)
    handler = RoleSwapHandler(ScriptedValidator(trainer.network, [0.1], metric), policy="if_better",
                              teacher_validator=ScriptedValidator(trainer.teacher, [score], metric), score_key=metric)
    handler.attach(trainer)
    with caplog.at_level("WARNING", logger="custom.handlers.role_swap"):
        trainer.run()
    assert (f"teacher's validation {metric} {score:.4f} is at or below chance" in caplog.text) is warned


def test_state_dict_round_trip_continues_the_same_schedule(tmp_path):
    scores, options = [0.3, 0.8, 0.4, 0.45], {"policy": "if_better", "interval": 2, "warmup": 4, "teacher_score": 0.5}
    full = _trainer(max_epochs=4)
    full_handler, full_validator = _attach(full, scores, **options)
    full.run()
    assert full_handler.rounds == [
        {"epoch": 4, "metric": "f1", "teacher_score": 0.5, "student_score": 0.8, "swapped": True}
    ]

    first = _trainer(max_epochs=2)
    first_handler, _ = _attach(first, scores[:2], **options)
    first.run()
    objects = {"network": first.network, "teacher": first.teacher, "optimizer": first.optimizer}
    checkpoint = {k: v.state_dict() for k, v in objects.items()} | {"role_swap": first_handler.state_dict()}
    torch.save(checkpoint, tmp_path / "checkpoint.pt")
    checkpoint = torch.load(tmp_path / "checkpoint.pt")

    resumed = _trainer(max_epochs=4, seed=1)
    for key in ("network", "teacher", "optimizer"):
        getattr(resumed, key).load_state_dict(checkpoint[key])
    resumed_handler, _ = _attach(resumed, scores[2:], **options)
    resumed_handler.load_state_dict(checkpoint["role_swap"])
    resumed.load_state_dict({"epoch": 2, "max_epochs": 4, "epoch_length": 1})
    resumed.run()
    assert resumed_handler.rounds == full_handler.rounds
    assert _equal(resumed.teacher.state_dict(), full_validator.snapshots[1])  # the epoch-2 best student


def test_bad_configuration_raises():
    validator = ScriptedValidator(TinyMILNet(), [])
    with pytest.raises(ValueError, match="policy must be"):
        RoleSwapHandler(validator, policy="always")
    with pytest.raises(ValueError, match="teacher's score"):
        RoleSwapHandler(validator, policy="if_better")
    with pytest.raises(ValueError, match="positive"):
        RoleSwapHandler(validator, policy="periodic", interval=0)


@pytest.mark.parametrize("margin, swapped", [(0.0, True), (0.05, True), (0.125, False), (0.25, False)])
def test_if_better_needs_the_margin(margin, swapped):
    """A best student 0.1 above the teacher swaps only when the margin is below 0.1."""
    trainer = _trainer(max_epochs=2)
    handler, _ = _attach(
        trainer, [0.55, 0.6], policy="if_better", interval=1, warmup=2, teacher_score=0.5, margin=margin
    )
    trainer.run()
    assert handler.rounds == [
        {"epoch": 2, "metric": "f1", "teacher_score": 0.5, "student_score": 0.6, "swapped": swapped}
    ]


def test_negative_margin_is_refused():
    trainer = _trainer(max_epochs=1)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        RoleSwapHandler(ScriptedValidator(trainer.network, []), teacher_score=0.5, margin=-0.1)


def test_teacher_changed_follows_every_roles_swapped_handler_whatever_the_attach_order():
    """Users of the new teacher (pseudo-labels) see it after the handlers that finish the exchange (the distributed
    broadcast), even when they were attached first."""
    trainer = _trainer(max_epochs=1)
    calls = []
    trainer.add_event_handler(DistillationEvents.TEACHER_CHANGED, lambda engine: calls.append("uses the teacher"))
    trainer.add_event_handler(DistillationEvents.ROLES_SWAPPED, lambda engine: calls.append("finishes the exchange"))
    RoleSwapHandler(ScriptedValidator(trainer.network, []), policy="periodic").swap(trainer)
    assert calls == ["finishes the exchange", "uses the teacher"]


@pytest.mark.parametrize("keep, kept_epoch, kept_score, swapped", [("best", 1, 0.7, True), ("last", 2, 0.55, False)])
def test_keep_decides_which_student_is_swapped_in_and_reported(keep, kept_epoch, kept_score, swapped):
    """Student scores 0.7 then 0.55 against a teacher at 0.6: "best" keeps epoch 1 and swaps it in; "last" keeps the
    epoch-2 student, which does not beat the teacher by the margin."""
    trainer = _trainer(max_epochs=2)
    handler, validator = _attach(
        trainer, [0.7, 0.55], policy="if_better", interval=1, warmup=2, teacher_score=0.6, margin=0.01, keep=keep
    )
    trainer.run()
    assert handler.rounds == [
        {"epoch": 2, "metric": "f1", "teacher_score": 0.6, "student_score": kept_score, "swapped": swapped}
    ]
    if swapped:
        assert _equal(trainer.teacher.state_dict(), validator.snapshots[kept_epoch - 1])
    else:
        assert _equal(handler.best_student_state, validator.snapshots[kept_epoch - 1])
        assert handler.best_student_score == kept_score


def test_unknown_keep_is_refused():
    trainer = _trainer(max_epochs=1)
    with pytest.raises(ValueError, match="keep must be one of"):
        RoleSwapHandler(ScriptedValidator(trainer.network, []), teacher_score=0.5, keep="first")
