"""What the workspace says about a process's run, from file times: did it finish, did it get
past loading the data. Standard library only; read by ct.pipeline.process and ct.pipeline.pushes.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

from ct import workspace as names
from ct.pipeline import records
from ct.pipeline.errors import PipelineError


def _epoch_seconds(stamp: str) -> float | None:
    try:
        parsed = datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except ValueError:
        return None
    return parsed.timestamp()


def finished_since(workspace: Path, role: str, started_at: str) -> bool:
    """The workspace's metrics.json is a `role` run's (train.py writes it when a run has ended
    well) and was written after the process started."""
    since = _epoch_seconds(started_at)
    metrics_path = workspace / names.METRICS_FILE
    try:
        metrics = records.load_json_object(metrics_path, "", root=workspace)
        written = os.lstat(metrics_path).st_mtime
    except (PipelineError, OSError):
        return False
    return since is not None and metrics.get("mode") == role and written >= since


def trained_since(workspace: Path, role: str, started_at: str) -> bool:
    """A `role` run folder recorded an epoch after the process started: it got past loading
    the data. Unknown (no start time) counts as training."""
    since = _epoch_seconds(started_at)
    if since is None:
        return True
    runs, kind = workspace / names.RUNS_DIR, role.split("-")[0]
    patterns = (f"{kind}-*/{names.RUN_EPOCHS}", f"{kind}-*/trial-*/{names.RUN_EPOCHS}")
    for epochs in (path for pattern in patterns for path in runs.glob(pattern)):
        try:
            if os.lstat(epochs).st_mtime >= since:
                return True
        except OSError:
            continue
    return False
