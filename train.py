"""Train, resume and tune the CIFAR-10 CNN; the entry point of the training and tuning containers.

    python train.py                       # the default run: 87% on CIFAR-10 (README "Benchmarks")
    python train.py --preset fast         # >= 80% in about 75 s on 2 CPU cores
    python train.py --epochs 2 --subset 5000 --out /tmp/w    # a quick run
    python train.py --tune --trials 8 --time-budget 1800     # bounded search, best model kept

Outputs in --out (default: the current folder, the pipeline's workspace), each written atomically:
runs/<run-id>/ {config.json, epochs.jsonl, checkpoint.pt, model.pt, metrics.json, train.log},
then accuracy.txt and metrics.json at the top for the latest run. Running the same command again
continues an unfinished run of the same config from its last checkpoint (what `docker start` of a
killed container does); --fresh starts over, --resume continues the latest unfinished run whatever
its config. Exit 0 on success, 2 with one line on stderr for bad input, 1 for anything unexpected;
SIGTERM or SIGINT stop it at once, keeping the last checkpoint: one line on stderr, exit 143 or 130.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import torch

from ct import atomic, stopping
from ct.data import Cifar, download, load_cifar
from ct.engine import (
    Runtime,
    evaluate,
    make_optimizer,
    make_runtime,
    make_schedule,
    steps_per_epoch,
    train_epoch,
)
from ct.errors import UsageError
from network import NET_DEFAULTS, build_model, check_net_config

# ---------------------------------------------------------------------------------------------
# Defaults: every key is also a command-line flag (--batch-size for batch_size, and so on).
# Measured on 2 AMD EPYC cores with bf16 (see README "Benchmarks"); the figures are for the
# JPEG-re-encoded CIFAR-10 copy, which runs 2-3 points below the original.
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 18,  # the default run: 87% test accuracy, about 5 minutes on 2 CPU cores
    "batch_size": 512,
    "optimizer": "sgd",  # sgd (Nesterov momentum), adam or adamw
    "lr": 0.4,  # peak of a linear warm-up / linear decay schedule
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "label_smoothing": 0.2,  # softer targets: faster, better calibrated training on short budgets
    "warmup_frac": 0.2,  # share of the steps spent warming up
    "lr_schedule": "onecycle",  # "onecycle" (warm-up, then linear decay to 0) or "constant"
    "augment": True,  # random crop (pad 4) + horizontal flip, batched on the device
    "tta": True,  # evaluate on each image and its mirror
    "seed": 0,
    "subset": 0,  # use only the first N training images (0: all)
    "val_split": 0,  # hold out the last N training images for validation (tuning does)
    **NET_DEFAULTS,
}

# Named sets of overrides. "fast" is the time-to-80% recipe; "original" the starting point of
# this project, kept as the benchmark's baseline.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "fast": {"epochs": 4, "warmup_frac": 0.1, "width": 16, "blocks": 3, "convs_per_block": 2},
    "gpu": {"epochs": 16, "width": 64, "blocks": 3, "convs_per_block": 2},
    "original": {"arch": "original", "optimizer": "sgd", "lr": 0.001, "momentum": 0.0,
                 "weight_decay": 0.0, "batch_size": 20, "label_smoothing": 0.0,
                 "lr_schedule": "constant", "augment": False, "tta": False, "epochs": 30},
}

# Flags that change where or how a run happens, not what it learns (not part of the run's config).
RUN_FLAGS = ("out", "data_dir", "device", "dry_run", "resume", "fresh", "tune", "trials",
             "time_budget", "optimizers", "download", "preset")
DRY_RUN_BATCHES = 3
CLOCK = "clock.json"  # in a run folder: the wall time its earlier processes spent, and restarts


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, allow_abbrev=False,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("where and how")
    run.add_argument("--out", type=Path, default=Path("."), help="workspace to write into")
    run.add_argument("--data-dir", type=Path, help="folder with CIFAR-10 (default: OUT/data)")
    run.add_argument("--download", action="store_true", help="fetch CIFAR-10 into --data-dir")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--preset", default="default", choices=sorted(PRESETS))
    run.add_argument("--dry-run", action="store_true", help="a few batches; workspace untouched")
    run.add_argument("--resume", action="store_true", help="continue the latest unfinished run")
    run.add_argument("--fresh", action="store_true", help="start over even if a run is unfinished")
    tune = p.add_argument_group("tuning")
    tune.add_argument("--tune", action="store_true", help="search hyperparameters, keep the best")
    tune.add_argument("--trials", type=int, default=8, help="at most this many trials")
    tune.add_argument("--time-budget", type=float, default=3600.0, help="seconds for all trials")
    tune.add_argument("--optimizers", default="sgd,adam,adamw", help="optimizers the search uses")
    cfg = p.add_argument_group("training (defaults: TRAIN_DEFAULTS in train.py, then --preset)")
    for key, value in TRAIN_DEFAULTS.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            cfg.add_argument(flag, type=_parse_bool, metavar="yes|no")
        else:
            cfg.add_argument(flag, type=type(value), metavar=type(value).__name__.upper())
    return p.parse_args(argv)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "yes", "true", "on"):
        return True
    if text.lower() in ("0", "no", "false", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes or no, not {text!r}")


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """TRAIN_DEFAULTS, then the preset, then explicit flags; validated."""
    cfg = {**TRAIN_DEFAULTS, **PRESETS[args.preset]}
    for key in TRAIN_DEFAULTS:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    check_config(cfg)
    return cfg


def check_config(cfg: dict[str, Any]) -> None:
    checks = [
        (cfg["epochs"] > 0, f"--epochs must be at least 1, not {cfg['epochs']}"),
        (cfg["lr"] > 0, f"--lr must be positive, not {cfg['lr']}"),
        (cfg["batch_size"] > 0, f"--batch-size must be at least 1, not {cfg['batch_size']}"),
        (cfg["optimizer"] in ("sgd", "adam", "adamw"),
         f"--optimizer must be sgd, adam or adamw, not {cfg['optimizer']!r}"),
        (cfg["subset"] >= 0, f"--subset must be 0 (all) or positive, not {cfg['subset']}"),
        (cfg["val_split"] >= 0, f"--val-split must be 0 or positive, not {cfg['val_split']}"),
        (0 <= cfg["label_smoothing"] < 1, "--label-smoothing must be in [0, 1)"),
        (0 <= cfg["warmup_frac"] <= 1, "--warmup-frac must be in [0, 1]"),
        (cfg["lr_schedule"] in ("onecycle", "constant"),
         f"--lr-schedule must be onecycle or constant, not {cfg['lr_schedule']!r}"),
        (cfg["momentum"] >= 0 and cfg["weight_decay"] >= 0,
         "--momentum and --weight-decay must not be negative"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    try:
        check_net_config(cfg)
    except ValueError as exc:
        raise UsageError(f"--{exc}") from exc


def config_hash(cfg: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:10]


# --- the workspace ----------------------------------------------------------------------------


@dataclass
class Workspace:
    root: Path

    @property
    def runs(self) -> Path:
        return self.root / "runs"

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
                 if (d / "config.json").is_file() and not (d / "metrics.json").exists()]
        return sorted(found, key=lambda d: d.name, reverse=True)

    def commit(self) -> str | None:
        if os.environ.get("CT_COMMIT"):
            return os.environ["CT_COMMIT"]
        recorded = self.root / "commit.txt"
        if recorded.is_file() and recorded.read_text().strip():
            return recorded.read_text().strip()
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                                 capture_output=True, text=True, timeout=5, check=True)
            return out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None


def choose_run_dir(ws: Workspace, kind: str, state: dict[str, Any], args: argparse.Namespace
                   ) -> tuple[Path, dict[str, Any], bool]:
    """Where this invocation runs, its state (a continued run keeps its stored state), and
    whether it continues an earlier run."""
    if not args.fresh:
        for run_dir in ws.unfinished_runs(kind):
            stored = read_json(run_dir / "config.json")
            if args.resume or stored == state:
                return run_dir, stored, True
    if args.resume:
        raise UsageError(f"no unfinished {kind} run in {ws.runs} to resume; "
                         "run without --resume to start one")
    with stopping.deferred():  # no run folder without its config
        run_dir = ws.new_run_dir(kind, config_hash(state))
        atomic.write_json(run_dir / "config.json", state)
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
        clock = cls(run_dir / CLOCK, started)
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


# --- checkpoints ------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic.write_via(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint at `path`, checked to belong to `cfg`; UsageError when corrupt or foreign."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for a damaged file
        raise UsageError(f"checkpoint {path} is corrupt ({exc.__class__.__name__}); delete it "
                         "to restart that run, or pass --fresh") from exc
    if not isinstance(ckpt, dict) or ckpt.get("config") != cfg:
        raise UsageError(f"checkpoint {path} belongs to another config; "
                         "delete it or pass --fresh")
    return ckpt


# --- one training run -------------------------------------------------------------------------


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


def train_run(run_dir: Path, cfg: dict[str, Any], split: Split, rt: Runtime, log: Log,
              dry_run: bool = False, deadline: float | None = None,
              clock: RunClock | None = None) -> dict[str, Any]:
    """Train `cfg` in `run_dir`, continuing from its checkpoint if there is one.

    Returns the run's summary (also written to run_dir/metrics.json unless the deadline cut the
    run short, in which case "stopped" is set and the run stays resumable). `clock`, the whole
    run's (a tuning run's for a trial), is saved with every checkpoint.
    """
    ckpt_path = run_dir / "checkpoint.pt"
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg).to(rt.device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    per_epoch = steps_per_epoch(len(split.train_x), cfg["batch_size"])
    schedule = make_schedule(optimizer, cfg["epochs"] * per_epoch, cfg["warmup_frac"],
                             cfg["lr_schedule"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    history: list[dict[str, Any]] = []
    start_epoch, train_seconds = 0, 0.0
    if ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, cfg)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["torch_rng"])
        if rt.device.type == "cuda" and ckpt.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng"])
        start_epoch, train_seconds, history = ckpt["epoch"], ckpt["train_seconds"], ckpt["history"]
        log(f"resuming {run_dir.name} from its checkpoint after epoch {start_epoch}")
    max_batches = DRY_RUN_BATCHES if dry_run else None
    last_epoch = min(start_epoch + 1, cfg["epochs"]) if dry_run else cfg["epochs"]
    for epoch in range(start_epoch, last_epoch):
        if deadline is not None and time.monotonic() > deadline:
            log(f"time budget spent; {run_dir.name} stops after epoch {epoch} (resumable)")
            return {"stopped": True, "epochs_done": epoch}
        stopping.at(f"during epoch {epoch + 1}/{cfg['epochs']} of {run_dir.name}", _kept(epoch))
        result = train_epoch(model, optimizer, schedule, split.train_x, split.train_y, cfg, gen,
                             rt, max_batches)
        train_seconds += result.seconds
        row = {"epoch": epoch + 1, "loss": round(result.loss, 4),
               "train_accuracy": round(result.accuracy, 2),
               "lr": round(schedule.get_last_lr()[0], 6),
               "images_per_s": round(result.images / max(result.seconds, 1e-9), 1),
               "elapsed_s": round(train_seconds, 2)}
        history.append(row)
        with stopping.deferred():  # a stop request waits for the epoch's records to be complete
            save_checkpoint(ckpt_path, {
                "format": 1, "config": cfg, "epoch": epoch + 1, "train_seconds": train_seconds,
                "history": history, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state() if rt.device.type == "cuda" else None,
            })
            if clock is not None:
                clock.save()
            atomic.write_text(run_dir / "epochs.jsonl",
                              "".join(json.dumps(r) + "\n" for r in history))
            log(f"epoch {epoch + 1}/{cfg['epochs']} loss {row['loss']:.4f} "
                f"train accuracy {row['train_accuracy']:.2f}% lr {row['lr']:.4f} "
                f"{row['images_per_s']:.0f} img/s elapsed {train_seconds:.1f}s")
            stopping.at(f"after epoch {epoch + 1}/{cfg['epochs']} of {run_dir.name}",
                        _kept(epoch + 1))
    stopping.at(f"during the evaluation of {run_dir.name}", _kept(len(history)))
    eval_start = time.perf_counter()
    accuracy, loss = evaluate(model, split.eval_x, split.eval_y, rt, flip_tta=cfg["tta"],
                              max_batches=1 if dry_run else None)
    eval_seconds = time.perf_counter() - eval_start
    images = int(len(split.train_x) * cfg["epochs"]) if not dry_run else 0
    name = split.eval_name
    summary = {
        f"{name}_accuracy": round(accuracy, 2), f"{name}_loss": round(loss, 4),
        "epochs": cfg["epochs"], "train_seconds": round(train_seconds, 2),
        "eval_seconds": round(eval_seconds, 2),
        "images_per_s": round(images / max(train_seconds, 1e-9), 1),
        "optimizer_class": type(optimizer).__name__,
    }
    with stopping.deferred():
        atomic.write_via(run_dir / "model.pt", lambda tmp: torch.save(
            {"config": cfg, "model": model.state_dict(), **summary}, tmp))
        log(f"{split.eval_name} accuracy {accuracy:.2f}% loss {loss:.4f} "
            f"(train {train_seconds:.1f}s, eval {eval_seconds:.1f}s)")
    return summary


def _kept(epochs_done: int) -> str:
    """What a stop leaves to resume from, for its one-line report."""
    if epochs_done == 0:
        return "no epoch had finished yet"
    return f"the checkpoint of epoch {epochs_done} is kept"


# --- the two modes ----------------------------------------------------------------------------


def run_summary(ws: Workspace, run_dir: Path, rt: Runtime, clock: RunClock, mode: str,
                accuracy: float, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": round(accuracy, 2), "mode": mode, "run_id": run_dir.name,
        "run_dir": str(run_dir.relative_to(ws.root)),
        "model": str((run_dir / "model.pt").relative_to(ws.root)),
        "wall_time_s": round(clock.total(), 2), "resumes": clock.resumes,
        "device": rt.describe(),
        "torch": torch.__version__, "commit": ws.commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **extra,
    }


def publish(ws: Workspace, run_dir: Path, summary: dict[str, Any], dry_run: bool) -> None:
    """Top-level results first, the run's own metrics.json (its "finished" mark) last."""
    stopping.finishing()
    if not dry_run:
        atomic.write_text(ws.root / "accuracy.txt", f"{summary['accuracy']:.2f}\n")
        atomic.write_json(ws.root / "metrics.json", summary)
    atomic.write_json(run_dir / "metrics.json", summary)


