"""A push that arrives while another commit trains, on the docker runtime (slow suite), the way
Jenkins runs the jobs: job3 for B while A's container trains (paused at a known point), A killed
before a job6 cycle, job6 restarting it from its checkpoint on A's code and handing it to job4,
then handing B to job3. The container sees its commit's snapshot read-only at /code, and not the
other snapshots. The local runtime's cases: tests/test_push_chains.py."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_props, run_script
from tests.push_chains import (
    assert_each_commit_judged_once,
    assert_output_trained_its_commit,
    container_stopped_itself,
    finish,
    queued,
    start,
    two_pushes,
    wait_for_first_epoch,
)


def monitor_until(env, predicate, what: str, timeout: float = 600) -> str:
    """job6 monitor cycles (as Jenkins' timer runs them) until `predicate(stderr)`."""
    deadline, seen = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        proc = run_script("job6-monitor.sh", env, "monitor")
        seen += proc.stderr
        if predicate(proc.stderr):
            return seen
        time.sleep(2)
    raise AssertionError(f"no job6 cycle saw {what}:\n{seen[-3000:]}")


@pytest.mark.docker
@pytest.mark.slow
def test_docker_push_during_training_and_a_kill_keep_every_run_on_its_commit(
    source_repo, docker_env, docker_engine, tmp_path
):
    env = {**docker_env, "CT_THRESHOLD": "5",
           "CT_TRAIN_ARGS": "--batch-size 64 --epochs 3 --seed 1"}
    ws = Path(env["CT_WORKSPACE"])
    labels = two_pushes(source_repo)
    a, b = list(labels)
    run_script("job1-pull.sh", env, str(source_repo), a)
    run_script("job2-image.sh", env)
    log = tmp_path / "job3-a.log"
    # A stops itself once its first epoch is recorded: nothing races the pause and kill below
    job3 = start("job3-train.sh", {**env, "CT_TEST_SIGNAL_AT": "SIGSTOP@after epoch 1/3 "},
                 log=log)
    wait_for_first_epoch(ws, job3, log)
    name = read_props(ws / "status" / "train.properties")["CONTAINER"]
    assert container_stopped_itself(docker_engine, name), "A did not stop itself after epoch 1"
    # the container sees A's snapshot read-only at /code and none of the others
    seen = docker_engine.docker("exec", name, "sh", "-c",
                                "ls -A /workspace/code; touch /code/x 2>&1 || echo read-only",
                                check=False)
    assert seen.strip().endswith("read-only") and a not in seen, seen
    mounts = {m["Destination"]: m for m in
              json.loads(docker_engine.docker("inspect", name))[0]["Mounts"]}
    assert mounts["/code"]["Source"] == str(ws / "code" / a) and mounts["/code"]["RW"] is False

    docker_engine.docker("pause", name)
    try:
        run_script("job1-pull.sh", env, str(source_repo), b)
        waiting = run_script("job3-train.sh", env, check=False)
        assert waiting.returncode == 3 and "is running" in waiting.stderr, waiting.stderr
        assert "restarting" not in run_script("job6-monitor.sh", env, "monitor").stderr
    finally:
        docker_engine.docker("unpause", name)
    docker_engine.docker("kill", name)
    code, out_a = finish(job3, log)
    assert code == 1 and queued(ws) == [b]

    # job6's cycles: restart A (its own code), see it finish, hand it to job4
    restarted = monitor_until(env, lambda err: "restarting it (1 of" in err, "the restart")
    assert f"commit {b}" not in restarted
    monitor_until(env, lambda err: "handing the restarted run over" in err, "A finish")
    handover = read_props(ws / "handover.properties")
    assert handover["COMMIT"] == a
    run_script("job4-gate.sh", env, handover["RUN_DIR"])
    out_restart = docker_engine.docker("logs", name)
    # the workspace is idle now: the next cycle hands B to job3
    monitor_until(env, lambda err: f"handing commit {b} to job3" in err, "B handed on")
    assert read_props(ws / "next-push.properties") == {"COMMIT": b}
    out_b = run_script("job3-train.sh", env)
    run_script("job4-gate.sh", env)

    runs_a = assert_output_trained_its_commit(ws, out_a + out_restart, labels)
    assert len(runs_a) == 1
    assert_output_trained_its_commit(ws, out_b.stdout + out_b.stderr, labels)
    assert_each_commit_judged_once(ws, labels)
    assert queued(ws) == []
    verify = subprocess.run(
        [sys.executable, "-m", "ct.pipeline.lineage", "--workspace", str(ws), "best", "--verify"],
        capture_output=True, text=True, cwd=REPO)
    said = verify.stdout + verify.stderr
    assert verify.returncode == 0 and "code not checked" not in said, said
