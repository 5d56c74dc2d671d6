"""DWSMIL / SAMIL: output contract, fusion, TorchScript export, local VGG16-BN weights."""

import pytest
import torch

from custom.networks import DWSMIL, SAMIL

NETWORKS = [DWSMIL, SAMIL]


@pytest.mark.parametrize("network", NETWORKS)
@pytest.mark.parametrize("size", [(64, 64), (40, 56), (37, 50)])
def test_output_contract(network, size):
    """(B, n_side + 1, H, W) probabilities for square, non-square and not-divisible-by-8 inputs."""
    torch.manual_seed(0)
    net = network(width=0.25).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 3, *size))
    assert net.n_side == 3
    assert out.shape == (2, net.n_side + 1, *size)
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("network, weights", [(DWSMIL, (0.3, 0.3, 0.4)), (SAMIL, (0.2, 0.35, 0.45))])
def test_fused_map_is_weighted_sum_of_side_maps(network, weights):
    """Last channel = w1 * side1 + w2 * side2 + w3 * side3 with the configured (default) weights."""
    torch.manual_seed(0)
    net = network(width=0.25).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 32, 48))
    expected = weights[0] * out[:, 0] + weights[1] * out[:, 1] + weights[2] * out[:, 2]
    torch.testing.assert_close(out[:, 3], expected)
    assert torch.allclose(out[0, 3, 5, 7], sum(w * out[0, i, 5, 7] for i, w in enumerate(weights)))


def test_custom_fusion_weights_and_invalid_ones():
    """Configurable weights are used; weights that could push the fused map out of [0, 1] are refused."""
    net = DWSMIL(width=0.25, fusion_weights=(0.0, 0.0, 1.0)).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 16, 16))
    torch.testing.assert_close(out[:, 3], out[:, 2])
    with pytest.raises(ValueError, match="sum to 1"):
        DWSMIL(width=0.25, fusion_weights=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="one channel count and one fusion weight per block"):
        DWSMIL(width=0.25, fusion_weights=(0.5, 0.5))


def test_samil_attention_mixes_distant_positions():
    """With an open gate, changing one corner of the input changes the deepest side map far away."""
    torch.manual_seed(0)
    net = SAMIL(width=0.25, num_heads=4).eval()
    net.blocks[2][1].gate.data.fill_(1.0)
    x = torch.randn(1, 3, 64, 64)
    y = x.clone()
    y[..., :8, :8] += 5.0
    with torch.no_grad():
        far_change = (net(x) - net(y))[0, 2, 48:, 48:].abs().max()
    assert far_change > 1e-4
    with pytest.raises(ValueError, match="divisible by num_heads"):
        SAMIL(width=0.25, num_heads=5)


@pytest.mark.parametrize("network", NETWORKS)
def test_torchscript_export_gives_same_output(network, tmp_path):
    """torch.jit.script (what `monai.bundle ckpt_export` uses) survives a save/load with identical output."""
    torch.manual_seed(0)
    net = network(width=0.25).eval()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(net), str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=1e-6)


def fake_vgg16_bn_state_dict() -> dict[str, torch.Tensor]:
    """torchvision's vgg16_bn layout built from its config list: conv, bn, relu per entry, 'M' a max-pool."""
    config = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
    generator = torch.Generator().manual_seed(1)
    state, index, in_channels = {}, 0, 3
    for entry in config:
        if entry == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(entry, in_channels, 3, 3, generator=generator)
        state[f"features.{index}.bias"] = torch.randn(entry, generator=generator)
        for leaf in ("weight", "bias", "running_mean"):
            state[f"features.{index + 1}.{leaf}"] = torch.randn(entry, generator=generator)
        state[f"features.{index + 1}.running_var"] = torch.rand(entry, generator=generator) + 0.5
        state[f"features.{index + 1}.num_batches_tracked"] = torch.tensor(7)
        index, in_channels = index + 3, entry
    state["classifier.0.weight"] = torch.randn(8, 8, generator=generator)
    return state


@pytest.mark.parametrize("network", NETWORKS)
def test_pretrained_vgg16_bn_weights_land_in_the_right_layers(network, tmp_path):
    """features.0/1 -> block 1 conv 1, features.10/11 -> block 2 conv 2, features.20/21 -> block 3 conv 3."""
    state = fake_vgg16_bn_state_dict()
    path = tmp_path / "vgg16_bn.pth"
    torch.save(state, path)
    net = network(width=1.0, pretrained_path=str(path))
    expected = {
        (0, 0): 0, (0, 1): 3, (1, 0): 7, (1, 1): 10, (2, 0): 14, (2, 1): 17, (2, 2): 20,
    }  # (block, conv within block) -> torchvision features index
    for (block, conv), index in expected.items():
        vgg = net.blocks[block] if network is DWSMIL or block < 2 else net.blocks[block][0]
        layer = vgg[conv]
        torch.testing.assert_close(layer.conv.weight, state[f"features.{index}.weight"])
        torch.testing.assert_close(layer.conv.bias, state[f"features.{index}.bias"])
        torch.testing.assert_close(layer.adn.N.weight, state[f"features.{index + 1}.weight"])
        torch.testing.assert_close(layer.adn.N.running_var, state[f"features.{index + 1}.running_var"])


def test_pretrained_weights_refuse_bad_input(tmp_path):
    """Wrong width, missing file, missing key and wrong shapes each give a clear error naming the problem."""
    path = tmp_path / "vgg16_bn.pth"
    state = fake_vgg16_bn_state_dict()
    torch.save(state, path)
    with pytest.raises(ValueError, match="needs width=1.0"):
        DWSMIL(width=0.25, pretrained_path=str(path))
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        DWSMIL(pretrained_path=str(tmp_path / "absent.pth"))
    missing = tmp_path / "missing_key.pth"
    torch.save({k: v for k, v in state.items() if k != "features.17.weight"}, missing)
    with pytest.raises(ValueError, match=r"missing_key.pth: missing key 'features.17.weight'"):
        DWSMIL(pretrained_path=str(missing))
    wrong = tmp_path / "vgg16_no_bn.pth"
    torch.save({**state, "features.3.weight": torch.zeros(64, 64, 1, 1)}, wrong)
    with pytest.raises(ValueError, match=r"vgg16_no_bn.pth: 'features.3.weight' has shape"):
        DWSMIL(pretrained_path=str(wrong))
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        DWSMIL(pretrained_path=str(garbage))
