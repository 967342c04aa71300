"""One config's training and train.py's two training modes: `train_config` trains a config in a
run folder, continuing from its checkpoint (the tuner runs each trial with it); `train_mode` is
`python train.py`, `reproduce_mode` is `train.py --reproduce RUN_ID`.

A continued run ends bit for bit where an uninterrupted one would: the checkpoint of every epoch
keeps the training state (ct.trainer.state), and nothing else that a run records, its clock and
log included (ct.trainer.runs), feeds back into what it computes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ct import atomic
from ct import workspace as names
from ct.trainer import plots, stopping
from ct.trainer.config import PLAIN_RECIPE, check_config, with_added_keys
from ct.trainer.data import Cifar
from ct.trainer.engine import Compute, evaluate, evaluate_as_configured
from ct.trainer.errors import UsageError
from ct.trainer.lineage import reproduction_line
from ct.trainer.runs import (
    Log,
    LogLine,
    RunClock,
    RunOptions,
    Workspace,
    choose_run_dir,
    load_data,
    pin_data,
    publish,
    read_json,
    record_lineage,
    run_summary,
    start_run_dir,
)
from ct.trainer.state import TrainingState, load_checkpoint, save_checkpoint

DRY_RUN_BATCHES = 3
# CIFAR-10's class names in label order, for a split whose dataset named none (the loaded
# dataset's batches.meta names them; ct.trainer.data checks that it names ten).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
GLANCE_IMAGES = 2000  # evaluation images looked at after every epoch, for the curves (_glance)


# --- one config's training --------------------------------------------------------------------


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_name: str  # "test" or "validation"
    classes: list[str] = field(default_factory=lambda: list(CIFAR10_CLASSES))  # label order


def make_split(data: Cifar, cfg: dict[str, Any], device: torch.device) -> Split:
    x, y = data.train_x, data.train_y
    if cfg["subset"]:
        x, y = x[:cfg["subset"]], y[:cfg["subset"]]
    if cfg["val_split"]:
        if cfg["val_split"] >= len(x):
            raise UsageError(f"--val-split {cfg['val_split']} leaves no training images")
        cut = len(x) - cfg["val_split"]
        parts = (x[:cut], y[:cut], x[cut:], y[cut:])
        name = "validation"
    else:
        parts = (x, y, data.test_x, data.test_y)
        name = "test"
    moved = [t.to(device) for t in parts]
    return Split(*moved, eval_name=name, classes=list(data.classes))


@dataclass
class Progress:
    """How far a run got: what its checkpoint records besides the training state."""

    epoch: int = 0  # epochs finished
    train_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def train_config(run_dir: Path, cfg: dict[str, Any], split: Split, compute: Compute, log: LogLine,
                 dry_run: bool = False, deadline: float | None = None,
                 clock: RunClock | None = None,
                 after_epoch: Callable[[int, float], None] | None = None) -> dict[str, Any]:
    """Train `cfg` in `run_dir`, continuing from its checkpoint if there is one.

    Returns the run's summary (also written to run_dir/model.pt) unless the deadline cut the run
    short, in which case "stopped" is set and the run stays resumable. `clock`, the whole run's
    (a tuning run's for a trial), is saved with every checkpoint. `after_epoch(epoch, glance
    accuracy)` runs once each epoch's records are complete (the tuner reports to its pruner
    there, and may raise to end the run).
    """
    state = TrainingState.build(cfg, len(split.train_x), compute, split.train_x)
    progress = _resume(run_dir, cfg, state, compute, log)
    last_epoch = min(progress.epoch + 1, cfg["epochs"]) if dry_run else cfg["epochs"]
    for epoch in range(progress.epoch, last_epoch):
        if deadline is not None and time.monotonic() > deadline:
            log(f"time budget spent; {run_dir.name} stops after epoch {epoch} (resumable)")
            return {"stopped": True, "epochs_done": epoch}
        stopping.at(f"during epoch {epoch + 1}/{cfg['epochs']} of {run_dir.name}", _kept(epoch))
        result = state.run_epoch(epoch, split.train_x, split.train_y, cfg, compute,
                                 DRY_RUN_BATCHES if dry_run else None)
        progress.epoch, progress.train_seconds = epoch + 1, progress.train_seconds + result.seconds
        row = {"epoch": epoch + 1, "loss": round(result.loss, 4),
               "train_accuracy": round(result.accuracy, 2),
               "eval_accuracy": round(_glance(state, split, compute), 2),
               "lr": round(state.schedule.get_last_lr()[0], 6),
               "images_per_s": round(result.images / max(result.seconds, 1e-9), 1),
               "elapsed_s": round(progress.train_seconds, 2)}
        _record_epoch(run_dir, cfg, state, progress, row, compute, log, clock)
        if after_epoch is not None:
            after_epoch(epoch + 1, row["eval_accuracy"])
    return _test(run_dir, cfg, split, state, progress, compute, log, dry_run)


def _glance(state: TrainingState, split: Split, compute: Compute) -> float:
    """The evaluation accuracy on the first GLANCE_IMAGES evaluation images, without the mirror
    average or the shifted views (whatever tta and tta_translate say): the curve in curves.png
    (the test set in a training run, the validation split in a tuning trial). Forward passes
    only, about 1% of an epoch; it changes no weight, statistic or RNG."""
    accuracy, _ = evaluate(state.model, split.eval_x[:GLANCE_IMAGES],
                           split.eval_y[:GLANCE_IMAGES], compute, flip_tta=False)
    return accuracy


def _resume(run_dir: Path, cfg: dict[str, Any], state: TrainingState, compute: Compute,
            log: LogLine) -> Progress:
    """Load the run's checkpoint into `state`, if it has one; how far the run had got."""
    ckpt_path = run_dir / names.RUN_CHECKPOINT
    if not ckpt_path.exists():
        return Progress()
    ckpt = load_checkpoint(ckpt_path, cfg)
    state.restore(ckpt, compute)
    log(f"resuming {run_dir.name} from its checkpoint after epoch {ckpt['epoch']}")
    return Progress(ckpt["epoch"], ckpt["train_seconds"], ckpt["history"])


def _record_epoch(run_dir: Path, cfg: dict[str, Any], state: TrainingState, progress: Progress,
                  row: dict[str, Any], compute: Compute, log: LogLine, clock: RunClock | None
                  ) -> None:
    """The checkpoint, the clock, epochs.jsonl and the log line of a finished epoch."""
    history = progress.history
    history.append(row)
    epoch = progress.epoch
    with stopping.deferred():  # a stop request waits for the epoch's records to be complete
        save_checkpoint(run_dir / names.RUN_CHECKPOINT, {
            "format": 1, "config": cfg, "epoch": epoch, "train_seconds": progress.train_seconds,
            "history": history, **state.saved(compute),
        })
        if clock is not None:
            clock.save()
        atomic.write_text(run_dir / names.RUN_EPOCHS,
                          "".join(json.dumps(r) + "\n" for r in history))
        plots.draw_curves(run_dir, history, log)  # never raises; touches no RNG
        # The epoch's line comes last: once it is printed, every file of the epoch is complete.
        log(f"epoch {epoch}/{cfg['epochs']} loss {row['loss']:.4f} "
            f"train accuracy {row['train_accuracy']:.2f}% lr {row['lr']:.4f} "
            f"{row['images_per_s']:.0f} img/s elapsed {progress.train_seconds:.1f}s")
        stopping.at(f"after epoch {epoch}/{cfg['epochs']} of {run_dir.name}", _kept(epoch))


def _test(run_dir: Path, cfg: dict[str, Any], split: Split, state: TrainingState,
          progress: Progress, compute: Compute, log: LogLine, dry_run: bool) -> dict[str, Any]:
    """Evaluate the trained model on the split's evaluation set; write run_dir/model.pt."""
    stopping.at(f"during the evaluation of {run_dir.name}", _kept(len(progress.history)))
    eval_start = time.perf_counter()
    predictions: list[torch.Tensor] = []
    accuracy, loss = evaluate_as_configured(state.model, split.eval_x, split.eval_y, compute,
                                            cfg, max_batches=1 if dry_run else None,
                                            predictions=predictions)
    eval_seconds = time.perf_counter() - eval_start
    per_class = per_class_view(split.classes, split.eval_y, predictions)
    images = int(len(split.train_x) * cfg["epochs"]) if not dry_run else 0
    train_seconds, name = progress.train_seconds, split.eval_name
    summary = {
        f"{name}_accuracy": round(accuracy, 2), f"{name}_loss": round(loss, 4),
        "epochs": cfg["epochs"], "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "images_per_s": round(images / max(train_seconds, 1e-9), 1),
        "optimizer_class": type(state.optimizer).__name__, **per_class,
    }
    with stopping.deferred():
        atomic.write_via(run_dir / names.RUN_MODEL, lambda tmp: torch.save(
            {"config": cfg, "model": state.model.state_dict(), **summary}, tmp))
        log(f"{name} accuracy {accuracy:.2f}% loss {loss:.4f} "
            f"(train {train_seconds:.1f}s, eval {eval_seconds:.1f}s)")
        plots.draw_curves(run_dir, progress.history, log, (name, accuracy))
        plots.draw_confusion(run_dir, per_class["classes"], per_class["confusion_matrix"], name,
                             log)
    return summary


def per_class_view(classes: list[str], truth: torch.Tensor, predictions: list[torch.Tensor]
                   ) -> dict[str, Any]:
    """`classes`, `per_class_accuracy` ({class: percent, 2 decimals; None for a class the set
    has no image of}) and `confusion_matrix` (rows: true class, columns: predicted) of the
    evaluation whose predicted classes, batch by batch from the set's start, are `predictions`:
    the very predictions its accuracy counted, so the diagonal's share is that accuracy."""
    n = len(classes)
    predicted = torch.cat(predictions).cpu() if predictions else torch.zeros(0, dtype=torch.long)
    # A dry run evaluates its first batch only: the labels of the images evaluated.
    cells = truth[:len(predicted)].cpu() * n + predicted
    matrix = torch.bincount(cells, minlength=n * n).view(n, n).tolist()
    accuracy = {name: round(100.0 * row[i] / sum(row), 2) if sum(row) else None
                for i, (name, row) in enumerate(zip(classes, matrix, strict=True))}
    return {"classes": list(classes), "per_class_accuracy": accuracy, "confusion_matrix": matrix}


def _kept(epochs_done: int) -> str:
    """What a stop leaves to resume from, for its one-line report."""
    if epochs_done == 0:
        return "no epoch had finished yet"
    return f"the checkpoint of epoch {epochs_done} is kept"


# --- train.py's training mode -----------------------------------------------------------------


def train_mode(opts: RunOptions, cfg: dict[str, Any], ws: Workspace, compute: Compute,
               started: float, reproduces: str | None = None) -> dict[str, Any]:
    """`train.py`: train `cfg` (or continue its unfinished run), test it, publish the results.
    A reproduction (`reproduces`: the run it repeats) leaves the top-level results alone."""
    if opts.dry_run:
        run_dir, resumed = start_run_dir(ws, "dry", cfg), False
    else:
        run_dir, cfg, resumed = choose_run_dir(ws, "train", cfg, opts, with_added_keys)
    clock = RunClock.begin(run_dir, started, resumed)
    with clock.saved_on_stop():
        log = Log(run_dir / names.RUN_LOG)
        log(f"run {run_dir.name} config {json.dumps(cfg, sort_keys=True)}")
        data = load_data(opts, ws, log)
        pin_data(run_dir, data.version)
        split = make_split(data, cfg, compute.device)
        result = train_config(run_dir, cfg, split, compute, log, dry_run=opts.dry_run,
                              clock=clock)
        accuracy = result.pop(f"{split.eval_name}_accuracy")
        extra = {"config": cfg, "dry_run": opts.dry_run, "train_images": len(split.train_x),
                 **result, names.LINEAGE: record_lineage(ws, run_dir, data, cfg, compute)}
        if reproduces is not None:
            extra["reproduces"] = reproduces
        summary = run_summary(ws, run_dir, compute, clock, "train", accuracy, extra)
        publish(ws, run_dir, summary, opts.dry_run or reproduces is not None)
    return summary


# --- train.py --reproduce ---------------------------------------------------------------------


@dataclass
class RecordedRun:
    run_dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any]


def recorded_run(ws: Workspace, run_id: str) -> RecordedRun:
    """The finished training run `run_id` of the workspace, its config ready to train again;
    UsageError (one line) otherwise."""
    run_dir = ws.runs / run_id
    if (not run_id or Path(run_id).name != run_id or run_id in (".", "..")
            or not (run_dir / names.RUN_CONFIG).is_file()):
        raise UsageError(f"--reproduce: no run {run_id!r} in {ws.runs} (give a folder name "
                         "under runs/, and --out for another workspace)")
    if run_id.startswith("tune-"):
        raise UsageError(f"--reproduce: {run_id} is a tuning round, which is not reproducible "
                         "this way; reproduce its best trial's config with train.py's flags")
    if not (run_dir / names.RUN_METRICS).is_file():
        raise UsageError(f"--reproduce: {run_id} has not finished (no {names.RUN_METRICS}), so "
                         "there is no result to compare with")
    metrics = read_json(run_dir / names.RUN_METRICS)
    if not run_id.startswith("train-") or metrics.get("dry_run") or metrics.get("mode") != "train":
        raise UsageError(f"--reproduce: {run_id} is not a finished training run "
                         "(dry runs and tuning rounds are not reproducible this way)")
    return RecordedRun(run_dir, _recorded_config(run_dir), metrics)


def _recorded_config(run_dir: Path) -> dict[str, Any]:
    """The run's config.json, checked like a config from flags. Keys added since it was recorded
    take the values it ran with (ct.trainer.config.with_added_keys); any other missing key means
    another version of train.py, whose runs this one cannot repeat."""
    config = with_added_keys(read_json(run_dir / names.RUN_CONFIG))
    missing = sorted(set(PLAIN_RECIPE) - set(config))
    if missing:
        raise UsageError(f"--reproduce: {run_dir.name}'s config.json lacks {', '.join(missing)} "
                         "(another version of train.py wrote it); check out that commit")
    check_config(config)
    return config


def reproduce_mode(opts: RunOptions, recorded: RecordedRun, ws: Workspace, compute: Compute,
                   started: float) -> tuple[dict[str, Any], str]:
    """Train the recorded run's config (and so its seed) again in a new run folder; the summary
    and one line comparing its accuracy with the recorded one."""
    run_id = recorded.run_dir.name
    fresh = replace(opts, fresh=True, resume=False, dry_run=False)
    summary = train_mode(fresh, recorded.config, ws, compute, started, reproduces=run_id)
    line = reproduction_line(run_id, summary["run_id"], summary["accuracy"],
                             float(recorded.metrics["accuracy"]),
                             recorded.metrics.get(names.LINEAGE), summary[names.LINEAGE],
                             compute.device.type)
    return summary, line
