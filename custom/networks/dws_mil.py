"""DWS-MIL style segmenter: VGG16-BN's first three blocks with a deeply supervised side map per block."""

from __future__ import annotations

from collections.abc import Sequence

from .mil_segmenter import MILSegmenter
from .vgg import stage_channels, vgg16_bn_trunk

__all__ = ["DWSMIL"]


class DWSMIL(MILSegmenter):
    """VGG16-BN blocks 1-3 (conv64 x2, conv128 x2, conv256 x3, each closed by a max-pool), one side map each.

    Args:
        in_channels: image channels.
        width: channel multiplier (1.0 = VGG16's 64/128/256; 0.25 trains on a CPU).
        fusion_weights: weights of the three side maps in the fused map. The default (0.3, 0.3, 0.4) is the
            IKD-MIL reference code; SA-MIL's DWS-MIL uses (0.2, 0.35, 0.45).
        pretrained_path: optional local file with torchvision's `vgg16_bn` state dict (ImageNet weights);
            only valid with width=1.0 and 3 input channels. Otherwise the convolutions are Kaiming-initialised.
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: float = 1.0,
        fusion_weights: Sequence[float] = (0.3, 0.3, 0.4),
        pretrained_path: str | None = None,
    ) -> None:
        super().__init__(vgg16_bn_trunk(width, in_channels, pretrained_path), stage_channels(width), fusion_weights)
        self.definition = {
            "_target_": "custom.networks.DWSMIL", "in_channels": int(in_channels), "width": float(width),
            "fusion_weights": [float(w) for w in fusion_weights], "pretrained_path": pretrained_path,
        }
