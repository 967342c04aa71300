"""The training engine: device set-up (`Compute`), batched augmentation, one epoch, weight
averaging (`Lookahead`), evaluation.

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

from ct import cpu_budget
from ct.trainer.allocator import keep_freed_memory
from ct.trainer.errors import UsageError
from ct.trainer.muon import make_muon
from ct.trainer.views import translated_where_unsure, view_logits

# Per-channel statistics of the CIFAR-10 training set, for normalisation.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
# Images per evaluation forward pass. A GPU wants big batches; on CPU a batch whose activations
# stay in the caches is about twice as fast (2-core Xeon VM, bf16: the default network's test with
# translated TTA took 11-12 s at 256 images against 22-23 s at 2,000; 128 to 400 were alike).
EVAL_BATCH_CPU = 256
EVAL_BATCH_GPU = 2000
DEVICES = ("auto", "cpu", "cuda")  # make_compute's `name`: the choices of every --device flag
PRECISIONS = ("auto", "fp32")  # make_compute's `precision`: every --precision flag's choices
# Lookahead (airbench94's LookaheadState): every LOOKAHEAD_EVERY steps the average is pulled toward
# the net by 1 - rho, rho = LOOKAHEAD_DECAY**LOOKAHEAD_EVERY * (step / total)**LOOKAHEAD_POWER.
LOOKAHEAD_EVERY = 5
LOOKAHEAD_DECAY = 0.95
LOOKAHEAD_POWER = 3
FLIP_SEED_OFFSET = 1  # the alternating flip's own generator: seed + this


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

    @property
    def eval_batch(self) -> int:
        return EVAL_BATCH_GPU if self.device.type == "cuda" else EVAL_BATCH_CPU

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


def make_compute(name: str, precision: str = "auto") -> Compute:
    """`name` is auto, cpu or cuda; raises UsageError when cuda is asked for and absent.
    `precision` auto: bf16 autocast (and TF32) on a GPU and on CPUs with native bf16 instructions,
    plain fp32 elsewhere; fp32: plain fp32 everywhere. On the CPU, torch gets the process's thread
    budget (ct.cpu_budget: CT_THREADS when set, else the cores the affinity and the cgroup quota
    leave), so trainings sharing a host do not oversubscribe it, and malloc keeps the memory a
    step frees for the next (ct.trainer.allocator: up to 16% of an epoch on 2 cores)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    fast_formats = precision == "auto"
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        # Deterministic kernels: a resumed run must end exactly where an uninterrupted one would.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = fast_formats
        torch.backends.cudnn.allow_tf32 = fast_formats
        return Compute(torch.device("cuda"), torch.bfloat16 if fast_formats else None)
    try:
        torch.set_num_threads(cpu_budget.threads())
    except cpu_budget.BudgetError as exc:
        raise UsageError(str(exc)) from exc
    keep_freed_memory()
    return Compute(torch.device("cpu"),
                   torch.bfloat16 if fast_formats and cpu_has_bf16() else None)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> normalised float, channels_last (faster convolutions on CPU and GPU)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1) * 255
    out = (x.float() - mean) / std
    return out.contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, gen: torch.Generator, flips: torch.Tensor | None = None,
            crop_pad: int = 4) -> torch.Tensor:
    """Random crop (zero padding `crop_pad`) and horizontal flip of a uint8 batch: two gathers,
    rows then columns (a mirrored image is just its columns read backwards). `flips` (bool per
    image) decides the mirroring instead of a draw. With `crop_pad` 0 only the flip is left."""
    n, channels, size = x.shape[0], x.shape[1], x.shape[-1]
    # The offsets are drawn before the flips, in the order runs have always drawn them.
    shifts = torch.randint(0, 2 * crop_pad + 1, (2, n), generator=gen).to(x.device) \
        if crop_pad else None
    if flips is None:
        flips = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    if shifts is None:
        return torch.where(flips[:, None, None, None], x.flip(3), x)
    padded = F.pad(x, (crop_pad,) * 4)
    ramp = torch.arange(size, device=x.device)
    rows = shifts[0, :, None] + ramp
    cols = shifts[1, :, None] + ramp
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    rows_index = rows[:, None, :, None].expand(n, channels, size, padded.shape[-1])
    cropped = padded.gather(2, rows_index)
    return cropped.gather(3, cols[:, None, None, :].expand(n, channels, size, size))


def cutout(x: torch.Tensor, gen: torch.Generator, size: int) -> torch.Tensor:
    """A size x size square of each normalised image set to 0, the dataset mean (airbench96's
    batch_cutout, against overfitting in long runs); the square lies wholly inside the image, its
    corner drawn per image. Images smaller than the square are blanked whole."""
    n, side = x.shape[0], x.shape[-1]
    size = min(size, side)
    corners = torch.randint(0, side - size + 1, (2, n), generator=gen).to(x.device)
    ramp = torch.arange(side, device=x.device)
    rows = (ramp >= corners[0, :, None]) & (ramp < corners[0, :, None] + size)
    cols = (ramp >= corners[1, :, None]) & (ramp < corners[1, :, None] + size)
    return x.masked_fill((rows[:, :, None] & cols[:, None, :])[:, None], 0.0)


