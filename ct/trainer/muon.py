"""--optimizer muon: Muon for the convolution filters, Nesterov SGD for every other weight, in one
optimizer (one schedule, one state dict, so checkpoints and resume work as for the others).

Muon (KellerJordan/cifar10-airbench, airbench94_muon.py, where it reaches 94% in 8 epochs against
9.9 for airbench94's SGD) steps each filter along the nearest orthogonal matrix to its Nesterov
momentum, found by a few Newton-Schulz iterations, and holds each filter's norm at
sqrt(output channels): every filter moves by the same share per step, however small its
gradient, so --muon-lr is that share and needs no weight decay.
"""

from __future__ import annotations

from typing import Any

import torch

NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)  # airbench's quintic: steep at zero, so 3 steps do
NEWTON_SCHULZ_STEPS = 3
MUON_MOMENTUM = 0.6  # airbench's; 0.4 and 0.85 did worse on the fast preset (docs/benchmarks.md)


def orthogonalized(grad: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`grad` read as a matrix with one row per output channel, its singular values pushed toward
    1: the large ones land in roughly 0.5-1.5, which trains as well as exactly 1 (airbench), and
    three steps leave the smallest of a wide spread short of it."""
    a, b, c = NEWTON_SCHULZ
    x = grad.reshape(len(grad), -1).bfloat16()
    x = x / (x.norm() + eps)  # every singular value <= 1, where the iteration converges
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T  # the Gram matrix on the short side is the cheap one
    for _ in range(NEWTON_SCHULZ_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x if wide else x.T).reshape(grad.shape).to(grad.dtype)


class MuonSGD(torch.optim.Optimizer):
    """Groups with "muon" set take Muon steps; the others Nesterov SGD with L2 weight decay, the
    update of torch.optim.SGD(nesterov=True)."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, momentum: float,
                 weight_decay: float) -> None:
        super().__init__(groups, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay,
                                  "muon": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:  # closure: the Optimizer signature
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._step_one(p, group)

    def _step_one(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        grad = p.grad if group["muon"] else p.grad.add(p, alpha=group["weight_decay"])
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        grad = grad.add(buf, alpha=group["momentum"])
        if group["muon"]:
            p.mul_(len(p) ** 0.5 / p.norm())
            p.add_(orthogonalized(grad), alpha=-group["lr"])
        else:
            p.add_(grad, alpha=-group["lr"])


def make_muon(groups: list[dict[str, Any]], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """`groups` (ct.trainer.engine.parameter_groups) train as --optimizer sgd trains them, less
    their convolution filters, which form one last group at --muon-lr: the first group's rate
    stays the one the log and the curves show."""
    filters = [p for group in groups for p in group["params"] if p.ndim == 4]
    rest = [{**group, "params": [p for p in group["params"] if p.ndim != 4]} for group in groups]
    return MuonSGD([*(group for group in rest if group["params"]),
                    {"params": filters, "muon": True, "lr": cfg["muon_lr"],
                     "momentum": MUON_MOMENTUM, "weight_decay": 0.0}],
                   lr=cfg["lr"], momentum=float(cfg["momentum"]),
                   weight_decay=cfg["weight_decay"])
