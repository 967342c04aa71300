"""A tuning round's workspace as the tuning tests read it: its trials, its round folders, the study
in its journal. Not a test module."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

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


class EpochClock:
    """Stands in for the `time` module of ct.trainer.tune and ct.trainer.run (`install`): its
    clock moves only when an epoch is trained, `epoch_s` seconds each (and when a worker sleeps).
    A round's time budget then counts epochs, so what fits in it is the same on a loaded machine
    as on an idle one, where a budget timed from a probe run raced the load."""

    def __init__(self, epoch_s: float) -> None:
        self.epoch_s = epoch_s
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now

    monotonic = perf_counter = time

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from ct.trainer import run, tune
        from ct.trainer.state import TrainingState

        monkeypatch.setattr(tune, "time", self)
        monkeypatch.setattr(run, "time", self)
        run_epoch = TrainingState.run_epoch

        def timed(state: TrainingState, *args: object, **kwargs: object) -> object:
            result = run_epoch(state, *args, **kwargs)
            self.now += self.epoch_s
            return result

        monkeypatch.setattr(TrainingState, "run_epoch", timed)
