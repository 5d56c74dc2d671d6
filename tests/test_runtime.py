# Copyright (c) the wsl-histo-seg authors. Licensed under the Apache License, Version 2.0.
"""Network runtimes of the whole-slide engine (custom.inference.runtime): every one gives the eager network's map
within 1e-4 on random input, for every network of custom.networks and a TorchScript module; torch.compile falls back
when it fails; the inferer re-prepares a network whose weights changed; heap reuse is scoped."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import custom.inference.runtime as runtime
from custom.inference import WholeSlideInferer
from custom.inference.heap import heap_reuse
from custom.inference.runtime import ConvReLU, prepare_network
from custom.networks import DWSMIL, SAMIL

TOLERANCE = 1e-4


def randomised(network: nn.Module) -> nn.Module:
    """``network`` with BatchNorm statistics and affine terms away from the identity (so folding them matters) and,
    for SA-MIL, the attention gate open; in eval mode."""
    torch.manual_seed(1)
    for module in network.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    for name, parameter in network.named_parameters():
        if name.endswith("gate"):
            parameter.data.fill_(0.7)
    return network.eval()


NETWORKS = {"dwsmil": lambda: DWSMIL(width=0.125), "samil": lambda: SAMIL(width=0.25, num_heads=4)}


def run(prepared, memory_format, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return prepared(x.contiguous(memory_format=memory_format))


@pytest.mark.parametrize("name", NETWORKS)
@pytest.mark.parametrize("kind", ["eager", "fused", "onednn", "auto"])
def test_runtime_equals_eager_network(name, kind):
    torch.manual_seed(0)
    network = randomised(NETWORKS[name]())
    for shape in ((3, 3, 64, 64), (1, 3, 40, 56)):
        x = torch.randn(*shape)
        with torch.inference_mode():
            expected = network(x)
        for channel in (-1, 0, 1, 2, 3):
            prepared, memory_format = prepare_network(network, kind, channel)
            out = run(prepared, memory_format, x)
            assert out.shape == (shape[0], *shape[2:])
            assert (out - expected[:, channel]).abs().max() <= TOLERANCE, (kind, channel, shape)


def test_onednn_fuses_every_conv_relu_and_leaves_the_network_untouched():
    network = randomised(DWSMIL(width=0.125))
    before = {k: v.clone() for k, v in network.state_dict().items()}
    prepared, _ = prepare_network(network, "onednn")
    fused = [m for m in prepared.modules() if isinstance(m, ConvReLU)]
    assert len(fused) == 7  # VGG16 blocks 1-3: 2 + 2 + 3 convolutions, each with its ReLU
    assert not any(isinstance(m, nn.BatchNorm2d) for m in prepared.blocks.modules())
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert any(isinstance(m, nn.BatchNorm2d) for m in network.modules())


def test_torchscript_module_runs_optimised_for_inference():
    network = randomised(DWSMIL(width=0.125))
    scripted = torch.jit.script(network)
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        expected = network(x)[:, -1]
    for kind in ("eager", "fused", "onednn"):
        prepared, memory_format = prepare_network(scripted, kind)
        assert (run(prepared, memory_format, x) - expected).abs().max() <= TOLERANCE, kind


class Wrapped(nn.Module):
    """A network that is no MILSegmenter (the generic path: output channel sliced off the traced graph)."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) * 1.0


def test_generic_network_is_folded_and_sliced():
    network = Wrapped(randomised(DWSMIL(width=0.125))).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = network(x)
    prepared, memory_format = prepare_network(network, "onednn", 1)
    assert any(isinstance(m, ConvReLU) for m in prepared.modules())
    assert (run(prepared, memory_format, x) - expected[:, 1]).abs().max() <= TOLERANCE


def test_compile_equals_eager_and_pads_a_short_batch():
    """The real torch.compile where a compiler exists (else its logged fallback): the same map, a last batch shorter
    than the first padded to its shape and cut back."""
    network = randomised(DWSMIL(width=0.125))
    prepared, memory_format = prepare_network(network, "compile")
    for n in (4, 3):
        x = torch.randn(n, 3, 32, 32)
        with torch.inference_mode():
            expected = network(x)[:, -1]
        out = run(prepared, memory_format, x)
        assert out.shape == (n, 32, 32)
        assert (out - expected).abs().max() <= TOLERANCE


def test_compile_failure_falls_back_and_is_logged(monkeypatch, caplog):
    def no_compiler(module):
        def call(x):
            raise OSError("no C++ compiler (simulated)")
        return call

    monkeypatch.setattr(runtime, "_compile", no_compiler)
    network = randomised(DWSMIL(width=0.125))
    prepared, memory_format = prepare_network(network, "compile")
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        expected = network(x)[:, -1]
    with caplog.at_level(logging.WARNING, logger="custom.inference.runtime"):
        first = run(prepared, memory_format, x)
        second = run(prepared, memory_format, x[:1])
    assert "torch.compile failed" in caplog.text and "no C++ compiler" in caplog.text
    assert caplog.text.count("torch.compile failed") == 1  # the compiler is not tried again
    assert (first - expected).abs().max() <= TOLERANCE and (second - expected[:1]).abs().max() <= TOLERANCE

    def unavailable(module):
        raise RuntimeError("torch.compile is not supported (simulated)")

    monkeypatch.setattr(runtime, "_compile", unavailable)
    prepared, memory_format = prepare_network(network, "compile")
    assert (run(prepared, memory_format, x) - expected).abs().max() <= TOLERANCE


def test_unknown_runtime_is_refused():
    with pytest.raises(ValueError, match="runtime must be one of"):
        WholeSlideInferer(runtime="tensorrt")
    with pytest.raises(ValueError, match="config key 'runtime'"):
        prepare_network(DWSMIL(width=0.125), "jit")


def test_inferer_keeps_the_prepared_network_until_its_weights_change():
    inferer = WholeSlideInferer(runtime="onednn", progress=False)
    network = DWSMIL(width=0.125).eval()
    device = torch.device("cpu")
    first = inferer.prepared_network(network, device)[0]
    assert inferer.prepared_network(network, device)[0] is first
    with torch.no_grad():
        network.side_convs[0].bias.add_(1.0)
    second = inferer.prepared_network(network, device)[0]
    assert second is not first
    x = torch.randn(1, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        assert (second(x) - network(x)[:, -1]).abs().max() <= TOLERANCE
    assert inferer.prepared_network(DWSMIL(width=0.125), device)[0] is not second


def test_heap_reuse_is_scoped_and_optional(monkeypatch):
    import custom.inference.heap as heap

    with heap_reuse() as outer:
        with heap_reuse() as inner:
            assert inner == outer
            assert heap._active == (2 if outer else 0)
        big = torch.ones(64, 1024, 1024)  # 256 MiB from the heap while active
        assert float(big[-1, -1, -1]) == 1.0
        del big
    assert heap._active == 0
    with heap_reuse(enabled=False) as active:
        assert active is False
    monkeypatch.setattr(heap, "glibc", lambda: None)
    with heap_reuse() as active:
        assert active is False
