"""One run in the workspace: the training state, its checkpoints, the epoch loop, the run's clock,
and publishing the results. train.py's training mode is `train_mode`; the tuner (`tune`) runs each
trial with `train_config`; the benchmarks build their model with `TrainingState.build`.

A run lives in <workspace>/runs/<kind>-<UTC time>-<config hash>/ (file names: ct.workspace). It is
resumable until its metrics.json exists: running the same config again continues it from its last
checkpoint and ends bit for bit where an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ct import atomic
from ct import workspace as names
from ct.trainer import plots, stopping
from ct.trainer.compat import with_added_keys, without_legacy_values
from ct.trainer.data import Cifar, dataset_sha256, download, load_cifar
from ct.trainer.engine import (
    Compute,
    EpochResult,
    Lookahead,
    alternating_flips,
    evaluate,
    evaluate_as_configured,
    flips_for_epoch,
    make_optimizer,
    make_schedule,
    normalise,
    size_for_epoch,
    steps_per_epoch,
    train_epoch,
)
from ct.trainer.errors import UsageError
from ct.trainer.lineage import reproduction_line, run_lineage
from network import FastCNN, build_model

DRY_RUN_BATCHES = 3
GLANCE_IMAGES = 2000  # evaluation images looked at after every epoch, for the curves (_glance)
WHITEN_IMAGES = 5000  # training images the whitening stem is fitted to (airbench's number)
CODE_DIR = Path(__file__).resolve().parents[2]  # the checkout train.py runs from
LogLine = Callable[[str], None]  # a Log, or anything else that takes one line


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run happens (train.py's "where and how" flags), not what it learns."""

    data_dir: Path | None = None  # None: <workspace>/data
    download: bool = False
    dry_run: bool = False  # a few batches; the workspace's results untouched
    resume: bool = False  # continue the latest unfinished run, whatever its config
    fresh: bool = False  # start over even if a run of the same config is unfinished


def config_hash(cfg: dict[str, Any]) -> str:
    # Added keys at their legacy values leave the hash (a run folder's name) as it was before.
    return hashlib.sha256(json.dumps(without_legacy_values(cfg), sort_keys=True).encode()
                          ).hexdigest()[:10]


# --- the workspace ----------------------------------------------------------------------------


@dataclass
class Workspace:
    root: Path

    @property
    def runs(self) -> Path:
        return self.root / names.RUNS_DIR

    def check_writable(self) -> None:
        try:
            self.runs.mkdir(parents=True, exist_ok=True)
            atomic.write_text(self.runs / ".write-test", "ok\n")
            (self.runs / ".write-test").unlink()
        except OSError as exc:
            raise UsageError(f"cannot write to --out {self.root} ({exc.strerror}); "
                             "pick a writable folder") from exc

    def new_run_dir(self, kind: str, cfg_hash: str) -> Path:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = self.runs / f"{kind}-{stamp}-{cfg_hash}"
        suffix = 1
        while path.exists():
            suffix += 1
            path = self.runs / f"{kind}-{stamp}-{cfg_hash}-{suffix}"
        path.mkdir(parents=True)
        return path

    def unfinished_runs(self, kind: str) -> list[Path]:
        """Run folders of this kind with a config but no final metrics, newest first."""
        if not self.runs.is_dir():
            return []
        found = [d for d in self.runs.glob(f"{kind}-*")
                 if (d / names.RUN_CONFIG).is_file() and not (d / names.RUN_METRICS).exists()]
        return sorted(found, key=lambda d: d.name, reverse=True)

    def commit(self) -> str | None:
        return names.current_commit(self.root, CODE_DIR)


