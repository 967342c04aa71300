"""The workspace contract: what lives where in the pipeline's workspace, and whose commit it is.

Standard library only: the trainer (in the container) writes these files, the gate and the mail
(on the Jenkins host) read them. The job scripts take the names they use from here too
(`python3 -m ct.workspace names`, read once by scripts/lib.sh).

    <workspace>/
      commit.txt                 job1: the latest pushed commit (its first word)
      code/repo.git              job1: the git repository pushes are fetched into (bare)
      code/<commit>/             job1: the commit's code, read-only, what its runs train
      data/                      CIFAR-10, and the trainer's caches of it (DATA_* names below)
      runs/<run-id>/             one training or tuning run (RUN_* names below), or a
                                 re-scoring of the best model (EVAL_RUNS)
      accuracy.txt, metrics.json the latest finished run: its accuracy, its summary
      gate.properties            ct.pipeline.gate: the verdict, for Jenkins' trigger (TUNE: job5)
      accuracy-history.csv       ct.pipeline.gate: one row per judged run
      plot/accuracy.csv          ct.pipeline.gate: this build's value (Jenkins Plot plugin)
      best.json                  ct.pipeline.promote: the best run, naming its stored model
      models/                    ct.pipeline.promote: the stored best model(s)
      best-model.pt              ct.pipeline.promote: a symlink to the model best.json names
      promotion.properties       ct.pipeline.promote: promoted or not
      outbox/                    ct.pipeline.notify: messages kept instead of (or before) mailing
      report/index.html          ct.pipeline.report: the static HTML report (Jenkins' "CT report")
      status/                    ct.pipeline.process: each training/tuning process's record;
                                 ct.pipeline.after_run: the verdict of the last judged run
      handover.properties        ct.pipeline.process: a restarted run job6 hands to job4
      next-push.properties       ct.pipeline.pushes: the queued push job6 hands to job2
      studies/optuna.journal     train.py --tune: the Optuna study every round continues
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# --- the workspace's top level
COMMIT_FILE = "commit.txt"
CODE_DIR = "code"  # one read-only snapshot per commit, and the git repository they come from
CODE_REPO = "code/repo.git"
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
REPORT_DIR = "report"
REPORT_INDEX = "report/index.html"
TUNE_JOURNAL = "studies/optuna.journal"  # the tuning study (unless CT_TUNE_STORAGE names a DB)
STATUS_DIR = "status"
IMAGE_STATUS = "status/image.properties"  # job2 (and job4 for tuning): the framework, the images
VERDICT_STATUS = "status/after-run.properties"  # the last judged run and its verdict
TUNE_ROUNDS_STATUS = "status/tune-rounds.properties"  # tuning rounds spent on the commit
HANDOVER_PROPERTIES = "handover.properties"  # job6 -> job4: a restarted run that has finished
NEXT_PUSH_PROPERTIES = "next-push.properties"  # job6 -> job2: the queued push to train next
PUSHES_STATUS = "status/pushes.json"  # the pushes waiting to be trained, oldest first
ARTIFACTS_DIR = "artifacts"  # Jenkins: artifacts/<job>/, what a build archives


def process_status(role: str) -> str:
    """The record of a training/tuning process (job3, job5, job6): how it runs and ended."""
    return f"{STATUS_DIR}/{role}.properties"


def snapshot_dir(commit: str) -> str:
    """The read-only copy of a commit's tree that its runs train (job1 writes it)."""
    return f"{CODE_DIR}/{commit}"


TRAIN_STATUS = process_status("train")
TUNE_STATUS = process_status("tune")

# --- the dataset, in DATA_DIR (or any --data-dir): the folder wins over the archive
DATA_FOLDER = "cifar-10-batches-py"
DATA_ARCHIVE = "cifar-10-python.tar.gz"
DATA_ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"  # the official download's

