"""ct.pipeline.push_queue and ct.pipeline.pushes: pushes wait in a bounded queue, and a push is
taken only when no other commit's chain is under way. Pure decisions, then the command line on
real workspaces (records as the job scripts leave them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from ct import workspace as names
from ct.pipeline import process, push_queue, records
from ct.pipeline.errors import PipelineError
from ct.pipeline.push_queue import Push, Settings
from ct.pipeline.records import VERDICT_RECORD
from tests.conftest import REPO

A, B, C = ("a" * 40, "b" * 40, "c" * 40)
WHEN = "2026-12-06T01:00:00Z"


def push(commit: str) -> Push:
    return Push(commit, "refs/heads/main", WHEN)


# ---------------------------------------------------------------- pure decisions


def test_all_in_order_appends_once_and_newest_keeps_only_the_newest():
    queue, said = push_queue.add([], push(A), Settings("all", 3))
    assert queue == [push(A)] and "position 1" in said
    queue, said = push_queue.add(queue, push(B), Settings("all", 3))
    assert [p.commit for p in queue] == [A, B] and "position 2" in said
    again, said = push_queue.add(queue, push(A), Settings("all", 3))
    assert again == queue and "queued already" in said
    newest, said = push_queue.add(queue, push(C), Settings("newest", 3))
    assert newest == [push(C)] and A in said and B in said and "CT_PUSH_ORDER=newest" in said


def test_a_full_queue_refuses_the_push_with_what_to_do():
    queue = [push(A), push(B)]
    with pytest.raises(PipelineError, match="NOT queued") as err:
        push_queue.add(queue, push(C), Settings("all", 2))
    assert "CT_PUSH_QUEUE_MAX=2" in str(err.value)
    # newest never fills up: the newer push replaces the waiting ones
    assert push_queue.add(queue, push(C), Settings("newest", 2))[0] == [push(C)]


def test_only_a_newer_waiting_push_under_newest_supersedes_a_run():
    assert push_queue.superseding([push(B)], A, Settings("newest")) == B
    assert push_queue.superseding([push(B)], A, Settings("all")) == ""
    assert push_queue.superseding([], A, Settings("newest")) == ""
    assert push_queue.superseding([push(A)], A, Settings("newest")) == ""


@pytest.mark.parametrize(("env", "says"), [
    ({"CT_PUSH_ORDER": "latest"}, "CT_PUSH_ORDER must be all or newest"),
    ({"CT_PUSH_QUEUE_MAX": "0"}, "CT_PUSH_QUEUE_MAX must be a whole number"),
    ({"CT_PUSH_QUEUE_MAX": "many"}, "CT_PUSH_QUEUE_MAX must be a whole number"),
])
def test_nonsense_settings_are_refused(env, says):
    with pytest.raises(PipelineError, match=says):
        push_queue.settings(env)
    assert push_queue.settings({}) == Settings("all", 20)


# ---------------------------------------------------------------- workspaces


def pushes(ws: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CT_")} | env
    return subprocess.run([sys.executable, "-m", "ct.pipeline.pushes", "--workspace", str(ws),
                           *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=60)


def queued(ws: Path) -> list[str]:
    return [p.commit for p in push_queue.load(ws)]


def with_queue(ws: Path, *commits: str) -> None:
    push_queue.save(ws, [push(c) for c in commits])


def process_record(ws: Path, role: str, commit: str, **changes: str) -> None:
    record = {"ROLE": role, "RUNTIME": "local", "CONTAINER": "pid-4242", "IMAGE": "local",
              "COMMIT": commit, "RESTARTS": "0", "STATUS": "running", "STARTED_AT": WHEN}
    process.save(ws, role, {**record, **changes})


def finished_run(ws: Path, run_id: str, mode: str = "train") -> None:
    metrics = {"accuracy": 70.0, "run_id": run_id, "run_dir": f"runs/{run_id}",
               "model": f"runs/{run_id}/model.pt", "mode": mode, "commit": A}
    (ws / "metrics.json").write_text(json.dumps(metrics))


def verdict(ws: Path, run_id: str, commit: str = A, tune: str = "false",
            judged_at: str = WHEN) -> None:
    records.save_record(ws, VERDICT_RECORD, {
        "ACCURACY": "70", "THRESHOLD": "80", "PASSED": "false", "COMMIT": commit,
        "RUN_DIR": f"runs/{run_id}", "RUN_ID": run_id, "TUNE": tune, "JUDGED_AT": judged_at},
        "test")


def take(ws: Path, *seen: str, **env: str) -> subprocess.CompletedProcess[str]:
    args = [f"--seen={s}" for s in seen] or ["--seen=train=missing"]
    return pushes(ws, "take", "--max-restarts", "3", *args, **env)


def test_job1_pushes_queue_in_order_and_job3_takes_the_oldest(tmp_path):
    for commit in (A, B, A):
        assert pushes(tmp_path, "add", "--commit", commit, "--ref", "main").returncode == 0
    assert queued(tmp_path) == [A, B]
    listed = pushes(tmp_path, "list").stdout
    assert listed.index(A) < listed.index(B)
    proc = take(tmp_path)
    assert proc.stdout.strip() == A and "1 more waiting" in proc.stderr
    assert queued(tmp_path) == [B]


def test_a_ref_with_control_characters_is_queued_as_one_line(tmp_path):
    proc = pushes(tmp_path, "add", "--commit", A, "--ref", "main\r\n\tCOMMIT=x\x1b[31m")
    assert proc.returncode == 0, proc.stderr
    (waiting,) = push_queue.load(tmp_path)
    assert waiting.ref == "main   COMMIT=x [31m"


def test_nothing_waiting_takes_nothing_and_says_so(tmp_path):
    proc = take(tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == ""
    assert "no push is waiting" in proc.stderr


def test_a_running_chain_keeps_the_push_queued(tmp_path):
    with_queue(tmp_path, B)
    process_record(tmp_path, "train", A)
    proc = take(tmp_path, "train=running")
    assert proc.stdout.strip() == "" and queued(tmp_path) == [B]
    assert f"commit {B} stays queued" in proc.stderr and "is running" in proc.stderr


def test_a_failed_run_job6_restarts_keeps_the_push_queued_unless_newest(tmp_path):
    with_queue(tmp_path, B)
    process_record(tmp_path, "train", A)
    killed = "train=ended:137:false"
    proc = take(tmp_path, killed)
    assert proc.stdout.strip() == "" and "job6 restarts it" in proc.stderr
    assert queued(tmp_path) == [B]
    # newest: the failed run of the older commit is given up, said, and never restarted
    proc = take(tmp_path, killed, CT_PUSH_ORDER="newest")
    assert proc.stdout.strip() == B and queued(tmp_path) == []
    record = process.load(tmp_path, "train")
    assert record["STATUS"] == "gave-up"
    assert f"superseded by the newer push {B}" in record["GAVE_UP"]
    assert "superseded" in proc.stderr


def test_a_finished_run_awaiting_its_verdict_keeps_the_push_queued(tmp_path):
    with_queue(tmp_path, B)
    process_record(tmp_path, "train", A, STATUS="exited", EXIT_CODE="0")
    finished_run(tmp_path, "train-a")
    proc = take(tmp_path)
    assert proc.stdout.strip() == "" and "awaits its verdict (job4)" in proc.stderr
    verdict(tmp_path, "train-a")  # job4 judged it: the chain is over
    assert take(tmp_path).stdout.strip() == B


def test_a_run_handed_to_tuning_keeps_the_push_queued_until_job5_ends(tmp_path):
    with_queue(tmp_path, B)
    process_record(tmp_path, "train", A, STATUS="exited", EXIT_CODE="0")
    finished_run(tmp_path, "train-a")
    verdict(tmp_path, "train-a", tune="true")
    proc = take(tmp_path)
    assert proc.stdout.strip() == "" and "handed to tuning (job5)" in proc.stderr
    # job5 ran and gave up for good (bad input): the chain is over
    process_record(tmp_path, "tune", A, STATUS="gave-up", GAVE_UP="bad input")
    assert take(tmp_path).stdout.strip() == B


def test_job5_with_no_round_left_ends_the_chain(tmp_path):
    with_queue(tmp_path, B)
    verdict(tmp_path, "train-a", tune="true")
    assert take(tmp_path).stdout.strip() == ""
    proc = subprocess.run([sys.executable, "-m", "ct.pipeline.after_run", "--workspace",
                           str(tmp_path), "tuning-skipped"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    assert take(tmp_path).stdout.strip() == B


def test_job6_hands_the_next_push_on_only_when_idle(tmp_path):
    with_queue(tmp_path, B, C)
    process_record(tmp_path, "train", A)
    handed = tmp_path / names.NEXT_PUSH_PROPERTIES
    proc = pushes(tmp_path, "dispatch", "--max-restarts", "3", "--seen", "train=running")
    assert proc.stdout.strip() == "" and not handed.exists()
    assert "2 push(es) waiting behind commit" in proc.stderr
    process_record(tmp_path, "train", A, STATUS="gave-up", GAVE_UP="bad input")
    proc = pushes(tmp_path, "dispatch", "--max-restarts", "3", "--seen", "train=missing")
    assert proc.stdout.strip() == B
    assert records.parse_properties(handed.read_text()) == {"COMMIT": B}
    assert queued(tmp_path) == [B, C]  # job3 takes it, not job6


def test_a_retrain_queues_the_latest_push_again(tmp_path):
    proc = pushes(tmp_path, "head", "--retrain")
    assert proc.returncode == 2 and "run job1 first" in proc.stderr
    (tmp_path / names.COMMIT_FILE).write_text(A + "\n")
    assert pushes(tmp_path, "head").stdout.strip() == ""  # a peek queues nothing
    proc = pushes(tmp_path, "head", "--retrain")
    assert proc.stdout.strip() == A and "a retrain" in proc.stderr and queued(tmp_path) == [A]
    with_queue(tmp_path, B)
    assert pushes(tmp_path, "head", "--retrain").stdout.strip() == B and queued(tmp_path) == [B]


def test_job6_does_not_restart_a_superseded_run_and_says_so(tmp_path):
    with_queue(tmp_path, B)
    process_record(tmp_path, "train", A)
    argv = [sys.executable, "-m", "ct.pipeline.process", "--workspace", str(tmp_path), "cycle",
            "--role", "train", "--runtime", "local", "--max-restarts", "3", "--seen", "ended",
            "--exit-code", "137", "--oom", "false"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CT_")}
    restart = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True)
    assert restart.stdout.strip() == "restart"  # all in order: A is restarted, B waits
    process_record(tmp_path, "train", A)
    newest = subprocess.run(argv, cwd=REPO, env={**env, "CT_PUSH_ORDER": "newest"},
                            capture_output=True, text=True)
    assert newest.stdout.strip() == "gave-up"
    assert f"superseded by the newer push {B}" in newest.stderr
    assert process.load(tmp_path, "train")["RESTARTS"] == "0"


@pytest.mark.parametrize(("content", "says"), [
    (b"\x00\xff garbage", "not UTF-8"),
    (b'{"format": 1, "pushes": [{"commit": "$(id)", "ref": "", "pushed_at": ""}]}',
     "an entry is not a push"),
    (b'{"format": 2, "pushes": []}', "not a push queue"),
    (b"[]", "not a JSON object"),
])
def test_a_damaged_queue_is_one_line_exit_2_and_nothing_taken(tmp_path, content, says):
    path = tmp_path / names.PUSHES_STATUS
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    for args in (("take", "--max-restarts", "3"), ("add", "--commit", A), ("list",)):
        proc = pushes(tmp_path, *args)
        assert proc.returncode == 2, args
        assert proc.stderr.count("\n") == 1 and says in proc.stderr and str(path) in proc.stderr
    assert path.read_bytes() == content


def test_a_queue_that_is_a_symlink_is_not_followed(tmp_path):
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"format": 1, "pushes": []}))
    ws = tmp_path / "ws"
    (ws / "status").mkdir(parents=True)
    (ws / names.PUSHES_STATUS).symlink_to(outside)
    proc = pushes(ws, "list")
    assert proc.returncode == 2 and "cannot be read" in proc.stderr


def test_a_full_queue_fails_job1_and_keeps_the_waiting_pushes(tmp_path):
    with_queue(tmp_path, A, B)
    proc = pushes(tmp_path, "add", "--commit", C, CT_PUSH_QUEUE_MAX="2")
    assert proc.returncode == 2 and "NOT queued" in proc.stderr
    assert queued(tmp_path) == [A, B]
    proc = pushes(tmp_path, "add", "--commit", "c0ffee")
    assert proc.returncode == 2 and "not a full commit id" in proc.stderr


def test_pushes_arriving_at_once_are_all_queued(tmp_path):
    """Every job1 holds the queue's lock for its read-modify-write: none is lost."""
    commits = [f"{n:040x}" for n in range(12)]
    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(lambda c: pushes(tmp_path, "add", "--commit", c), commits))
    assert all(proc.returncode == 0 for proc in results)
    assert sorted(queued(tmp_path)) == commits
