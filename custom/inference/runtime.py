# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""How the whole-slide engine evaluates its network: the same function, computed faster.

``prepare_network(network, runtime, channel)`` returns a callable mapping a ``(B, C, H, W)`` batch to the ``(B, H, W)``
map of one output channel (the fused map, ``-1``, by default), and the memory format its input should have:

- ``eager``: the network as given, in eval mode; every output channel is computed, one is kept.
- ``fused``: BatchNorm folded into the convolution before it (``torch.fx``), channels-last weights, and for a
  ``MILSegmenter`` only what the kept channel needs (``MILSegmenter.channel_map``: no side-map stack, no output
  concatenation; a side map runs only the blocks above it).
- ``onednn``: ``fused``, with every 3x3 convolution and the ReLU after it run as one oneDNN call (a ReLU post-op,
  ``torch.ops.mkldnn._convolution_pointwise``) instead of a convolution writing a float map that a second pass clamps.
  CPU only (elsewhere it is ``fused``).
- ``compile``: ``fused`` compiled by ``torch.compile`` (inductor; on a CPU it writes C++ and needs a compiler, cached
  under ``torch._inductor``'s cache folder, ``/tmp/torchinductor_<user>`` unless ``TORCHINDUCTOR_CACHE_DIR`` says
  otherwise). Compiling takes seconds to a minute and happens at the first batch; batches are padded to one shape so
  it happens once. If it fails (no compiler, an unsupported operator) the failure is logged and ``onednn`` (or
  ``fused`` off a CPU) runs instead.
- ``auto``: ``onednn`` on a CPU, ``fused`` elsewhere: the fastest that needs no compiler (see bundle/docs/README.md).

Every runtime gives the eager network's map up to float rounding (``tests/test_runtime.py``: within 1e-4). A
TorchScript module, or a network that ``torch.fx`` cannot trace, is run as in ``eager`` (logged), except that a
``onednn`` TorchScript module goes through ``torch.jit.optimize_for_inference`` (frozen, oneDNN conv+ReLU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.optimization import fuse

__all__ = ["RUNTIMES", "ConvReLU", "KeptChannel", "check_runtime", "fold_network", "network_versions",
           "onednn_conv_relu", "prepare_network", "resolve_runtime"]

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "eager", "fused", "onednn", "compile")


def fold_network(network: nn.Module) -> nn.Module:
    """``network`` with BatchNorm folded into the conv before it (a ``torch.fx`` copy; its weights stay untouched),
    channels-last; returned as it is (eval mode) when ``torch.fx`` cannot trace it."""
    network.eval()
    try:
        fused = fuse(network)
    except (torch.fx.proxy.TraceError, TypeError, NotImplementedError) as err:
        logger.info("network left unfused (torch.fx cannot trace it): %s", err)
        return network
    return fused.to(memory_format=torch.channels_last)


