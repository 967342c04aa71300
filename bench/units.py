"""The benchmarks' yardsticks, measured in the benchmark's own process: the cost unit (one
full-size training epoch of a reference preset, timed on random images) and the oneDNN
instruction set the convolutions run on.

A machine's speed drifts by up to 1.7x from day to day and differs between CPUs (AVX512-BF16 with
AMX, without AMX, fp32 only), so seconds alone compare badly: every figure goes out with the unit
measured beside it and the ISA that produced it.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from typing import Any

import torch

from ct.trainer import config
from ct.trainer.data import TRAIN_IMAGES
from ct.trainer.engine import Compute, size_for_epoch
from ct.trainer.state import TrainingState

REFERENCE = "plain"  # the preset whose full-size epoch is the unit
# Convolutions in a fresh interpreter, with oneDNN's verbose log on: its "isa:" line names the
# kernels this machine runs (ONEDNN_MAX_CPU_ISA caps them, e.g. AVX512_CORE_BF16 on an AMX CPU
# runs what a CPU without AMX runs). fp32 first: under a cap without bf16 the bf16 convolution
# leaves oneDNN, and the line would not come.
ISA_PROBE = """
import torch
x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
torch.nn.functional.conv2d(x, w)
with torch.autocast("cpu", dtype=torch.bfloat16):
    torch.nn.functional.conv2d(x, w)
"""


FULL_SIZE = 32


def epoch_sizes(cfg: dict[str, Any]) -> list[int]:
    """The image size of each of the preset's epochs."""
    return [size_for_epoch(cfg["train_sizes"], e) or FULL_SIZE for e in range(cfg["epochs"])]


class PresetProbe:
    """A preset's training state on random images, timed at each of its image sizes."""

    def __init__(self, name: str, batches: int, compute: Compute,
                 changes: dict[str, Any] | None = None) -> None:
        self.name = " ".join(["--preset", name, *as_flags(changes or {})])
        self.cfg = {**config.preset_config(name), **(changes or {})}
        self.compute = compute
        self.batches = batches
        n = batches * int(self.cfg["batch_size"])
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (n, 3, FULL_SIZE, FULL_SIZE), dtype=torch.uint8,
                               generator=gen).to(self.compute.device)
        self.y = torch.randint(0, 10, (n,), generator=gen).to(self.compute.device)
        self.state = TrainingState.build(self.cfg, n, self.compute, self.x)
        sizes = epoch_sizes(self.cfg)
        self.first_epoch = {size: sizes.index(size) for size in sorted(set(sizes))}

    def seconds_per_image(self, size: int) -> float:
        """One pass of `batches` batches as the preset's first epoch at `size` trains."""
        result = self.state.run_epoch(self.first_epoch[size], self.x, self.y, self.cfg,
                                      self.compute, self.batches)
        return result.seconds / result.images


def overrides(pairs: list[str]) -> dict[str, Any]:
    """KEY=VALUE pairs typed like the defaults they replace; ValueError names a bad one."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in config.PLAIN_RECIPE:
            raise ValueError(f"no config key {key!r}; see train.py --help")
        default = config.PLAIN_RECIPE[key]
        out[key] = value.lower() in ("1", "yes", "true") if isinstance(default, bool) \
            else type(default)(value)
    return out


def as_flags(values: dict[str, Any]) -> list[str]:
    """{"crop_pad": 4, "tta": False} -> ["--crop-pad", "4", "--tta", "no"]: train.py's flags."""
    flags: list[str] = []
    for key, value in values.items():
        text = ("yes" if value else "no") if isinstance(value, bool) else str(value)
        flags += [f"--{key.replace('_', '-')}", text]
    return flags


def onednn_isa() -> str:
    """E.g. "oneDNN v3.12.0, isa Intel AVX-512 with Intel DL Boost and bfloat16 support (no
    AMX)", with the ONEDNN_MAX_CPU_ISA cap when one is set."""
    proc = subprocess.run([sys.executable, "-c", ISA_PROBE], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "ONEDNN_VERBOSE": "1"})
    info = [line.split(",")[-1] for line in proc.stdout.splitlines()
            if line.startswith("onednn_verbose") and ",info," in line]
    version = next((part for part in info if part.startswith("oneDNN")), "oneDNN ?")
    isa = next((part.removeprefix("isa:") for part in info if part.startswith("isa:")), "?")
    amx = "with AMX" if "AMX" in isa else "no AMX"
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return (f"{version.split(' (')[0]}, isa {isa} ({amx})"
            + (f", capped by ONEDNN_MAX_CPU_ISA={cap}" if cap else ""))


def unit_seconds(compute: Compute, rounds: int = 3, batches: int = 3) -> float:
    """One full-size epoch of the reference preset on this machine now: the median of `rounds`
    timed turns (after an untimed one that builds the kernels), scaled to the training set."""
    probe = PresetProbe(REFERENCE, batches, compute)
    probe.seconds_per_image(FULL_SIZE)
    return statistics.median(probe.seconds_per_image(FULL_SIZE)
                             for _ in range(rounds)) * TRAIN_IMAGES


def describe(compute: Compute) -> str:
    """The line every benchmark starts with: device, precision, threads, torch, oneDNN ISA."""
    return f"{compute.describe()}, torch {torch.__version__}, {onednn_isa()}"
