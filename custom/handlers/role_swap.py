"""Dynamic role reversal: the best student becomes the teacher, the old teacher becomes the student's start."""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

import torch
from monai.utils import IgniteInfo, min_version, optional_import

from custom.distributed import unwrap_network
from custom.engines.distillation_trainer import DistillationEvents
from custom.engines.stages import CHECKPOINT_POLICIES
from custom.metrics.selection import chance_level

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")
if TYPE_CHECKING:
    from ignite.engine import Engine
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")

__all__ = ["RoleSwapHandler", "POLICIES"]

POLICIES = ("if_better", "periodic", "off")


class RoleSwapHandler:
    """
    Swap teacher and student of a ``custom.engines.DistillationTrainer`` (bundle/docs/method.md, role reversal; defects
    3 and 4).

    The handler follows the student's validation: after every run of ``validator`` (whose ``network`` is the
    trainer's student) it reads ``validator.state.metrics[score_key]`` (higher is better) and keeps an in-memory deep
    copy of the weights whenever the score is the best since the last swap (``keep="best"``), or of every validated
    student with its score (``keep="last"``: the latest student is the one that counts; ``checkpoint_policy``).
    At the end of epochs ``warmup, warmup + interval, ...`` it decides:

    - ``"if_better"``: swap when the best student's score beats the current teacher's by more than ``margin``
      (so that a validation difference within noise is not a decision);
    - ``"periodic"``: always swap (the reference code); if no student was validated since the last swap, the
      current student is swapped in with its last score (None when it was never validated), instead of the
      reference's crash on a missing best-student checkpoint (defect 4);
    - ``"off"``: never decide.

    A swap is real (defect 3): both state dicts are deep-copied before loading, so the teacher gets the best
    student's weights and the student the old teacher's, with no shared storage. Weights are loaded in place, so
    the optimizer still holds the student's parameters; its state (e.g. Adam moments, step counts) is cleared
    because it described the previous weights; learning rates and param groups are kept. The teacher's score
    becomes the swapped-in student's, the best-student record starts afresh, and
    ``DistillationEvents.ROLES_SWAPPED`` then ``DistillationEvents.TEACHER_CHANGED`` are fired on the trainer (the
    distributed subclass broadcasts the weights on the first, the pseudo-label handler regenerates on the second).

    Every decision is appended to ``rounds`` as ``{"epoch", "metric", "teacher_score", "student_score", "swapped"}``
    (``metric`` names the validation score used) and logged. ``state_dict()`` / ``load_state_dict()`` carry scores,
    best-student weights and rounds, so put the handler in the CheckpointSaver's ``save_dict`` and a resumed run keeps
    the same schedule.

    Attach it after the ``ValidationHandler`` in ``train_handlers``, so that a decision sees that epoch's validation.

    Args:
        validator: the evaluator of the student (anything with ``state.metrics`` and ``network``, Ignite events).
        policy: one of ``"if_better"``, ``"periodic"``, ``"off"``.
        interval: epochs between decisions (K; 30 in the reference).
        warmup: first epoch at which a decision is made (60 in the reference).
        score_key: metric name in ``validator.state.metrics``; default the validator's key metric.
        margin: how much the best student must beat the teacher by for ``"if_better"`` to swap.
        teacher_score: validation score of the initial teacher (e.g. its stage-1 best metric).
        teacher_validator: evaluator whose ``network`` is the teacher, run once at the start when
            ``teacher_score`` is not given; ``"if_better"`` needs one of the two.
        keep: ``"best"`` or ``"last"``: which validated student the swap, the report and ``model.pt`` take.
    """

    def __init__(
        self,
        validator: Engine,
        policy: str = "if_better",
        interval: int = 30,
        warmup: int = 60,
        score_key: str | None = None,
        teacher_score: float | None = None,
        teacher_validator: Engine | None = None,
        margin: float = 0.0,
        keep: str = "best",
    ) -> None:
        if keep not in CHECKPOINT_POLICIES:
            raise ValueError(f"keep must be one of {CHECKPOINT_POLICIES}, got {keep!r}.")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
        if interval < 1 or warmup < 1:
            raise ValueError(f"interval and warmup must be positive epochs, got interval={interval}, warmup={warmup}.")
        if policy == "if_better" and teacher_score is None and teacher_validator is None:
            raise ValueError('policy "if_better" needs the teacher\'s score: give teacher_score or teacher_validator.')
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}.")
        self.margin = margin
        self.keep = keep
        self.validator = validator
        self.policy = policy
        self.interval = interval
        self.warmup = warmup
        self.score_key = score_key
        self.teacher_validator = teacher_validator
        self.teacher_score = teacher_score
        self.best_student_score: float | None = None
        self.best_student_state: dict[str, torch.Tensor] | None = None
        self.last_student_score: float | None = None
        self.rounds: list[dict[str, Any]] = []
        self.logger = logging.getLogger(__name__)

    def attach(self, engine: Engine) -> None:
        """Follow the student's validation and decide at the trainer's epoch ends."""
        self.validator.add_event_handler(Events.COMPLETED, self.record_student)
        if self.teacher_score is None and self.teacher_validator is not None:
            engine.add_event_handler(Events.STARTED, self.score_teacher)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def score_teacher(self, engine: Engine) -> None:
        """Validate the teacher once, unless a resumed state already holds its score."""
        if self.teacher_score is None:
            self.teacher_validator.run()
            self.teacher_score = self._score(self.teacher_validator)
            self.logger.info(f"role swap: initial teacher validation {self.metric_name} {self.teacher_score:.4f}")
            self._warn_at_chance()

    def _warn_at_chance(self) -> None:
        """Say when the teacher does not separate the validation labels: its pseudo-masks then carry little signal,
        which a weak-label user cannot see any other way."""
        chance = chance_level(self.metric_name)
        if chance is not None and self.teacher_score <= chance:
            self.logger.warning(
                f"role swap: the teacher's validation {self.metric_name} {self.teacher_score:.4f} is at or below "
                f"chance ({chance}): it does not separate the positive from the negative validation images (or "
                "slides), so its pseudo-masks carry little signal; check the labels, or give stage 1 more epochs or "
                "more data before trusting the student"
            )

    def record_student(self, validator: Engine) -> None:
        """Keep a deep copy of the student's weights when its validation score is the best since the last swap, or
        always with ``keep="last"``."""
        score = self._score(validator)
        self.last_student_score = score
        if self.keep == "last" or self.best_student_score is None or score > self.best_student_score:
            self.best_student_score = score
            self.best_student_state = copy.deepcopy(unwrap_network(validator.network).state_dict())

    def __call__(self, engine: Engine) -> None:
        """Decide at a scheduled epoch end whether the roles swap, record and log the decision."""
        epoch = engine.state.epoch
        if self.policy == "off" or epoch < self.warmup or (epoch - self.warmup) % self.interval:
            return
        record = {
            "epoch": epoch,
            "metric": self.metric_name,
            "teacher_score": self.teacher_score,
            "student_score": self.best_student_score,
            "swapped": self._should_swap(),
        }
        self.rounds.append(record)
        self.logger.info(
            f"role swap at epoch {epoch} ({self.policy}, {self.metric_name}, margin {self.margin}): teacher "
            f"{_fmt(record['teacher_score'])}, {self.keep} student {_fmt(record['student_score'])}, "
            f"swapped: {record['swapped']}"
        )
        if record["swapped"]:
            self.swap(engine)

    def swap(self, engine: Engine) -> None:
        """Teacher <- best (or current) student, student <- old teacher, as independent copies; then notify: first
        the handlers that finish the exchange (``ROLES_SWAPPED``), then those that use the new teacher."""
        student = unwrap_network(engine.network)
        old_teacher_state = copy.deepcopy(engine.teacher.state_dict())
        if self.best_student_state is None:
            new_teacher_state, new_teacher_score = copy.deepcopy(student.state_dict()), self.last_student_score
        else:
            new_teacher_state, new_teacher_score = self.best_student_state, self.best_student_score
        engine.teacher.load_state_dict(new_teacher_state)
        student.load_state_dict(old_teacher_state)
        engine.optimizer.state.clear()
        self.teacher_score = new_teacher_score
        self.best_student_score, self.best_student_state, self.last_student_score = None, None, None
        engine.fire_event(DistillationEvents.ROLES_SWAPPED)
        engine.fire_event(DistillationEvents.TEACHER_CHANGED)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue the same schedule."""
        return {
            "teacher_score": self.teacher_score,
            "best_student_score": self.best_student_score,
            "best_student_state": self.best_student_state,
            "last_student_score": self.last_student_score,
            "rounds": copy.deepcopy(self.rounds),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by :meth:`state_dict`."""
        self.teacher_score = state_dict["teacher_score"]
        self.best_student_score = state_dict["best_student_score"]
        self.best_student_state = copy.deepcopy(state_dict["best_student_state"])
        self.last_student_score = state_dict["last_student_score"]
        self.rounds = copy.deepcopy(list(state_dict["rounds"]))

    def _should_swap(self) -> bool:
        """The policy's rule; ``if_better`` needs a validated student that beats the teacher."""
        if self.policy == "periodic":
            return True
        return self.best_student_score is not None and self.best_student_score > self.teacher_score + self.margin

    @property
    def metric_name(self) -> str:
        """The validation metric the decisions use, for the log and ``rounds``."""
        return self.score_key or getattr(getattr(self.validator, "state", None), "key_metric_name", None) or "score"

    def _score(self, validator: Engine) -> float:
        """The validator's score for this handler, as a float."""
        key = self.score_key or validator.state.key_metric_name
        if key not in validator.state.metrics:
            raise KeyError(f"validator has no metric {key!r}; it has {sorted(validator.state.metrics)}.")
        return float(validator.state.metrics[key])


def _fmt(score: float | None) -> str:
    """A score for the log, or 'none' before any validation."""
    return "none" if score is None else f"{score:.4f}"
