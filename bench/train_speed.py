"""Training speed benchmark: wall-clock time to a test accuracy, against the original recipe.

    python bench/train_speed.py                     # CPU: `train.py --preset fast`, then the
                                                    # original recipe in the same wall-clock budget
    python bench/train_speed.py --seeds 3           # the preset with seeds 0, 1, 2: the spread
    python bench/train_speed.py --precision fp32    # as on a CPU without native bf16
    python bench/train_speed.py --preset gpu --device cuda --seeds 3    # the GPU preset

Data: CIFAR-10 from --data-dir (default ../shared/data, the JPEG q75 re-encoded copy: accuracies
on it run 2-3 points below the original dataset, so every figure printed says which data it used).
The first part runs train.py as a user would (a fresh process, data already on disk) and reports
its whole wall-clock time; the second trains the original model (3 convs 16/32/64, no batch norm,
dropout 0.25, fc 500, SGD lr 0.001 without momentum, batch 20) until that same time is spent,
evaluation included. --time-to evaluates after every epoch and reports when the target was met.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from bench.units import as_flags, describe, overrides, unit_seconds  # noqa: E402
from ct.trainer import config  # noqa: E402
from ct.trainer.data import TRAIN_IMAGES, load_cifar  # noqa: E402
from ct.trainer.engine import (  # noqa: E402
    DEVICES,
    PRECISIONS,
    Compute,
    evaluate_as_configured,
    make_compute,
    steps_per_epoch,
)
from ct.trainer.state import TrainingState  # noqa: E402

DATA_NOTE = "CIFAR-10 (JPEG q75 copy)"


def run_preset(preset: str, data_dir: Path, device: str, seed: int = 0,
               overrides: dict[str, Any] | None = None, precision: str = "auto"
               ) -> dict[str, Any]:
    """`train.py --preset P --seed S [--key value ...]` in a fresh process; its wall time and its
    own metrics.

    The workspace's decoded-data cache is filled first (untimed, but reported), as it is in a
    pipeline workspace after its first run."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        load_cifar(data_dir, cache_dir=Path(out) / "data")
        cold_load = time.perf_counter() - t0
        cmd = [sys.executable, str(REPO / "train.py"), "--preset", preset, "--out", out,
               "--data-dir", str(data_dir), "--device", device, "--precision", precision,
               "--seed", str(seed),
               *as_flags(overrides or {})]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        wall = time.perf_counter() - t0
        metrics = json.loads((Path(out) / "metrics.json").read_text())
    return {"preset": preset, "seed": seed, "wall_s": round(wall, 1),
            "accuracy": metrics["accuracy"],
            "cold_load_s": round(cold_load, 1),
            "train_s": metrics["train_seconds"], "images_per_s": metrics["images_per_s"],
            "device": metrics["device"]}


def train_for(cfg: dict[str, Any], data_dir: Path, device: str, budget_s: float | None,
              target: float | None, precision: str = "auto") -> dict[str, Any]:
    """Train `cfg` in-process until `budget_s` is spent (whole batches) or `target` is reached,
    evaluating after every epoch; the clock covers training and evaluation, not data loading."""
    compute = make_compute(device, precision)
    data = load_cifar(data_dir)
    x, y, tx, ty = (t.to(compute.device)
                    for t in (data.train_x, data.train_y, data.test_x, data.test_y))
    state = TrainingState.build(cfg, len(x), compute, x)  # as train.py's runs start
    per_epoch = steps_per_epoch(len(x), cfg["batch_size"])
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    reached = None
    for epoch in range(cfg["epochs"]):
        max_batches = None
        if budget_s is not None and curve:
            left = budget_s - (time.perf_counter() - start)
            per_batch = curve[-1]["train_s"] / per_epoch
            max_batches = int(max(0.0, left - curve[-1]["eval_s"]) / per_batch)
            if max_batches == 0:
                break
        result = state.run_epoch(epoch, x, y, cfg, compute, max_batches)
        t_eval = time.perf_counter()
        accuracy, _ = evaluate_as_configured(state.model, tx, ty, compute, cfg)
        elapsed = time.perf_counter() - start
        curve.append({"epoch": epoch + 1, "images": result.images, "accuracy": round(accuracy, 2),
                      "elapsed_s": round(elapsed, 1), "train_s": result.seconds,
                      "eval_s": time.perf_counter() - t_eval})
        print(f"  epoch {epoch + 1}: {accuracy:.2f}% at {elapsed:.1f}s", file=sys.stderr)
        if target is not None and accuracy >= target and reached is None:
            reached = elapsed
            break
        if budget_s is not None and elapsed >= budget_s:
            break
    return {"accuracy": curve[-1]["accuracy"], "elapsed_s": curve[-1]["elapsed_s"],
            "images_seen": sum(c["images"] for c in curve), "time_to_target_s": reached,
            "device": compute.describe(), "curve": curve}