def run_train(args: argparse.Namespace, cfg: dict[str, Any], ws: Workspace, rt: Runtime,
              started: float) -> dict[str, Any]:
    if args.dry_run:
        run_dir, resumed = ws.new_run_dir("dry", config_hash(cfg)), False
        atomic.write_json(run_dir / "config.json", cfg)
    else:
        run_dir, cfg, resumed = choose_run_dir(ws, "train", cfg, args)
    clock = RunClock.begin(run_dir, started, resumed)
    with clock.saved_on_stop():
        log = Log(run_dir / "train.log")
        log(f"run {run_dir.name} config {json.dumps(cfg, sort_keys=True)}")
        data = load_data(args, ws, log)
        split = make_split(data, cfg, rt.device)
        result = train_run(run_dir, cfg, split, rt, log, dry_run=args.dry_run, clock=clock)
        accuracy = result.pop(f"{split.eval_name}_accuracy")
        extra = {"config": cfg, "dry_run": args.dry_run, "train_images": len(split.train_x),
                 **result}
        summary = run_summary(ws, run_dir, rt, clock, "train", accuracy, extra)
        publish(ws, run_dir, summary, args.dry_run)
    return summary


def run_tune(args: argparse.Namespace, base: dict[str, Any], ws: Workspace, rt: Runtime,
             started: float) -> dict[str, Any]:
    from ct import tune

    plan = tune.make_plan(base, args.trials, args.time_budget, args.optimizers)
    run_dir, plan, resumed = choose_run_dir(ws, "tune", plan, args)
    clock = RunClock.begin(run_dir, started, resumed)
    with clock.saved_on_stop():
        log = Log(run_dir / "train.log")
        log(f"tune {run_dir.name} plan {json.dumps(plan, sort_keys=True)}")
        data = load_data(args, ws, log)
        # Each trial saves the tuning run's clock with its checkpoints.
        outcome = tune.search(run_dir, plan, data, rt, log, partial(train_run, clock=clock),
                              make_split, args.dry_run)
        extra = {"config": outcome.best_config, "best_params": outcome.best_params,
                 "val_accuracy": outcome.val_accuracy, "trials": outcome.trials_run,
                 "trials_planned": plan["trials"], "time_budget_s": plan["time_budget"],
                 "dry_run": args.dry_run}
        summary = run_summary(ws, run_dir, rt, clock, "tune", outcome.test_accuracy, extra)
        publish(ws, run_dir, summary, args.dry_run)
    return summary


