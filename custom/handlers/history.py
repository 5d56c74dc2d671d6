"""The training curves a stage checkpoint carries, stored as plain data so that the checkpoint loads weights-only."""

from __future__ import annotations

from typing import Any, Mapping

from monai.handlers import MetricLogger
from monai.handlers.metric_logger import MetricLoggerKeys

__all__ = ["TrainingHistory"]

LOSS, METRICS = "loss", "metrics"


class TrainingHistory(MetricLogger):
    """MONAI's ``MetricLogger`` whose state is a dict of str keys, lists and dicts.

    ``MetricLogger.state_dict`` keys its state by the ``MetricLoggerKeys`` Enum and holds the metrics in a
    ``defaultdict``; neither unpickles with ``torch.load(weights_only=True)``, so every stage checkpoint that saved
    one could be read only by running the pickle's code, and ``evaluate.json`` refused them. This state reads back
    anywhere; ``load_state_dict`` also takes MONAI's own (an older checkpoint resumed with ``weights_only=False``).
    """

    def state_dict(self) -> dict[str, Any]:
        """Loss and metric histories as plain lists of (iteration, value) pairs."""
        return {LOSS: list(self.loss), METRICS: {name: list(points) for name, points in self.metrics.items()}}

    def load_state_dict(self, state_dict: Mapping[Any, Any]) -> None:
        """Restore from this class's state or from ``MetricLogger``'s (Enum keys)."""
        loss = state_dict[LOSS] if LOSS in state_dict else state_dict[MetricLoggerKeys.LOSS]
        metrics = state_dict[METRICS] if METRICS in state_dict else state_dict[MetricLoggerKeys.METRICS]
        self.loss[:] = list(loss)
        self.metrics.clear()
        self.metrics.update({name: list(points) for name, points in metrics.items()})
