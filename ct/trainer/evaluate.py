"""Re-score a saved model on the test set the data holds now: the champion, before promotion
compares a run measured on a new test set with it (ct.pipeline.promote, docs/reports.md).

    python -m ct.trainer.evaluate MODEL --out WORKSPACE [--data-dir D] [--increments I]
                                  [--device auto|cpu|cuda] [--precision auto|fp32]

Run with the code of the commit that trained MODEL (its network.py builds the model back): the
pipeline runs it in that commit's training image with its snapshot on PYTHONPATH. The test set
is loaded and checked as a training run loads it (the CIFAR-10 base in --data-dir, default
WORKSPACE/data, plus the increments' test images), and the model is evaluated with its recipe's
test-time augmentation by the very code a run's test uses (evaluate_as_configured,
per_class_view). The one thing written is WORKSPACE/runs/eval-<UTC time>-<sha256[:10]>/
metrics.json (atomically): mode "eval", model, model_sha256, accuracy, per_class_accuracy,
classes, test_version, data_version, run_id, commit, device, finished_at. accuracy.txt,
metrics.json and the best model stay as they are. Exit 0; 2: bad input (a missing or corrupt
model, bad data), one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

import torch

from ct import atomic
from ct import workspace as names
from ct.trainer.engine import DEVICES, PRECISIONS, Compute, evaluate_as_configured, make_compute
from ct.trainer.errors import UsageError
from ct.trainer.run import per_class_view
from ct.trainer.runs import Log, LogLine, RunOptions, Workspace, load_data, test_version
from ct.trainer.state import load_model

KIND = names.EVAL_RUNS  # runs/eval-<UTC time>-<model sha256[:10]>/


def model_digest(path: Path) -> str:
    """The model file's sha256 (best.json's model_sha256 for a stored best model)."""
    if not path.is_file():
        raise UsageError(f"{path} is not a file; give the model to evaluate (a workspace's "
                         "best-model.pt, models/best-*.pt or runs/<id>/model.pt)")
    try:
        return names.hash_files([path])
    except OSError as exc:
        raise UsageError(f"cannot read {path} ({exc.strerror}); make it readable") from exc


def load_saved(path: Path, compute: Compute) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model and its config; UsageError for anything but a model.pt this code can build."""
    try:
        return load_model(path, compute)
    except Exception as exc:  # torch.load and load_state_dict raise many types for a bad file
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        raise UsageError(f"{path} is not a model this code can load ({reason}); give a model.pt "
                         "that train.py wrote, evaluated with the code of its commit") from exc


def evaluate_model(path: Path, ws: Workspace, opts: RunOptions, compute: Compute,
                   log: LogLine) -> dict[str, Any]:
    """Evaluate the model at `path` on the test set of the data `opts` names; write and return
    its metrics.json. The model is checked before the data is read: a bad model costs nothing."""
    sha256 = model_digest(path)
    model, cfg = load_saved(path, compute)
    data = load_data(opts, ws, log)
    test_x, test_y = data.test_x.to(compute.device), data.test_y.to(compute.device)
    predictions: list[torch.Tensor] = []
    accuracy, _ = evaluate_as_configured(model, test_x, test_y, compute, cfg,
                                         predictions=predictions)
    view = per_class_view(list(data.classes), test_y, predictions)
    run_dir = ws.new_run_dir(KIND, sha256[:10])  # only now: a failed evaluation leaves nothing
    shown = path.resolve()
    summary = {
        "mode": KIND, "run_id": run_dir.name, "run_dir": run_dir.relative_to(ws.root).as_posix(),
        "model": (shown.relative_to(ws.root).as_posix() if shown.is_relative_to(ws.root)
                  else str(shown)),
        "model_sha256": sha256, "accuracy": round(accuracy, 2),
        "per_class_accuracy": view["per_class_accuracy"], "classes": view["classes"],
        "test_version": test_version(data), "data_version": data.version,
        "commit": ws.commit(), "device": compute.describe(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic.write_json(run_dir / names.RUN_METRICS, summary)
    log(f"{path.name} (sha256 {sha256[:16]}) on test set {summary['test_version'][:16]}: "
        f"accuracy {accuracy:.2f}% over {len(test_y)} test images -> "
        f"{summary['run_dir']}/{names.RUN_METRICS}")
    return summary


# ---------------------------------------------------------------- the commands on a saved model
# (this one and ct.trainer.export): the same arguments, workspace and one-line errors


def fail(prog: str, message: str, status: int = 2) -> NoReturn:
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, f"{message} (see --help)")


def model_parser(prog: str, doc: str, verb: str, writes: str) -> OneLineParser:
    """The arguments of a command on a saved model in the pipeline's workspace."""
    parser = OneLineParser(prog=prog, description=doc.split("\n")[0])
    parser.add_argument("model", type=Path, help=f"the model.pt to {verb}")
    parser.add_argument("--out", type=Path, required=True,
                        help=f"the workspace: its data, and runs/ for {writes}")
    parser.add_argument("--data-dir", type=Path, help="folder with CIFAR-10 (default: OUT/data)")
    parser.add_argument("--increments", type=Path, metavar="DIR",
                        help="the increments folder (default: the data dir's increments/)")
    return parser


def open_workspace(out: Path) -> Workspace:
    """--out as the workspace to write into; UsageError when it is no writable folder."""
    ws = Workspace(out.resolve())
    if not ws.root.is_dir():
        raise UsageError(f"--out {out} is not a folder; give the pipeline's workspace")
    ws.check_writable()
    return ws


def main(argv: Sequence[str] | None = None) -> int:
    parser = model_parser("ct.trainer.evaluate", __doc__, "evaluate", "the result")
    parser.add_argument("--device", default="auto", choices=DEVICES)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS)
    args = parser.parse_args(argv)
    try:
        ws = open_workspace(args.out)
        compute = make_compute(args.device, args.precision)
        opts = RunOptions(data_dir=args.data_dir, increments=args.increments)
        summary = evaluate_model(args.model, ws, opts, compute, Log())
    except UsageError as exc:
        fail(parser.prog, str(exc))
    print(f"accuracy {summary['accuracy']:.2f}% (eval, run {summary['run_id']})", flush=True)
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    os._exit(status)  # as train.py: every file is written; skip torch's slow teardown