def load_data(args: argparse.Namespace, ws: Workspace, log: Log) -> Cifar:
    data_dir = args.data_dir if args.data_dir is not None else ws.root / "data"
    if args.download:
        log(f"downloading CIFAR-10 into {data_dir}")
        download(data_dir)
    t0 = time.perf_counter()
    data = load_cifar(data_dir, cache_dir=ws.root / "data")
    log(f"data {data.source}: {len(data.train_x)} train, {len(data.test_x)} test images "
        f"({time.perf_counter() - t0:.1f}s)")
    return data


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    with stopping.handling_signals():
        try:
            args = parse_args(argv)
            if args.resume and args.fresh:
                raise UsageError("--resume and --fresh contradict each other; pick one")
            if args.tune and not (1 <= args.trials <= 100 and args.time_budget > 0):
                raise UsageError("--trials must be in 1..100 and --time-budget positive")
            cfg = resolve_config(args)
            ws = Workspace(args.out.resolve())
            ws.check_writable()
            rt = make_runtime(args.device)
            print(f"device {rt.describe()}, torch {torch.__version__}", flush=True)
            summary = (run_tune if args.tune else run_train)(args, cfg, ws, rt, started)
        except UsageError as exc:
            fail(str(exc))
        except stopping.Stopped as stop:
            print(f"train.py: {stopping.report(stop)}", file=sys.stderr, flush=True)
            return stop.exit_status
    print(f"accuracy {summary['accuracy']:.2f}% ({summary['mode']}, run {summary['run_id']}, "
          f"{summary['wall_time_s']:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
