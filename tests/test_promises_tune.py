"""The README's promises about job5, through the job scripts on the local runtime with real git
repositories and real (tiny) training and tuning: CT_MAX_TUNE_ROUNDS above 1 gives a commit that
many rounds of one study and no more; job5 stops a hung tuning process at its hard deadline (1.5 x
CT_TUNE_BUDGET + 5 min, from `ct.pipeline.process tune-deadline`); with CT_ARTIFACTS_DIR, job5
keeps the best run's curves.png for the Jenkins mail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SCRIPTS, read_props, run_script
from tests.tune_workspace import the_study

# One epoch of a narrow net on 256 images, no test-time views: a run in seconds, its accuracy far
# below the threshold of 100 these tests set. Tuning trials are as small.
SMALL = ("--batch-size 64 --epochs 1 --subset 256 --block-widths 16,32,32 --tta no "
         "--tta-translate no")


def handed_to_tuning(env: dict[str, str], source_repo: Path) -> Path:
    """job1 -> job3 -> job4 below the threshold: the run is handed to job5 (TUNE=true). The
    workspace. (job2 builds nothing on the local runtime: job3 checks the framework itself.)"""
    ws = Path(env["CT_WORKSPACE"])
    run_script("job1-pull.sh", env, str(source_repo))
    run_script("job3-train.sh", env)
    run_script("job4-gate.sh", env)
    assert read_props(ws / "gate.properties")["TUNE"] == "true"
    return ws


@pytest.fixture
def tune_env(script_env):
    # one trial per round: the pushed config itself
    return {**script_env, "CT_THRESHOLD": "100", "CT_TRAIN_ARGS": f"{SMALL} --lr 0.01 --seed 1",
            "CT_TUNE_TRIALS": "1", "CT_TUNE_ARGS": f"{SMALL} --max-epochs 1"}


def tune_rounds(ws: Path) -> list[Path]:
    return sorted(p for p in (ws / "runs").glob("tune-*") if p.is_dir())


@pytest.mark.slow
def test_max_tune_rounds_two_rounds_of_one_study_then_no_more(tune_env, source_repo):
    env = {**tune_env, "CT_MAX_TUNE_ROUNDS": "2"}
    ws = handed_to_tuning(env, source_repo)
    commit = (ws / "commit.txt").read_text().strip()

    first = run_script("job5-tune.sh", env)
    assert f"tuning round 1 of 2 for commit {commit} done" in first.stderr
    study = json.loads((ws / "metrics.json").read_text())["study"]
    after_first = len(the_study(ws).trials)
    assert after_first >= 1 and len(tune_rounds(ws)) == 1

    # the same commit handed to job5 again (a rebuild): a second round of the same study
    second = run_script("job5-tune.sh", env)
    assert f"tuning round 2 of 2 for commit {commit} done" in second.stderr
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["mode"] == "tune" and metrics["study"] == study
    assert the_study(ws).study_name == study  # still the journal's only study
    after_second = len(the_study(ws).trials)
    assert after_second > after_first
    round_best = json.loads((ws / metrics["run_dir"] / "best.json").read_text())
    assert round_best["study"] == study and round_best["trials_in_study"] == after_second
    assert len(tune_rounds(ws)) == 2
    assert read_props(ws / "status" / "tune-rounds.properties") == {"COMMIT": commit,
                                                                    "ROUNDS": "2"}

    # a third: that commit's rounds are spent; nothing is tuned, mailed or counted
    outbox = sorted((ws / "outbox").glob("*.eml"))
    third = run_script("job5-tune.sh", env)
    assert f"commit {commit} was tuned 2 time(s) already (CT_MAX_TUNE_ROUNDS=2)" in third.stderr
    assert len(the_study(ws).trials) == after_second and len(tune_rounds(ws)) == 2
    assert sorted((ws / "outbox").glob("*.eml")) == outbox and len(outbox) == 2
    assert read_props(ws / "status" / "tune-rounds.properties")["ROUNDS"] == "2"


@pytest.mark.slow  # a whole tuning round; the fast suite keeps the chain's mail with curves
def test_job5_keeps_the_best_runs_curves_for_the_mail(tune_env, source_repo, tmp_path):
    artifacts = tmp_path / "artifacts"
    ws = handed_to_tuning(tune_env, source_repo)
    run_script("job5-tune.sh", {**tune_env, "CT_ARTIFACTS_DIR": str(artifacts)})
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["mode"] == "tune"
    best = json.loads((ws / "best.json").read_text())
    assert best["run_dir"] == metrics["run_dir"]  # the round's winner is the best model now
    kept = (artifacts / "curves.png").read_bytes()
    assert kept.startswith(b"\x89PNG\r\n\x1a\n")
    # the round's picture is its winning trial's (the round's best.json names it)
    round_dir = ws / metrics["run_dir"]
    winner = json.loads((round_dir / "best.json").read_text())["trial"]
    assert kept == (round_dir / f"trial-{winner:03d}" / "curves.png").read_bytes()


@pytest.mark.parametrize(("budget", "deadline"),
                         [(0, 300), (120, 480), (3600, 5700), (3601, 5701)])
def test_tune_deadline_is_half_again_the_budget_plus_five_minutes(tmp_path, budget, deadline):
    proc = subprocess.run(
        [sys.executable, "-m", "ct.pipeline.process", "--workspace", str(tmp_path),
         "tune-deadline", "--budget", str(budget)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        check=False)
    assert (proc.returncode, proc.stdout) == (0, f"{deadline}\n"), proc.stderr


STAND_IN_PYTHON = """#!/usr/bin/env bash
# A stand-in for CT_PYTHON: `train.py --tune` hangs (a tuning process that never ends on its own),
# and job5's hard deadline is 2 s instead of 1.5 x budget + 5 min (its arithmetic is tested
# through the real command); everything else is the real interpreter.
case " $* " in
  *" tune-deadline "*) echo 2; exit 0 ;;
  *"/train.py --tune "*) exec sleep 600 ;;
esac
exec {python} "$@"
"""


@pytest.mark.slow  # a tuning round left to hang until its deadline
def test_job5_stops_a_hung_tuning_process_at_its_deadline(tune_env, source_repo, tmp_path):
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN_PYTHON.format(python=sys.executable))
    stand_in.chmod(0o755)
    env = {**tune_env, "CT_PYTHON": str(stand_in), "CT_TUNE_BUDGET": "1"}
    ws = handed_to_tuning(env, source_repo)
    job5 = subprocess.Popen([str(SCRIPTS / "job5-tune.sh")], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = job5.communicate(timeout=120)  # the hang itself lasts 600 s
    finally:
        if job5.poll() is None:
            os.killpg(job5.pid, signal.SIGKILL)
    record = read_props(ws / "status" / "tune.properties")
    name = record["CONTAINER"]
    assert f"tuning passed its hard deadline of 2s: stopping {name}" in err
    assert job5.returncode == 1, err
    assert record["EXIT_CODE"] == str(128 + signal.SIGTERM)  # stopped, as the watchdog does
    with pytest.raises(ProcessLookupError):
        os.kill(int(name.removeprefix("pid-")), 0)
    assert not (ws / "status" / "tune-w1.properties").exists()
