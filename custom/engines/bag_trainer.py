"""Stage 1 with slide-level labels: a slide is a bag of its tissue tiles, and one label covers the whole bag."""

from __future__ import annotations

from typing import Any

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys

__all__ = ["BagMILTrainer"]


def _norm_buffers(network: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every batch-norm running statistic, to undo a forward pass's update of them."""
    return [
        (buffer, buffer.detach().clone())
        for module in network.modules()
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
        for buffer in module.buffers()
    ]


class BagMILTrainer(SupervisedTrainer):
    """A ``SupervisedTrainer`` whose batches are bags of tiles, ``image`` (B, k, 3, H, W) with one label per bag.

    The network segments every tile; the loss (``custom.losses.BagMILLoss``) takes the maps as (B, k, C, H, W), so
    pooling runs over every pixel of a bag. Memory is bounded by ``tile_batch`` tiles per forward pass, whatever
    the bag size: when a batch holds more tiles, the step runs in two passes (gradient checkpointing at the level
    of the bag, as in GradCache): a no-grad pass over micro-batches gives every tile's maps, the loss and its
    gradient with respect to those maps; a second pass recomputes each micro-batch with gradients and
    back-propagates that map gradient. The accumulated gradient is exactly that of one graph over the same
    micro-batches: batch-norm layers (VGG16-BN blocks of DWS-MIL) normalise each micro-batch by its own statistics
    in both passes, and their running statistics are restored after the first pass so that they update once per
    micro-batch, as in a plain loop. The network must not draw random numbers in its forward (no dropout). The cost
    is one extra forward pass per step.

    The output's ``pred`` holds the (B, k, C, H, W) maps of the step (detached in the two-pass case).

    Args:
        tile_batch: most tiles per forward pass; every other argument is ``SupervisedTrainer``'s.
    """

    def __init__(self, *args: Any, tile_batch: int = 16, **kwargs: Any) -> None:
        if tile_batch < 1:
            raise ValueError(f"tile_batch must be >= 1, got {tile_batch}.")
        super().__init__(*args, **kwargs)
        self.tile_batch = tile_batch

    def _forward(self, engine: BagMILTrainer, tiles: torch.Tensor) -> torch.Tensor:
        """The network's maps of a stack of tiles (n, 3, H, W), under autocast when AMP is on."""
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                return engine.inferer(tiles, engine.network)
        return engine.inferer(tiles, engine.network)

    def _backward(self, engine: BagMILTrainer, loss: torch.Tensor) -> None:
        """Back-propagate, through the gradient scaler when AMP is on."""
        (engine.scaler.scale(loss) if engine.amp and engine.scaler is not None else loss).backward()

    def _iteration(self, engine: BagMILTrainer, batchdata: dict[str, torch.Tensor]) -> dict:
        """One optimizer step over a batch of bags; returns IMAGE, LABEL (slide labels), PRED (maps) and LOSS."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        images, labels = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if images.ndim != 5:
            raise ValueError(f"expected bags of tiles (B, k, 3, H, W), got image shape {tuple(images.shape)}.")
        n_bags, k = images.shape[:2]
        tiles = images.flatten(0, 1)
        engine.state.output = {Keys.IMAGE: images, Keys.LABEL: labels}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if len(tiles) <= engine.tile_batch:
            maps = self._forward(engine, tiles)
            engine.state.output[Keys.PRED] = maps.unflatten(0, (n_bags, k))
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(engine.state.output[Keys.PRED].float(), labels).mean()
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            self._backward(engine, loss)
        else:
            chunks = tiles.split(engine.tile_batch)
            running = _norm_buffers(engine.network)
            with torch.no_grad():
                maps = torch.cat([self._forward(engine, chunk).float() for chunk in chunks])
            for buffer, saved in running:
                buffer.copy_(saved)
            maps = maps.unflatten(0, (n_bags, k)).requires_grad_(True)
            engine.state.output[Keys.PRED] = maps
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss = engine.loss_function(maps, labels).mean()
            (map_grad,) = torch.autograd.grad(loss, maps)
            engine.state.output[Keys.LOSS] = loss.detach()
            engine.state.output[Keys.PRED] = maps.detach()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            for chunk, grad in zip(chunks, map_grad.flatten(0, 1).split(engine.tile_batch)):
                self._backward(engine, (self._forward(engine, chunk).float() * grad).sum())
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.amp and engine.scaler is not None:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
