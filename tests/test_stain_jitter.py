"""RandStainJitterBatchd: stain amounts against scikit-image's deconvolution and hand-computed scalings."""

from __future__ import annotations

import numpy as np
import pytest
import test_bundle_training
import torch
from monai.bundle import ConfigParser
from skimage.color import rgb2hed, rgb_from_hed
from test_bundle_training import CONFIGS

from custom.handlers import EpochSeedHandler
from custom.transforms import IMAGENET_MEAN, IMAGENET_STD, RandStainJitterBatchd

tiny_data = test_bundle_training.tiny_data  # the bundle tests' module-scoped synthetic data set

MEAN = np.asarray(IMAGENET_MEAN).reshape(1, 3, 1, 1)
STD = np.asarray(IMAGENET_STD).reshape(1, 3, 1, 1)


def normalised(rgb: np.ndarray) -> torch.Tensor:
    """(B, rows, cols, 3) RGB in [0, 1] as the normalised (B, 3, rows, cols) batch the trainer sees."""
    return torch.as_tensor((rgb.transpose(0, 3, 1, 2) - MEAN) / STD, dtype=torch.float32)


def rgb_of(batch: torch.Tensor) -> np.ndarray:
    """The inverse of :func:`normalised`."""
    return (batch.numpy() * STD + MEAN).transpose(0, 2, 3, 1)


def pure_stain(stain: int, amount: float) -> np.ndarray:
    """The RGB colour of ``amount`` OD units of one stain alone: exp(-amount * its stain vector)."""
    return np.exp(-amount * rgb_from_hed[stain])


def test_identity_draw_returns_the_image():
    rgb = np.random.default_rng(0).uniform(0.05, 1.0, (2, 5, 7, 3))
    out = RandStainJitterBatchd().jitter(normalised(rgb), np.ones((2, 3)), np.zeros((2, 3)))
    np.testing.assert_allclose(rgb_of(out), rgb, atol=1e-5)


def test_doubling_haematoxylin_squares_a_pure_haematoxylin_pixel():
    # OD of a pure-H pixel is k * h; alpha_H = 2 makes it 2k * h, so its RGB becomes RGB ** 2
    colour = pure_stain(0, 0.5)
    rgb = np.broadcast_to(colour, (1, 2, 2, 3)).copy()
    out = RandStainJitterBatchd().jitter(normalised(rgb), np.array([[2.0, 1.0, 1.0]]), np.zeros((1, 3)))
    np.testing.assert_allclose(rgb_of(out)[0, 0, 0], colour**2, atol=1e-5)


def test_eosin_shift_on_white_glass_adds_that_much_eosin():
    rgb = np.ones((1, 1, 1, 3))
    out = RandStainJitterBatchd().jitter(normalised(rgb), np.ones((1, 3)), np.array([[0.0, 0.3, 0.0]]))
    np.testing.assert_allclose(rgb_of(out)[0, 0, 0], pure_stain(1, 0.3), atol=1e-5)


def test_stain_amounts_agree_with_scikit_image_rgb2hed():
    # rgb2hed gives -ln(RGB) @ hed_from_rgb divided by ln(1e6); scaling one stain by 1.5 must move exactly that one
    amounts = np.random.default_rng(1).uniform(0.05, 0.6, (1, 4, 4, 3))  # positive H, E, DAB amounts (OD units)
    rgb = np.exp(-amounts @ rgb_from_hed)
    out = RandStainJitterBatchd().jitter(normalised(rgb), np.array([[1.0, 1.5, 1.0]]), np.zeros((1, 3)))
    before = rgb2hed(rgb[0]) * np.log(1e6)
    after = rgb2hed(np.clip(rgb_of(out)[0], 1e-6, 1)) * np.log(1e6)
    unclipped = (before > 0).all(-1) & (rgb_of(out)[0] < 1).all(-1)
    assert unclipped.sum() >= 12
    np.testing.assert_allclose(before, amounts[0], atol=1e-4)
    np.testing.assert_allclose(after[unclipped][:, 1], 1.5 * before[unclipped][:, 1], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(after[unclipped][:, [0, 2]], before[unclipped][:, [0, 2]], rtol=1e-3, atol=1e-4)


def test_draws_lie_in_their_ranges_and_prob_zero_changes_nothing():
    jitter = RandStainJitterBatchd(sigma=0.2, bias=0.1)
    jitter.set_random_state(3)
    jitter.randomize(4000)
    assert np.all(np.abs(jitter._alpha - 1) <= 0.2) and np.all(np.abs(jitter._beta) <= 0.1)
    assert jitter._alpha.std() > 0.1 and jitter._beta.std() > 0.05  # U(-a, a) has std a / sqrt(3)
    batch = normalised(np.random.default_rng(2).uniform(0.1, 1, (3, 4, 4, 3)))
    out = RandStainJitterBatchd(prob=0.0)({"image": batch, "mask": torch.ones(3, 1, 4, 4)})
    np.testing.assert_allclose(out["image"].numpy(), batch.numpy(), atol=1e-5)
    assert torch.equal(out["mask"], torch.ones(3, 1, 4, 4))


def test_each_image_gets_its_own_draw_and_a_seed_repeats_them():
    batch = normalised(np.full((6, 4, 4, 3), 0.6))
    first, second = RandStainJitterBatchd(), RandStainJitterBatchd()
    first.set_random_state(7)
    second.set_random_state(7)
    a, b = first({"image": batch})["image"], second({"image": batch})["image"]
    assert torch.equal(a, b)
    assert len({tuple(np.round(a[i, :, 0, 0].numpy(), 5)) for i in range(6)}) == 6


@pytest.mark.parametrize("kwargs", [{"sigma": 1.0}, {"sigma": -0.1}, {"bias": -0.01}, {"std": (0.2, 0.0, 0.2)}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        RandStainJitterBatchd(**kwargs)


def test_a_batch_that_is_not_rgb_is_refused():
    with pytest.raises(ValueError, match="RGB batch"):
        RandStainJitterBatchd().jitter(torch.zeros(2, 1, 4, 4), np.ones((2, 3)), np.zeros((2, 3)))


def test_the_knob_adds_the_jitter_after_the_flips_and_each_is_reseeded_on_its_own(tiny_data):
    parser = ConfigParser()
    parser.read_config([str(CONFIGS / "train.json"), str(CONFIGS / "cpu_train.json")])
    parser.update({"dataset_dir": str(tiny_data)})
    assert parser.get_parsed_content("distill#stain") is None  # off by default
    parser.update({"distill_stain_jitter": True})
    augment, stain = parser.get_parsed_content("distill#augment"), parser.get_parsed_content("distill#stain")
    assert isinstance(stain, RandStainJitterBatchd) and list(stain.keys) == ["image"]
    assert parser.get_parsed_content("distill#trainer").batch_transform.transforms == (augment, stain)
    seeder = next(h for h in parser.get_parsed_content("distill#handlers") if isinstance(h, EpochSeedHandler))
    assert seeder.randomizable == [augment, stain]

    class Engine:
        class state:
            epoch = 2

    seeder(Engine)
    stain_draw = stain.R.random_sample()
    augment_draw = augment.R.random_sample()
    stain.set_random_state(seed=111 + 2 * 1000 + 1)
    assert stain_draw == stain.R.random_sample() and augment_draw != stain_draw
