"""Every knob of the model builds a working network of the right shape."""

from __future__ import annotations

import itertools

import pytest
import torch

from network import NET_DEFAULTS, build_model


@pytest.mark.parametrize(("blocks", "convs"), list(itertools.product([1, 2, 3, 4], [1, 2, 3])))
def test_fast_net_shapes_for_depths(blocks: int, convs: int) -> None:
    model = build_model({"blocks": blocks, "convs_per_block": convs, "width": 8})
    out = model(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.shape == (4, 10)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert n_convs == 1 + blocks * convs


@pytest.mark.parametrize("width", [4, 16, 32])
def test_width_sets_channels(width: int) -> None:
    model = build_model({"width": width, "blocks": 3})
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[0].out_channels == width and convs[-1].out_channels == width * 8


def test_dropout_is_applied_in_training_only() -> None:
    model = build_model({"dropout": 0.5, "width": 4})
    x = torch.randn(8, 3, 32, 32)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    assert not torch.equal(model(x), model(x))


def test_original_architecture() -> None:
    model = build_model({"arch": "original"})
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 32, 64]


@pytest.mark.parametrize(
    "bad", [{"blocks": 5}, {"width": 0}, {"convs_per_block": 0}, {"dropout": 1.0}, {"arch": "vgg"}]
)
def test_out_of_range_knobs_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_model({**NET_DEFAULTS, **bad})
