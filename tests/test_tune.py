"""train.py --tune: an Optuna study kept in the workspace, bounded rounds, the test set touched once
by the winner, rounds that grow one study, killed trials retried once."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from ct.trainer import study as studies
from ct.trainer.config import PLAIN_RECIPE, default_config
from ct.trainer.engine import OPTIMIZERS
from ct.trainer.tune import trial_dir
from tests.conftest import REPO
from tests.synthetic_cifar import make_cifar
from tests.train_cli import run, signalled_at
from tests.tune_workspace import TUNE, EpochClock, journal, rows, the_study, tune_dir, tune_dirs


def test_a_round_tries_the_base_config_first_and_tests_only_the_best(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE,
                          "--trials", "3"], capsys)
    assert status == 0, out
    run_dir = tune_dir(tmp_path)
    trials = rows(run_dir)
    assert [t["trial"] for t in trials] == [0, 1, 2]
    default = default_config()
    assert trials[0]["params"] == {"optimizer": default["optimizer"], "lr": default["lr"],
                                   "weight_decay": default["weight_decay"], "epochs": 2,
                                   "batch_size": 64,
                                   "convs_per_block": default["convs_per_block"],
                                   "dropout": default["dropout"],
                                   "label_smoothing": default["label_smoothing"]}, \
        "trial 0 is the pushed config (no width: the default network ignores it)"
    assert trials[0]["status"] == "done", "the base config is never pruned"
    best = json.loads((run_dir / "best.json").read_text())
    done = [t for t in trials if t["status"] == "done"]
    assert best["val_accuracy"] == max(t["val_accuracy"] for t in done)
    assert best["params"] == trials[best["trial"]]["params"]
    study = the_study(tmp_path)
    assert best["study"] == study.study_name and best["trials_in_study"] == 3
    assert best["trials_finished"] + best["trials_pruned"] == 3
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mode"] == "tune" and metrics["best_params"] == best["params"]
    assert metrics["study"] == study.study_name
    assert (metrics["trials_finished"], metrics["trials_pruned"]) == (
        best["trials_finished"], best["trials_pruned"])
    assert float((tmp_path / "accuracy.txt").read_text()) == best["test_accuracy"]
    # the best trial's test, per class: the same predictions as its accuracy
    matrix = metrics["confusion_matrix"]
    assert len(metrics["per_class_accuracy"]) == 10 and (run_dir / "confusion.png").is_file()
    diagonal = sum(matrix[i][i] for i in range(10)) / sum(map(sum, matrix))
    assert round(100 * diagonal, 2) == best["test_accuracy"]
    assert (run_dir / "model.pt").read_bytes() == (
        trial_dir(run_dir, best["trial"]) / "model.pt").read_bytes()
    log = (run_dir / "train.log").read_text()
    assert log.count("test accuracy") == 0 and out.count(", test ") == 1, "tested once"
    assert f"best trial-{best['trial']:03d}" in out
    # The study holds what trials.jsonl shows: same numbers, values and states.
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert {t.number: t.value for t in study.trials if t.state == TrialState.COMPLETE} == {
        t["trial"]: t["val_accuracy"] for t in done}


@pytest.mark.parametrize("push, second", [
    (["--optimizer", "adam", "--lr", "0.003"], "recipe"),  # a push that is not the recipe
    # (slow: two more rounds; the fast suite keeps the first case)
    pytest.param(["--optimizer", "adam", "--lr", "0.003", "--no-recipe-trial"], "sampled",
                 marks=pytest.mark.slow),
    pytest.param(["--epochs", "3", "--batch-size", "512"], "sampled",  # the push is the recipe
                 marks=pytest.mark.slow),
])
def test_the_default_recipe_is_the_second_trial_unless_the_push_is_it(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str],
        push: list[str], second: str) -> None:
    status, out, _ = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE,
                          "--trials", "3", *push], capsys)
    assert status == 0, out
    trials = rows(tune_dir(tmp_path))
    assert [t["source"] for t in trials] == ["base", second, "sampled"]
    if second == "recipe":
        searched = {k: default_config()[k] for k in trials[1]["params"]}
        assert trials[1]["params"] == {**searched, "epochs": 3}, "capped by --max-epochs 3"
        assert trials[1]["status"] == "done", "a known good point is never pruned"
    assert studies.source_of(the_study(tmp_path).trials[1]) == second, "the study knows too"


def test_selection_uses_a_validation_split_not_the_test_set(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE, "--trials", "1"],
               capsys)[0] == 0
    trial = tune_dir(tmp_path) / "trial-000"
    config = json.loads((trial / "config.json").read_text())
    assert config["val_split"] == 100, "one tenth of the 1,000 training images validates"
    last_epoch = json.loads((trial / "epochs.jsonl").read_text().splitlines()[-1])
    assert last_epoch["epoch"] == 2
    log = (tune_dir(tmp_path) / "train.log").read_text()
    assert "validation accuracy" in log
    assert log.count("test accuracy") == 0, "trials are never scored on the test set"


@pytest.mark.slow  # two whole tuning rounds
def test_two_rounds_grow_one_study_and_a_changed_problem_starts_another(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE, "--trials", "2"]
    assert run(args, capsys)[0] == 0
    status, out, _ = run(args, capsys)  # the next push below the threshold
    assert status == 0, out
    assert "2 earlier trial(s); 2 slot(s) added" in out
    first, second = tune_dirs(tmp_path)
    assert [r["trial"] for r in rows(first)] == [0, 1]
    assert [r["trial"] for r in rows(second)] == [2, 3], "the second round continues the study"
    study = the_study(tmp_path)
    assert len(study.trials) == 4
    assert {t.user_attrs["round"] for t in study.trials} == {first.name, second.name}
    assert json.loads((second / "best.json").read_text())["trials_in_study"] == 4
    # Another search space (no Adam) or other data: another study in the same journal.
    assert run([*args, "--optimizers", "sgd,adamw"], capsys)[0] == 0
    other_data = make_cifar(tmp_path / "other", per_batch=200, test=200, seed=7)
    assert run(["--out", tmp_path, "--data-dir", other_data, *TUNE, "--trials", "1"],
               capsys)[0] == 0
    storage = journal(tmp_path)
    assert len(optuna.get_all_study_names(storage)) == 3
    assert len(the_study_named(storage, study.study_name).trials) == 4, "the first is untouched"


def the_study_named(storage: optuna.storages.BaseStorage, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage)


# Each epoch takes this long on the round's clock (tune_workspace.EpochClock): budgets in epochs.
EPOCH_S = 10.0


@pytest.mark.slow  # a whole round of real trials: 20-25 s on one core
def test_time_budget_bounds_the_round(tmp_path: Path, tiny_cifar_root: Path,
                                      capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials start while the budget lasts and none after it: 7.5 epochs' time fits the base
    and recipe trials (3 epochs each) and the start of sampled ones, never fifty trials."""
    EpochClock(EPOCH_S).install(monkeypatch)
    budget = 7.5 * EPOCH_S
    status, out, _ = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE, "--epochs", "3",
                          "--trials", "50", "--time-budget", str(budget)], capsys)
    assert status == 0, out
    trials = rows(tune_dir(tmp_path))
    assert [(t["source"], t["status"], t["seconds"]) for t in trials[:2]] == [
        ("base", "done", 3 * EPOCH_S), ("recipe", "done", 3 * EPOCH_S)]
    assert 3 <= len(trials) < 50
    starts = [sum(t["seconds"] for t in trials[:i]) for i in range(len(trials))]
    assert all(start < budget for start in starts), "no trial starts after the budget"
    assert starts[-1] + trials[-1]["seconds"] >= budget, "the round used its budget"
    assert f"time budget of {budget:.0f}s spent" in out
    study = the_study(tmp_path)
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING)), \
        "the round's unused slots are closed, so no later round pops them"


