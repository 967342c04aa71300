"""ct.pipeline.changes: a retrain trains nothing when the code, the data and the flags are those
of a judged run; job6's hourly check and weekly retrain ask it before they start job2 (a real
HTTP server stands in for job2's buildWithParameters)."""

from __future__ import annotations

import csv
import email
import email.policy
import json
import os
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
from PIL import Image

from ct import data_version
from ct import workspace as names
from ct.pipeline.changes import Request, decide, normal_args
from tests.conftest import REPO, run_script

COMMIT = "e" * 40
OTHER = "f" * 40
ARGS = "--epochs 2 --seed 1"


def lineage(commit: str = COMMIT, version: str = "v1", args: str = ARGS) -> dict[str, str]:
    return {"commit": commit, "data_version": version, "train_args": args}


def test_the_same_code_data_and_flags_as_a_judged_run_is_unchanged():
    request = Request(COMMIT, "v1", ARGS)
    changed, why = decide(request, iter([("train-1", lineage())]), force=False)
    assert not changed and why == "nothing changed since run train-1: not training"
    changed, why = decide(request, iter([("train-1", lineage())]), force=True)
    assert changed and "FORCE" in why
    changed, why = decide(request, iter([]), force=False)
    assert changed and "no judged run" in why


@pytest.mark.parametrize(("then", "says"), [
    (lineage(commit=OTHER), f"commit '{COMMIT}' (was '{OTHER}')"),
    (lineage(version="v0"), "data version 'v1' (was 'v0')"),
    (lineage(args="--epochs 3"), f"train args '{ARGS}' (was '--epochs 3')"),
    ({"commit": COMMIT}, "data version 'v1' (was not recorded)"),
])
def test_what_changed_since_the_champion_is_said(then, says):
    changed, why = decide(Request(COMMIT, "v1", ARGS), iter([("champ", then)]), force=False)
    assert changed and why.startswith("changed since run champ: ") and says in why


def test_any_judged_run_of_the_same_request_counts_not_only_the_champion():
    runs = iter([("champ", lineage(commit=OTHER)), ("train-2", lineage())])
    changed, why = decide(Request(COMMIT, "v1", ARGS), runs, force=False)
    assert not changed and "since run train-2" in why


def test_flags_compare_as_flags_not_as_spacing():
    assert normal_args("  --epochs   2\t--seed 1 ") == normal_args(ARGS)
    assert normal_args("--lr '0.1'") == normal_args("--lr 0.1")


# ---------------------------------------------------------------- a workspace


@pytest.fixture
def workspace(tmp_path, tiny_cifar_root):
    """A workspace whose champion was trained on COMMIT, the tiny base data and ARGS."""
    ws = tmp_path / "ws"
    shutil.copytree(tiny_cifar_root, ws / "data")
    (ws / names.COMMIT_FILE).write_text(COMMIT + "\n")
    version = data_version.compute(ws / "data", cache_dir=ws / "data").version
    (ws / names.BEST_FILE).write_text(json.dumps({"run_id": "train-1",
                                                  "lineage": lineage(version=version)}))
    return ws


def check(ws: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CT_")}
    environ.pop("FORCE", None)
    return subprocess.run([sys.executable, "-m", "ct.pipeline.changes", "--workspace", str(ws),
                           "check", *args], cwd=REPO, env={**environ, **env},
                          capture_output=True, text=True, timeout=60)


def add_increment_image(ws: Path, name: str = "new", colour=(200, 10, 10)) -> Path:
    path = ws / "data" / "increments" / name / "train" / "cat" / "one.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (47, 13), colour).save(path)
    return path


def test_unchanged_then_new_data_then_forced(workspace):
    proc = check(workspace, CT_TRAIN_ARGS=ARGS)
    assert proc.stdout.split()[0] == "unchanged", proc.stderr
    assert "nothing changed since run train-1" in proc.stderr
    image = add_increment_image(workspace)
    proc = check(workspace, CT_TRAIN_ARGS=ARGS)
    assert proc.stdout.split()[0] == "changed" and "data version" in proc.stderr
    new_version = proc.stdout.split()[1]
    assert new_version == data_version.compute(workspace / "data").version
    shutil.rmtree(image.parents[3])  # the increments folder: the data is the base again
    assert check(workspace, CT_TRAIN_ARGS=ARGS).stdout.split()[0] == "unchanged"
    assert check(workspace, CT_TRAIN_ARGS=ARGS, FORCE="true").stdout.split()[0] == "changed"
    assert check(workspace, CT_TRAIN_ARGS="--epochs 3").stdout.split()[0] == "changed"
    assert check(workspace, "--commit", OTHER, CT_TRAIN_ARGS=ARGS).stdout.split()[0] == "changed"


def test_a_judged_run_in_the_history_is_found(workspace):
    best = json.loads((workspace / names.BEST_FILE).read_text())
    (workspace / names.BEST_FILE).write_text(json.dumps({**best, "lineage": lineage(OTHER)}))
    run = workspace / "runs" / "train-2"
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"lineage": best["lineage"]}))
    with open(workspace / names.HISTORY_FILE, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["time", "build", "commit", "accuracy", "threshold", "passed", "run"])
        writer.writerow(["t", "", COMMIT, "50", "80", "false", "train-2"])
        writer.writerow(["t", "", COMMIT, "50", "80", "false", "../../etc"])
    proc = check(workspace, CT_TRAIN_ARGS=ARGS)
    assert proc.stdout.split()[0] == "unchanged" and "since run train-2" in proc.stderr


