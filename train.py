"""Train, resume and tune the CIFAR-10 CNN; the entry point of the training and tuning containers.

    python train.py                       # the default run: 89.8% on CIFAR-10 (README "Results")
    python train.py --preset fast         # 82% in 2 epochs (47-48 s on 2 bf16 CPU cores)
    python train.py --preset plain        # the plain recipe, without airbench's levers: 87%
    python train.py --epochs 2 --subset 5000 --out /tmp/w    # a quick run
    python train.py --tune --trials 30 --time-budget 3600    # a tuning round of the Optuna study
    python train.py --reproduce train-20250101-120000-0123456789   # rerun a recorded run

Outputs in --out (default: the current folder, the pipeline's workspace), each written atomically:
runs/<run-id>/ {config.json, epochs.jsonl, checkpoint.pt, curves.png, model.pt, metrics.json,
train.log, code.json} (a tuning run: also trials.jsonl, trials.png, best.json, a trial-NNN/ run per
trial; the study: studies/optuna.journal or $CT_TUNE_STORAGE's database), then accuracy.txt and
metrics.json at the top for the latest run, with the data's counts and lineage (data version,
dataset, code and model sha256, seed, commit, image, torch, device, threads). --reproduce RUN_ID
trains RUN_ID's recorded config again in a new run folder and compares the accuracies (the top-level
results stay as they are). The same command again continues an unfinished run of the same config and
code (commit, code digest) from its last checkpoint; --fresh starts over, --resume continues the
latest unfinished run of the same code whatever its config. Exit 0: success; 2: bad input (one line
on stderr); 1: anything unexpected; SIGTERM/SIGINT stop it at once, keeping the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, NoReturn

import torch

from ct.trainer import config, stopping
from ct.trainer.engine import DEVICES, OPTIMIZERS, PRECISIONS, Compute, make_compute
from ct.trainer.errors import UsageError
from ct.trainer.run import recorded_run, reproduce_mode, train_mode
from ct.trainer.runs import RunOptions, Workspace

CONFIG_DEFAULTS = """Each default below is the config `python train.py` runs: the default preset
over the plain recipe (PRESETS and PLAIN_RECIPE in ct/trainer/config.py).
Another --preset brings its own values; a flag given overrides the preset."""
SHOWN = " (default: %(default)s)"  # argparse fills the flag's default in
STALE_AFTER = 300.0  # --stale-after's default: other values need --tune


def fail(message: str, status: int = 2) -> NoReturn:
    print(f"train.py: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see --help)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__, allow_abbrev=False,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    run = p.add_argument_group("where and how").add_argument
    run("--out", type=Path, default=Path("."), help="workspace to write into")
    run("--data-dir", type=Path, help="folder with CIFAR-10 (default: OUT/data)")
    run("--increments", type=Path, metavar="DIR", help="labelled images to add (docs/data.md)")
    run("--download", action="store_true", help="fetch CIFAR-10 into --data-dir")
    run("--device", default="auto", choices=DEVICES)
    run("--precision", default="auto", choices=PRECISIONS,
        help="auto: bf16 autocast on a GPU and on CPUs with native bf16 (AVX512-BF16, AMX), "
             "fp32 elsewhere; fp32: never bf16" + SHOWN)
    run("--preset", default=config.DEFAULT_PRESET, choices=sorted(config.PRESETS),
        help="named recipe (PRESETS in ct/trainer/config.py)" + SHOWN)
    run("--dry-run", action="store_true", help="a few batches; workspace untouched")
    run("--resume", action="store_true", help="continue the latest unfinished run of this code")
    run("--fresh", action="store_true", help="start over even if a run is unfinished")
    run("--reproduce", metavar="RUN_ID",
        help="train the recorded run RUN_ID (runs/RUN_ID/config.json, its seed included) again "
             "in a new run folder and compare the accuracies")
    tune = p.add_argument_group("tuning").add_argument
    tune("--tune", action="store_true", help="search hyperparameters, keep the best")
    tune("--trials", type=int, default=30, help="at most this many trials" + SHOWN)
    tune("--time-budget", type=float, default=3600.0, help="seconds for all trials" + SHOWN)
    tune("--optimizers", default=",".join(OPTIMIZERS), help="optimizers the search uses" + SHOWN)
    tune("--max-epochs", type=int, default=24,
         help="the longest trial the search may propose" + SHOWN)
    tune("--sampler", default="tpe", choices=["tpe", "random"],
         help="how trials are proposed" + SHOWN)
    tune("--pruner", default="halving",
         help="what stops trials that fall behind: median, halving, hyperband or none" + SHOWN)
    tune("--worker", type=int, default=0, metavar="K",
         help="K >= 1: help the open round of the same flags and workspace (CT_TUNE_WORKERS "
              "starts these); 0: run the round (default)")
    tune("--recipe-trial", action=argparse.BooleanOptionalAction, default=True,
         help="try the default preset's config (its searched keys) as the round's second "
              "trial, unless the config already is that" + SHOWN)
    tune("--stale-after", type=float, default=STALE_AFTER, metavar="SECONDS",
         help="a trial without a heartbeat this long lost its worker and is retried" + SHOWN)
    cfg = p.add_argument_group("training", CONFIG_DEFAULTS)
    for key, value in config.default_config().items():
        shown = ("yes" if value else "no") if isinstance(value, bool) else value
        # argparse %-formats help text: a literal % must be doubled.
        help_line = f"{config.CONFIG_HELP[key]} (default: {shown})".replace("%", "%%")
        kind: Any = _parse_bool if isinstance(value, bool) else type(value)
        metavar = "yes|no" if isinstance(value, bool) else type(value).__name__.upper()
        cfg.add_argument("--" + key.replace("_", "-"), type=kind, metavar=metavar, help=help_line)
    return p.parse_args(argv)


def _parse_bool(text: str) -> bool:
    if text.lower() not in ("1", "yes", "true", "on", "0", "no", "false", "off"):
        raise argparse.ArgumentTypeError(f"expected yes or no, not {text!r}")
    return text.lower() in ("1", "yes", "true", "on")


def given_config_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in config.PLAIN_RECIPE if getattr(args, k) is not None}


def resolve_config(args: argparse.Namespace) -> dict[str, Any]:
    """The plain recipe, then the preset, then explicit flags; validated."""
    cfg = {**config.preset_config(args.preset), **given_config_flags(args)}
    config.check_config(cfg)
    return cfg


def check_run_flags(args: argparse.Namespace) -> None:
    if args.resume and args.fresh:
        raise UsageError("--resume and --fresh contradict each other; pick one")
    if args.tune and not (1 <= args.trials <= 100 and args.time_budget > 0):
        raise UsageError("--trials must be in 1..100 and --time-budget positive")
    if args.worker or args.stale_after != STALE_AFTER:
        if not args.tune:
            raise UsageError("--worker and --stale-after belong to --tune")
        if not (0 <= args.worker <= 64 and args.stale_after > 0):
            raise UsageError("--worker must be in 0..64 and --stale-after positive")
    if args.reproduce is not None:
        given = {"--tune": args.tune, "--resume": args.resume, "--fresh": args.fresh,
                 "--dry-run": args.dry_run, "--preset": args.preset != config.DEFAULT_PRESET,
                 **{"--" + key.replace("_", "-"): True for key in given_config_flags(args)}}
        others = [flag for flag, on in given.items() if on]
        if others:
            raise UsageError(f"--reproduce trains the recorded config as it is; drop {others[0]}")


def tune(args: argparse.Namespace, cfg: dict[str, Any], ws: Workspace, compute: Compute,
         started: float) -> dict[str, Any] | None:
    try:  # optuna is imported here only, so the training image needs none of it
        from ct.trainer.plan import TuneOptions
        from ct.trainer.tune import tune_mode
    except ImportError as exc:
        raise UsageError(f"--tune needs {exc.name} (the tuning image installs it): "
                         "pip install -r requirements-tune.txt") from exc
    flags = {f.name: getattr(args, f.name) for f in fields(TuneOptions) if f.name != "recipe"}
    tuning = TuneOptions(**flags, recipe=config.default_config() if args.recipe_trial else None)
    return tune_mode(run_options(args), cfg, ws, compute, started, tuning)


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(**{f.name: getattr(args, f.name) for f in fields(RunOptions)})


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    with stopping.handling_signals():
        try:
            args = parse_args(argv)
            check_run_flags(args)
            cfg = resolve_config(args)
            ws = Workspace(args.out.resolve())
            ws.check_writable()
            recorded = recorded_run(ws, args.reproduce) if args.reproduce is not None else None
            compute = make_compute(args.device, args.precision)
            print(f"device {compute.describe()}, torch {torch.__version__}", flush=True)
            if recorded is not None:
                summary, line = reproduce_mode(run_options(args), recorded, ws, compute, started)
                print(line, flush=True)
                return 0
            if args.tune:
                summary = tune(args, cfg, ws, compute, started)
                if summary is None:  # a helper worker: the round's owner reports
                    return 0
            else:
                summary = train_mode(run_options(args), cfg, ws, compute, started)
        except UsageError as exc:
            fail(str(exc))
        except stopping.Stopped as stop:
            print(f"train.py: {stopping.report(stop)}", file=sys.stderr, flush=True)
            return stop.exit_status
    print(f"accuracy {summary['accuracy']:.2f}% ({summary['mode']}, run {summary['run_id']}, "
          f"{summary['wall_time_s']:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    # Python's own teardown would then free torch's object graph one object at a time (about
    # 1 s after a run, 2-core Xeon VM). Every file is written, closed and renamed by now, so the
    # process leaves at once, skipping exit handlers (this project registers none).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