class ConvReLU(nn.Module):
    """``relu(conv(x))`` of a 2-D convolution as one oneDNN call with a ReLU post-op (CPU, float32).

    The weight is kept channels-last; oneDNN picks the same algorithm as for the plain convolution and applies the
    ReLU to each output block while it is in cache, so the map is written once and never read back for the clamp.
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"ConvReLU takes zero-padded convolutions with explicit padding, got {conv}")
        self.padding, self.stride = list(conv.padding), list(conv.stride)
        self.dilation, self.groups = list(conv.dilation), conv.groups
        self.register_buffer("weight", conv.weight.detach().clone().contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(
            x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups, "relu", [], ""
        )


def _is_relu(node: torch.fx.Node, modules: dict[str, nn.Module]) -> bool:
    """An fx node computing a (not in-place) ReLU of its single argument."""
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.ReLU
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu"


def onednn_conv_relu(graph_module: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, int]:
    """Replace every ``Conv2d -> ReLU`` pair of an fx graph (the conv's only user being the ReLU) by a ``ConvReLU``;
    in place; returns the module and how many pairs were replaced."""
    modules = dict(graph_module.named_modules())
    graph, replaced = graph_module.graph, 0
    for node in list(graph.nodes):
        if not _is_relu(node, modules) or len(node.args) != 1:
            continue
        conv = node.args[0]
        if not (isinstance(conv, torch.fx.Node) and conv.op == "call_module" and len(conv.users) == 1
                and type(modules.get(conv.target)) is nn.Conv2d):
            continue
        try:
            fused = ConvReLU(modules[conv.target])
        except ValueError:
            continue
        name = f"{conv.target.replace('.', '_')}_relu"
        graph_module.add_submodule(name, fused)
        with graph.inserting_after(node):
            new = graph.call_module(name, (conv.args[0],))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        graph.erase_node(conv)
        replaced += 1
    graph.lint()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module, replaced


class KeptChannel(nn.Module):
    """One output channel of ``network`` as ``(B, H, W)``: through its ``channel_map`` with the given (optimised)
    ``blocks`` when they are given (a ``custom.networks.MILSegmenter``), else ``network(x)[:, channel]``."""

    def __init__(self, network: nn.Module, channel: int, blocks: list[nn.Module] | None = None) -> None:
        super().__init__()
        self.network, self.channel = network, channel
        self.blocks = None if blocks is None else nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks is not None:
            return self.network.channel_map(x, self.channel, self.blocks)
        return self.network(x)[:, self.channel]


def _has_channel_map(network: nn.Module) -> bool:
    """Whether ``network`` computes one output channel alone from replaceable blocks: ``channel_map(x, channel,
    blocks)`` and ``blocks`` (``custom.networks.MILSegmenter``; this package does not import the networks)."""
    return callable(getattr(network, "channel_map", None)) and isinstance(getattr(network, "blocks", None),
                                                                          nn.ModuleList)


def _optimised_blocks(network: nn.Module, conv_relu: bool) -> list[nn.Module] | None:
    """The blocks of ``network`` with BatchNorm folded (and conv+ReLU fused), or None if one cannot be traced."""
    blocks = []
    for block in network.blocks:
        folded = fold_network(block)
        if not isinstance(folded, torch.fx.GraphModule):
            return None
        blocks.append(onednn_conv_relu(folded)[0] if conv_relu else folded)
    return blocks


def _fast(network: nn.Module, channel: int, conv_relu: bool) -> nn.Module:
    """The ``fused`` (``conv_relu``: ``onednn``) evaluation of one channel of ``network``."""
    if _has_channel_map(network):
        blocks = _optimised_blocks(network, conv_relu)
        if blocks is not None:
            return KeptChannel(network, channel, blocks).eval()
    folded = fold_network(network)
    if conv_relu and isinstance(folded, torch.fx.GraphModule):
        folded = onednn_conv_relu(folded)[0]
    return KeptChannel(folded, channel).eval()


class _Compiled:
    """A compiled callable with a fallback: its first call compiles; a failure then is logged and the fallback
    answers this call and every later one. Batches smaller than the first are padded to its size (one shape, one
    compile) and the padding cut off the output."""

    def __init__(self, compiled: Callable, fallback: nn.Module, memory_format: torch.memory_format) -> None:
        self.compiled, self.fallback, self.memory_format = compiled, fallback, memory_format
        self.batch: int | None = None
        self.failed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.failed:
            return self.fallback(x)
        n = x.shape[0]
        if self.batch is not None and n < self.batch:
            pad = x.new_zeros((self.batch - n, *x.shape[1:])).contiguous(memory_format=self.memory_format)
            x = torch.cat([x, pad]).contiguous(memory_format=self.memory_format)
        try:
            out = self.compiled(x)
        except Exception as err:  # noqa: BLE001 - any compile failure (no compiler, backend error) falls back
            if self.batch is not None and not _is_compile_error(err):
                raise
            logger.warning("torch.compile failed (%s: %s); running the network uncompiled instead",
                           type(err).__name__, str(err).splitlines()[0] if str(err) else "")
            self.failed = True
            return self.fallback(x[:n])
        self.batch = self.batch or n
        return out[:n]


def _is_compile_error(err: Exception) -> bool:
    """Whether ``err`` came from the compiler stack (dynamo/inductor) rather than the network itself."""
    try:
        from torch._dynamo.exc import BackendCompilerFailed, TorchDynamoException
    except ImportError:  # pragma: no cover - torch without dynamo
        return False
    return isinstance(err, (BackendCompilerFailed, TorchDynamoException, OSError))


def _compile(module: nn.Module) -> Callable:
    """``torch.compile`` of an inference module (inductor, weights frozen into the graph); a seam for tests."""
    return torch.compile(module, backend="inductor", dynamic=False, options={"freezing": True})


def network_versions(network: nn.Module) -> tuple:
    """The version counters of every parameter and buffer of ``network``: they change with any in-place update
    (an optimizer step, ``load_state_dict``), so a network prepared from it is known to be stale."""
    tensors = (t for t in (*network.parameters(), *network.buffers()) if t is not None)
    return tuple((id(t), t._version) for t in tensors)


def check_runtime(runtime: str) -> str:
    """``runtime`` if it is one of ``RUNTIMES``; refused naming the config key otherwise (before any slide is read)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES} (config key 'runtime'), got {runtime!r}")
    return runtime


