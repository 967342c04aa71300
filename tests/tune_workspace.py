"""A tuning round's workspace as the tuning tests read it: its trials, its round folders, the study
in its journal. Not a test module."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

# Trials of at most 3 epochs on 900 images: a sampled trial takes a few seconds.
TUNE = ["--tune", "--epochs", "2", "--batch-size", "64", "--max-epochs", "3"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def tune_dirs(ws: Path) -> list[Path]:
    return sorted(ws.glob("runs/tune-*"))


def tune_dir(ws: Path) -> Path:
    (found,) = tune_dirs(ws)
    return found


def journal(ws: Path) -> optuna.storages.BaseStorage:
    return optuna.storages.journal.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(ws / "studies" / "optuna.journal")))


def the_study(ws: Path) -> optuna.Study:
    """The workspace's one study, read straight from its journal file."""
    storage = journal(ws)
    (name,) = optuna.get_all_study_names(storage)
    return optuna.load_study(study_name=name, storage=storage)
