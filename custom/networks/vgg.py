"""The first three VGG16-BN blocks, shared by the MIL segmenters, and loading of local ImageNet weights."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

__all__ = ["VGG16_BN_STAGES", "vgg_block", "stage_channels", "vgg16_bn_trunk", "load_vgg16_bn_trunk"]

# (output channels, number of 3x3 convolutions) of VGG16's first three blocks.
VGG16_BN_STAGES: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3))

# Indices of the 3x3 convolutions in torchvision's `vgg16_bn().features`; each BatchNorm2d sits at index + 1
# (conv, bn, relu repeated, a max-pool closing each block: 0 3 | 7 10 | 14 17 20).
VGG16_BN_CONV_INDICES: tuple[int, ...] = (0, 3, 7, 10, 14, 17, 20)


def vgg_block(in_channels: int, out_channels: int, n_convs: int) -> nn.Sequential:
    """One VGG block: `n_convs` x (3x3 conv + BN + ReLU), then 2x2 max-pool halving the size."""
    layers: list[nn.Module] = []
    for i in range(n_convs):
        layers.append(
            Convolution(
                spatial_dims=2,
                in_channels=in_channels if i == 0 else out_channels,
                out_channels=out_channels,
                kernel_size=3,
                act="relu",
                norm="batch",
            )
        )
    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
    block = nn.Sequential(*layers)
    for module in block.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(module.bias)
    return block


def stage_channels(width: float) -> list[int]:
    """Channels of the three blocks scaled by `width` (1.0 = VGG16's 64/128/256)."""
    if width <= 0:
        raise ValueError(f"width must be positive, got {width}.")
    return [max(1, round(channels * width)) for channels, _ in VGG16_BN_STAGES]


def vgg16_bn_trunk(width: float = 1.0, in_channels: int = 3, pretrained_path: str | None = None) -> list[nn.Sequential]:
    """The three VGG16-BN blocks as separate modules so a network can tap a side output after each.

    `pretrained_path` names a local torchvision `vgg16_bn` state-dict file (ImageNet weights); it needs
    VGG16's own shapes, so width=1.0 and in_channels=3.
    """
    if pretrained_path is not None and (width != 1.0 or in_channels != 3):
        raise ValueError(
            f"pretrained_path={pretrained_path!r} needs width=1.0 and in_channels=3 (VGG16's shapes), "
            f"got width={width}, in_channels={in_channels}."
        )
    blocks = []
    for out_channels, (_, n_convs) in zip(stage_channels(width), VGG16_BN_STAGES):
        blocks.append(vgg_block(in_channels, out_channels, n_convs))
        in_channels = out_channels
    if pretrained_path is not None:
        load_vgg16_bn_trunk(blocks, pretrained_path)
    return blocks


def _trunk_layers(blocks: Sequence[nn.Module]) -> list[Convolution]:
    """The 3x3 conv+BN layers of the blocks in forward order (the order of VGG16_BN_CONV_INDICES)."""
    return [m for block in blocks for m in block.modules() if isinstance(m, Convolution)]


def load_vgg16_bn_trunk(blocks: Sequence[nn.Module], path: str) -> None:
    """Copy ImageNet weights from a local torchvision `vgg16_bn` state-dict file into the three blocks.

    The file holds torchvision's layout (`features.0.weight`, `features.1.running_mean`, ...); keys beyond
    the first three blocks (deeper features, classifier) are ignored. Nothing is downloaded.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"VGG16-BN weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: cannot be read as a torch state dict ({e}).") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a torchvision vgg16_bn state dict, got {type(state).__name__}.")
    layers = _trunk_layers(blocks)
    if len(layers) != len(VGG16_BN_CONV_INDICES):
        raise ValueError(f"expected {len(VGG16_BN_CONV_INDICES)} conv layers in the trunk, found {len(layers)}.")
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    for layer, conv_index in zip(layers, VGG16_BN_CONV_INDICES):
        sources = {"conv": f"features.{conv_index}", "adn.N": f"features.{conv_index + 1}"}
        for name, target in layer.state_dict().items():
            prefix, _, leaf = name.rpartition(".")
            key = f"{sources[prefix]}.{leaf}"
            if key not in state:
                if leaf == "num_batches_tracked":  # older torchvision files do not store it
                    continue
                raise ValueError(f"{path}: missing key '{key}'; is this a torchvision vgg16_bn state dict?")
            if state[key].shape != target.shape:
                raise ValueError(
                    f"{path}: '{key}' has shape {tuple(state[key].shape)}, expected {tuple(target.shape)} "
                    "(pretrained weights need width=1.0 and 3 input channels)."
                )
            pairs.append((target, state[key]))
    with torch.no_grad():  # copy only once every key has been checked, so a bad file changes nothing
        for target, source in pairs:
            target.copy_(source)
