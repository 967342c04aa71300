"""What follows a finished run (ct.pipeline.after_run through scripts/job4-gate.sh), checked at the
level Jenkins sees: the files a build leaves, and job4's conditional step evaluated on them the
way the pinned plugins evaluate it.

token-macro 400.v35420b_922dcb_ impl/PropertyFromFileMacro.java (ReadProperty.call): PROPFILE
loads the workspace file as it is with java.util.Properties; a missing file expands to
"<file> not found", a missing key to "". run-condition 1.7 core/StringsMatchCondition.java
runPerform expands arg1 and arg2 with TokenMacro.expandAll and compares them with equals
(ignoreCase false).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from ct.pipeline import records
from tests import test_jenkins_checks as jc
from tests.conftest import run_script

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def job4_condition(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(arg1, arg2) of job4's strings-match condition, from the rendered XML."""
    xml = jc.render(jc.JOBS_YAML, tmp_path_factory.mktemp("jjb") / "out", "token")
    condition = next(xml["job4"].iter("condition"))
    return condition.findtext("arg1"), condition.findtext("arg2")


def propfile(workspace: Path, macro: str) -> str:
    """${PROPFILE,file="F",property="P"} as PropertyFromFileMacro expands it."""
    match = re.fullmatch(r'\$\{PROPFILE,file="([^"]+)",property="([^"]+)"\}', macro)
    assert match, macro
    path = workspace / match.group(1)
    if not path.exists():
        return f"{match.group(1)} not found"
    return records.parse_properties(path.read_text()).get(match.group(2), "")


def starts_job5(workspace: Path, condition: tuple[str, str]) -> bool:
    arg1, arg2 = condition
    return propfile(workspace, arg1) == arg2


def finished_run(ws: Path, accuracy: float, run_id: str = "train-1") -> None:
    """A workspace whose latest run has finished, as train.py leaves it; network.py and train.py
    in the commit's snapshot stand in for its code, which job4 only inspects (the framework)
    before tuning."""
    run = ws / "runs" / run_id
    run.mkdir(parents=True, exist_ok=True)
    (run / "model.pt").write_bytes(f"model {run_id}".encode())
    code = ws / "code" / COMMIT
    code.mkdir(parents=True, exist_ok=True)
    (code / "network.py").write_text("import torch\n")
    (code / "train.py").write_text("import torch\n")
    (ws / "commit.txt").write_text(COMMIT + "\n")
    metrics = {"accuracy": accuracy, "run_id": run_id, "run_dir": f"runs/{run_id}",
               "model": f"runs/{run_id}/model.pt", "mode": "train", "commit": COMMIT}
    (ws / "metrics.json").write_text(json.dumps(metrics))
    (ws / "accuracy.txt").write_text(f"{accuracy}\n")


def history_runs(ws: Path) -> list[str]:
    with open(ws / "accuracy-history.csv", newline="") as handle:
        return [row["run"] for row in csv.DictReader(handle)]


def test_job4_twice_for_a_run_below_the_threshold_starts_job5_once(script_env, job4_condition):
    ws = Path(script_env["CT_WORKSPACE"])
    finished_run(ws, 61.5)
    env = {**script_env, "CT_ARTIFACTS_DIR": str(ws / "artifacts" / "job4")}

    run_script("job4-gate.sh", env)
    assert starts_job5(ws, job4_condition)
    first = records.parse_properties((ws / "gate.properties").read_text())
    assert (first["PASSED"], first["RUN_ID"], first["TUNE"]) == ("false", "train-1", "true")
    assert (ws / "artifacts" / "job4" / "accuracy.csv").exists()

    (ws / "artifacts" / "job4" / "accuracy.csv").unlink()  # a new build's folder starts empty
    again = run_script("job4-gate.sh", env)
    assert "judged already" in again.stderr
    assert not starts_job5(ws, job4_condition)
    second = records.parse_properties((ws / "gate.properties").read_text())
    assert second == {**first, "TUNE": "false"}  # the same verdict, written by this build
    assert not (ws / "artifacts" / "job4" / "accuracy.csv").exists()  # no second plot point
    assert history_runs(ws) == ["train-1"]


def test_a_failed_job4_leaves_no_verdict_for_the_condition(script_env, job4_condition):
    ws = Path(script_env["CT_WORKSPACE"])
    finished_run(ws, 61.5)
    run_script("job4-gate.sh", script_env)
    assert starts_job5(ws, job4_condition)
    finished_run(ws, 62.0, run_id="train-2")
    (ws / "accuracy.txt").write_text("sixty-two\n")
    failed = run_script("job4-gate.sh", script_env, check=False)
    assert failed.returncode == 2
    assert "sixty-two" in failed.stderr and len(failed.stderr.strip().splitlines()) == 1
    assert not starts_job5(ws, job4_condition)
    assert not (ws / "gate.properties").exists()


def test_job4_retried_after_a_failed_promotion_keeps_the_run_in_the_history_once(script_env):
    ws = Path(script_env["CT_WORKSPACE"])
    finished_run(ws, 91.0)
    (ws / "models").write_text("a file where the stored models go\n")
    for _ in range(2):
        failed = run_script("job4-gate.sh", script_env, check=False)
        assert failed.returncode == 2 and "models" in failed.stderr
        assert not (ws / "best.json").exists()
    (ws / "models").unlink()
    done = run_script("job4-gate.sh", script_env)
    assert "promoted" in done.stderr
    assert json.loads((ws / "best.json").read_text())["run_id"] == "train-1"
    assert history_runs(ws) == ["train-1"]
    # judged now: a fourth build changes nothing and mails nothing more
    outbox = sorted((ws / "outbox").iterdir())
    run_script("job4-gate.sh", script_env)
    assert sorted((ws / "outbox").iterdir()) == outbox