def downscale(x: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 batch resized to size x size (bilinear, antialiased), as float: the net, which
    ends in a global pool, takes any size, and a smaller image costs its share of pixels."""
    return F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def train_sizes(text: str) -> list[int]:
    """ "24,32" -> [24, 32]; empty -> []. Raises ValueError naming what is wrong."""
    parts = [part.strip() for part in text.split(",")] if text else []
    if not all(part.isdigit() and 8 <= int(part) <= 32 for part in parts):
        raise ValueError(f"train_sizes must be a comma list of image sizes in 8..32, not {text!r}")
    return [int(part) for part in parts]


def size_for_epoch(text: str, epoch: int) -> int | None:
    """The training image size of epoch `epoch` (0-based): the list's entry, the last one
    repeating; None (full size) when the list is empty."""
    sizes = train_sizes(text)
    return sizes[min(epoch, len(sizes) - 1)] if sizes else None


def alternating_flips(seed: int, n_train: int, device: torch.device) -> torch.Tensor:
    """airbench's alternating flip: each training image gets one random orientation (drawn from
    its own generator, so the batch order and crops draw as without it) and is shown mirrored
    on every other epoch (`flips_for_epoch`): two epochs see every image both ways, where random
    flips leave a quarter of them unmirrored or mirrored twice."""
    gen = torch.Generator().manual_seed(seed + FLIP_SEED_OFFSET)
    return (torch.rand(n_train, generator=gen) < 0.5).to(device)


def flips_for_epoch(base: torch.Tensor, epoch: int) -> torch.Tensor:
    return base ^ bool(epoch % 2)


def _sgd(groups: list[dict[str, Any]], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    momentum = float(cfg["momentum"])
    return torch.optim.SGD(groups, lr=cfg["lr"], momentum=momentum, nesterov=momentum > 0,
                           weight_decay=cfg["weight_decay"])


def _adam(groups: list[dict[str, Any]], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


def _adamw(groups: list[dict[str, Any]], cfg: dict[str, Any]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"])


_OPTIMIZER_MAKERS = {"sgd": _sgd, "adam": _adam, "adamw": _adamw, "muon": make_muon}
# make_optimizer's names, in the order help texts list them: the choices of --optimizer, of
# --optimizers and of the tuner's search.
OPTIMIZERS = tuple(_OPTIMIZER_MAKERS)


def make_optimizer(model: nn.Module, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    name = cfg["optimizer"]
    if name not in _OPTIMIZER_MAKERS:
        raise ValueError(f"unknown optimizer {name!r}; use {', '.join(OPTIMIZERS)}")
    return _OPTIMIZER_MAKERS[name](parameter_groups(model, cfg), cfg)


def parameter_groups(model: nn.Module, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """What the optimizer trains. Frozen weights (the whitening stem's, fixed BN scales) take no
    optimizer state. With bias_lr_scale != 1 the batch norms' shifts form a second group, their
    learning rate scaled up and weight decay down by it, so that their decay per step stays
    (airbench); otherwise one group, whose state_dict layout is what it always was."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    scale = float(cfg["bias_lr_scale"])
    if scale == 1.0:
        return [{"params": trainable}]
    shifts = {id(m.bias) for m in model.modules()
              if isinstance(m, nn.BatchNorm2d) and m.bias is not None}
    return [{"params": [p for p in trainable if id(p) not in shifts]},
            {"params": [p for p in trainable if id(p) in shifts], "lr": cfg["lr"] * scale,
             "weight_decay": cfg["weight_decay"] / scale}]


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


class Lookahead:
    """airbench94's LookaheadState: from step `start` on, every LOOKAHEAD_EVERY steps an average
    of the weights moves toward the net's and the net jumps back to the average. rho grows with
    the cube of the progress: early on the net runs almost free, late on it is averaged hard. At
    each epoch's end the net becomes the average, so checkpoints, glances and the final model are
    the average. Every float entry of the state dict takes part, BN running statistics included.

    The average is training state: a checkpoint keeps it (`average`), or a resumed run would start
    a fresh average where the uninterrupted one updates the old.
    """

    def __init__(self, total_steps: int, start_frac: float) -> None:
        self.total_steps = max(1, total_steps)
        self.start = math.ceil(total_steps * start_frac)
        self.average: dict[str, torch.Tensor] | None = None  # None until the first update

    def after_step(self, model: nn.Module, step: int) -> None:
        """`step`: optimizer steps taken so far (the schedule's count, which checkpoints keep)."""
        if step < self.start or step % LOOKAHEAD_EVERY != 0:
            return
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return
        progress = step / self.total_steps
        rho = LOOKAHEAD_DECAY ** LOOKAHEAD_EVERY * progress ** LOOKAHEAD_POWER
        self._pull(model, 1.0 - rho)

    def end_epoch(self, model: nn.Module) -> None:
        """The net becomes the average (airbench's update with decay 1)."""
        if self.average is not None:
            self._pull(model, 0.0)

    @torch.no_grad()
    def _pull(self, model: nn.Module, weight: float) -> None:
        assert self.average is not None
        for name, tensor in model.state_dict().items():  # shares storage with the model
            if tensor.dtype.is_floating_point:
                average = self.average[name]
                average.lerp_(tensor, weight)
                tensor.copy_(average)


@dataclass
class EpochResult:
    loss: float
    accuracy: float  # on the augmented training batches, percent: free to compute, a trend only
    images: int
    seconds: float


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer,
                schedule: torch.optim.lr_scheduler.LRScheduler, x: torch.Tensor, y: torch.Tensor,
                cfg: dict[str, Any], gen: torch.Generator, compute: Compute,
                max_batches: int | None = None, lookahead: Lookahead | None = None,
                flips: torch.Tensor | None = None, size: int | None = None) -> EpochResult:
    """One pass over (x, y) in a fresh random order; `max_batches` cuts it short (dry runs).
    With `lookahead`, the net is its average at the end; `flips` (one bool per image of x)
    mirrors images instead of random flips; `size` downscales the batches to size x size."""
    model.train()
    start = time.perf_counter()
    order = torch.randperm(len(x), generator=gen).to(x.device)
    batch_size = int(cfg["batch_size"])
    use_aug = bool(cfg["augment"])
    crop_pad = int(cfg["crop_pad"])
    total_loss = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device)
    seen = 0
    for i, first in enumerate(range(0, len(x), batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        idx = order[first:first + batch_size]
        inputs = x[idx]
        if use_aug:
            inputs = augment(inputs, gen, None if flips is None else flips[idx], crop_pad)
        if size is not None and size != inputs.shape[-1]:
            inputs = downscale(inputs, size)
        inputs = normalise(inputs)
        # Drawn last, so the crops and flips draw the same numbers whatever cutout is.
        if use_aug and cfg["cutout"]:
            inputs = cutout(inputs, gen, int(cfg["cutout"]))
        with compute.autocast():
            logits = model(inputs)
            loss = F.cross_entropy(logits.float(), y[idx], label_smoothing=cfg["label_smoothing"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if lookahead is not None:
            lookahead.after_step(model, schedule.last_epoch)
        total_loss += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y[idx]).sum()
        seen += len(idx)
    if lookahead is not None:
        lookahead.end_epoch(model)
    if compute.device.type == "cuda":
        torch.cuda.synchronize()
    return EpochResult(float(total_loss) / max(1, seen), 100.0 * float(correct) / max(1, seen),
                       seen, time.perf_counter() - start)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, compute: Compute,
             flip_tta: bool = True, max_batches: int | None = None, translate: bool = False,
             predictions: list[torch.Tensor] | None = None, translate_margin: float = 1.0,
             mirror_margin: float = 1.0) -> tuple[float, float]:
    """(accuracy %, mean loss); `flip_tta` averages each image's logits with its mirror's (for
    the images `mirror_margin` leaves unsure); `translate` adds two shifted views (for the images
    `translate_margin` leaves unsure); `predictions` gets each batch's predicted classes."""
    model.eval()
    correct = torch.zeros((), device=x.device)
    loss_sum = torch.zeros((), device=x.device)
    seen, batch = 0, compute.eval_batch
    for i, first in enumerate(range(0, len(x), batch)):
        if max_batches is not None and i >= max_batches:
            break
        inputs, labels = normalise(x[first:first + batch]), y[first:first + batch]
        with compute.autocast():
            logits = view_logits(model, inputs, flip_tta, mirror_margin)
            if translate:
                logits = translated_where_unsure(model, inputs, logits, flip_tta,
                                                 translate_margin)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        predicted = logits.argmax(1)
        correct += (predicted == labels).sum()
        seen += len(labels)
        if predictions is not None:  # the per-class view counts the very same predictions
            predictions.append(predicted)
    return 100.0 * float(correct) / max(1, seen), float(loss_sum) / max(1, seen)


def evaluate_as_configured(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                           compute: Compute, cfg: dict[str, Any], max_batches: int | None = None,
                           predictions: list[torch.Tensor] | None = None) -> tuple[float, float]:
    """`evaluate` with the test-time augmentation the config asks for (tta, tta_translate)."""
    return evaluate(model, x, y, compute, flip_tta=cfg["tta"], max_batches=max_batches,
                    translate=cfg["tta_translate"], predictions=predictions,
                    translate_margin=cfg["tta_translate_margin"],
                    mirror_margin=cfg["tta_margin"])
