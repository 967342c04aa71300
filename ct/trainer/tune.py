"""Bounded hyperparameter search: `train.py --tune` (`tune_mode`).

Trials are chosen on a validation split held out of the training set, never on the test set; the
test set is touched once, by the winner. The search is bounded twice: at most `trials` trials, and a
wall-clock budget checked at every epoch (a trial cut short by it is recorded, not used). Each trial
is an ordinary resumable run in `<tune-run>/trial-NN/`, so a killed tuning container continues where
it stopped. Trial 0 is the base config itself, so tuning never ends worse on validation than it.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ct import atomic
from ct import workspace as names
from ct.trainer import plots, stopping
from ct.trainer.data import Cifar
from ct.trainer.engine import Compute, evaluate
from ct.trainer.errors import UsageError
from ct.trainer.run import (
    Log,
    LogLine,
    RunClock,
    RunOptions,
    Workspace,
    choose_run_dir,
    load_data,
    make_split,
    publish,
    record_lineage,
    run_summary,
    train_config,
)
from network import build_model

# What the search varies, with the values it picks from; the rest of the config stays at base.
SEARCH_SPACE: dict[str, list[Any]] = {
    "lr_scale": [0.5, 1.0, 1.5],  # times the optimizer's base learning rate below
    "epochs_scale": [1.0, 1.5],  # times the base config's epochs
    "batch_size": [256, 512],
    "width": [16, 24, 32],  # channels of the stem; wider is slower, usually better
    "blocks": [3],  # four blocks would pool 32x32 down to 2x2: worse here
    "convs_per_block": [1, 2],
    "dropout": [0.0, 0.1, 0.2],
}
# Peak learning rates that suit each optimizer with the batch sizes above.
BASE_LR = {"sgd": 0.4, "adam": 0.002, "adamw": 0.002}
WEIGHT_DECAY = {"sgd": 5e-4, "adam": 0.0, "adamw": 0.05}
VAL_FRACTION = 10  # one tenth of the training images validate, at most MAX_VAL
MAX_VAL = 5000


@dataclass
class Outcome:
    best_params: dict[str, Any]
    best_config: dict[str, Any]
    val_accuracy: float
    test_accuracy: float
    trials_run: int


def make_plan(base: dict[str, Any], trials: int, time_budget: float, optimizers: str
              ) -> dict[str, Any]:
    names = [o.strip() for o in optimizers.split(",") if o.strip()]
    unknown = [o for o in names if o not in BASE_LR]
    if not names or unknown:
        raise UsageError(f"--optimizers takes a comma list of sgd, adam, adamw, not {optimizers!r}")
    return {"base": base, "trials": trials, "time_budget": time_budget, "optimizers": names}


def trial_params(index: int, plan: dict[str, Any]) -> dict[str, Any]:
    """Trial 0 is the base config; the others sample the search space, cycling the optimizers."""
    base = plan["base"]
    optimizer = plan["optimizers"][index % len(plan["optimizers"])]
    if index == 0:
        picks = {"lr_scale": 1.0, "epochs_scale": 1.0, "batch_size": base["batch_size"],
                 "width": base["width"], "blocks": base["blocks"],
                 "convs_per_block": base["convs_per_block"], "dropout": base["dropout"]}
    else:
        rng = random.Random(base["seed"] * 1000 + index)
        picks = {key: rng.choice(values) for key, values in SEARCH_SPACE.items()}
    lr = round(BASE_LR[optimizer] * picks.pop("lr_scale"), 6)
    if optimizer == base["optimizer"] and index == 0:
        lr = base["lr"]
    epochs = max(1, round(base["epochs"] * picks.pop("epochs_scale")))
    return {"optimizer": optimizer, "lr": lr, "weight_decay": WEIGHT_DECAY[optimizer],
            "epochs": epochs, **picks}


def trial_dir(run_dir: Path, index: int) -> Path:
    """Where trial `index` (0-based, as in trials.jsonl) keeps its resumable run."""
    return run_dir / f"trial-{index:02d}"


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def search(run_dir: Path, plan: dict[str, Any], data: Cifar, compute: Compute, log: LogLine,
           dry_run: bool, clock: RunClock | None = None) -> Outcome:
    """Run the remaining trials of `plan` in `run_dir`, then test the best one. Each trial saves
    `clock` (the tuning run's) with its checkpoints."""
    trials_path = run_dir / names.RUN_TRIALS
    rows = _read_rows(trials_path)
    spent = sum(r["seconds"] for r in rows)
    deadline = time.monotonic() + plan["time_budget"] - spent
    n_train = plan["base"]["subset"] or len(data.train_x)
    val = min(MAX_VAL, max(1, n_train // VAL_FRACTION))
    split = None
    for index in range(len(rows), plan["trials"]):
        if time.monotonic() > deadline:
            log(f"time budget of {plan['time_budget']:.0f}s spent after {index} trial(s)")
            break
        stopping.at(f"before trial {index + 1}/{plan['trials']}", "every finished trial is kept")
        params = trial_params(index, plan)
        cfg = {**plan["base"], **params, "val_split": val}
        if split is None:
            split = make_split(data, cfg, compute.device)
        folder = trial_dir(run_dir, index)
        with stopping.deferred():  # no trial folder without its config
            folder.mkdir(exist_ok=True)
            atomic.write_json(folder / names.RUN_CONFIG, cfg)
        log(f"trial {index + 1}/{plan['trials']} ({folder.name}): "
            f"{json.dumps(params, sort_keys=True)}")
        t0 = time.monotonic()
        result = train_config(folder, cfg, split, compute, log, dry_run=dry_run,
                              deadline=deadline, clock=clock)
        row = {"trial": index, "params": params, "seconds": round(time.monotonic() - t0, 2),
               "status": "stopped" if result.get("stopped") else "done",
               "val_accuracy": result.get("validation_accuracy"),
               "optimizer_class": result.get("optimizer_class")}
        rows.append(row)
        with stopping.deferred():  # a finished trial is recorded, so a restart does not redo it
            atomic.write_text(trials_path, "".join(json.dumps(r) + "\n" for r in rows))
            plots.draw_trials(run_dir, rows, lambda i: trial_dir(run_dir, i), log)
    stopping.at("while testing the best trial", "every finished trial is kept")
    return _finish(run_dir, plan, rows, data, compute, log, val)


def _finish(run_dir: Path, plan: dict[str, Any], rows: list[dict[str, Any]], data: Cifar,
            compute: Compute, log: LogLine, val: int) -> Outcome:
    finished = [r for r in rows if r["status"] == "done"]
    if not finished:
        raise UsageError(f"no trial finished within --time-budget {plan['time_budget']:.0f}s; "
                         "raise the budget or lower --epochs")
    best = max(finished, key=lambda r: r["val_accuracy"])
    best_dir = trial_dir(run_dir, best["trial"])
    saved = torch.load(best_dir / names.RUN_MODEL, map_location="cpu", weights_only=False)
    model = build_model(saved["config"]).to(compute.device, memory_format=torch.channels_last)
    model.load_state_dict(saved["model"])
    test_x, test_y = data.test_x.to(compute.device), data.test_y.to(compute.device)
    test_accuracy, _ = evaluate(model, test_x, test_y, compute, flip_tta=saved["config"]["tta"])
    with stopping.deferred():  # the model and best.json describing it, together
        atomic.copy_file(best_dir / names.RUN_MODEL, run_dir / names.RUN_MODEL)
        atomic.write_json(run_dir / names.RUN_BEST, {
            "trial": best["trial"], "params": best["params"], "val_accuracy": best["val_accuracy"],
            "test_accuracy": round(test_accuracy, 2), "validation_images": val,
            "trials_finished": len(finished), "trials_run": len(rows),
        })
    if (best_dir / names.RUN_CURVES).is_file():  # the round's picture in the report and the mail
        atomic.copy_file(best_dir / names.RUN_CURVES, run_dir / names.RUN_CURVES)
    log(f"best trial {best['trial'] + 1} ({best_dir.name}): "
        f"validation {best['val_accuracy']:.2f}%, test {test_accuracy:.2f}%")
    return Outcome(best["params"], saved["config"], best["val_accuracy"], test_accuracy, len(rows))


def tune_mode(opts: RunOptions, base: dict[str, Any], ws: Workspace, compute: Compute,
              started: float, trials: int, time_budget: float, optimizers: str
              ) -> dict[str, Any]:
    """`train.py --tune`: search around `base` (or continue an unfinished search), test the best
    trial, publish the results."""
    plan = make_plan(base, trials, time_budget, optimizers)
    run_dir, plan, resumed = choose_run_dir(ws, "tune", plan, opts)
    clock = RunClock.begin(run_dir, started, resumed)
    with clock.saved_on_stop():
        log = Log(run_dir / names.RUN_LOG)
        log(f"tune {run_dir.name} plan {json.dumps(plan, sort_keys=True)}")
        data = load_data(opts, ws, log)
        outcome = search(run_dir, plan, data, compute, log, opts.dry_run, clock)
        extra = {"config": outcome.best_config, "best_params": outcome.best_params,
                 "val_accuracy": outcome.val_accuracy, "trials": outcome.trials_run,
                 "trials_planned": plan["trials"], "time_budget_s": plan["time_budget"],
                 "dry_run": opts.dry_run,
                 names.LINEAGE: record_lineage(ws, run_dir, data, outcome.best_config, compute)}
        summary = run_summary(ws, run_dir, compute, clock, "tune", outcome.test_accuracy, extra)
        publish(ws, run_dir, summary, opts.dry_run)
    return summary
