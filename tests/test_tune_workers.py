"""train.py --tune with helpers: workers share one round's trials (local processes, a PostgreSQL
study), a killed worker's trial is retried once, bad storage is refused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import optuna
import pytest
from optuna.trial import TrialState

from ct.trainer import study as studies
from ct.trainer.stopping import TEST_SIGNAL_ENV
from tests.conftest import REPO
from tests.train_cli import run
from tests.tune_workspace import TUNE, the_study, tune_dir


def worker_cmd(ws: Path, data: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--out", str(ws), "--data-dir", str(data),
            *TUNE, "--trials", "4", "--stale-after", "4", *extra]


def start_helper(ws: Path, data: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Worker 1, started and waiting for a round before the owner opens one: the owner's tiny
    trials take a second or two, so a helper still importing torch could miss them all."""
    log = ws.parent / "helper.log"
    helper = subprocess.Popen(worker_cmd(ws, data, "--epochs", "3", "--worker", "1"),
                              env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, text=True)
    hang_guard = time.monotonic() + 600  # not a speed check: only a hung helper gets near it
    while "waiting for worker 0" not in log.read_text():
        assert helper.poll() is None and time.monotonic() < hang_guard, log.read_text()
        time.sleep(0.2)
    return helper


def helper_output(helper: subprocess.Popen, ws: Path) -> str:
    helper.wait(timeout=60)
    return (ws.parent / "helper.log").read_text()


def check_round(ws: Path, slots: int, study: optuna.Study | None = None) -> dict:
    """Every slot ran exactly once (a retry replaces a lost trial), the winner tested once;
    `study` where it lives elsewhere than the workspace's journal."""
    run_dir = tune_dir(ws)
    study = study or the_study(ws)
    trials = study.trials
    retried = [t for t in trials if t.user_attrs.get("ended", "").endswith("retried")]
    ended = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(ended) == slots, [(t.number, t.state, t.user_attrs) for t in trials]
    assert len(trials) == slots + len(retried)
    assert sorted(t.user_attrs["resume_from"] for t in trials if "resume_from" in t.user_attrs
                  ) == sorted(t.number for t in retried), "each lost trial retried once"
    assert not study.get_trials(states=(TrialState.WAITING, TrialState.RUNNING))
    best = json.loads((run_dir / "best.json").read_text())
    assert (run_dir / "train.log").read_text().count("best trial-") == 1, "tested once"
    assert best["trials_finished"] + best["trials_pruned"] == slots
    return {"study": study, "best": best, "retried": retried}


def test_a_round_is_opened_to_helpers_only_once_its_slots_wait(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A helper joins when the study says the round is open and leaves when it finds no waiting
    slot: opened before its slots were enqueued (slow on PostgreSQL), a round lost its helper."""
    waiting_when_opened: list[int] = []
    set_user_attr = optuna.Study.set_user_attr

    def watched(study: optuna.Study, key: str, value: object) -> None:
        if key == studies.ROUND_ATTR and isinstance(value, dict) and value.get("open"):
            waiting_when_opened.append(len(study.get_trials(states=(TrialState.WAITING,))))
        set_user_attr(study, key, value)

    monkeypatch.setattr(optuna.Study, "set_user_attr", watched)
    status, out, _ = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE,
                          "--trials", "3", "--dry-run"], capsys)
    assert status == 0, out
    assert waiting_when_opened == [3], "every slot waits before a helper may join"


def test_a_helper_whose_round_ended_while_it_started_has_nothing_to_do(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A short round can end before a helper has imported torch: the helper then ends at once
    (exit 0) instead of waiting ten minutes for a round that will not come."""
    ws = tmp_path / "ws"
    assert run(worker_cmd(ws, tiny_cifar_root, "--trials", "1")[2:], capsys)[0] == 0
    study = the_study(ws)
    closed = study.user_attrs[studies.ROUND_ATTR]
    assert closed["open"] is False
    # As if the round had closed just after the helper started (its clock is read at start).
    study.set_user_attr(studies.ROUND_ATTR, {**closed, "closed_at": time.time() + 3600})
    helper = subprocess.run(worker_cmd(ws, tiny_cifar_root, "--trials", "1", "--worker", "1"),
                            capture_output=True, text=True, timeout=120)
    assert helper.returncode == 0, helper.stderr
    assert f"{closed['run_id']} ended before it could join" in helper.stdout
    assert len(the_study(ws).trials) == 1, "the helper added nothing to the study"


@pytest.mark.slow
def test_two_local_workers_share_a_round_without_doubling_a_trial(
        tmp_path: Path, tiny_cifar_root: Path) -> None:
    ws = tmp_path / "ws"
    helper = start_helper(ws, tiny_cifar_root)
    owner = subprocess.run(worker_cmd(ws, tiny_cifar_root, "--epochs", "3"), capture_output=True,
                           text=True, timeout=300)
    helper_out = helper_output(helper, ws)
    assert owner.returncode == 0 and helper.returncode == 0, owner.stderr + helper_out
    result = check_round(ws, slots=4)
    workers = {t.user_attrs["worker"] for t in result["study"].trials}
    assert workers == {"w0", "w1"}, "both workers ran trials"
    assert "worker 1 done" in helper_out


@pytest.mark.slow
def test_a_worker_killed_mid_trial_is_retried_once_and_the_round_finishes(
        tmp_path: Path, tiny_cifar_root: Path) -> None:
    ws = tmp_path / "ws"
    # The helper dies without a word (SIGKILL: no handler runs) after its trial's first epoch.
    helper = start_helper(ws, tiny_cifar_root,
                          {**os.environ, TEST_SIGNAL_ENV: "SIGKILL@after epoch 1/"})
    owner = subprocess.run(worker_cmd(ws, tiny_cifar_root, "--epochs", "3"), capture_output=True,
                           text=True, timeout=300)
    helper_out = helper_output(helper, ws)
    assert helper.returncode == -signal.SIGKILL, helper_out
    assert "(w1, slot" in helper_out, "the helper had started a trial"
    assert owner.returncode == 0, owner.stdout + owner.stderr
    result = check_round(ws, slots=4)
    assert len(result["retried"]) == 1 and "lost its worker" in owner.stdout


# --- bad storage ------------------------------------------------------------------------------


@pytest.mark.parametrize("url, says", [
    ("postgresql+psycopg2://ct:secret@127.0.0.1:1/ct", "OperationalError"),
    ("postgresql+psycopg2://ct@127.0.0.1:1/ct?sslmode=disable&password=secret",
     "OperationalError"),
    ("nonsense://what", "NoSuchModuleError"),
])
def test_an_unusable_database_is_one_line_and_nothing_is_published(
        tmp_path: Path, tiny_cifar_root: Path, url: str, says: str,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "accuracy.txt").write_text("70.00\n")
    monkeypatch.setenv("CT_TUNE_STORAGE", url)
    status, _, err = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE,
                          "--trials", "1"], capsys)
    assert status == 2, err
    (line,) = err.splitlines()
    assert line.startswith("train.py: error: tuning storage ") and says in line, line
    assert "secret" not in line, "the password stays out of the log"
    assert (tmp_path / "accuracy.txt").read_text() == "70.00\n"


