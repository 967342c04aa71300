"""Every knob of the model builds a working network of the right shape."""

from __future__ import annotations

import itertools

import pytest
import torch

from network import PLAIN_NET, build_model


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
        build_model({**PLAIN_NET, **bad})


# --- the whitening stem -----------------------------------------------------------------------


def _correlated_images(n: int = 200) -> torch.Tensor:
    """Float images whose 2x2 patches are strongly correlated, across pixels and channels: a
    whitening that works has something to undo."""
    x = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x = x + x.roll(1, dims=-1) + x.roll(1, dims=-2)
    x[:, 1] += x[:, 0]
    x[:, 2] += 0.5 * x[:, 1]
    return x


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_whiten_stem_shapes(blocks: int) -> None:
    from network import WHITEN_CHANNELS

    model = build_model({"stem": "whiten", "width": 8, "blocks": blocks})
    out = model(torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert out.shape == (4, 10)
    stem = model.features[0]
    assert isinstance(stem, torch.nn.Conv2d)
    assert (stem.out_channels, stem.kernel_size, stem.padding) == (WHITEN_CHANNELS, (2, 2), (0, 0))
    assert stem.bias is not None and stem.bias.requires_grad
    assert not stem.weight.requires_grad, "the whitening filters are frozen from the start"
    assert not isinstance(model.features[1], torch.nn.BatchNorm2d)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs[1].in_channels == WHITEN_CHANNELS and convs[-1].out_channels == 8 * 2 ** blocks


def test_a_config_without_a_stem_gets_the_conv_stem() -> None:
    """A config recorded without the key means stem "conv": a 3x3 conv without bias, then BN."""
    model = build_model({"width": 8})
    assert PLAIN_NET["stem"] == "conv"
    assert isinstance(model.features[0], torch.nn.Conv2d)
    assert model.features[0].kernel_size == (3, 3) and model.features[0].bias is None
    assert isinstance(model.features[1], torch.nn.BatchNorm2d)


def test_whitening_weights_are_deterministic_and_whiten() -> None:
    from network import whitening_weights

    images = _correlated_images()
    first = whitening_weights(images)
    assert first.shape == (24, 3, 2, 2) and first.dtype == torch.float32
    assert torch.equal(first, whitening_weights(images.clone()))
    assert torch.equal(first[12:], -first[:12]), "each filter and its negative"
    # Without eps the first 12 filters map the patches to unit, uncorrelated directions.
    exact = whitening_weights(images, eps=0.0)[:12].double()
    out = torch.nn.functional.conv2d(images.double(), exact)  # N x 12 x 31 x 31
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    covariance = flat.T @ flat / len(flat)
    assert torch.allclose(covariance, torch.eye(12, dtype=torch.float64), atol=1e-3)


def test_whitening_filters_come_strongest_direction_first() -> None:
    from network import whitening_weights

    weights = whitening_weights(_correlated_images())
    norms = weights[:12].flatten(1).norm(dim=1)
    assert torch.all(norms[1:] >= norms[:-1] * 0.999), "strongest direction first: smallest gain"


@pytest.mark.parametrize(
    "bad", [{"stem": "patchify"}, {"stem": "whiten", "arch": "original"}]
)
def test_bad_stems_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError, match="stem"):
        build_model({**PLAIN_NET, **bad})


# --- explicit block widths --------------------------------------------------------------------


def test_block_widths_set_each_block_and_default_to_doubling() -> None:
    convs = [m for m in build_model({"width": 8, "block_widths": "24,96,96"}).modules()
             if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 24, 24, 96, 96, 96, 96]
    doubling = [m.out_channels for m in build_model({"width": 8}).modules()
                if isinstance(m, torch.nn.Conv2d)]
    assert doubling == [8, 16, 16, 32, 32, 64, 64]


@pytest.mark.parametrize("widths", ["24,96", "24,x,96", "24,96,0", "24,96,96,96"])
def test_block_widths_that_do_not_fit_the_blocks_are_refused(widths: str) -> None:
    with pytest.raises(ValueError, match="block_widths"):
        build_model({**PLAIN_NET, "block_widths": widths})


@pytest.mark.parametrize("stem", ["conv", "whiten"])
def test_dirac_init_makes_each_3x3_conv_pass_its_input_through(stem: str) -> None:
    """airbench's Conv.reset_parameters: filter i is the identity on channel i for i below
    min(c_in, c_out); the other filters keep the random init, drawn exactly as without the key
    (same seed, same numbers)."""
    torch.manual_seed(0)
    plain = build_model({"stem": stem, "width": 8})
    torch.manual_seed(0)
    dirac = build_model({"stem": stem, "width": 8, "dirac_init": True})
    pairs = [(a, b) for a, b in zip(plain.modules(), dirac.modules(), strict=True)
             if isinstance(b, torch.nn.Conv2d) and b.kernel_size == (3, 3)]
    assert len(pairs) == (7 if stem == "conv" else 6)
    for random_conv, conv in pairs:
        k = min(conv.in_channels, conv.out_channels)  # a narrowing conv passes its first k
        identity = torch.zeros(k, conv.in_channels, 3, 3)
        identity[range(k), range(k), 1, 1] = 1
        assert torch.equal(conv.weight[:k], identity)
        assert torch.equal(conv.weight[k:], random_conv.weight[k:])
    if stem == "whiten":  # the 2x2 whitening conv is set from the data, not by dirac
        assert torch.equal(plain.features[0].weight, dirac.features[0].weight)
