"""Stage-2 trainer: a frozen teacher's maps distilled into a trainable student, in one Ignite engine."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from monai.engines.trainer import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import Transform
from monai.utils import IgniteInfo, min_version, optional_import
from monai.utils.enums import CommonKeys as Keys
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from custom.transforms import PSEUDO_KEY

if TYPE_CHECKING:
    from ignite.engine import Engine, EventEnum
    from ignite.metrics import Metric
else:
    Engine, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Engine")
    Metric, _ = optional_import("ignite.metrics", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Metric")
    EventEnum, _ = optional_import(
        "ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "EventEnum", as_type="base"
    )

__all__ = ["DistillationEvents", "DistillationTrainer"]



class DistillationEvents(EventEnum):
    """
    Stage-2 events, registered by :class:`DistillationTrainer` so that its handlers compose through Ignite, in an
    order that does not depend on the order of ``train_handlers``. The role-swap handler fires both, one after the
    other, once teacher and student have exchanged weights:

    - ``ROLES_SWAPPED``: the weights changed on this process; handlers that make them agree everywhere attach here
      (the distributed role swap broadcasts rank 0's weights on it);
    - ``TEACHER_CHANGED``: fired after every ``ROLES_SWAPPED`` handler has returned, so the new teacher is final on
      every rank; handlers that use the teacher attach here (the pseudo-label handler regenerates its cache on it).
    """

    ROLES_SWAPPED = "roles_swapped"
    TEACHER_CHANGED = "teacher_changed"


class DistillationTrainer(Trainer):
    """
    Fusion knowledge distillation (bundle/docs/method.md, stage 2), inherits from ``Trainer`` and ``Workflow``.

    Each iteration takes the teacher's maps for the batch, either the cached pseudo-labels in
    ``batchdata[pseudo_key]`` (B, 1, H, W) written by ``custom.handlers.PseudoLabelHandler``, or, with
    ``pseudo_key=None``, a no-grad forward of the teacher (strong images take their pixel mask instead, see
    :meth:`with_strong_masks`); then runs the student, computes
    ``loss_function.components(student_out, teacher_maps, label)`` and steps the optimizer.

    The teacher is frozen here (``requires_grad_(False)``, eval mode in every iteration) and must not be in the
    optimizer. ``teacher`` and ``network`` (the student) are attributes whose weights the role-swap handler
    exchanges in place, so the optimizer keeps pointing at the student's parameters.
    For multi-GPU training, ``network`` may be a ``DistributedDataParallel`` wrapper and ``teacher`` a plain module
    on each rank; nothing in the iteration depends on the rank.

    Args:
        device: an object representing the device on which to run.
        max_epochs: the total epoch number for trainer to run.
        train_data_loader: batches of dicts with ``image`` (B, 3, H, W), ``label`` (B,) and, with the cache on,
            ``pseudo_key`` (B, 1, H, W).
        network: the student, ``net(x) -> (B, S + 1, H, W)`` probabilities, fused map last.
        teacher: the teacher, same contract as ``network``.
        optimizer: the optimizer of the student's parameters.
        loss_function: a ``custom.losses.DistillationLoss`` or any module with
            ``components(student_out, teacher_maps, label) -> dict`` holding ``"loss"``.
        pseudo_key: batch key of the cached teacher maps; None runs the teacher on every batch.
        mask_key: batch key of the pixel masks that replace the teacher's maps on strong images (mixed supervision);
            augmentations must move it with the image.
        strong_key: batch key of the per-image flag "this mask is a strong label" (``custom.data.STRONG_KEY``, which
            ``custom.data.with_strong_labels`` sets).
        batch_transform: applied to each collated batch dict before anything reads it, e.g.
            ``custom.transforms.RandFlipRotate90Batchd`` over image, mask and pseudo-label (a live teacher then sees
            the augmented image, as with per-sample augmentation).
        epoch_length: number of iterations for one epoch, default to `len(train_data_loader)`.
        non_blocking: if True and this copy is between CPU and GPU, the copy may occur asynchronously.
        prepare_batch: function returning ``(image, label)`` on the device from ``batchdata``.
        iteration_update: the callable function for every iteration, replaces ``self._iteration()``.
        inferer: how the student runs on the input, default ``SimpleInferer()``.
        teacher_inferer: how the teacher runs on the input, default ``SimpleInferer()``.
        postprocessing: execute additional transformation for the model output data.
        key_train_metric: Ignite metric computed every iteration and averaged into ``engine.state.metrics``.
        additional_metrics: more Ignite metrics that also attach to Ignite Engine.
        metric_cmp_fn: function to compare current key metric with previous best key metric value.
        train_handlers: Ignite handlers with ``attach``; order matters for ones on the same event: validation
            before role swap, the epoch checkpoint saver last (pseudo-label regeneration follows the role swap
            through ``DistillationEvents``, whatever the order).
        amp: whether to enable auto-mixed-precision training (CUDA autocast + GradScaler), default is False.
        event_names: additional custom ignite events that will register to the engine.
        event_to_attr: a dictionary to map an event to a state attribute, then add to `engine.state`.
        decollate: whether to decollate the batch-first data to a list of data after model computation.
        optim_set_to_none: when calling `optimizer.zero_grad()`, instead of setting to zero, set the grads to None.
        to_kwargs: dict of other args for `prepare_batch` API when converting the input data.
        amp_kwargs: dict of the args for `torch.autocast("cuda")` API.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: torch.nn.Module,
        teacher: torch.nn.Module,
        optimizer: Optimizer,
        loss_function: torch.nn.Module,
        pseudo_key: str | None = PSEUDO_KEY,
        mask_key: str = "mask",
        strong_key: str = "strong",
        batch_transform: Callable[[dict], dict] | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        inferer: Inferer | None = None,
        teacher_inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list[str | EventEnum | type[EventEnum]] | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        _check_teacher_not_optimized(teacher, optimizer)
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=None,
            amp=amp,
            event_names=[DistillationEvents, *(event_names or [])],
            event_to_attr=event_to_attr,
            decollate=decollate,
            to_kwargs=to_kwargs,
            amp_kwargs=amp_kwargs,
        )
        self.network = network
        self.teacher = teacher.requires_grad_(False).eval()
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.pseudo_key = pseudo_key
        self.mask_key = mask_key
        self.strong_key = strong_key
        self.batch_transform = batch_transform
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.teacher_inferer = SimpleInferer() if teacher_inferer is None else teacher_inferer
        self.optim_set_to_none = optim_set_to_none
        # handlers attach last, once the networks they read (teacher, network, optimizer) exist
        if train_handlers is not None:
            self._register_handlers(train_handlers)

    def teacher_maps(self, batchdata: dict[str, Any], inputs: torch.Tensor) -> torch.Tensor:
        """The teacher's maps for this batch: the cached pseudo-labels, or a no-grad teacher forward."""
        if self.pseudo_key is None:
            self.teacher.eval()
            with torch.no_grad():
                return self.teacher_inferer(inputs, self.teacher)
        if self.pseudo_key not in batchdata:
            raise KeyError(
                f"batch has no {self.pseudo_key!r} key: add LoadPseudoLabeld to the train transforms, "
                "or set pseudo_key=None to run the teacher on every batch."
            )
        return batchdata[self.pseudo_key].to(device=inputs.device, non_blocking=self.non_blocking)

    def with_strong_masks(self, batchdata: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
        """The teacher's maps with every strong image's pixel mask in their place (mixed supervision).

        A pathologist's mask outranks the teacher: strong images (``batchdata[strong_key]``) learn their ``mask``,
        every map channel of the target alike; a batch without strong images is returned unchanged.
        """
        if self.strong_key not in batchdata:
            return target
        strong = torch.as_tensor(batchdata[self.strong_key]).reshape(-1).bool().to(target.device)
        if not bool(strong.any()):
            return target
        mask = (batchdata[self.mask_key].to(device=target.device, dtype=target.dtype) > 0.5).to(target.dtype)
        return torch.where(strong.view(-1, 1, 1, 1), mask.expand_as(target), target)

    def _iteration(self, engine: DistillationTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """
        One distillation step. Returns a dictionary with IMAGE, LABEL (image-level), PRED (student output),
        ``PSEUDO_KEY`` (the teacher's maps used, cached or live), LOSS and the loss components (``loss_kd``,
        ``loss_wce``).
        """
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        if engine.batch_transform is not None:
            batchdata = engine.batch_transform(batchdata)
        inputs, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: labels}

        def _compute_pred_loss() -> None:
            target = engine.with_strong_masks(batchdata, engine.teacher_maps(batchdata, inputs))
            engine.state.output[PSEUDO_KEY] = target
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output.update(engine.loss_function.components(engine.state.output[Keys.PRED], target, labels))
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                _compute_pred_loss()
            engine.scaler.scale(engine.state.output[Keys.LOSS]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            _compute_pred_loss()
            engine.state.output[Keys.LOSS].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _check_teacher_not_optimized(teacher: torch.nn.Module, optimizer: Optimizer) -> None:
    """Refuse an optimizer over teacher parameters: the teacher must stay frozen during a round."""
    teacher_params = {id(p) for p in teacher.parameters()}
    if any(id(p) in teacher_params for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer holds teacher parameters; give it the student's (network's) parameters only.")
