"""Stage-2 fusion knowledge-distillation loss: soft Dice to the teacher's map plus weighted cross-entropy."""

from __future__ import annotations

import math

import torch
from monai.utils.enums import CommonKeys as Keys
from torch.nn.modules.loss import _Loss

from custom.losses.dice import soft_dice_loss
from custom.losses.mil import MILPoolingLoss
from custom.losses.weighted_ce import WeightedCELoss

__all__ = ["DistillationLoss"]

TARGETS = ("fused", "side")


class DistillationLoss(_Loss):
    """
    ``loss = L_kd + lambda_wce * L_wce + lambda_mil * L_mil`` between a student's output and its teacher's
    (bundle/docs/method.md, stage 2).

    - ``L_kd``: soft Dice (``soft_dice_loss``, per image and per map, smoothing 1 as in stage 1) between every
      student map (side maps and the fused map) and the teacher's target. ``target="fused"`` (the method): every
      student map learns the teacher's fused map. ``target="side"`` (ablation): student map k learns teacher map k,
      so the teacher output must have all ``S + 1`` channels (a teacher forward, not the one-channel cache).
      Positive images learn the teacher's map; negative images learn an all-zero mask whatever the teacher says,
      scored as in stage 1 on the inverted maps (``1 - p`` against all ones), since Dice to an empty mask is flat.
    - ``L_wce``: :class:`WeightedCELoss` between the student's fused map and the same (negatives: zero) target.
    - Calibrated targets (off by default, ``target_threshold=None``): with a threshold ``T`` every teacher map is
      recentred, ``t' = sigmoid(logit(t) - logit(T))``, before both terms see it, so that the teacher's calls start at
      ``T`` instead of 0.5 while its confidence ordering is kept; ``T = 0.5`` changes nothing.
      :class:`custom.handlers.PseudoLabelHandler` sets it from the teacher's false calls on the training negatives
      (``fp_budget``), without a mask. Strong images' masks (0 or 1) are unchanged by it.
    - ``L_mil`` (off by default, ``lambda_mil=0``): stage 1's own loss on the student, :class:`MILPoolingLoss`
      (BCE of the generalised-mean score, r = 4, of every student map against the image label). The image label is
      the one thing in stage 2 that is not the teacher's guess; on a negative image this term is as steep in the
      largest false call as stage 1 was, where the inverted Dice grows only as about f / 2 for a false share f.

    Reduction: ``L_kd`` is the mean of the ``B x (S + 1)`` per-image Dice terms and ``L_wce`` the mean over images,
    so the loss does not depend on the batch size. The reference adds ``2 x B x WCE`` to the sum of those
    ``B x (S + 1)`` terms; dividing by ``B x (S + 1)`` gives ``mean Dice + 2 / (S + 1) x WCE``, so its balance is
    ``lambda_wce = 2 / (S + 1)``: the default 0.5 is the reference's for DWS-MIL's three side maps.
    (Were the reference's Dice terms batch-level, ``S + 1`` of them, the equivalent would be ``2 B / (S + 1)``.)

    Args:
        lambda_wce: weight of ``L_wce``.
        use_wce: False drops ``L_wce`` (ablation: Dice distillation only); it is then reported as 0.
        wce_threshold: teacher probabilities at or above it are foreground for ``L_wce``.
        target: ``"fused"`` or ``"side"``, see above.
        smooth: Dice numerator and denominator smoothing.
        lambda_mil: weight of ``L_mil``; 0 leaves the method as specified.
        mil_r: generalised-mean exponent of ``L_mil`` (stage 1's ``r``).
        target_threshold: the teacher probability that becomes the targets' 0.5, in (0, 1); None leaves the maps as
            they are (the method as specified).
    """

    def __init__(
        self,
        lambda_wce: float = 0.5,
        use_wce: bool = True,
        wce_threshold: float = 0.5,
        target: str = "fused",
        smooth: float = 1.0,
        lambda_mil: float = 0.0,
        mil_r: float = 4.0,
        target_threshold: float | None = None,
    ) -> None:
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}.")
        if lambda_mil < 0:
            raise ValueError(f"lambda_mil must be >= 0, got {lambda_mil}.")
        self.lambda_mil = lambda_mil
        self.mil = MILPoolingLoss(r=mil_r)
        self.lambda_wce = lambda_wce
        self.use_wce = use_wce
        self.target = target
        self.smooth = smooth
        self.wce = WeightedCELoss(threshold=wce_threshold)
        self.target_threshold = target_threshold

    @property
    def target_threshold(self) -> float | None:
        """The teacher probability that the targets recentre to 0.5 (None: targets as the teacher gives them)."""
        return self._target_threshold

    @target_threshold.setter
    def target_threshold(self, value: float | None) -> None:
        if value is not None and not 0.0 < float(value) < 1.0:
            raise ValueError(f"target_threshold must lie in (0, 1) or be None, got {value}.")
        self._target_threshold = None if value is None else float(value)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Scalar total loss; see :meth:`components` for the arguments."""
        return self.components(student, teacher, label)[Keys.LOSS]

    def components(self, student: torch.Tensor, teacher: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        """
        Args:
            student: student probabilities (B, S + 1, H, W), side maps then the fused map last.
            teacher: teacher probabilities, (B, 1, H, W) fused map (pseudo-label cache) or (B, S + 1, H, W).
            label: image-level labels (B,), 1 = tumour, 0 = none.

        Returns:
            ``{"loss": total, "loss_kd": L_kd, "loss_wce": L_wce, "loss_mil": L_mil}``, scalars (the components are
            for logging; ``L_mil`` is 0 when ``lambda_mil`` is 0).
        """
        positive = self._positive_mask(label, student)
        target = self._dice_target(student, self.recentre(teacher.to(student.dtype))) * positive
        foreground = torch.where(positive, student, 1.0 - student)
        kd = soft_dice_loss(foreground, torch.where(positive, target, torch.ones_like(student)), self.smooth).mean()
        wce = self.wce(student[:, -1:], target[:, -1:]) if self.use_wce else kd.new_zeros(())
        mil = self.mil(student, label.to(student.device)) if self.lambda_mil > 0 else kd.new_zeros(())
        total = kd + self.lambda_wce * wce + self.lambda_mil * mil
        return {Keys.LOSS: total, "loss_kd": kd, "loss_wce": wce, "loss_mil": mil}

    def recentre(self, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher's maps with ``target_threshold`` moved to 0.5 (unchanged when it is None); 0 and 1 stay."""
        if self._target_threshold is None:
            return teacher
        shift = math.log(self._target_threshold / (1.0 - self._target_threshold))
        return torch.sigmoid(torch.logit(teacher.float(), eps=1e-6) - shift).to(teacher.dtype)

    def _dice_target(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The teacher map each student channel learns, broadcast to the student's shape."""
        if teacher.shape[0] != student.shape[0] or teacher.shape[2:] != student.shape[2:]:
            raise ValueError(f"teacher shape {tuple(teacher.shape)} does not match student {tuple(student.shape)}.")
        if self.target == "fused":
            return teacher[:, -1:].expand_as(student)
        if teacher.shape[1] != student.shape[1]:
            raise ValueError(
                f'target="side" needs the teacher\'s {student.shape[1]} maps, got {teacher.shape[1]} channel(s); '
                "the pseudo-label cache holds only the fused map, so run the teacher every step."
            )
        return teacher

    @staticmethod
    def _positive_mask(label: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
        """(B, 1, 1, 1) boolean mask of tumour images, checked against the batch size."""
        flat = label.reshape(-1)
        if flat.numel() != student.shape[0]:
            raise ValueError(f"expected one image-level label per image ({student.shape[0]}), got {flat.numel()}.")
        return (flat > 0.5).view(-1, 1, 1, 1).to(student.device)
