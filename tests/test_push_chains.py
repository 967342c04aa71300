"""A push that arrives while another commit trains, on the local runtime: real git repositories
with two commits whose network.py prints a marker, the job scripts run as Jenkins runs them (and
scripts/pipeline.sh as `make run` does), the run paused or killed at a known point. Every run's
recorded commit is the code it ran, each commit gets one verdict, no push is lost.

The same on the docker runtime: tests/test_push_chains_docker.py (slow suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_props, run_script
from tests.push_chains import (
    STOP_AFTER_FIRST_EPOCH,
    assert_each_commit_judged_once,
    assert_output_trained_its_commit,
    finish,
    kill,
    queued,
    resume,
    start,
    stopped_itself,
    two_pushes,
    verdicts,
)

FAST = "--batch-size 64 --epochs 2 --seed 1"


@pytest.fixture
def env(script_env):
    # every run passes the gate: no tuning here
    return {**script_env, "CT_TRAIN_ARGS": FAST, "CT_THRESHOLD": "5"}


def train_a_then_push_b(ws: Path, env, repo: Path, tmp_path: Path):
    """job1+job2 for A, job3 for A in the background until A's run stops itself after its first
    epoch, then job1 for B while A is stopped; returns (labels, job3 process, its log, A's pid).
    A stays stopped."""
    labels = two_pushes(repo)
    a, b = list(labels)
    run_script("job1-pull.sh", env, str(repo), a)
    run_script("job2-image.sh", env)
    log = tmp_path / "job3-a.log"
    job3 = start("job3-train.sh", {**env, **STOP_AFTER_FIRST_EPOCH}, log=log)
    pid = stopped_itself(ws, job3, log)
    before = (ws / "code" / a / "network.py").read_text()
    assert run_script("job1-pull.sh", env, str(repo), b).stdout.strip() == b
    assert (ws / "code" / a / "network.py").read_text() == before  # A's code is pinned
    assert queued(ws) == [b]
    return labels, job3, log, pid


def test_a_push_during_training_waits_and_each_commit_trains_its_own_code(env, source_repo,
                                                                         tmp_path):
    ws = Path(env["CT_WORKSPACE"])
    labels, job3, log, pid = train_a_then_push_b(ws, env, source_repo, tmp_path)
    b = list(labels)[1]
    try:
        waiting = run_script("job3-train.sh", env, check=False)
    finally:
        resume(pid)
    assert waiting.returncode == 3, waiting.stderr
    assert f"commit {b} stays queued" in waiting.stderr and "is running" in waiting.stderr
    code, out_a = finish(job3, log)
    assert code == 0, out_a[-3000:]
    run_script("job4-gate.sh", env)
    # job6's cycle finds the workspace idle and hands B to job3 (next-push.properties)
    run_script("job6-monitor.sh", env, "monitor")
    assert read_props(ws / "next-push.properties") == {"COMMIT": b}
    out_b = run_script("job3-train.sh", env)
    run_script("job4-gate.sh", env)
    runs_a = assert_output_trained_its_commit(ws, out_a, labels)
    runs_b = assert_output_trained_its_commit(ws, out_b.stdout + out_b.stderr, labels)
    assert runs_a.isdisjoint(runs_b)
    assert_each_commit_judged_once(ws, labels)
    assert queued(ws) == []


@pytest.mark.slow  # the fast suite keeps the push that waits for a paused run, above
def test_a_killed_run_is_restarted_on_its_own_code_and_the_push_waits_for_it(env, source_repo,
                                                                             tmp_path):
    """Killed before job3 for B: job3 must not resume A's run as B, nor drop B."""
    ws = Path(env["CT_WORKSPACE"])
    labels, job3, log, pid = train_a_then_push_b(ws, env, source_repo, tmp_path)
    b = list(labels)[1]
    kill(pid)
    code, out_a = finish(job3, log)
    assert code == 1 and "job6" in out_a
    waiting = run_script("job3-train.sh", env, check=False)
    assert waiting.returncode == 3 and "job6 restarts it" in waiting.stderr
    assert queued(ws) == [b]
    restarted = run_script("job6-monitor.sh", env, "monitor", "--follow")
    out_restart = restarted.stdout + restarted.stderr
    assert "resuming" in out_restart
    out_b = run_script("job3-train.sh", env)
    run_script("job4-gate.sh", env)
    runs_a = assert_output_trained_its_commit(ws, out_a + out_restart, labels)
    assert len(runs_a) == 1  # A's run was continued, not started again
    assert_output_trained_its_commit(ws, out_b.stdout + out_b.stderr, labels)
    assert_each_commit_judged_once(ws, labels)


@pytest.mark.slow  # a variant of the order: its decisions are unit-tested in test_pushes.py
def test_newest_order_trains_the_new_push_instead_of_restarting_the_old_one(env, source_repo,
                                                                           tmp_path):
    ws = Path(env["CT_WORKSPACE"])
    env = {**env, "CT_PUSH_ORDER": "newest"}
    labels, job3, log, pid = train_a_then_push_b(ws, env, source_repo, tmp_path)
    b = list(labels)[1]
    kill(pid)
    assert finish(job3, log)[0] == 1
    out_b = run_script("job3-train.sh", env)
    assert f"superseded by the newer push {b}" in out_b.stderr
    run_script("job4-gate.sh", env)
    cycle = run_script("job6-monitor.sh", env, "monitor")
    assert "restarting" not in cycle.stderr  # A is never restarted
    assert_output_trained_its_commit(ws, out_b.stdout + out_b.stderr, labels)
    assert [commit for commit, _ in verdicts(ws)] == [b]


@pytest.mark.slow  # the two other local cases run the same jobs, fast
def test_the_local_chain_runner_trains_the_push_that_arrived_during_its_chain(env, source_repo,
                                                                              tmp_path):
    """make run twice: the second finds A training (stopped), leaves B queued and exits 0; A is
    killed before any job6 cycle; the first runner restarts A, judges it, then trains B."""
    ws = Path(env["CT_WORKSPACE"])
    labels = two_pushes(source_repo)
    a, b = list(labels)
    log = tmp_path / "pipeline-a.log"
    # every fresh run of this runner stops itself after epoch 1: A's, and later B's
    first = start("pipeline.sh", {**env, **STOP_AFTER_FIRST_EPOCH}, str(source_repo), a, log=log)
    pid = stopped_itself(ws, first, log)
    try:
        second = run_script("pipeline.sh", env, str(source_repo), b)
    finally:
        kill(pid)
    assert "nothing trained now" in second.stderr and queued(ws) == [b]
    resume(stopped_itself(ws, first, log, not_pid=pid))  # B's run (A's resumed run goes on)
    code, out = finish(first, log)
    assert code == 0, out[-4000:]
    assert "resuming" in out and "2 push(es) trained" in out
    assert_output_trained_its_commit(ws, out, labels)
    assert_each_commit_judged_once(ws, labels)
    assert queued(ws) == []