def _onednn_cpu(device: torch.device) -> bool:
    """Whether ``device`` is a CPU that oneDNN serves (where the conv+ReLU post-op exists)."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available()


def resolve_runtime(runtime: str, device: torch.device) -> str:
    """The runtime that ``runtime`` means on ``device`` (``auto`` chosen; ``onednn`` off a CPU is ``fused``)."""
    check_runtime(runtime)
    cpu = _onednn_cpu(device)
    if runtime == "auto":
        return "onednn" if cpu else "fused"
    if runtime == "onednn" and not cpu:
        logger.info("runtime 'onednn' needs a CPU with oneDNN; running 'fused' on %s", device)
        return "fused"
    return runtime


def prepare_network(network: nn.Module, runtime: str = "auto", channel: int = -1,
                    device: torch.device | None = None) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                                 torch.memory_format]:
    """A callable giving output channel ``channel`` of ``network`` as ``(B, H, W)``, run as ``runtime`` says, and the
    memory format its input batches should have. ``network`` itself is put in eval mode and otherwise untouched."""
    network.eval()
    device = device or next(network.parameters()).device
    runtime = resolve_runtime(runtime, device)
    if runtime == "eager":
        return KeptChannel(network, channel).eval(), torch.contiguous_format
    if isinstance(network, torch.jit.ScriptModule):
        if runtime in ("onednn", "compile") and device.type == "cpu":
            try:
                return KeptChannel(torch.jit.optimize_for_inference(torch.jit.freeze(network)), channel), \
                    torch.contiguous_format
            except RuntimeError as err:  # e.g. a module already frozen, or one freezing cannot handle
                logger.info("TorchScript module left as it is (optimize_for_inference failed: %s)", err)
        return KeptChannel(network, channel).eval(), torch.contiguous_format
    fallback = _fast(network, channel, conv_relu=_onednn_cpu(device) and runtime in ("onednn", "compile"))
    if runtime != "compile":
        return fallback, torch.channels_last
    try:
        compiled = _compile(_fast(network, channel, conv_relu=False))
    except Exception as err:  # noqa: BLE001 - torch.compile itself refusing (e.g. an unsupported Python)
        logger.warning("torch.compile unavailable (%s: %s); running the network uncompiled instead",
                       type(err).__name__, err)
        return fallback, torch.channels_last
    return _Compiled(compiled, fallback, torch.channels_last), torch.channels_last
