"""torch.compile on the CPU, end to end: does compiling the network pay for itself?

    python bench/compile_cost.py                       # fast and default presets, bf16 where native
    python bench/compile_cost.py --presets fast --precision fp32

For each preset, two fresh processes share one inductor cache folder (as a workspace would keep
it between runs): the first compiles from nothing (cold), the second finds the cache (warm).
Each times the compile (the first steps at each of the preset's image sizes, minus what those
steps cost uncompiled) and then the steady cost per image, compiled and eager taking turns in
the same process. The verdict adds it up over the preset's epochs: compile + compiled epochs
against eager epochs, in units (one full-size epoch of --preset plain, eager, timed here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.units import FULL_SIZE, PresetProbe, describe, epoch_sizes  # noqa: E402
from ct.trainer import config  # noqa: E402
from ct.trainer.data import TRAIN_IMAGES  # noqa: E402
from ct.trainer.engine import PRECISIONS, make_compute  # noqa: E402


def child(preset: str, precision: str, batches: int, rounds: int) -> dict[str, Any]:
    """In this process: the compile time and each size's eager and compiled cost per image."""
    compute = make_compute("cpu", precision)
    eager = PresetProbe(preset, batches, compute)
    compiled = PresetProbe(preset, batches, compute)
    unit = PresetProbe("plain", batches, compute)
    for probe in (eager, unit):  # kernels built, untimed
        for size in probe.first_epoch:
            probe.seconds_per_image(size)
    compiled.state.model.compile(dynamic=False)
    start = time.perf_counter()
    first_steps = sum(compiled.seconds_per_image(size) * compiled.x.shape[0]
                      for size in compiled.first_epoch)
    compile_s = time.perf_counter() - start - sum(eager.seconds_per_image(size) * eager.x.shape[0]
                                                  for size in eager.first_epoch)
    costs: dict[str, dict[int, list[float]]] = {"eager": {}, "compiled": {}}
    units = []
    for _ in range(rounds):
        for size in eager.first_epoch:
            costs["eager"].setdefault(size, []).append(eager.seconds_per_image(size))
            costs["compiled"].setdefault(size, []).append(compiled.seconds_per_image(size))
        units.append(unit.seconds_per_image(FULL_SIZE) * TRAIN_IMAGES)
    return {"compile_s": max(0.0, compile_s), "first_steps_s": first_steps,
            "unit_s": statistics.median(units), "describe": describe(compute),
            "per_image": {kind: {str(size): statistics.median(v) for size, v in by_size.items()}
                          for kind, by_size in costs.items()}}


def run_child(preset: str, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--child", preset, "--precision",
                           args.precision, "--batches", str(args.batches), "--rounds",
                           str(args.rounds)], env=env, capture_output=True, text=True,
                          check=False)
    if proc.returncode != 0:
        sys.exit(f"compile_cost.py: error: {preset}: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def epochs_cost(result: dict[str, Any], kind: str, sizes: list[int]) -> float:
    """The preset's training, in seconds at `kind`'s per-image costs."""
    return sum(result["per_image"][kind][str(size)] for size in sizes) * TRAIN_IMAGES


def report(preset: str, cold: dict[str, Any], warm: dict[str, Any]) -> None:
    sizes = epoch_sizes(config.preset_config(preset))
    unit = (cold["unit_s"] + warm["unit_s"]) / 2
    for name, result in (("cold", cold), ("warm", warm)):
        eager = epochs_cost(result, "eager", sizes)
        compiled = epochs_cost(result, "compiled", sizes) + result["compile_s"]
        verdict = "compile wins" if compiled < eager else "eager wins"
        print(f"--preset {preset}, {name} cache: compile {result['compile_s']:.1f} s; training "
              f"eager {eager / unit:.2f} units, compiled {compiled / unit:.2f} units with the "
              f"compile ({(compiled / eager - 1) * 100:+.0f}%): {verdict}")
    steady = statistics.mean(cold["per_image"]["compiled"][str(s)] /
                             cold["per_image"]["eager"][str(s)] for s in set(sizes))
    print(f"--preset {preset}: a compiled step costs {steady:.2f}x an eager one once compiled")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default="fast,default")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--batches", type=int, default=3, help="training batches per timed turn")
    p.add_argument("--rounds", type=int, default=3, help="turns each side takes (median)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.precision, args.batches, args.rounds)))
        return 0
    names = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in names if name not in config.PRESETS]
    if unknown:
        sys.exit(f"compile_cost.py: error: unknown preset {unknown[0]!r}")
    for preset in names:
        with tempfile.TemporaryDirectory() as cache:
            cold = run_child(preset, args, Path(cache))
            warm = run_child(preset, args, Path(cache))
        if preset == names[0]:
            print(cold["describe"])
        report(preset, cold, warm)
    return 0


if __name__ == "__main__":
    sys.exit(main())