# --- inside a run folder, runs/<kind>-<UTC time>-<config hash>/
RUN_CONFIG = "config.json"  # the run's config (a tuning run's: its plan); written first
RUN_CODE = "code.json"  # the commit and code digest the run trains; a resume must match both
RUN_DATA = "data.json"  # the data version the run's first epoch saw; a resume must see the same
RUN_EPOCHS = "epochs.jsonl"  # one line per finished epoch
RUN_CHECKPOINT = "checkpoint.pt"  # the state after the last finished epoch: what a resume reads
RUN_CLOCK = "clock.json"  # the wall time earlier processes spent on the run, and its restarts
RUN_LOG = "train.log"
RUN_MODEL = "model.pt"  # the trained model, with its config and summary
RUN_METRICS = METRICS_FILE  # the run's summary; its presence marks the run finished
RUN_TRIALS = "trials.jsonl"  # a tuning run: one line per trial, in trial-NNN/ folders
RUN_BEST = BEST_FILE  # a tuning run: the best trial
RUN_CURVES = "curves.png"  # loss, accuracies and learning rate per epoch (when matplotlib imports)
RUN_TRIALS_PLOT = "trials.png"  # a tuning run: every trial's curve, the best highlighted
# runs/eval-<UTC time>-<model sha256[:10]>/metrics.json: a saved model re-scored on the test set
# of the data now (python -m ct.trainer.evaluate); promotion reads it (ct.pipeline.rescore)
EVAL_RUNS = "eval"

# --- inside data/ (the trainer's caches, beside the dataset or instead of it)
DATA_CACHE = "cifar-10-uint8.npz"  # the decoded dataset, keyed by its source's size and mtime
DATA_HASH_CACHE = "cifar-10-sha256.json"  # the dataset's sha256 (lineage), keyed the same way

# --- the `lineage` object in a run's metrics.json (copied into best.json on promotion)
LINEAGE = "lineage"

# The commit the trainer records when the pipeline passes it in (job3/job5 set it), and the
# digest of that commit's snapshot (code_sha256), which the run's lineage keeps.
COMMIT_ENV = "CT_COMMIT"
CODE_SHA256_ENV = "CT_CODE_SHA256"
TRAIN_ARGS_ENV = "CT_TRAIN_ARGS"  # the pipeline's training flags, recorded as train_args
# The image a run's container was started from, for its lineage (the job scripts pass them in):
# its tag (<prefix>-train:<hash>) and its id (sha256:...). Unset or LOCAL_IMAGE: no container.
IMAGE_ENV = "CT_IMAGE"
IMAGE_ID_ENV = "CT_IMAGE_ID"
LOCAL_IMAGE = "local"


_COMMIT_ID = re.compile(r"[0-9a-f]{7,64}")
NO_COMMIT = "unknown"  # what the job scripts record and show when no commit is known


def recorded_commit(workspace: Path) -> str:
    """The commit job1 checked out: the first word of commit.txt when it is a commit id (hex);
    "" when there is none. The one rule, for the host tools and the job scripts alike."""
    try:
        words = (workspace / COMMIT_FILE).read_text(encoding="utf-8").split()
    except (OSError, UnicodeDecodeError):
        return ""
    return words[0] if words and _COMMIT_ID.fullmatch(words[0]) else ""


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


# ---------------------------------------------------------------- the dataset's identity


def dataset_source(data_dir: Path) -> Path | None:
    """What a run reads in `data_dir` (which may also name the folder or archive itself): the
    cifar-10-batches-py folder (one holding test_batch) before the .tar.gz archive; None when
    neither is there. The same order as the trainer's ct.trainer.data.locate."""
    for path in (data_dir / DATA_FOLDER, data_dir / DATA_ARCHIVE, data_dir):
        if path.is_dir() and (path / "test_batch").exists():
            return path
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            return path
    return None


# What a folder's digest covers, in this order (dataset_files).
DATASET_FOLDER_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")


def dataset_files(source: Path) -> list[Path]:
    """What the dataset's sha256 covers, in this order: the archive itself, or the folder's
    DATASET_FOLDER_FILES (data_batch_1..5, test_batch, batches.meta)."""
    source = Path(source)
    return [source / name for name in DATASET_FOLDER_FILES] if source.is_dir() else [source]


def hash_files(paths: Iterable[Path], algorithm: str = "sha256") -> str:
    """The hex digest of the files' bytes one after the other (`cat PATHS | sha256sum`), read in
    1 MiB blocks. Raises OSError when a file is missing or unreadable."""
    digest = hashlib.new(algorithm)
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def dataset_sha256(source: Path) -> str:
    """The dataset's identity as the lineage records it: the sha256 of `dataset_files(source)`.
    The trainer (ct.trainer.data.dataset_sha256, which caches it) and the host's
    `ct.pipeline.lineage --verify` both call this. Raises OSError when a file is unreadable."""
    return hash_files(dataset_files(source))