def choose_run_dir(ws: Workspace, kind: str, state: dict[str, Any], opts: RunOptions,
                   upgrade: Callable[[dict[str, Any]], dict[str, Any]]
                   ) -> tuple[Path, dict[str, Any], bool]:
    """Where this invocation runs, its state (a continued run keeps its stored state), and
    whether it continues an earlier run. `upgrade` fills in the keys a stored state written by an
    older train.py lacks (ct.trainer.compat), so that such a run is still found and continued."""
    if not opts.fresh:
        for run_dir in ws.unfinished_runs(kind):
            stored = read_json(run_dir / names.RUN_CONFIG)
            if isinstance(stored, dict):  # anything else matches no state
                stored = upgrade(stored)
            if opts.resume or stored == state:
                return run_dir, stored, True
    if opts.resume:
        raise UsageError(f"no unfinished {kind} run in {ws.runs} to resume; "
                         "run without --resume to start one")
    with stopping.deferred():  # no run folder without its config
        run_dir = ws.new_run_dir(kind, config_hash(state))
        atomic.write_json(run_dir / names.RUN_CONFIG, state)
    return run_dir, state, False


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is unreadable or not JSON ({exc}); "
                         "delete that run folder or pass --fresh") from exc


class Log:
    """Plain lines to stdout (the Jenkins console) and to the run's train.log."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{datetime.now(timezone.utc):%H:%M:%S} {message}"
        print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def load_data(opts: RunOptions, ws: Workspace, log: LogLine) -> Cifar:
    data_dir = opts.data_dir if opts.data_dir is not None else ws.root / names.DATA_DIR
    if opts.download:
        log(f"downloading CIFAR-10 into {data_dir}")
        download(data_dir)
    t0 = time.perf_counter()
    data = load_cifar(data_dir, cache_dir=ws.root / names.DATA_DIR)
    log(f"data {data.source}: {len(data.train_x)} train, {len(data.test_x)} test images "
        f"({time.perf_counter() - t0:.1f}s)")
    assert data.location is not None  # load_cifar always says what it read
    t0 = time.perf_counter()
    data.sha256, cached = dataset_sha256(data.location, cache_dir=ws.root / names.DATA_DIR)
    how = "cached" if cached else f"hashed in {time.perf_counter() - t0:.1f}s"
    log(f"dataset sha256 {data.sha256[:16]} ({how})")
    return data


def record_lineage(ws: Workspace, run_dir: Path, data: Cifar, cfg: dict[str, Any],
                   compute: Compute) -> dict[str, Any]:
    """The run's lineage (ct.trainer.lineage), once run_dir/model.pt is written."""
    return run_lineage(dataset_sha256=data.sha256, dataset_location=data.location,
                       seed=cfg["seed"], commit=ws.commit(), compute=compute,
                       model_path=run_dir / names.RUN_MODEL)


# --- the run's clock --------------------------------------------------------------------------


@dataclass
class RunClock:
    """A run's wall time across restarts: what its earlier processes spent (run_dir/clock.json)
    plus this process's time. Kept apart from the config and the RNGs, so timing cannot change
    what a resumed run computes; one file per run also serves --tune, whose trials each have a
    checkpoint of their own."""

    path: Path
    started: float  # time.monotonic() when this process began
    before: float = 0.0
    resumes: int = 0

    @classmethod
    def begin(cls, run_dir: Path, started: float, resumed: bool) -> RunClock:
        clock = cls(run_dir / names.RUN_CLOCK, started)
        if resumed:
            saved = _read_clock(clock.path)
            clock.before = float(saved.get("wall_seconds", 0.0))
            clock.resumes = int(saved.get("resumes", 0)) + 1
            clock.save()  # counts this restart even if it is stopped before its first checkpoint
        return clock

    def total(self) -> float:
        return self.before + time.monotonic() - self.started

    def save(self) -> None:
        atomic.write_json(self.path, {"wall_seconds": round(self.total(), 3),
                                      "resumes": self.resumes})

    @contextmanager
    def saved_on_stop(self) -> Iterator[None]:
        """A stopped process's time counts too, although its last epoch will be trained again."""
        try:
            yield
        except stopping.Stopped:
            self.save()
            raise


def _read_clock(path: Path) -> dict[str, Any]:
    # Timing is for the record only: a missing or damaged clock must not block a resume.
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