def in_units(compute: Compute, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`run`'s figures with its wall and training time in units: one full-size reference epoch
    timed in this process just before and just after it (their mean), so a drifting machine
    moves both sides of the ratio alike."""
    before = unit_seconds(compute)
    figures = run()
    unit = (before + unit_seconds(compute)) / 2
    return {**figures, "unit_s": round(unit, 1), "wall_units": round(figures["wall_s"] / unit, 2),
            "train_units": round(figures["train_s"] / unit, 2)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    accuracies = [run["accuracy"] for run in runs]
    walls = [run["wall_s"] for run in runs]
    return {"accuracy_mean": round(sum(accuracies) / len(runs), 2),
            "accuracy_min": min(accuracies), "accuracy_max": max(accuracies),
            "wall_mean_s": round(sum(walls) / len(runs), 1), "wall_max_s": max(walls),
            "train_units_mean": round(sum(run["train_units"] for run in runs) / len(runs), 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="train.py's --precision, for both recipes (default: auto)")
    p.add_argument("--preset", default="fast", choices=sorted(config.PRESETS))
    p.add_argument("--time-to", type=float, help="only measure the time to this test accuracy")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value of the preset, e.g. --set epochs=30")
    p.add_argument("--seeds", type=int, default=1,
                   help="run the preset with seeds 0..N-1 and report the spread (default 1)")
    p.add_argument("--json", type=Path, help="also write the figures to this file")
    args = p.parse_args()
    compute = make_compute(args.device, args.precision)
    print(f"# data: {DATA_NOTE} from {args.data_dir}; {describe(compute)}")
    if args.time_to is not None:
        cfg = {**config.preset_config(args.preset), **overrides(args.set)}
        result = train_for(cfg, args.data_dir, args.device, None, args.time_to,
                           args.precision)
        hit = result["time_to_target_s"]
        verdict = f"{hit:.1f} s" if hit is not None else "not reached"
        print(f"time to {args.time_to:g}% ({DATA_NOTE}), preset {args.preset} {args.set}, "
              f"{result['device']}: {verdict}; best {max(c['accuracy'] for c in result['curve'])}%"
              f" in {result['elapsed_s']} s over {len(result['curve'])} epochs")
        figures: dict[str, Any] = {"time_to": result}
    else:
        if args.seeds < 1:
            p.error("--seeds must be at least 1")
        changes = overrides(args.set)
        flags = as_flags(changes)
        runs = [in_units(compute, lambda seed=seed: run_preset(
            args.preset, args.data_dir, args.device, seed, changes, args.precision))
            for seed in range(args.seeds)]
        for ours in runs:
            command = " ".join(["train.py --preset", args.preset, *flags, "--seed",
                                str(ours["seed"])])
            print(f"{command}: "
                  f"{ours['accuracy']:.2f}% test accuracy ({DATA_NOTE}) in {ours['wall_s']} s "
                  f"wall-clock = {ours['wall_units']} units (unit: {ours['unit_s']} s here, "
                  f"measured around the run), training {ours['train_s']} s = "
                  f"{ours['train_units']} units at "
                  f"{ours['images_per_s']:.0f} img/s; data from the workspace cache, a first load "
                  f"from the archive adds about {ours['cold_load_s']} s), {ours['device']}")
        spread = summarise(runs)
        if args.seeds > 1:
            print(f"{args.seeds} seeds: accuracy mean {spread['accuracy_mean']:.2f}%, min "
                  f"{spread['accuracy_min']:.2f}%, max {spread['accuracy_max']:.2f}%; wall-clock "
                  f"mean {spread['wall_mean_s']} s, max {spread['wall_max_s']} s; training mean "
                  f"{spread['train_units_mean']} units")
        original = config.preset_config("original")
        budget = spread["wall_mean_s"]
        base = train_for(original, args.data_dir, args.device, budget, None, args.precision)
        print(f"original recipe, same {budget} s budget: {base['accuracy']:.2f}% test "
              f"accuracy ({DATA_NOTE}) after {base['images_seen']} images "
              f"({base['images_seen'] / TRAIN_IMAGES:.2f} epochs), {base['device']}")
        figures = {"ours": runs[0], "runs": runs, "spread": spread, "original": base}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
