"""What training changes and what a checkpoint keeps of it: `TrainingState` (the model, the
optimizer, the schedule, the generator of every random draw, the weight average), checkpoints
written and checked against their config, and a saved model.pt loaded back for evaluation. The
benchmarks build their model with `TrainingState.build` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ct import atomic
from ct.trainer.config import with_added_keys
from ct.trainer.engine import (
    Compute,
    EpochResult,
    Lookahead,
    alternating_flips,
    flips_for_epoch,
    make_optimizer,
    make_schedule,
    normalise,
    size_for_epoch,
    steps_per_epoch,
    train_epoch,
)
from ct.trainer.errors import UsageError
from network import FastCNN, build_model

WHITEN_IMAGES = 5000  # training images the whitening stem is fitted to (airbench's number)


@dataclass
class TrainingState:
    """What training changes: the model, the optimizer, the learning-rate schedule and the
    generator of every random draw (batch order, augmentation), and the weight average of
    `lookahead` (None without). A checkpoint keeps all of them and the global RNGs, so that a
    resumed run repeats the same steps."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    lookahead: Lookahead | None = None
    flip_base: torch.Tensor | None = None  # alternating flip's orientations; None: random flips

    @classmethod
    def build(cls, cfg: dict[str, Any], n_train: int, compute: Compute,
              train_x: torch.Tensor | None = None) -> TrainingState:
        """The state before the first step; the same `cfg` (and `train_x`) always builds the
        same state. `train_x`, the uint8 training images, is needed by stem "whiten" only."""
        torch.manual_seed(cfg["seed"])
        model = build_model(cfg).to(compute.device, memory_format=torch.channels_last)
        if cfg["stem"] == "whiten":  # before the optimizer, which leaves its weight out
            _init_whitening(model, train_x)
        optimizer = make_optimizer(model, cfg)
        total_steps = cfg["epochs"] * steps_per_epoch(n_train, cfg["batch_size"])
        schedule = make_schedule(optimizer, total_steps, cfg["warmup_frac"], cfg["lr_schedule"])
        lookahead = Lookahead(total_steps, cfg["lookahead_start"]) if cfg["lookahead"] else None
        flip_base = (alternating_flips(cfg["seed"], n_train, compute.device)
                     if cfg["flip"] == "alternate" else None)  # from the seed: no checkpoint
        return cls(model, optimizer, schedule, torch.Generator().manual_seed(cfg["seed"]),
                   lookahead, flip_base)

    def run_epoch(self, epoch: int, x: torch.Tensor, y: torch.Tensor, cfg: dict[str, Any],
                  compute: Compute, max_batches: int | None = None) -> EpochResult:
        """Epoch `epoch` (0-based) over (x, y). What is frozen follows from `epoch` alone, so a
        resumed run freezes the same parameters as an uninterrupted one."""
        if cfg["stem"] == "whiten":
            assert isinstance(self.model, FastCNN)
            self.model.train_whitening_bias(epoch < cfg["whiten_bias_epochs"])
        return train_epoch(self.model, self.optimizer, self.schedule, x, y, cfg, self.generator,
                           compute, max_batches, lookahead=self.lookahead,
                           flips=None if self.flip_base is None
                           else flips_for_epoch(self.flip_base, epoch),
                           size=size_for_epoch(cfg["train_sizes"], epoch))

    def saved(self, compute: Compute) -> dict[str, Any]:
        """The state and the RNGs, for a checkpoint."""
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state() if compute.device.type == "cuda" else None,
            "lookahead": self.lookahead.average if self.lookahead is not None else None,
        }

    def restore(self, ckpt: dict[str, Any], compute: Compute) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        self.generator.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if compute.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        if self.lookahead is not None:  # a checkpoint recorded without the key: no average yet
            average = ckpt.get("lookahead")
            self.lookahead.average = None if average is None else {
                name: tensor.to(compute.device) for name, tensor in average.items()}


def _init_whitening(model: nn.Module, train_x: torch.Tensor | None) -> None:
    if train_x is None:
        raise ValueError("stem whiten fits its filters to the training images: pass train_x")
    assert isinstance(model, FastCNN)
    model.init_whitening(normalise(train_x[:WHITEN_IMAGES]))


def load_model(path: Path, compute: Compute) -> tuple[nn.Module, dict[str, Any]]:
    """A saved model.pt on the device, ready to evaluate, and its config (keys added since it
    was saved filled in: ct.trainer.config.with_added_keys)."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    cfg = with_added_keys(saved["config"])
    model = build_model(cfg).to(compute.device, memory_format=torch.channels_last)
    model.load_state_dict(saved["model"])
    return model, cfg


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic.write_via(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at `path`, checked to belong to `cfg`; UsageError when corrupt or foreign."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UsageError(f"checkpoint {path} is corrupt ({exc.__class__.__name__}); delete it "
                         "to restart that run, or pass --fresh") from exc
    recorded = ckpt.get("config") if isinstance(ckpt, dict) else None
    # A checkpoint recorded without some keys meant their legacy values.
    if not isinstance(recorded, dict) or with_added_keys(recorded) != cfg:
        raise UsageError(f"checkpoint {path} belongs to another config; "
                         "delete it or pass --fresh")
    return ckpt