def test_a_restarted_round_continues_instead_of_starting_over(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE, "--trials", "2"]
    assert run(args, capsys)[0] == 0
    first = rows(tune_dir(tmp_path))
    (tune_dir(tmp_path) / "metrics.json").unlink()  # as if killed just before the end
    status, out, _ = run(args, capsys)
    assert status == 0 and "trial-00" not in out.replace("best trial-00", ""), out
    assert rows(tune_dir(tmp_path)) == first
    assert len(the_study(tmp_path).trials) == 2, "no slot added twice"


def test_a_budget_too_small_for_any_trial_is_a_clear_error(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    EpochClock(EPOCH_S).install(monkeypatch)
    (tmp_path / "accuracy.txt").write_text("70.00\n")
    status, _, err = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE,
                          "--epochs", "50", "--time-budget", str(0.5 * EPOCH_S)], capsys)
    assert status == 2 and "no trial finished" in err
    assert (tmp_path / "accuracy.txt").read_text() == "70.00\n"


def test_sigterm_mid_trial_then_the_retry_resumes_its_checkpoint_and_counts_once(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # One slot, the base config, stopped during its second epoch.
    args = ["--data-dir", tiny_cifar_root, "--tune", "--epochs", "3", "--batch-size", "32",
            "--trials", "1"]
    assert run(["--out", tmp_path / "ref", *args], capsys)[0] == 0
    ws = tmp_path / "ws"
    cmd = [sys.executable, str(REPO / "train.py"), "--out", str(ws), *map(str, args)]
    stop = signalled_at(cmd, "during epoch 2/3 of trial-000", "SIGTERM")
    assert stop.returncode == 143, stop.stderr
    (line,) = stop.stderr.splitlines()
    assert line.startswith("train.py: stopped by SIGTERM during epoch 2/3 of trial-000;"), line
    assert "the checkpoint of epoch 1 is kept" in line, line
    stopped_s = json.loads((tune_dir(ws) / "clock.json").read_text())["wall_seconds"]
    status, out, _ = run(["--out", ws, *args], capsys)
    assert status == 0, out
    assert "trial-000 lost its worker" in out
    assert "resuming trial-001 from its checkpoint after epoch 1" in out
    (done,) = [r for r in rows(tune_dir(ws)) if r["status"] == "done"]
    (reference,) = rows(tune_dir(tmp_path / "ref"))
    assert done["val_accuracy"] == reference["val_accuracy"], "resumed as if never stopped"
    states = [t.state for t in the_study(ws).trials]
    assert states == [TrialState.FAIL, TrialState.COMPLETE], "retried once, counted once"
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["accuracy"] == json.loads((tmp_path / "ref" / "metrics.json").read_text())[
        "accuracy"]
    assert metrics["resumes"] == 1 and metrics["trials_finished"] == 1
    assert metrics["wall_time_s"] > stopped_s, "the stopped process's time counts"


def test_the_search_leaves_out_a_key_the_base_network_ignores() -> None:
    """The default run's whitening stem with explicit block widths never reads `width`: searching
    it would spend trials on a flat axis. The plain base reads it, and keeps its whole space (so
    its studies keep their names)."""
    from network import build_model

    default, plain = default_config(), dict(PLAIN_RECIPE)
    narrow, wide = build_model({**default, "width": 8}), build_model({**default, "width": 32})
    assert [p.shape for p in narrow.parameters()] == [p.shape for p in wide.parameters()]
    assert "width" not in studies.search_space(["sgd"], 24, default)
    assert "width" not in studies.params_of(default, default)
    assert set(studies.SHARED) <= set(studies.search_space(["sgd"], 24, plain))
    assert studies.params_of(plain, plain)["width"] == plain["width"]


def test_every_optimizer_has_its_ranges_and_the_search_offers_them_all() -> None:
    assert set(studies.LR) == set(studies.WEIGHT_DECAY) == set(OPTIMIZERS)
    space = studies.search_space(list(OPTIMIZERS), 24, default_config())
    assert space["optimizer"].choices == OPTIMIZERS


def test_reports_reach_every_tenth_so_short_and_long_trials_compare(tmp_path: Path) -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    reported = 0
    for epoch, accuracy in enumerate([30.0, 50.0, 70.0], start=1):
        reported = studies.report(trial, reported, epoch, 3, accuracy)
    values = study.trials[0].intermediate_values
    assert sorted(values) == list(range(1, 11))
    assert (values[3], values[6], values[10]) == (30.0, 50.0, 70.0)


# --- several workers on one round -------------------------------------------------------------


@pytest.mark.slow  # a whole round of real trials: about 15 s on one core
def test_a_trial_that_cannot_finish_in_the_budget_stops_early(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sampled trial whose pace says it would end after the deadline stops at once (its time
    goes to other trials) instead of running until the deadline cuts it."""
    EpochClock(EPOCH_S).install(monkeypatch)
    # The base config's trial (1 epoch here) runs first; 12 epochs' time is left after it.
    # Sampled trials take 4 to 60 epochs, and the seeded draws here include longer ones than 12.
    budget = EPOCH_S * (1 + 12)
    status, out, _ = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, "--tune", "--epochs",
                          "1", "--batch-size", "64", "--trials", "4", "--max-epochs", "60",
                          "--no-recipe-trial", "--time-budget", str(budget)], capsys)
    assert status == 0, out
    early = [r for r in rows(tune_dir(tmp_path)) if "would not finish" in (r["ended"] or "")]
    assert early, out
    for row in early:
        assert row["status"] == "stopped" and row["params"]["epochs"] > 12
        done = (tune_dir(tmp_path) / f"trial-{row['trial']:03d}" / "epochs.jsonl").read_text()
        assert len(done.splitlines()) == 1, "stopped after its first epoch, not at the deadline"