# --- the training state and its checkpoints ---------------------------------------------------


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
        if self.lookahead is not None:  # a checkpoint from before the key: no average yet
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
    was saved filled in: ct.trainer.compat)."""
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
    # A checkpoint written before some keys existed meant their legacy values (ct.trainer.compat).
    if not isinstance(recorded, dict) or with_added_keys(recorded) != cfg:
        raise UsageError(f"checkpoint {path} belongs to another config; "
                         "delete it or pass --fresh")
    return ckpt


# --- one config's training --------------------------------------------------------------------


@dataclass
class Split:
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    eval_name: str  # "test" or "validation"


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
    return Split(*moved, eval_name=name)


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
    accuracy, loss = evaluate_as_configured(state.model, split.eval_x, split.eval_y, compute,
                                            cfg, max_batches=1 if dry_run else None)
    eval_seconds = time.perf_counter() - eval_start
    images = int(len(split.train_x) * cfg["epochs"]) if not dry_run else 0
    train_seconds, name = progress.train_seconds, split.eval_name
    summary = {
        f"{name}_accuracy": round(accuracy, 2), f"{name}_loss": round(loss, 4),
        "epochs": cfg["epochs"], "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "images_per_s": round(images / max(train_seconds, 1e-9), 1),
        "optimizer_class": type(state.optimizer).__name__,
    }
    with stopping.deferred():
        atomic.write_via(run_dir / names.RUN_MODEL, lambda tmp: torch.save(
            {"config": cfg, "model": state.model.state_dict(), **summary}, tmp))
        log(f"{name} accuracy {accuracy:.2f}% loss {loss:.4f} "
            f"(train {train_seconds:.1f}s, eval {eval_seconds:.1f}s)")
        plots.draw_curves(run_dir, progress.history, log, (name, accuracy))
    return summary


def _kept(epochs_done: int) -> str:
    """What a stop leaves to resume from, for its one-line report."""
    if epochs_done == 0:
        return "no epoch had finished yet"
    return f"the checkpoint of epoch {epochs_done} is kept"


# --- publishing, and train.py's training mode -------------------------------------------------


def run_summary(ws: Workspace, run_dir: Path, compute: Compute, clock: RunClock, mode: str,
                accuracy: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": round(accuracy, 2), "mode": mode, "run_id": run_dir.name,
        "run_dir": str(run_dir.relative_to(ws.root)),
        "model": str((run_dir / names.RUN_MODEL).relative_to(ws.root)),
        "wall_time_s": round(clock.total(), 2), "resumes": clock.resumes,
        "device": compute.describe(),
        "torch": torch.__version__, "commit": ws.commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra,
    }


def publish(ws: Workspace, run_dir: Path, summary: dict[str, Any], dry_run: bool) -> None:
    """Top-level results first, the run's own metrics.json (its "finished" mark) last."""
    stopping.finishing()
    if not dry_run:
        atomic.write_text(ws.root / names.ACCURACY_FILE, f"{summary['accuracy']:.2f}\n")
        atomic.write_json(ws.root / names.METRICS_FILE, summary)
    atomic.write_json(run_dir / names.RUN_METRICS, summary)


def train_mode(opts: RunOptions, cfg: dict[str, Any], ws: Workspace, compute: Compute,
               started: float, reproduces: str | None = None) -> dict[str, Any]:
    """`train.py`: train `cfg` (or continue its unfinished run), test it, publish the results.
    A reproduction (`reproduces`: the run it repeats) leaves the top-level results alone."""
    if opts.dry_run:
        run_dir, resumed = ws.new_run_dir("dry", config_hash(cfg)), False
        atomic.write_json(run_dir / names.RUN_CONFIG, cfg)
    else:
        run_dir, cfg, resumed = choose_run_dir(ws, "train", cfg, opts, with_added_keys)
    clock = RunClock.begin(run_dir, started, resumed)
    with clock.saved_on_stop():
        log = Log(run_dir / names.RUN_LOG)
        log(f"run {run_dir.name} config {json.dumps(cfg, sort_keys=True)}")
        data = load_data(opts, ws, log)
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
    """The finished training run `run_id` of the workspace; UsageError (one line) otherwise."""
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
    return RecordedRun(run_dir, read_json(run_dir / names.RUN_CONFIG), metrics)


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