def test_bad_increments_are_one_line_and_no_verdict(workspace):
    (workspace / "data" / "increments" / "new" / "train" / "kitten").mkdir(parents=True)
    proc = check(workspace, CT_TRAIN_ARGS=ARGS)
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "kitten" in proc.stderr


class _Jenkins(BaseHTTPRequestHandler):
    requests: ClassVar[list[str]] = []

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        _Jenkins.requests.append(self.path)
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("mode", ["check", "weekly"])
def test_job6_starts_a_retrain_only_when_something_changed(workspace, script_env, rendered,
                                                           mode):
    server = HTTPServer(("127.0.0.1", 0), _Jenkins)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Jenkins.requests = []
    env = {**script_env, "CT_WORKSPACE": str(workspace), "CT_TRAIN_ARGS": ARGS,
           "JENKINS_URL": f"http://127.0.0.1:{server.server_port}", "JENKINS_USER": "bot",
           "JENKINS_API_TOKEN": "t0k"}
    try:
        quiet = run_script("job6-monitor.sh", env, mode)
        add_increment_image(workspace)
        retrain = run_script("job6-monitor.sh", env, mode)
        forced = run_script("job6-monitor.sh", {**env, "FORCE": "true"}, mode)
        bad = run_script("job6-monitor.sh", {**env, "FORCE": "yes"}, mode, check=False)
    finally:
        server.shutdown()
    assert "nothing changed since run train-1" in quiet.stderr
    assert "retrain requested" in retrain.stderr and "retrain requested" in forced.stderr
    assert bad.returncode == 2 and "FORCE must be true or false" in bad.stderr
    assert len(_Jenkins.requests) == 2
    version = data_version.compute(workspace / "data").version
    declared = {p.findtext("name") for p in rendered["job2"].iter()
                if p.tag.endswith("ParameterDefinition")}
    for path, force in zip(_Jenkins.requests, ("false", "true"), strict=True):
        query = parse_qs(urlsplit(path).query)
        assert query == {"DATA_VERSION": [version], "FORCE": [force]}  # no token=: job2 has none
        assert set(query) <= declared


@pytest.mark.slow  # three real trainings; the decision and job6's are tested above, fast
def test_a_retrain_of_unchanged_inputs_trains_nothing_and_new_data_trains(source_repo,
                                                                          script_env):
    """The chain on the local runtime: job1..job4 train and judge a run; job2's retrain of the
    same commit, data and flags makes job3 say so and train nothing (green); an increment makes
    it train on base + increment; FORCE=true trains even with nothing changed."""
    env = {**script_env, "CT_TRAIN_ARGS": "--batch-size 64 --epochs 1 --seed 1",
           "CT_THRESHOLD": "5"}
    ws = Path(env["CT_WORKSPACE"])
    for script in ("job1-pull.sh", "job2-image.sh", "job3-train.sh", "job4-gate.sh"):
        run_script(script, env, *([str(source_repo)] if script == "job1-pull.sh" else []))
    metrics = json.loads((ws / "metrics.json").read_text())
    first = metrics["run_id"]
    assert metrics["lineage"]["train_args"] == "--batch-size 64 --epochs 1 --seed 1"
    # the mail (kept in the outbox) and the report name the champion's data version
    (mail,) = (ws / "outbox").glob("*.eml")
    body = email.message_from_bytes(mail.read_bytes(), policy=email.policy.default).get_body(
        ("plain",)).get_content()
    train = metrics["data"]["base_train"]
    assert f"data version:        {metrics['data_version']} ({train} + 0 train" in body
    page = (ws / "report" / "index.html").read_text()
    assert f"<dt>data version</dt><dd>{metrics['data_version']}" in page

    def retrain(**extra: str) -> subprocess.CompletedProcess[str]:
        run_script("job2-image.sh", {**env, **extra})
        return run_script("job3-train.sh", {**env, **extra})

    skipped = retrain()
    assert f"nothing changed since run {first}" in skipped.stderr
    assert len(list((ws / "runs").glob("train-*"))) == 1
    add_increment_image(ws)
    trained = retrain()
    assert "changed since run" in trained.stderr and "data version" in trained.stderr
    metrics = json.loads((ws / "metrics.json").read_text())
    assert metrics["run_id"] != first and metrics["data"]["increment_train"] == 1
    run_script("job4-gate.sh", env)
    forced = retrain(FORCE="true")
    assert "FORCE is set: retraining" in forced.stderr
    assert len(list((ws / "runs").glob("train-*"))) == 3
