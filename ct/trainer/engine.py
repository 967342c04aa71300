"""The training engine: device set-up (`Compute`), batched augmentation, one epoch, evaluation.

The whole dataset stays on the device as uint8; each batch is cropped, flipped and normalised there
with tensor ops (no DataLoader, no per-image Python). Every random draw comes from one
`torch.Generator` whose state the checkpoint keeps, so a resumed run repeats the same batches.
"""

from __future__ import annotations

import math
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ct.trainer.errors import UsageError

# Per-channel statistics of the CIFAR-10 training set, for normalisation.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
CROP_PAD = 4
EVAL_BATCH = 2000


@dataclass
class Compute:
    """The device a run computes on and its number format (not the pipeline's CT_RUNTIME, which
    says whether the container runs under docker or as a local process)."""

    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain fp32

    def autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        amp = "fp32" if self.amp_dtype is None else f"{self.amp_dtype}".removeprefix("torch.")
        return f"{self.device.type} ({amp}, {torch.get_num_threads()} threads)"


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions, where bf16 autocast pays off."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_compute(name: str) -> Compute:
    """`name` is auto, cpu or cuda; raises UsageError when cuda is asked for and absent."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        # Deterministic kernels: a resumed run must end exactly where an uninterrupted one would.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return Compute(torch.device("cuda"), torch.bfloat16)
    cores = _usable_cores()
    torch.set_num_threads(cores)
    return Compute(torch.device("cpu"), torch.bfloat16 if cpu_has_bf16() else None)


def _usable_cores() -> int:
    try:
        import os

        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, torch.get_num_threads())


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> normalised float, channels_last (faster convolutions on CPU and GPU)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    out = (x.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 4) and horizontal flip of a uint8 batch: two gathers, rows then
    columns (a mirrored image is just its columns read backwards)."""
    n, channels, size = x.shape[0], x.shape[1], x.shape[-1]
    padded = F.pad(x, (CROP_PAD,) * 4)
    shifts = torch.randint(0, 2 * CROP_PAD + 1, (2, n), generator=gen).to(x.device)
    flips = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    ramp = torch.arange(size, device=x.device)
    rows = shifts[0, :, None] + ramp
    cols = shifts[1, :, None] + ramp
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    rows_index = rows[:, None, :, None].expand(n, channels, size, padded.shape[-1])
    cropped = padded.gather(2, rows_index)
    return cropped.gather(3, cols[:, None, None, :].expand(n, channels, size, size))


def make_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    params = model.parameters()
    name = cfg["optimizer"]
    if name == "sgd":
        momentum = float(cfg["momentum"])
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=momentum, nesterov=momentum > 0,
                               weight_decay=cfg["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    raise ValueError(f"unknown optimizer {name!r}; use sgd, adam or adamw")


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return max(1, math.ceil(n_train / batch_size))


def make_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_frac: float,
                  kind: str = "onecycle") -> torch.optim.lr_scheduler.LambdaLR:
    """"onecycle": linear warm-up, then linear decay to zero at the last step; or "constant"."""
    warmup = max(1, round(total_steps * warmup_frac))

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class EpochResult:
    loss: float
    accuracy: float  # on the augmented training batches, percent: free to compute, a trend only
    images: int
    seconds: float


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler, x: torch.Tensor, y: torch.Tensor,
                cfg: dict[str, Any], gen: torch.Generator, compute: Compute,
                max_batches: int | None = None) -> EpochResult:
    """One pass over (x, y) in a fresh random order; `max_batches` cuts it short (dry runs)."""
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(x), generator=gen).to(x.device)
    batch_size = int(cfg["batch_size"])
    use_aug = bool(cfg["augment"])
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    seen = 0
    for i, first in enumerate(range(0, len(x), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        idx = order[first:first + batch_size]
        inputs = augment(x[idx], gen) if use_aug else x[idx]
        with compute.autocast():
            logits = model(normalise(inputs))
            loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=cfg["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total_loss += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y[idx]).sum()
        seen += len(idx)
    if compute.device.type == "cuda":
        torch.cuda.synchronize()
    return EpochResult(float(total_loss) / max(1, seen), 100.0 * float(correct) / max(1, seen),
                       seen, time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compute: Compute,
             flip_tta: bool = True, max_batches: int | None = None) -> tuple[float, float]:
    """(accuracy %, mean loss); `flip_tta` averages the logits of each image and its mirror."""
    model.eval()
    correct = torch.zeros((), device=x.device)
    loss_sum = torch.zeros((), device=x.device)
    seen = 0
    for i, first in enumerate(range(0, len(x), EVAL_BATCH)):
        if max_batches is not None and i >= max_batches:
            break
        inputs = normalise(x[first:first + EVAL_BATCH])
        labels = y[first:first + EVAL_BATCH]
        with compute.autocast():
            logits = model(inputs).float()
            if flip_tta:
                logits = (logits + model(inputs.flip(-1)).float()) / 2
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
    return 100.0 * float(correct) / max(1, seen), float(loss_sum) / max(1, seen)
