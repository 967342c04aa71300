"""The workspace as the trainer sees it (`Workspace`): its run folders, which one an invocation
runs in (a new one, or the unfinished one it continues), each run's clock and log, its inputs
(the dataset, the lineage), and publishing its results.

A run lives in <workspace>/runs/<kind>-<UTC time>-<config hash>/ (file names: ct.workspace). It is
resumable until its metrics.json exists: running the same config of the same code again (the same
commit and code digest, its code.json) continues it from its last checkpoint.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ct import atomic, data_version
from ct import workspace as names
from ct.trainer import stopping
from ct.trainer.config import config_hash
from ct.trainer.data import Cifar, DataError, dataset_sha256, download, load_cifar
from ct.trainer.engine import Compute
from ct.trainer.errors import UsageError
from ct.trainer.increments import add_increments
from ct.trainer.lineage import run_lineage

CODE_DIR = Path(__file__).resolve().parents[2]  # the checkout train.py runs from
LogLine = Callable[[str], None]  # a Log, or anything else that takes one line


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run happens (train.py's "where and how" flags), not what it learns."""

    data_dir: Path | None = None  # None: <workspace>/data
    increments: Path | None = None  # None: <data dir>/increments, when there is one
    download: bool = False
    dry_run: bool = False  # a few batches; the workspace's results untouched
    resume: bool = False  # continue the latest unfinished run of this code, whatever its config
    fresh: bool = False  # start over even if a run of the same config is unfinished


@dataclass
class Workspace:
    """The folder train.py writes into (--out): run folders, the data cache, the latest results."""

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


def code_record(ws: Workspace) -> dict[str, str | None]:
    """What a run started now trains (its code.json): the commit and the digest of the commit's
    snapshot ($CT_CODE_SHA256, ct.workspace.code_sha256); None for what is not known."""
    return {"commit": ws.commit(), "code_sha256": os.environ.get(names.CODE_SHA256_ENV) or None}


def stored_code(run_dir: Path) -> dict[str, Any]:
    """A run's code.json; a run from before code.json (or with anything but an object in it)
    trains commit None and code None."""
    path = run_dir / names.RUN_CODE
    stored = read_json(path) if path.exists() else None
    stored = stored if isinstance(stored, dict) else {}
    return {"commit": stored.get("commit"), "code_sha256": stored.get("code_sha256")}


def code_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a run of `stored` code is not one of `current` code (one phrase); None: the same."""
    def which(code: dict[str, Any], key: str, what: str) -> str:
        return f"{what} {code[key]}" if code[key] is not None else f"no recorded {what}"

    if stored["commit"] != current["commit"]:
        return (f"it trains {which(stored, 'commit', 'commit')}, this is "
                f"{which(current, 'commit', 'commit')}")
    if stored["code_sha256"] != current["code_sha256"]:
        return (f"it trains {which(stored, 'code_sha256', 'code sha256')}, this is "
                f"{which(current, 'code_sha256', 'code sha256')}")
    return None


def pin_data(run_dir: Path, data_version: str) -> None:
    """The data a run trains on may not change under it: the first process records the data
    version (data.json); a later one (a restart, a resume) on other data is refused, because
    its epochs would mix two datasets."""
    path = run_dir / names.RUN_DATA
    if not path.exists():
        atomic.write_json(path, {"data_version": data_version})
        return
    recorded = read_json(path)
    then = recorded.get("data_version") if isinstance(recorded, dict) else None
    if then != data_version:
        raise UsageError(f"{run_dir.name} began on data version {then}, the data now is "
                         f"{data_version} (increments added or removed): it cannot continue on "
                         "other data; put the data back, or pass --fresh to start over")


def start_run_dir(ws: Workspace, kind: str, state: dict[str, Any]) -> Path:
    """A new run folder with its config.json and code.json, never one without them."""
    with stopping.deferred():
        run_dir = ws.new_run_dir(kind, config_hash(state))
        atomic.write_json(run_dir / names.RUN_CONFIG, state)
        atomic.write_json(run_dir / names.RUN_CODE, code_record(ws))
    return run_dir


def choose_run_dir(ws: Workspace, kind: str, state: dict[str, Any], opts: RunOptions,
                   upgrade: Callable[[dict[str, Any]], dict[str, Any]]
                   ) -> tuple[Path, dict[str, Any], bool]:
    """Where this invocation runs, its state (a continued run keeps its stored state), and
    whether it continues an earlier run: the latest unfinished one of the same state (any state
    with --resume) whose code.json names this invocation's commit and code digest. `upgrade`
    fills in the keys a stored state lacks when it was recorded before they existed
    (ct.trainer.config.with_added_keys), so that such a run is still found and continued. Each
    run passed over for its code alone gets one line in the log."""
    code = code_record(ws)
    skipped: list[str] = []
    chosen: tuple[Path, dict[str, Any], bool] | None = None
    if not opts.fresh:
        for run_dir in ws.unfinished_runs(kind):
            stored = read_json(run_dir / names.RUN_CONFIG)
            if isinstance(stored, dict):  # anything else matches no state
                stored = upgrade(stored)
            if not (opts.resume or stored == state):
                continue
            why = code_difference(stored_code(run_dir), code)
            if why is None:
                chosen = run_dir, stored, True
                break
            skipped.append(f"not continuing {names.RUNS_DIR}/{run_dir.name}: {why}")
    if chosen is None and opts.resume:
        raise UsageError(f"no unfinished {kind} run of this code in {ws.runs} to resume"
                         + (f" ({skipped[0]})" if skipped else "")
                         + "; run without --resume to start one")
    if chosen is None:
        chosen = start_run_dir(ws, kind, state), state, False
    log = Log(chosen[0] / names.RUN_LOG)
    for line in skipped:
        log(line)
    return chosen


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
    # Every image is checked here, before the run trains a step: bad data publishes nothing.
    t0 = time.perf_counter()
    data = add_increments(data, data_dir, opts.increments, ws.root / names.DATA_DIR, log)
    log(f"data version {data.version[:16]}: {len(data.train_x)} train, {len(data.test_x)} test "
        f"images ({time.perf_counter() - t0:.1f}s)")
    _TEST_VERSIONS[data.version] = _test_version(data, data_dir, opts.increments, ws)
    return data


# The test version (ct.data_version.test_version) of each data version this process loaded.
# A Cifar carries its data version alone; the test version is a function of the same images,
# so the data version is a sound key for it.
_TEST_VERSIONS: dict[str, str] = {}


def test_version(data: Cifar) -> str | None:
    """The test set's identity of data that load_data loaded; None for data loaded otherwise."""
    return _TEST_VERSIONS.get(data.version)


