"""What the report shows, read leniently from the workspace: the runs, the best model, the latest
run's summary and its confusion matrix picture, the accuracy history and job6's restarts. A file
that is missing or damaged is a reason shown on the page, never an exception. Standard library
only."""

from __future__ import annotations

import csv
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ct import untrusted
from ct import workspace as names
from ct.pipeline import records

_STAMP = re.compile(r"-(\d{8}-\d{6})-")  # runs/<kind>-<UTC time>-<config hash>[-n]
# A run folder's confusion-matrix picture, as ct.trainer.plots.CONFUSION names it (the host side
# imports nothing of the trainer's; tests/test_per_class.py checks that the two agree).
RUN_CONFUSION = "confusion.png"
# Everything here is the container's: read through ct.untrusted (no link below the workspace
# followed, regular files only) under these caps; JSON objects under records.MAX_READ.
MAX_TEXT = 64 << 20  # the accuracy history, the status records
MAX_PICTURE = 16 << 20


@dataclass
class Run:
    run_id: str
    path: Path
    metrics: dict[str, Any] | None
    problem: str  # why metrics is None
    has_curves: bool
    has_trials_plot: bool

    @property
    def mode(self) -> str:
        mode = (self.metrics or {}).get("mode")
        if isinstance(mode, str) and mode:
            return mode
        return self.run_id.split("-", 1)[0] if "-" in self.run_id else "?"


@dataclass
class ReportInputs:
    """What the page shows, read from one workspace."""

    root: Path
    best: dict[str, Any] | None = None
    best_problem: str = ""
    history: list[dict[str, str]] = field(default_factory=list)
    history_problem: str = ""
    latest: dict[str, Any] | None = None  # metrics.json: the latest finished run's summary
    confusion: bytes | None = None  # that run's confusion.png
    confusion_problem: str = ""  # why a confusion.png that is there cannot be shown
    runs: list[Run] = field(default_factory=list)  # newest first, all of them
    status: dict[str, dict[str, str]] = field(default_factory=dict)


def run_sort_key(path: Path) -> tuple[str, float, str]:
    """Newest first: the UTC time in the run's name, else its folder's modification time."""
    match = _STAMP.search(path.name)
    try:
        mtime = path.stat().st_mtime
    except OSError:
        mtime = 0.0
    return (match.group(1) if match else "", mtime, path.name)


def regular(root: Path, path: Path) -> bool:
    """Whether `path` is a regular file reached without a link (one the page may show)."""
    try:
        with untrusted.opened(path, MAX_PICTURE, root=root):
            return True
    except untrusted.UntrustedFile:
        return False


def read_run(root: Path, path: Path) -> Run:
    metrics, problem = records.read_json_object(path / names.RUN_METRICS, root)
    if metrics is None and problem == f"no {names.RUN_METRICS}":
        started = (path / names.RUN_CHECKPOINT).exists() or (path / names.RUN_EPOCHS).exists()
        problem += " (not finished: still running, stopped or crashed)" if started else ""
    elif metrics is not None and not records.is_percentage(metrics.get("accuracy")):
        problem = f"{names.RUN_METRICS} has accuracy {metrics.get('accuracy')!r}, not a percentage"
        metrics = None
    return Run(path.name, path, metrics, problem, regular(root, path / names.RUN_CURVES),
               regular(root, path / names.RUN_TRIALS_PLOT))


def read_history(root: Path, path: Path) -> tuple[list[dict[str, str]], str]:
    try:
        text = untrusted.read_text(path, MAX_TEXT, root=root)
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except untrusted.Missing:
        return [], ""
    except untrusted.UntrustedFile as err:
        return [], f"{path.name} cannot be read ({err.cause})"
    except csv.Error as err:
        return [], f"{path.name} cannot be read ({err})"
    good = [r for r in rows if number(r.get("accuracy")) is not None]
    skipped = len(rows) - len(good)
    return good, f"{skipped} row(s) without a readable accuracy left out" if skipped else ""


def number(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def collect(root: Path) -> ReportInputs:
    inputs = ReportInputs(root)
    best, problem = records.read_json_object(root / names.BEST_FILE, root)
    inputs.best, inputs.best_problem = best, ("" if problem == f"no {names.BEST_FILE}" else problem)
    inputs.history, inputs.history_problem = read_history(root, root / names.HISTORY_FILE)
    inputs.latest, _ = records.read_json_object(root / names.METRICS_FILE, root)
    inputs.confusion, inputs.confusion_problem = read_confusion(root, inputs.latest)
    try:
        with untrusted.folder(root, (names.RUNS_DIR,)):  # runs/ itself no link
            folders = [p for p in (root / names.RUNS_DIR).iterdir()
                       if p.is_dir() and not p.is_symlink()]
    except (untrusted.UntrustedFile, OSError):
        folders = []
    folders.sort(key=run_sort_key, reverse=True)
    inputs.runs = [read_run(root, p) for p in folders]
    for role, name in (("training", names.TRAIN_STATUS), ("tuning", names.TUNE_STATUS)):
        props = read_properties(root, root / name)
        if props:
            inputs.status[role] = props
    return inputs


def read_properties(root: Path, path: Path) -> dict[str, str]:
    """A status record for display: {} when absent, unreadable, linked or damaged."""
    try:
        return records.parse_properties(untrusted.read_text(path, MAX_TEXT, root=root))
    except (untrusted.UntrustedFile, ValueError):
        return {}


def read_confusion(root: Path, latest: dict[str, Any] | None) -> tuple[bytes | None, str]:
    """The latest run's runs/<run id>/confusion.png: (its bytes, "") or (None, why not; "" when
    the run has none, as runs from before the per-class view and tuning rounds)."""
    run_id = (latest or {}).get("run_id")
    if not isinstance(run_id, str) or not records.is_workspace_file(run_id) or "/" in run_id:
        return None, ""
    path = root / names.RUNS_DIR / run_id / RUN_CONFUSION
    try:  # copied beside the page: a link here would publish the file it points at
        return untrusted.read_bytes(path, MAX_PICTURE, root=root), ""
    except untrusted.Missing:
        return None, ""
    except untrusted.UntrustedFile as err:
        return None, f"{names.RUNS_DIR}/{run_id}/{RUN_CONFUSION} cannot be read ({err.cause})"
