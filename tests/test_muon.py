"""--optimizer muon on its own: the orthogonalized step, the filters' fixed norm, SGD for the rest,
and the state a checkpoint keeps. Small tensors, no dataset."""

from __future__ import annotations

import copy

import pytest
import torch

from ct.trainer.config import PLAIN_RECIPE, check_config, default_config
from ct.trainer.engine import make_optimizer
from ct.trainer.errors import UsageError
from ct.trainer.muon import MUON_MOMENTUM, orthogonalized
from network import build_model


def _matrix_with_spread(rows: int, cols: int) -> torch.Tensor:
    """A random matrix whose singular values run from 0.1 to 10."""
    gen = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(rows, rows, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen))
    k = min(rows, cols)
    return u[:, :k] @ torch.diag(torch.logspace(-1, 1, k)) @ v[:, :k].T


@pytest.mark.parametrize("shape", [(32, 24, 3, 3), (256, 8, 3, 3)])  # wide and tall
def test_orthogonalized_squeezes_the_singular_values_toward_one(shape: tuple[int, ...]) -> None:
    """A 100x spread comes out within about 10x, the largest near 1: every direction of the
    gradient gets a step of similar size. (Three steps leave the very smallest short of 1.)"""
    grad = _matrix_with_spread(shape[0], shape[1] * 9).reshape(shape)
    before = torch.linalg.svdvals(grad.reshape(shape[0], -1))
    after = torch.linalg.svdvals(orthogonalized(grad).reshape(shape[0], -1))
    assert before.max() / before.min() > 99
    assert orthogonalized(grad).shape == grad.shape and after.shape == before.shape
    assert 0.8 < after.max() < 1.5 and after.max() / after.min() < 12, (after.min(), after.max())


def _muon_model() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model({"width": 4, "dirac_init": True})
    return model, make_optimizer(model, {**PLAIN_RECIPE, "optimizer": "muon"})


def _set_grads(model: torch.nn.Module, seed: int, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * scale


def test_filters_take_muon_steps_at_muon_lr_and_the_rest_sgd_at_lr() -> None:
    model, optimizer = _muon_model()
    *rest, filters = optimizer.param_groups
    conv = [p for p in model.parameters() if p.ndim == 4]
    assert [id(p) for p in filters["params"]] == [id(p) for p in conv] and conv
    assert filters["lr"] == PLAIN_RECIPE["muon_lr"] and filters["momentum"] == MUON_MOMENTUM
    assert rest[0]["lr"] == PLAIN_RECIPE["lr"], "the log shows the first group's rate: --lr"
    twin = build_model({"width": 4, "dirac_init": True})
    twin.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD([p for p in twin.parameters() if p.ndim != 4], lr=PLAIN_RECIPE["lr"],
                          momentum=PLAIN_RECIPE["momentum"], nesterov=True,
                          weight_decay=PLAIN_RECIPE["weight_decay"])
    for seed in (1, 2):
        _set_grads(model, seed)
        _set_grads(twin, seed)
        start = [p.detach().clone() for p in conv]
        optimizer.step()
        sgd.step()
    for mine, theirs in zip(model.parameters(), twin.parameters(), strict=True):
        if mine.ndim != 4:
            torch.testing.assert_close(mine, theirs)
    for before, after in zip(start, conv, strict=True):
        held = before * (len(before) ** 0.5 / before.norm())
        step = (after - held).norm() / held.norm()
        assert 0 < step <= 2 * filters["lr"], "each filter moves by about --muon-lr of its norm"


def test_a_filters_step_does_not_depend_on_its_gradients_scale() -> None:
    """SGD would step 1000x further on the scaled gradient; Muon takes the same step."""
    steps = []
    for scale in (1.0, 1000.0):
        model, optimizer = _muon_model()
        _set_grads(model, 1, scale)
        optimizer.step()
        steps.append([p.detach().clone() for p in model.parameters() if p.ndim == 4])
    for small, large in zip(*steps, strict=True):
        torch.testing.assert_close(small, large, atol=1e-2, rtol=1e-2)


def test_the_momentum_comes_back_from_the_state_dict_step_for_step() -> None:
    """What resume relies on: an optimizer rebuilt from a checkpoint's state continues exactly
    as the one that was never stopped."""
    model, optimizer = _muon_model()
    _set_grads(model, 1)
    optimizer.step()
    # A checkpoint is a copy: the live state dict shares the momentum buffers.
    saved_model, saved_optimizer = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    again, rebuilt = _muon_model()
    again.load_state_dict(saved_model)
    rebuilt.load_state_dict(saved_optimizer)
    for net, opt in ((model, optimizer), (again, rebuilt)):
        _set_grads(net, 2)
        opt.step()
    for mine, theirs in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_muon_lr_must_be_positive() -> None:
    with pytest.raises(UsageError, match="--muon-lr must be positive"):
        check_config({**default_config(), "muon_lr": 0.0})
