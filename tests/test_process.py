"""ct.pipeline.process: how a training/tuning process stands and what job6 does about it, as pure
decisions, through its command line, and through job6-monitor.sh on a damaged record."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ct.pipeline import process, records
from ct.pipeline.process import Seen, classify_end, decide
from tests.conftest import REPO, run_script

RECORD = {"ROLE": "train", "RUNTIME": "docker", "CONTAINER": "ct-train-0123456789ab",
          "IMAGE": "ct-cifar-train:0123456789abcdef", "COMMIT": "0123abcd", "RESTARTS": "0",
          "STATUS": "running", "STARTED_AT": "2026-12-06T01:00:00Z"}


def cycle(record: dict[str, str], seen: Seen, **kw) -> process.Decision:
    options = {"max_restarts": 3, "follow": False, "finished_well": False} | kw
    return decide(record, seen, **options)


# ---------------------------------------------------------------- decisions


def test_a_running_process_is_left_alone():
    decision = cycle(RECORD, Seen("running"))
    assert decision.action == "running" and decision.changes == {}


@pytest.mark.parametrize(
    ("seen", "finished_well", "why"),
    [
        (Seen("ended", 137, "false"), False, "exit code 137"),
        (Seen("missing"), False, "vanished"),
    ],
)
def test_a_failed_or_vanished_run_is_restarted_within_the_budget(seen, finished_well, why):
    decision = cycle(RECORD, seen, finished_well=finished_well)
    assert decision.action == "restart" and why in decision.message
    assert decision.changes["RESTARTS"] == "1"


def test_the_restart_budget_is_the_limit():
    decision = cycle({**RECORD, "RESTARTS": "3"}, Seen("ended", 1, "false"))
    assert decision.action == "gave-up"
    assert decision.changes["STATUS"] == "gave-up"
    assert "after 3 restart(s) (CT_MAX_RESTARTS=3)" in decision.changes["GAVE_UP"]
    assert cycle({**RECORD, **decision.changes}, Seen("missing")).action == "gave-up"


@pytest.mark.parametrize(("code", "oom"), [(2, "false"), (137, "true")])
def test_bad_input_and_an_oom_kill_are_final(code, oom):
    decision = cycle({**RECORD, "RESTARTS": "0"}, Seen("ended", code, oom))
    assert decision.action == "gave-up"
    assert "a restart would only repeat it" in decision.changes["GAVE_UP"]


def test_an_oom_kill_while_loading_the_data_does_not_blame_the_batch_size():
    loading = classify_end(137, "true", "1g", in_training=False)
    training = classify_end(137, "true", "1g", in_training=True)
    assert "loading the data" in loading.why and "--batch-size" not in loading.why
    assert "CT_MEMORY" in loading.why
    assert "--batch-size" in training.why


def test_a_vanished_process_whose_run_finished_counts_as_finished():
    decision = cycle(RECORD, Seen("missing"), finished_well=True)
    assert decision.action == "finished"
    assert decision.changes["EXIT_CODE"] == "0" and decision.changes["STATUS"] == "exited"


@pytest.mark.parametrize(("follow", "action"), [(True, "judge"), (False, "handed-over")])
def test_a_finished_restarted_run_is_handed_on_once(follow, action):
    restarted = {**RECORD, "RESTARTS": "1"}
    decision = cycle(restarted, Seen("ended", 0, "false"), follow=follow)
    assert decision.action == action
    handed = {**restarted, **decision.changes, "HANDED_OVER": "true"}
    assert cycle(handed, Seen("ended", 0, "false")).action == "finished"


def test_a_tuning_round_is_counted_per_commit():
    assert process.next_round({"COMMIT": "aaaaaaa", "ROUNDS": "1"}, "bbbbbbb", 1) == 1
    assert process.next_round({"COMMIT": "aaaaaaa", "ROUNDS": "1"}, "aaaaaaa", 1) is None
    assert process.next_round({"COMMIT": "aaaaaaa", "ROUNDS": "1"}, "aaaaaaa", 2) == 2


# ---------------------------------------------------------------- the record


def run_cli(ws: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "ct.pipeline.process", "--workspace", str(ws),
                           *args], capture_output=True, text=True, env=env, timeout=60)


def write_record(ws: Path, data: bytes) -> Path:
    path = ws / "status" / "train.properties"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


GOOD = records.format_properties(RECORD, "test").encode()


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b"", "empty"),
        (bytes(range(256)) * 4, "damaged"),
        (GOOD[: len(GOOD) // 2], "damaged"),
        (GOOD.replace(b"RESTARTS=0", b"RESTARTS=$(id>pwned)"), "RESTARTS"),
        (GOOD.replace(b"RUNTIME=docker", b"RUNTIME=chroot"), "RUNTIME"),
    ],
)
def test_a_damaged_record_is_one_line_exit_2_and_no_action(tmp_path, data, says):
    path = write_record(tmp_path, data)
    result = run_cli(tmp_path, "cycle", "--role", "train", "--runtime", "docker",
                     "--max-restarts", "3", "--seen", "missing")
    assert result.returncode == 2
    assert result.stdout == ""  # no action word
    (line,) = result.stderr.strip().splitlines()
    assert str(path) in line and says in line
    assert path.read_bytes() == data  # nothing written


@pytest.mark.parametrize("kind", ["folder", "symlink"])
def test_an_unreadable_record_is_one_line(tmp_path, kind):
    path = tmp_path / "status" / "train.properties"
    path.parent.mkdir(parents=True)
    if kind == "folder":
        path.mkdir()
    else:  # a record is never read through a link, wherever it points
        (tmp_path / "elsewhere").write_bytes(GOOD)
        path.symlink_to(tmp_path / "elsewhere")
    result = run_cli(tmp_path, "get", "--role", "train", "CONTAINER")
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert str(path) in line and ("not a regular file" in line or "symbolic link" in line)


def test_the_runtime_is_the_settings_never_the_records(tmp_path):
    local = {**RECORD, "RUNTIME": "local", "CONTAINER": "pid-12345"}
    path = write_record(tmp_path, records.format_properties(local, "test").encode())
    result = run_cli(tmp_path, "cycle", "--role", "train", "--runtime", "docker",
                     "--max-restarts", "3", "--seen", "missing")
    assert result.returncode == 2 and result.stdout == ""
    assert "CT_RUNTIME is docker" in result.stderr
    assert records.parse_properties(path.read_text()) == local


def test_values_are_escaped_and_read_back_whole(tmp_path):
    why = "exit code 1\nRESTARTS=0 = : # ! é 🙂 ${JENKINS_API_TOKEN}"
    given = {**RECORD, "CONTAINER": process.container_of(tmp_path, "train"), "STATUS": "gave-up",
             "GAVE_UP": why}
    process.save(tmp_path, "train", given)
    text = (tmp_path / "status" / "train.properties").read_text()
    assert "\nRESTARTS=0\n" in text and text.count("\n") == len(given) + 1
    assert process.load(tmp_path, "train") == given


def test_job6_on_a_damaged_record_starts_nothing(script_env):
    """An empty record once made job6 treat a finished run as vanished and start train.py
    again; now it says what is wrong and does nothing."""
    ws = Path(script_env["CT_WORKSPACE"])
    (ws / "train.py").parent.mkdir(parents=True)
    (ws / "train.py").write_text("raise SystemExit('must not run')\n")
    path = write_record(ws, b"")
    result = run_script("job6-monitor.sh", script_env, "monitor", check=False)
    assert result.returncode == 2
    assert str(path) in result.stderr and "empty" in result.stderr
    assert not (ws / "status" / "train.log").exists()
    assert not (ws / "status" / "train.args").exists()
    assert path.read_bytes() == b""
