"""Tuning quality benchmark: what a tuning round buys, per strategy, under the same budget.

    python bench/tune_quality.py --arm tpe --time-budget 3600     # job5's default round
    python bench/tune_quality.py --arm random --time-budget 1200  # today's behaviour, 20 minutes
    python bench/tune_quality.py --arm tpe --pruner hyperband --subset 10000 --time-budget 480

Each arm runs `train.py --tune` as job5 does (a fresh process, a fresh workspace, so a fresh
study) from the same start: a weak push (--preset plain --optimizer sgd --lr 0.002 --width 8
--epochs 4, below 80%: the plain recipe, the default run when docs/benchmarks.md was measured; its
recipe trial is today's default run's searched values, then lr 0.4 and 18 epochs), and prints one
JSON line: trials finished / pruned / cut by the budget, the best validation accuracy and the
winner's test accuracy (tested once, by train.py). Arms:
  random  Optuna's RandomSampler without pruning and without the recipe trial: the old random
          search.
  tpe     TPE (seeded, multivariate) with --pruner (default: train.py's), and train.py's default
          recipe as the second trial (--no-recipe-trial: without it).
--at SECONDS also reports the round as it stood after that many seconds of trials (trials run one
after another, so the round's state then is the finished trials whose cumulative time fits): the
winner among those is tested here on the test set. A TPE round cut there is the same round as one
given that budget, since the sampler and pruner never look at the budget.

Data: CIFAR-10 from --data-dir (default ../shared/data, the JPEG q75 copy: figures on it run 2-3
points below the original dataset). The CPU and thread count are printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from ct import workspace as names  # noqa: E402
from ct.trainer.data import load_cifar  # noqa: E402
from ct.trainer.engine import evaluate_as_configured, make_compute  # noqa: E402
from ct.trainer.state import load_model  # noqa: E402
from ct.trainer.tune import trial_dir  # noqa: E402

WEAK_PUSH = ["--preset", "plain", "--optimizer", "sgd", "--lr", "0.002", "--width", "8",
             "--epochs", "4"]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def run_arm(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, str(REPO / "train.py"), "--tune", "--out", str(out),
           "--data-dir", str(args.data_dir), *WEAK_PUSH]
    if args.trials:
        cmd += ["--trials", str(args.trials)]
    if args.time_budget:
        cmd += ["--time-budget", str(args.time_budget)]
    if args.subset:
        cmd += ["--subset", str(args.subset)]
    if args.seed:
        cmd += ["--seed", str(args.seed)]
    if args.arm == "random":
        cmd += ["--sampler", "random", "--pruner", "none", "--no-recipe-trial"]
    else:
        cmd += ["--sampler", "tpe"] + (["--pruner", args.pruner] if args.pruner else [])
        cmd += [] if args.recipe_trial else ["--no-recipe-trial"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    wall = time.perf_counter() - t0
    (run_dir,) = (out / "runs").glob("tune-*")
    rows = [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]
    best = json.loads((run_dir / "best.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    plan = json.loads((run_dir / "config.json").read_text())
    result = {"arm": args.arm, "seed": args.seed, "sampler": plan["sampler"],
              "pruner": plan["pruner"], "trials": plan["trials"],
              "budget_s": metrics["time_budget_s"],
              "wall_s": round(wall, 1),
              **counts(rows), "best_val": best["val_accuracy"],
              "test": best["test_accuracy"], "best_trial": best["trial"],
              "best_source": rows_by_number(rows)[best["trial"]]["source"],
              "best_params": best["params"]}
    if args.at:
        result[f"at_{args.at:.0f}s"] = state_at(rows, run_dir, args)
    return result


def rows_by_number(rows: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    return {row["trial"]: row for row in rows}


def counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    return {"finished": sum(r["status"] == "done" for r in rows),
            "pruned": sum(r["status"] == "pruned" for r in rows),
            "cut": sum(r["status"] == "stopped" for r in rows)}


def state_at(rows: list[dict[str, Any]], run_dir: Path, args: argparse.Namespace
             ) -> dict[str, Any]:
    """The round as it stood after `args.at` seconds of trials; its winner tested here."""
    elapsed, seen = 0.0, []
    for row in rows:
        elapsed += row["seconds"] or 0.0
        if elapsed > args.at:
            break
        seen.append(row)
    done = [r for r in seen if r["status"] == "done"]
    if not done:
        return {**counts(seen), "best_val": None, "test": None}
    best = max(done, key=lambda r: r["val_accuracy"])
    compute = make_compute("cpu")
    model, cfg = load_model(trial_dir(run_dir, best["trial"]) / names.RUN_MODEL, compute)
    data = load_cifar(args.data_dir)
    test, _ = evaluate_as_configured(model, data.test_x, data.test_y, compute, cfg)
    return {**counts(seen), "best_val": best["val_accuracy"], "test": round(test, 2),
            "best_trial": best["trial"], "best_source": best["source"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arm", choices=["random", "tpe"], required=True)
    p.add_argument("--pruner", help="tpe arm: median, halving, hyperband (default: train.py's)")
    p.add_argument("--time-budget", type=float, help="seconds (default: train.py's, job5's)")
    p.add_argument("--trials", type=int, help="slots (default: train.py's, job5's)")
    p.add_argument("--recipe-trial", action=argparse.BooleanOptionalAction, default=True,
                   help="tpe arm: try train.py's default recipe second (default: %(default)s)")
    p.add_argument("--subset", type=int, default=0, help="first N training images")
    p.add_argument("--seed", type=int, default=0,
                   help="the push's seed: weights, data order and the sampler's draws")
    p.add_argument("--at", type=float, default=0.0, help="also report the round after SECONDS")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--keep", type=Path, help="keep the workspace here instead of a temp dir")
    args = p.parse_args()
    print(f"# {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          "CIFAR-10 (JPEG q75 copy)", flush=True)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run_arm(args, args.keep)
    else:
        with tempfile.TemporaryDirectory() as out:
            result = run_arm(args, Path(out))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
