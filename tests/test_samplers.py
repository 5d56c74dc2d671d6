"""Epoch samplers: strong labels drawn at a fixed share, a fixed number of items per epoch, one draw shared by ranks."""

import pytest
import torch
from monai.data import DistributedSampler
from test_bundle_training import tiny_data  # noqa: F401  (fixture)
from test_mixed_supervision import _parsed

from custom.data import EpochSampler, epoch_sampler, strong_weights
from custom.errors import InputError


class _Items(torch.utils.data.Dataset):
    """A dataset that is only its ``data`` list, as the training datasets expose it."""

    def __init__(self, strong: list[bool]) -> None:
        self.data = [{"image": f"{i}.png", "label": 1, "strong": s} for i, s in enumerate(strong)]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        return self.data[index]


def test_strong_weights_by_hand():
    # 2 strong of 10 at share 0.5: each strong item 0.5 / 2, each weak item 0.5 / 8
    weights = strong_weights(_Items([True, True] + [False] * 8).data, 0.5)
    assert weights == pytest.approx([0.25, 0.25] + [0.0625] * 8)
    assert sum(weights) == pytest.approx(1.0)
    assert strong_weights(_Items([False] * 4).data, 0.5) is None  # nothing to oversample
    assert strong_weights(_Items([True] * 4).data, 0.5) is None
    # a share is a floor: 3 strong of 10 already make 0.25, and the supervised upper bound's positives stay as many
    assert strong_weights(_Items([True] * 3 + [False] * 7).data, 0.25) is None
    assert strong_weights(_Items([True] * 2 + [False] * 8).data, 0.25) == pytest.approx([0.125] * 2 + [0.09375] * 8)


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5])
def test_strong_share_outside_the_open_interval_is_refused(share):
    with pytest.raises(InputError, match="strong_share must be in \\(0, 1\\)"):
        strong_weights(_Items([True, False]).data, share)


def test_strong_items_make_the_share_of_an_epoch(caplog):
    # 6 strong of 226 (the 5 % mosaics case): natural share 2.7 %, asked 25 %
    caplog.set_level("INFO")
    dataset = _Items([True] * 6 + [False] * 220)
    sampler = epoch_sampler(dataset, strong_share=0.25)
    assert "the 6 strong of 226 items (2.7 %)" in caplog.text and "each about 9.4 times" in caplog.text
    assert isinstance(sampler, EpochSampler) and len(sampler) == 226
    torch.manual_seed(0)
    draws = [i for _ in range(40) for i in sampler]
    share = sum(i < 6 for i in draws) / len(draws)
    assert share == pytest.approx(0.25, abs=0.01)  # 9,040 draws: the binomial sd is 0.005
    assert set(draws) == set(range(226))  # the weak items are still all drawn


def test_both_knobs_off_is_plain_shuffling():
    assert epoch_sampler(_Items([True, False]), None, None) is None
    assert epoch_sampler(_Items([True] + [False] * 9), None, 0.0) is None  # the command line's "off"


def test_items_per_epoch_without_replacement():
    sampler = epoch_sampler(_Items([False] * 50), num_samples=20)
    torch.manual_seed(3)
    first = list(sampler)
    assert len(first) == len(set(first)) == 20 and all(0 <= i < 50 for i in first)
    torch.manual_seed(3)
    assert list(sampler) == first  # the per-epoch seeding replays an epoch
    assert len(epoch_sampler(_Items([False] * 5), num_samples=20)) == 5  # never more than there are
    with pytest.raises(InputError, match="tiles_per_epoch must be >= 1"):
        epoch_sampler(_Items([False] * 5), num_samples=0)


@pytest.mark.parametrize("weights", [None, [0.5] * 3 + [0.05] * 8])
def test_ranks_split_one_global_draw(weights):
    # ranks seeded alike take every world-th draw: together they are the single-process draw, padded to even length
    draws = []
    for rank in range(3):
        torch.manual_seed(7)
        draws.append(list(EpochSampler(11, 10, weights, rank=rank, world=3)))
    torch.manual_seed(7)
    alone = list(EpochSampler(11, 10, weights))
    assert [len(d) for d in draws] == [4, 4, 4]
    interleaved = [d[k] for k in range(4) for d in draws]
    assert interleaved[:10] == alone and interleaved[10:] == alone[:2]


def test_train_config_wires_the_share_into_both_stages(tiny_data):  # noqa: F811
    parser = _parsed(tiny_data, strong_fraction=0.5, strong_share=0.5)
    for stage in ("train", "distill"):
        loader = parser.get_parsed_content(f"{stage}#dataloader")
        assert isinstance(loader.sampler, EpochSampler) and loader.sampler.weights is not None
        strong = [bool(item["strong"]) for item in loader.dataset.data]
        expected = [0.5 / sum(strong) if s else 0.5 / (len(strong) - sum(strong)) for s in strong]
        assert loader.sampler.weights.tolist() == pytest.approx(expected)
    default = _parsed(tiny_data).get_parsed_content("train#dataloader")
    assert not isinstance(default.sampler, EpochSampler)  # shuffle=True: torch's RandomSampler
    # the upper bound's strong positives already make more than the default share: its epoch is not reweighted
    supervised = _parsed(tiny_data, ("supervised.json",)).get_parsed_content("train#dataloader")
    assert not isinstance(supervised.sampler, EpochSampler)


def test_distributed_without_either_knob_keeps_monais_sampler(monkeypatch):
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    dataset = _Items([True] + [False] * 5)
    plain = epoch_sampler(dataset, distributed=True)
    assert isinstance(plain, DistributedSampler) and len(plain) == 3
    weighted = epoch_sampler(dataset, strong_share=0.5, distributed=True)
    assert isinstance(weighted, EpochSampler) and (weighted.rank, weighted.world) == (1, 2) and len(weighted) == 3
