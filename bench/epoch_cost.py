"""What the presets' training costs, relative to one another, measured in one process.

    python bench/epoch_cost.py                               # fast, default and plain, vs plain
    python bench/epoch_cost.py --presets fast --epoch-seconds 15.8   # + a forecast elsewhere
    python bench/epoch_cost.py --presets fast --set activation=relu  # fast, and fast with ReLU

A shared or virtual machine drifts by 20-30% in speed from one run to the next, more than most
levers change, so wall-clock runs of two presets compare badly. Here every preset runs a few real
training batches (`TrainingState.run_epoch`: augmentation, resizing, forward, backward, optimizer
and lookahead, as in train.py) at each image size its schedule uses, and the presets take turns,
round after round, each turn between two of the reference's: the drift hits both sides of a
ratio alike. Costing the reference itself (plain among the defaults) shows what noise is left.
The images are random (a step's cost does not depend on what the pixels show).

Each preset's training is reported in *reference epochs*: full-size epochs of --reference on this
machine. With --epoch-seconds, what one such epoch took on another machine (train.py's log: the
training seconds over the epochs), the same figures become that machine's training seconds: a
forecast that holds where the same kernels run (the same precision and instruction set), not a
measurement.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from bench.units import FULL_SIZE, PresetProbe, describe, epoch_sizes, overrides  # noqa: E402
from ct.trainer import config  # noqa: E402
from ct.trainer.data import TRAIN_IMAGES  # noqa: E402
from ct.trainer.engine import DEVICES, PRECISIONS, make_compute  # noqa: E402
from ct.trainer.errors import UsageError  # noqa: E402


def measure(probes: list[PresetProbe], reference: PresetProbe, rounds: int
            ) -> tuple[dict[tuple[str, int], float], float]:
    """Median over rounds of each (preset, size)'s cost per image over the reference's at full
    size, timed just before and just after it; and the reference's median seconds per image."""
    for probe in [reference, *probes]:  # the first pass at a size builds its kernels: untimed
        for size in probe.first_epoch:
            probe.seconds_per_image(size)
    keys = [(probe, size) for probe in probes for size in probe.first_epoch]
    ratios: dict[tuple[str, int], list[float]] = {}
    reference_costs = [reference.seconds_per_image(FULL_SIZE)]
    for _ in range(rounds):
        for probe, size in keys:
            cost = probe.seconds_per_image(size)
            reference_costs.append(reference.seconds_per_image(FULL_SIZE))
            around = (reference_costs[-2] + reference_costs[-1]) / 2
            ratios.setdefault((probe.name, size), []).append(cost / around)
    return ({key: statistics.median(values) for key, values in ratios.items()},
            statistics.median(reference_costs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="fast,default,plain",
                   help="comma list of train.py presets to cost")
    p.add_argument("--reference", default="plain", choices=sorted(config.PRESETS),
                   help="the preset whose full-size epoch is the unit")
    p.add_argument("--rounds", type=int, default=5, help="turns each preset takes (median)")
    p.add_argument("--batches", type=int, default=3, help="training batches per turn and size")
    p.add_argument("--epoch-seconds", type=float,
                   help="seconds of one full-size reference epoch on another machine: forecast")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="also cost each preset with this config key changed, in the same rounds")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = p.parse_args()
    names = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in names if name not in config.PRESETS]
    if unknown:
        sys.exit(f"epoch_cost.py: error: unknown preset {unknown[0]!r}; choose from "
                 f"{', '.join(sorted(config.PRESETS))}")
    if args.rounds < 1 or args.batches < 1:
        sys.exit("epoch_cost.py: error: --rounds and --batches must be at least 1")
    if args.epoch_seconds is not None and args.epoch_seconds <= 0:
        sys.exit("epoch_cost.py: error: --epoch-seconds must be positive")

    try:
        changes = overrides(args.set)
        for name in names:
            config.check_config({**config.preset_config(name), **changes})
    except (ValueError, UsageError) as exc:
        sys.exit(f"epoch_cost.py: error: --set: {exc}")
    compute = make_compute(args.device, args.precision)
    variants = [{}, changes] if changes else [{}]
    probes = [PresetProbe(name, args.batches, compute, variant)
              for name in names for variant in variants]
    reference = PresetProbe(args.reference, args.batches, compute)
    ratios, base = measure(probes, reference, args.rounds)
    here = base * TRAIN_IMAGES
    print(f"{describe(compute)}; unit: one full-size epoch "
          f"of --preset {args.reference} ({here:.1f} s here, median of {args.rounds} rounds)")
    for probe in probes:
        sizes = epoch_sizes(probe.cfg)
        total = sum(ratios[(probe.name, size)] for size in sizes)
        per_size = ", ".join(f"{size}x{size} {ratios[(probe.name, size)]:.3f} "
                             f"(x{sizes.count(size)})" for size in probe.first_epoch)
        forecast = (f"; with {args.epoch_seconds:g} s a unit: {total * args.epoch_seconds:.0f} s"
                    if args.epoch_seconds else "")
        print(f"{probe.name}: {len(sizes)} epochs, per epoch {per_size}: "
              f"{total:.2f} units = {total * here:.0f} s of training here{forecast}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