def canonical_flags(text: str) -> str:
    """Command-line flags (CT_TRAIN_ARGS) in one canonical spelling, so that the same flags
    compare equal however they are spaced or quoted: the trainer records a run's this way and
    ct.pipeline.changes compares them. ValueError for unbalanced quotes."""
    return " ".join(shlex.split(text))


def code_sha256(code_dir: Path) -> str:
    """The digest of a snapshot's code: sha256 over every file's relative path and bytes, in
    path order (symlinks by their target text, never followed; __pycache__ left out). The
    launcher passes it to a run ($CT_CODE_SHA256) and `ct.pipeline.lineage --verify` recomputes
    it. Raises OSError when the folder cannot be read."""
    root = Path(code_dir)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        # a link to a folder is listed among the folders; it counts by its target text
        entries += [Path(dirpath, name) for name in dirnames if Path(dirpath, name).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames
                             if d != "__pycache__" and not Path(dirpath, d).is_symlink())
        entries += [Path(dirpath, name) for name in filenames]
    digest = hashlib.sha256()
    for path in sorted(entries, key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix().encode()
        if path.is_symlink():
            body = b"link:" + os.readlink(path).encode()
        else:
            body = b"file:" + hashlib.sha256(path.read_bytes()).hexdigest().encode()
        digest.update(rel + b"\0" + body + b"\n")
    return digest.hexdigest()


def current_image(env: Mapping[str, str] = os.environ) -> tuple[str, str | None]:
    """(tag, id) of the image this run's container runs: ("local", "local") outside a container
    ($CT_IMAGE unset or "local"); the id is None when $CT_IMAGE_ID is not passed in."""
    tag = env.get(IMAGE_ENV, "").strip()
    if not tag or tag == LOCAL_IMAGE:
        return LOCAL_IMAGE, LOCAL_IMAGE
    return tag, env.get(IMAGE_ID_ENV, "").strip() or None


# ---------------------------------------------------------------- the host tools' --workspace


def add_workspace_argument(parser: argparse.ArgumentParser) -> None:
    """--workspace W, defaulting to $CT_WORKSPACE, for the host-side tools (ct.pipeline.*)."""
    parser.add_argument("--workspace", type=Path, default=os.environ.get("CT_WORKSPACE") or None,
                        help="the pipeline workspace (default: $CT_WORKSPACE)")


def workspace_of(parser: argparse.ArgumentParser, given: Path | None) -> Path | None:
    """The workspace a tool was given, an existing folder; None after one line on stderr (the
    tool's name first), for the caller to exit 2. None given at all is argparse's usage error."""
    if given is None:
        parser.error("--workspace is required (or set CT_WORKSPACE)")
    workspace = Path(given)
    if not workspace.is_dir():
        print(f"{parser.prog}: workspace {workspace} is not a directory; check --workspace",
              file=sys.stderr)
        return None
    return workspace


# ---------------------------------------------------------------- for the job scripts

# The names scripts/lib.sh reads once (as WS_<NAME>), so that bash spells no file name itself.
SHELL_NAMES = {
    "COMMIT_FILE": COMMIT_FILE, "DATA_DIR": DATA_DIR, "RUNS_DIR": RUNS_DIR,
    "STATUS_DIR": STATUS_DIR, "DATA_FOLDER": DATA_FOLDER, "DATA_ARCHIVE": DATA_ARCHIVE,
    "OUTBOX_DIR": OUTBOX_DIR, "BEST_FILE": BEST_FILE, "HANDOVER_FILE": HANDOVER_PROPERTIES,
    "NEXT_PUSH_FILE": NEXT_PUSH_PROPERTIES, "CODE_DIR": CODE_DIR, "CODE_REPO": CODE_REPO,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ct.workspace", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("names", help="NAME=value lines of the workspace's names, for bash")
    parser.parse_args(argv)
    print("\n".join(f"{key}={value}" for key, value in SHELL_NAMES.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