def test_a_corrupt_journal_is_one_line_and_kept_for_inspection(
        tmp_path: Path, tiny_cifar_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = tmp_path / "studies" / "optuna.journal"
    journal.parent.mkdir()
    journal.write_text('{"op_code": 0, "worker_id": "x"\n{not json}\n{"op_code": 0}\n')
    before = journal.read_bytes()
    status, _, err = run(["--out", tmp_path, "--data-dir", tiny_cifar_root, *TUNE], capsys)
    assert status == 2
    (line,) = err.splitlines()
    assert "studies/optuna.journal is unusable" in line and "move" in line, line
    assert journal.read_bytes() == before and not (tmp_path / "metrics.json").exists()



# --- a study in PostgreSQL, shared like workers on several machines share it ------------------


def fresh_database(server_url: str, name: str) -> str:
    """An empty database of its own on the test server; its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}"'))
        connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name


@pytest.mark.slow
def test_two_workers_on_a_postgresql_study_run_each_slot_once(
        tmp_path: Path, tiny_cifar_root: Path, postgres_url: str) -> None:
    url = fresh_database(postgres_url, "ct_two_workers")
    env = {**os.environ, "CT_TUNE_STORAGE": url}
    ws = tmp_path / "ws"
    helper = start_helper(ws, tiny_cifar_root, env)
    owner = subprocess.run(worker_cmd(ws, tiny_cifar_root, "--epochs", "3"), env=env,
                           capture_output=True, text=True, timeout=300)
    helper_out = helper_output(helper, ws)
    assert owner.returncode == 0 and helper.returncode == 0, owner.stderr + helper_out
    assert not (ws / "studies").exists(), "the database holds the study, not the workspace"
    (name,) = optuna.get_all_study_names(url)
    # A retry (a heartbeat late on a loaded machine) is allowed; a slot run twice is not.
    result = check_round(ws, slots=4, study=optuna.load_study(study_name=name, storage=url))
    assert {t.user_attrs["worker"] for t in result["study"].trials} == {"w0", "w1"}
    assert result["best"]["study"] == name
    assert owner.stdout.count("best trial-") == 1 and "best trial-" not in helper_out
    assert "not-a-real-secret" not in owner.stdout + owner.stderr + helper_out
    # The next round continues the same study in the database.
    again = subprocess.run(worker_cmd(ws, tiny_cifar_root, "--epochs", "3", "--trials", "1"),
                           env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(optuna.load_study(study_name=name, storage=url).trials) == 5 + len(
        result["retried"])


def test_a_trial_just_popped_by_another_worker_is_not_taken_for_lost(tmp_path: Path) -> None:
    """Between popping a slot and its first heartbeat a trial has no heartbeat yet: its start
    time stands in, so a worker looking at that moment leaves it alone."""
    study = optuna.create_study(direction="maximize")
    rnd = studies.Round(study, "tune-x")
    rnd.enqueue({})
    storage = study._storage
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert storage.set_trial_state_values(waiting._trial_id, TrialState.RUNNING)  # popped by w1
    assert rnd.retry_lost("w0", stale_after=60.0) == []
    storage.set_trial_user_attr(waiting._trial_id, "worker", "w1")
    storage.set_trial_user_attr(waiting._trial_id, "heartbeat", 0.0)  # an ancient beat...
    assert rnd.retry_lost("w0", stale_after=60.0) == [], "...but it started a moment ago"
    assert rnd.retry_lost("w1", stale_after=60.0) == [waiting.number], "w1 restarted: its own"
    retry = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["resume_from"] for t in retry] == [waiting.number]


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:pw-secret@h/db", "postgresql://h/db"),
    ("postgresql://u@h:5432/db?password=pw-secret&sslmode=require",
     "postgresql://h:5432/db?password=***&sslmode=require"),
    ("postgresql://u:pw%40secret@h/db?PGPASSWORD=pw-secret", "postgresql://h/db?PGPASSWORD=***"),
    ("not a url pw-secret", "***"),
])
def test_a_storage_password_is_hidden_in_every_form(url: str, shown: str) -> None:
    assert studies.redact_url(url) == shown
    said = studies.redact(f"failed: {url}; the driver says {unquote(url)}", url)
    assert "secret" not in said and shown in said, said
