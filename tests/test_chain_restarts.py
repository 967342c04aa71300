"""A training process that dies, on the local runtime: job3 says whether job6 restarts it, job6
restarts it up to CT_MAX_RESTARTS times, resumes it from its checkpoint and judges it once. Real
git repositories, a real SMTP server (aiosmtpd). The deaths are deterministic: a stand-in
train.py that kills itself, or the real trainer killing itself at a named point
(ct.trainer.stopping's CT_TEST_SIGNAL_AT), never a test polling for a moment to kill it in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import git, read_props, run_script


def test_job6_bad_input_is_final_and_keeps_the_monitor_red_local(source_repo, script_env):
    """Exit 2 (bad input) would fail the same way on every restart: job3 says job6 will not
    restart it, job6 says why once and gives up, and every later cycle stays red (exit 1)."""
    env = {**script_env, "CT_TRAIN_ARGS": "--epochs -3", "CT_MAX_RESTARTS": "2"}
    ws = Path(env["CT_WORKSPACE"])
    run_script("job1-pull.sh", env, str(source_repo))
    proc = run_script("job3-train.sh", env, check=False)
    assert proc.returncode == 1
    assert "job6 will not restart it" in proc.stderr and "restarts it" not in proc.stderr
    proc = run_script("job6-monitor.sh", env, "monitor", "--follow", check=False)
    assert proc.returncode == 1
    assert "restarting it" not in proc.stderr
    assert proc.stderr.count("bad input (exit code 2") == 1
    state = read_props(ws / "status" / "train.properties")
    assert (state["STATUS"], state["EXIT_CODE"], state["RESTARTS"]) == ("gave-up", "2", "0")
    for _ in range(2):  # red until a new run replaces the record, and it keeps the exit code
        proc = run_script("job6-monitor.sh", env, "monitor", check=False)
        assert proc.returncode == 1 and "gave up" in proc.stderr and "exit code 2" in proc.stderr
    assert read_props(ws / "status" / "train.properties")["RESTARTS"] == "0"


# A stand-in for train.py (the trainer is not the point here): every process dies at once, as
# if by kill -9, and leaves its pid in a file outside the workspace first.
KILLED_AT_START = """import os, signal
with open({pids!r}, "a") as pids:
    pids.write(f"{{os.getpid()}}\\n")
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_job6_restart_limit_local(source_repo, script_env, tmp_path):
    """A run that is killed every time is restarted CT_MAX_RESTARTS times, then job6 gives up."""
    env = {**script_env, "CT_MAX_RESTARTS": "2"}
    ws = Path(env["CT_WORKSPACE"])
    pids = tmp_path / "killed.pids"
    (source_repo / "train.py").write_text(KILLED_AT_START.format(pids=str(pids)))
    git(source_repo, "commit", "-qam", "a trainer that is always killed")
    run_script("job1-pull.sh", env, str(source_repo))
    proc = run_script("job3-train.sh", env, check=False)
    assert proc.returncode == 1 and "job6 (scripts/job6-monitor.sh) restarts it" in proc.stderr
    proc = run_script("job6-monitor.sh", env, "monitor", "--follow", check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("restarting it") == 2
    assert "giving up" in proc.stderr and "CT_MAX_RESTARTS=2" in proc.stderr
    state = read_props(ws / "status" / "train.properties")
    assert (state["STATUS"], state["RESTARTS"], state["EXIT_CODE"]) == ("gave-up", "2", "137")
    assert len(set(pids.read_text().split())) == 3  # the first process and two restarts
    # the next monitor cycle does not restart it again, and stays red
    proc = run_script("job6-monitor.sh", env, "monitor", check=False)
    assert proc.returncode == 1 and "gave up" in proc.stderr
    assert read_props(ws / "status" / "train.properties")["RESTARTS"] == "2"
    assert len(pids.read_text().split()) == 3


@pytest.mark.slow  # the fast suite keeps the restart limit and the final bad input
def test_job6_follow_judges_a_restarted_run_once_local(source_repo, script_env, smtp_server):
    """The local chain's self-healing: job3 fails when its process is killed just after epoch 1's
    checkpoint; job6 --follow restarts it, it resumes from that checkpoint, and job6 runs what
    follows every finished run (lib.sh after_run): verdict, promotion and mail, once."""
    smtp, inbox = smtp_server
    env = {**script_env, **smtp, "CT_THRESHOLD": "1",
           "CT_TRAIN_ARGS": "--batch-size 32 --epochs 4 --lr 0.05 --seed 3"}
    ws = Path(env["CT_WORKSPACE"])
    run_script("job1-pull.sh", env, str(source_repo))
    # only job3's process gets the kill; the restarted one resumes past that point anyway
    killed = {**env, "CT_TEST_SIGNAL_AT": "SIGKILL@after epoch 1/4 "}
    job3 = run_script("job3-train.sh", killed, check=False)
    assert job3.returncode == 1, job3.stderr[-3000:]
    assert "job6 (scripts/job6-monitor.sh) restarts it" in job3.stderr
    assert not (ws / "gate.properties").exists() and not (ws / "metrics.json").exists()

    proc = run_script("job6-monitor.sh", env, "monitor", "--follow")
    assert "restarting it (1 of 3)" in proc.stderr
    metrics = json.loads((ws / "metrics.json").read_text())
    run = metrics["run_id"]
    assert f"resuming {run} from its checkpoint after epoch 1" in proc.stdout + proc.stderr
    epochs = [json.loads(line)["epoch"]
              for line in (ws / metrics["run_dir"] / "epochs.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3, 4]  # epoch 1 kept, not trained again
    assert read_props(ws / "gate.properties")["RUN_DIR"] == metrics["run_dir"]
    assert json.loads((ws / "best.json").read_text())["run_dir"] == metrics["run_dir"]
    assert len(inbox.messages) == 1
    assert not (ws / "handover.properties").exists()  # judged here, nothing for job4
    # what pipeline.sh and Jenkins may still do afterwards changes nothing
    assert "judged already" in run_script("job4-gate.sh", env).stderr
    proc = run_script("job6-monitor.sh", env, "monitor")
    assert "handing" not in proc.stderr
    assert len(inbox.messages) == 1
