"""Two pushes and a training run between them, for tests/test_push_chains*.py: commits whose
network.py prints a marker, a job started in the background, a run paused or killed at a
known point, and the checks that every run trained the code of the commit it records."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import SCRIPTS, git, read_props

MARKER = "CODE-MARKER"


def commit_with_marker(repo: Path, label: str) -> str:
    """Commit network.py printing `CODE-MARKER <label>` when imported; the new commit's id."""
    network = repo / "network.py"
    text = re.sub(rf"\nprint\(\"{MARKER} \w+\", flush=True\)\n", "\n", network.read_text())
    network.write_text(text + f'\nprint("{MARKER} {label}", flush=True)\n')
    git(repo, "commit", "-qam", f"code {label}")
    return git(repo, "rev-parse", "HEAD")


def two_pushes(repo: Path) -> dict[str, str]:
    """Commits A and B of `repo`, each marked: {commit id: label}. HEAD is B."""
    a = commit_with_marker(repo, "A")
    b = commit_with_marker(repo, "B")
    return {a: "A", b: "B"}


def start(script: str, env: dict[str, str], *args: str, log: Path) -> subprocess.Popen:
    """A job script in the background, its output (stdout and stderr) in `log`."""
    handle = open(log, "w")
    return subprocess.Popen([str(SCRIPTS / script), *args], env=env, stdout=handle,
                            stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 600) -> tuple[int, str]:
    code = proc.wait(timeout=timeout)
    return code, log.read_text()


# How long a wait below gives a job before calling it hung: not a speed bound (run_script's
# timeout, the same), only what keeps a broken job from holding the suite forever.
HANG_GUARD_S = 600.0
# ct.trainer.stopping's test hook: the trainer stops itself (SIGSTOP) once epoch 1 of 2 is
# recorded, a state that lasts until the test continues or kills it: no epoch can slip by.
STOP_AFTER_FIRST_EPOCH = {"CT_TEST_SIGNAL_AT": "SIGSTOP@after epoch 1/2 "}


def wait_for_first_epoch(ws: Path, proc: subprocess.Popen, log: Path) -> Path:
    """The run folder of the training run once it has recorded an epoch (a checkpoint): for a
    container, whose record names no pid; `container_stopped_itself` then waits for its hook."""
    guard = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < guard:
        found = sorted((ws / "runs").glob("train-*/epochs.jsonl"))
        if found:
            return found[-1].parent
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before an epoch:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    raise AssertionError(f"hung: no epoch after {HANG_GUARD_S:.0f} s")


def _stopped(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def stopped_itself(ws: Path, proc: subprocess.Popen, log: Path, not_pid: int = 0) -> int:
    """The pid of the training process (its record's) once it has stopped itself at its hook
    (STOP_AFTER_FIRST_EPOCH); `not_pid`: one that stopped before and was dealt with."""
    state = ws / "status" / "train.properties"
    guard = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < guard:
        name = read_props(state).get("CONTAINER", "") if state.exists() else ""
        if name.startswith("pid-") and int(name[4:]) != not_pid and _stopped(int(name[4:])):
            return int(name[4:])
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before its run stopped itself:\n"
                                 f"{log.read_text()[-4000:]}")
        time.sleep(0.1)
    raise AssertionError(f"hung: the run did not stop itself after {HANG_GUARD_S:.0f} s")


def container_stopped_itself(docker_engine, name: str) -> bool:
    """Whether train.py in container `name` stops itself at its hook before the container ends:
    its process is the host's to see, as `stopped_itself` sees a local run's."""
    guard = time.monotonic() + HANG_GUARD_S
    while time.monotonic() < guard:
        rows = docker_engine.docker("top", name, "-o", "pid,args", check=False).splitlines()[1:]
        if any("train.py" in row and _stopped(int(row.split()[0])) for row in rows):
            return True
        if docker_engine.docker("inspect", "-f", "{{.State.Running}}", name,
                                check=False).strip() != "true":
            return False
        time.sleep(0.2)
    return False


def resume(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def queued(ws: Path) -> list[str]:
    path = ws / "status" / "pushes.json"
    return [p["commit"] for p in json.loads(path.read_text())["pushes"]] if path.exists() else []


def run_code(ws: Path, run_name: str) -> str:
    return json.loads((ws / "runs" / run_name / "code.json").read_text())["commit"]


def assert_output_trained_its_commit(ws: Path, output: str, labels: dict[str, str]) -> set[str]:
    """A job's output names the runs it trained (`run NAME config`, `resuming NAME`) and the
    markers of the code that ran: they agree with what each run records. The runs named."""
    # the trainer's own lines: "run NAME config {...}", "resuming NAME from its checkpoint"
    runs = {a or b for a, b in re.findall(
        r"\brun (train-[\w-]+) config|\bresuming (train-[\w-]+) from", output)}
    markers = set(re.findall(rf"{MARKER} (\w+)", output))
    assert runs, output[-3000:]
    assert markers == {labels[run_code(ws, name)] for name in runs}, (runs, markers)
    for name in runs:
        metrics = json.loads((ws / "runs" / name / "metrics.json").read_text())
        assert metrics["commit"] == run_code(ws, name)
        assert metrics["lineage"]["commit"] == run_code(ws, name)
    return runs


def verdicts(ws: Path) -> list[tuple[str, str]]:
    """(commit, run) of every judged run, from the gate's history."""
    with open(ws / "accuracy-history.csv", newline="") as handle:
        return [(row["commit"], row["run"]) for row in csv.DictReader(handle)]


def assert_each_commit_judged_once(ws: Path, labels: dict[str, str]) -> None:
    judged = verdicts(ws)
    assert sorted(commit for commit, _ in judged) == sorted(labels), judged
    for commit, run in judged:
        assert run_code(ws, run) == commit
