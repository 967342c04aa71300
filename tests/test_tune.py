"""train.py --tune: bounded by trials and time, every named optimizer used, test set untouched."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest

from ct.trainer.tune import trial_dir
from tests.conftest import REPO
from tests.test_train import stop_after
from tests.train_cli import run

TUNE = ["--tune", "--epochs", "2", "--batch-size", "64"]


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trials.jsonl").read_text().splitlines()]


def tune_dir(ws: Path) -> Path:
    (found,) = ws.glob("runs/tune-*")
    return found


def test_tune_tries_every_named_optimizer_and_keeps_the_best(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE, "--trials", "3",
                          "--optimizers", "sgd,adam,adamw"], capsys)
    assert status == 0, out
    trials = rows(tune_dir(tmp_path))
    assert len(trials) == 3 and all(t["status"] == "done" for t in trials)
    assert {t["optimizer_class"] for t in trials} == {"SGD", "Adam", "AdamW"}
    best = json.loads((tune_dir(tmp_path) / "best.json").read_text())
    assert best["val_accuracy"] == max(t["val_accuracy"] for t in trials)
    assert best["params"] == trials[best["trial"]]["params"]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mode"] == "tune" and metrics["best_params"] == best["params"]
    assert float((tmp_path / "accuracy.txt").read_text()) == best["test_accuracy"]
    assert metrics["accuracy"] == best["test_accuracy"] and metrics["trials"] == 3
    best_dir = trial_dir(tune_dir(tmp_path), best["trial"]).name
    assert (tune_dir(tmp_path) / "model.pt").read_bytes() == (
        tune_dir(tmp_path) / best_dir / "model.pt").read_bytes()
    # The log counts trials from 1 and names each trial's folder, so the two never disagree.
    assert f"trial {best['trial'] + 1}/3 ({best_dir})" in out
    assert f"best trial {best['trial'] + 1} ({best_dir})" in out


def test_selection_uses_a_validation_split_not_the_test_set(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE, "--trials", "1"],
               capsys)[0] == 0
    trial = tune_dir(tmp_path) / "trial-00"
    config = json.loads((trial / "config.json").read_text())
    assert config["val_split"] == 100, "one tenth of the 1,000 training images validates"
    last_epoch = json.loads((trial / "epochs.jsonl").read_text().splitlines()[-1])
    assert last_epoch["epoch"] == 2
    log = (tune_dir(tmp_path) / "train.log").read_text()
    assert "validation accuracy" in log
    assert log.count("test accuracy") == 0, "trials are never scored on the test set"


def test_time_budget_bounds_the_search(tmp_path: Path, tiny_cifar_root: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data-dir", tiny_cifar_root, "--tune", "--epochs", "3", "--batch-size", "64"]
    # The budget is three first trials long, measured here, so a busy machine cannot make the
    # first trial miss it while fifty trials still cannot fit.
    assert run(["--out", tmp_path / "probe", *common, "--trials", "1"], capsys)[0] == 0
    budget = max(4.0, 3 * rows(tune_dir(tmp_path / "probe"))[0]["seconds"])
    status, out, _ = run(["--out", tmp_path / "ws", *common, "--trials", "50",
                          "--time-budget", str(budget)], capsys)
    assert status == 0, out
    trials = rows(tune_dir(tmp_path / "ws"))
    assert 1 <= len(trials) < 50
    assert "time budget" in out
    assert sum(t["seconds"] for t in trials[:-1]) <= budget, "no trial starts after the budget"


def test_a_restarted_tune_continues_instead_of_starting_over(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE, "--trials", "2"]
    assert run(args, capsys)[0] == 0
    first = rows(tune_dir(tmp_path))
    (tune_dir(tmp_path) / "metrics.json").unlink()  # as if killed just before the end
    status, out, _ = run(args, capsys)
    assert status == 0 and "trial 1/2" not in out and "trial 2/2" not in out
    assert rows(tune_dir(tmp_path)) == first


def test_a_budget_too_small_for_any_trial_is_a_clear_error(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "accuracy.txt").write_text("70.00\n")
    status, _, err = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE,
                          "--epochs", "50", "--time-budget", "0.5"], capsys)
    assert status == 2 and "no trial finished" in err
    assert (tmp_path / "accuracy.txt").read_text() == "70.00\n"


def test_sigterm_stops_a_tune_that_then_continues_to_the_same_end(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One trial, the base config: batches of 32 make it long enough (3 epochs of 29 steps) to be
    # stopped inside it; sampled trials would only add time.
    args = ["--data-dir", tiny_cifar_root, "--tune", "--epochs", "3", "--batch-size", "32",
            "--trials", "1"]
    assert run(["--out", tmp_path / "ref", *args], capsys)[0] == 0
    ws = tmp_path / "ws"
    cmd = [sys.executable, str(REPO / "train.py"), "--out", str(ws), *map(str, args)]
    stop = stop_after(cmd, ["trial 1/1", "epoch 1/3"], signal.SIGTERM)
    assert stop.status == 143, stop.stderr
    (line,) = stop.stderr.splitlines()
    assert line.startswith("train.py: stopped by SIGTERM ") and "of trial-00" in line, line
    status, out, _ = run(["--out", ws, *args], capsys)
    assert status == 0 and "resuming trial-00" in out, out

    def outcome(ws: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows(tune_dir(ws))]

    assert outcome(ws) == outcome(tmp_path / "ref"), "a resumed trial ends as if never stopped"
    metrics = json.loads((ws / "metrics.json").read_text())
    reference = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert metrics["accuracy"] == reference["accuracy"]
    assert (metrics["resumes"], reference["resumes"]) == (1, 0)
    assert metrics["wall_time_s"] >= stop.ran_s, "the stopped process's time counts"