def _test_version(data: Cifar, data_dir: Path, given: Path | None, ws: Workspace) -> str:
    """The increments listed once more (their digests come from the cache add_increments has
    just written: no image is read again), down to the test images' entries."""
    try:
        version = data_version.compute(data_dir, given, base=data.sha256,
                                       cache_dir=ws.root / names.DATA_DIR)
    except data_version.DataVersionError as err:
        raise DataError(str(err)) from None
    if version.version != data.version:
        raise DataError(f"the increments in {version.increments_dir} changed while this run "
                        "read them; run it again once they are complete")
    return data_version.test_version(version)


def record_lineage(ws: Workspace, run_dir: Path, data: Cifar, cfg: dict[str, Any],
                   compute: Compute) -> dict[str, Any]:
    """The run's lineage (ct.trainer.lineage), once run_dir/model.pt is written."""
    return run_lineage(dataset_sha256=data.sha256, dataset_location=data.location,
                       data_version=data.version, data=data.record,
                       seed=cfg["seed"], commit=ws.commit(), compute=compute,
                       model_path=run_dir / names.RUN_MODEL, test_version=test_version(data))


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


# --- publishing -------------------------------------------------------------------------------


def run_summary(ws: Workspace, run_dir: Path, compute: Compute, clock: RunClock, mode: str,
                accuracy: float, extra: dict[str, Any]) -> dict[str, Any]:
    """The run's metrics.json. The data's version, its test set's and its counts
    (`data_version`, `test_version`, `data`) come from the lineage in `extra` (record_lineage),
    to the top level where readers (promotion: the test set) look first."""
    lineage = extra.get(names.LINEAGE)
    data = {key: lineage[key] for key in ("data_version", "test_version", "data")
            if isinstance(lineage, dict) and key in lineage}
    return {
        "accuracy": round(accuracy, 2), "mode": mode, "run_id": run_dir.name,
        "run_dir": str(run_dir.relative_to(ws.root)),
        "model": str((run_dir / names.RUN_MODEL).relative_to(ws.root)),
        "wall_time_s": round(clock.total(), 2), "resumes": clock.resumes,
        "device": compute.describe(),
        "torch": torch.__version__, "commit": ws.commit(),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **data,
        **extra,
    }


def publish(ws: Workspace, run_dir: Path, summary: dict[str, Any], dry_run: bool) -> None:
    """Top-level results first, the run's own metrics.json (its "finished" mark) last."""
    stopping.finishing()
    if not dry_run:
        atomic.write_text(ws.root / names.ACCURACY_FILE, f"{summary['accuracy']:.2f}\n")
        atomic.write_json(ws.root / names.METRICS_FILE, summary)
    atomic.write_json(run_dir / names.RUN_METRICS, summary)
