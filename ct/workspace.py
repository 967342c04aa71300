"""The workspace contract: what lives where in the pipeline's workspace, and whose commit it is.

Standard library only: the trainer (in the container) writes these files, the gate and the mail
(on the Jenkins host) read them. The job scripts keep their own copy of the names they use
(scripts/lib.sh), since bash cannot import this.

    <workspace>/
      commit.txt                 job1: the commit checked out (its first word)
      data/                      CIFAR-10, and the trainer's decoded cache of it
      runs/<run-id>/             one training or tuning run (RUN_* names below)
      accuracy.txt, metrics.json the latest finished run: its accuracy, its summary
      gate.properties            ct.pipeline.gate check: the verdict, for Jenkins' trigger
      accuracy-history.csv       ct.pipeline.gate check: one row per judged run
      plot/accuracy.csv          ct.pipeline.gate check: this build's value (Jenkins Plot plugin)
      best.json                  ct.pipeline.gate promote: the best run, naming its stored model
      models/                    ct.pipeline.gate promote: the stored best model(s)
      best-model.pt              ct.pipeline.gate promote: a symlink to the model best.json names
      promotion.properties       ct.pipeline.gate promote: promoted or not
      outbox/                    ct.pipeline.notify: messages kept instead of (or before) mailing
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# --- the workspace's top level
COMMIT_FILE = "commit.txt"
DATA_DIR = "data"
RUNS_DIR = "runs"
ACCURACY_FILE = "accuracy.txt"
METRICS_FILE = "metrics.json"
GATE_PROPERTIES = "gate.properties"
HISTORY_FILE = "accuracy-history.csv"
PLOT_FILE = "plot/accuracy.csv"
BEST_FILE = "best.json"
MODELS_DIR = "models"  # the stored best models, each named by its content
BEST_MODEL = "best-model.pt"  # what users open: a symlink to the model best.json names
PROMOTION_PROPERTIES = "promotion.properties"
OUTBOX_DIR = "outbox"

# --- inside a run folder, runs/<kind>-<UTC time>-<config hash>/
RUN_CONFIG = "config.json"  # the run's config (a tuning run's: its plan); written first
RUN_EPOCHS = "epochs.jsonl"  # one line per finished epoch
RUN_CHECKPOINT = "checkpoint.pt"  # the state after the last finished epoch: what a resume reads
RUN_CLOCK = "clock.json"  # the wall time earlier processes spent on the run, and its restarts
RUN_LOG = "train.log"
RUN_MODEL = "model.pt"  # the trained model, with its config and summary
RUN_METRICS = METRICS_FILE  # the run's summary; its presence marks the run finished
RUN_TRIALS = "trials.jsonl"  # a tuning run: one line per trial, in trial-NN/ folders
RUN_BEST = BEST_FILE  # a tuning run: the best trial

# The commit the trainer records when the pipeline passes it in (job3/job5 set it).
COMMIT_ENV = "CT_COMMIT"


def recorded_commit(workspace: Path) -> str:
    """The commit job1 checked out (the first word of commit.txt); "" when there is none."""
    try:
        words = (workspace / COMMIT_FILE).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return ""
    return words[0] if words else ""


def commit_of_run(workspace: Path, metrics: Mapping[str, Any] | None) -> str:
    """The commit that produced a finished run: its metrics.json's, else commit.txt's, else ""."""
    if metrics and isinstance(metrics.get("commit"), str) and metrics["commit"].strip():
        return metrics["commit"].strip()
    return recorded_commit(workspace)


def current_commit(workspace: Path, code_dir: Path, env: Mapping[str, str] = os.environ
                   ) -> str | None:
    """The commit a run now starting trains: $CT_COMMIT, else commit.txt's, else the HEAD of the
    git checkout `code_dir` (a run outside the pipeline), else None."""
    if env.get(COMMIT_ENV):
        return env[COMMIT_ENV]
    recorded = recorded_commit(workspace)
    if recorded:
        return recorded
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=code_dir, capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
