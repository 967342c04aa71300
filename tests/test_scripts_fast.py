"""The job scripts without a Docker engine: lint, strictness, settings, job1 (real git), job2
detection, job4 input checks, job6's weekly trigger (real HTTP server). job6 restarting a dead run:
tests/test_chain_restarts.py."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import ClassVar
from urllib.parse import parse_qs, urlsplit

import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import (
    REPO,
    SCRIPTS,
    git,
    read_props,
    required_tool,
    run_script,
    venv_tool,
)

JOB_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))


def test_shellcheck_clean():
    shellcheck = required_tool(shutil.which("shellcheck"), "shellcheck",
                               "apt-get install -y shellcheck", "CT_REQUIRE_SHELLCHECK")
    proc = subprocess.run(
        [shellcheck, "-x", *[str(p.relative_to(REPO)) for p in JOB_SCRIPTS]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout
    assert {p.name for p in JOB_SCRIPTS} >= {
        "lib.sh", "job1-pull.sh", "job2-image.sh", "job3-train.sh", "job4-gate.sh",
        "job5-tune.sh", "job6-monitor.sh", "pipeline.sh",
    }  # fmt: skip


LIBRARIES = {"lib.sh", "lib-process.sh"}  # sourced, never run
ENTRY_POINTS = [p for p in JOB_SCRIPTS if p.name not in LIBRARIES]
# main's first command in a probe run, each a mistake a strict job must stop at
STRICT_PROBES = {
    "errexit": "false",  # a failing command
    "pipefail": "false | true",  # a failing command inside a pipeline
    "nounset": ': "$CT_PROBE_NEVER_SET"',  # a misspelt variable, which would expand to ""
}


@pytest.mark.parametrize("probe", sorted(STRICT_PROBES))
def test_every_job_stops_at_its_first_failing_command(probe, script_env, tmp_path):
    """Each script, run with a probe as main's first command, ends non-zero there and runs
    nothing after it: the options in force when main runs, whatever lib.sh and the script set
    before. The probe goes into a copy of scripts/ (beside the real ct/), since no input makes a
    job's own commands fail at will."""
    root = tmp_path / "checkout"
    shutil.copytree(SCRIPTS, root / "scripts")
    (root / "ct").symlink_to(REPO / "ct")
    for script in ENTRY_POINTS:
        copy = root / "scripts" / script.name
        text = copy.read_text()
        assert text.count("\nmain() {\n") == 1, script.name
        copy.write_text(text.replace("\nmain() {\n", "\nmain() {\n  echo PROBE-REACHED >&2\n"
                                     f"  {STRICT_PROBES[probe]}\n  echo PROBE-SURVIVED >&2\n"))
        proc = subprocess.run([str(copy)], env=script_env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=120)
        assert "PROBE-REACHED" in proc.stderr, (script.name, proc.stderr[-2000:])
        assert proc.returncode != 0 and "PROBE-SURVIVED" not in proc.stderr, script.name
        if probe == "nounset":
            assert "CT_PROBE_NEVER_SET: unbound variable" in proc.stderr, script.name


def test_scripts_hold_no_sudo_or_eval_and_end_in_main():
    """Structural, where no run can show it: a construct that must be absent (sudo, eval of
    text that may hold a build parameter) is absent on every path, including those no test
    input reaches; and `main "$@"` as the last line means bash has read every function before
    any of it runs, so a checkout updated under a running job cannot splice new lines into it
    (racing an edit against bash's reader is no test). docs/development.md, Conventions."""
    for script in JOB_SCRIPTS:
        text = script.read_text()
        assert not re.search(r"\bsudo\b", text), f"{script.name} uses sudo"
        assert not re.search(r"^\s*eval\b", text, re.M), f"{script.name} uses eval"
    for script in ENTRY_POINTS:
        code = [line for line in script.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
        assert code[-1] == 'main "$@"', script.name
        assert "main() {" in code, script.name


@pytest.mark.parametrize("name", ["Dockerfile.train", "Dockerfile.tune"])
def test_dockerfiles(name):
    hadolint = required_tool(venv_tool("hadolint"), "hadolint",
                             "pip install -r requirements-dev.txt", "CT_REQUIRE_HADOLINT")
    proc = subprocess.run([hadolint, name], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parser = DockerfileParser(fileobj=open(REPO / name, "rb"))
    text = (REPO / name).read_text()
    default_base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    # python only: requirements.txt brings torch (tests/test_requirements.py)
    assert re.fullmatch(r"python:3\.\d+-slim-\w+", default_base), "a pinned official image"
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entries = [i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT"]
    entry = json.loads(entries[-1])
    # the code is mounted at /code (the pipeline mounts the commit's snapshot there)
    expected = ["python", "/code/train.py"] + (["--tune"] if name.endswith("tune") else [])
    assert entry == expected
    assert [i["value"] for i in parser.structure if i["instruction"] == "WORKDIR"] == ["/workspace"]


def test_settings_have_one_default_each_and_are_documented():
    defaults = {}
    for script in JOB_SCRIPTS:
        for name in re.findall(r'^: "\$\{(\w+):=', script.read_text(), re.M):
            assert script.name == "lib.sh", f"{name} defaulted outside lib.sh"
            assert name not in defaults, f"{name} defaulted twice"
            defaults[name] = script.name
    for name in ("CT_WORKSPACE", "CT_RUNTIME", "CT_THRESHOLD", "CT_DATA_DIR", "CT_TRAIN_ARGS",
                 "CT_MAX_RESTARTS", "CT_BASE_IMAGE", "SMTP_HOST", "NOTIFY_TO", "JENKINS_URL",
                 "JENKINS_USER", "JENKINS_API_TOKEN"):  # fmt: skip
        assert name in defaults
    readme = (REPO / "README.md").read_text() if (REPO / "README.md").exists() else ""
    settings = readme.split("## Settings", 1)[1] if "## Settings" in readme else ""
    missing = [name for name in defaults if f"`{name}`" not in settings]
    assert not missing, f"settings missing from README '## Settings': {missing}"


# ------------------------------------------------------------------------------------- job1


def test_job1_snapshots_each_push_read_only_and_keeps_state(source_repo, script_env):
    ws = Path(script_env["CT_WORKSPACE"])
    first = git(source_repo, "rev-parse", "HEAD")
    out = run_script("job1-pull.sh", script_env, str(source_repo)).stdout.strip()
    assert out == first
    assert (ws / "commit.txt").read_text() == first + "\n"
    snap = ws / "code" / first
    assert (snap / "train.py").read_bytes() == (source_repo / "train.py").read_bytes()
    assert not (snap / "train.py").stat().st_mode & 0o222 and not snap.stat().st_mode & 0o222
    assert not (ws / "train.py").exists() and not (ws / ".git").exists()  # no checkout at the top
    # state of the pipeline in the workspace
    for rel in ("data/cifar-10-batches-py/x", "runs/r1/model.pt", "outbox/m.eml"):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("state")
    for rel in ("accuracy.txt", "metrics.json", "best.json", "best-model.pt"):
        (ws / rel).write_text("state")
    # second push: a file changed, one removed; the first commit's snapshot is untouched
    (source_repo / "network.py").write_text((source_repo / "network.py").read_text() + "\n# v2\n")
    git(source_repo, "rm", "-q", "Makefile")
    git(source_repo, "commit", "-qam", "second push")
    second = git(source_repo, "rev-parse", "HEAD")
    assert run_script("job1-pull.sh", script_env, str(source_repo)).stdout.strip() == second
    assert (ws / "commit.txt").read_text().strip() == second
    assert (ws / "code" / second / "network.py").read_text().endswith("# v2\n")
    assert not (ws / "code" / second / "Makefile").exists()
    assert (ws / "code" / first / "Makefile").exists()
    assert not (ws / "code" / first / "network.py").read_text().endswith("# v2\n")
    for rel in ("data/cifar-10-batches-py/x", "runs/r1/model.pt", "outbox/m.eml", "accuracy.txt",
                "metrics.json", "best.json", "best-model.pt"):  # fmt: skip
        assert (ws / rel).read_text() == "state", rel
    # both pushes wait, oldest first
    queue = json.loads((ws / "status" / "pushes.json").read_text())["pushes"]
    assert [push["commit"] for push in queue] == [first, second]
    # an explicit older commit (what Jenkins passes as GIT_COMMIT) is queued once only
    assert run_script("job1-pull.sh", script_env, str(source_repo), first).stdout.strip() == first
    queue = json.loads((ws / "status" / "pushes.json").read_text())["pushes"]
    assert [push["commit"] for push in queue] == [first, second]


@pytest.mark.parametrize("ref", ["--upload-pack=touch pwned", "-x"])
def test_job1_refuses_a_ref_git_would_read_as_an_option(source_repo, script_env, ref, tmp_path):
    proc = run_script("job1-pull.sh", script_env, str(source_repo), ref, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "must not be empty or start with '-'" in proc.stderr
    assert not (tmp_path / "pwned").exists()


def test_job1_unknown_ref_is_a_clear_error(source_repo, script_env):
    proc = run_script("job1-pull.sh", script_env, str(source_repo), "no-such-branch", check=False)
    assert proc.returncode == 2
    assert "cannot fetch 'no-such-branch'" in proc.stderr


# ------------------------------------------------------------------------------------- job2


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        ("import numpy as np\n\ndef model():\n    return np.zeros(3)\n", "unknown framework"),
        ("import tensorflow as tf\nm = tf.keras.Sequential()\n", "detected tensorflow"),
        ("from sklearn.svm import SVC\n", "detected sklearn"),
    ],
)
def test_job2_framework_detection(source_repo, script_env, code, expected):
    (source_repo / "network.py").write_text(code)
    (source_repo / "train.py").write_text("print('hello')\n")
    git(source_repo, "commit", "-qam", "not pytorch")
    run_script("job1-pull.sh", script_env, str(source_repo))
    proc = run_script("job2-image.sh", script_env, check=False)
    assert proc.returncode == 2
    assert expected in proc.stderr
    if expected == "unknown framework":  # names what it looked for
        for looked_for in ("PyTorch", "nn.Conv2d", "Keras/TensorFlow", "scikit-learn"):
            assert looked_for in proc.stderr


def test_job2_local_runtime_detects_pytorch(source_repo, script_env):
    run_script("job1-pull.sh", script_env, str(source_repo))
    proc = run_script("job2-image.sh", script_env)
    assert proc.stdout.strip() == "local"
    props = read_props(Path(script_env["CT_WORKSPACE"]) / "status" / "image.properties")
    assert props["FRAMEWORK"] == "pytorch"


# ------------------------------------------------------------------------------------- job4


@pytest.mark.parametrize(
    ("content", "why"),
    [
        (None, "missing"),
        ("", "empty"),
        ("eighty\n", "garbled"),
        ("nan\n", "NaN"),
        ("101.5\n", "out of range"),
    ],
)
def test_job4_rejects_bad_accuracy(tmp_path, script_env, content, why):
    ws = Path(script_env["CT_WORKSPACE"])
    ws.mkdir()
    run = ws / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "model.pt").write_bytes(b"model")
    (ws / "metrics.json").write_text(
        json.dumps({"accuracy": 90.0, "run_dir": "runs/r1", "model": "runs/r1/model.pt"})
    )
    if content is not None:
        (ws / "accuracy.txt").write_text(content)
    proc = run_script("job4-gate.sh", script_env, check=False)
    assert proc.returncode == 2, why
    assert "nothing promoted" in proc.stderr
    assert "accuracy" in proc.stderr.lower()
    assert not (ws / "best.json").exists()
    assert not (ws / "best-model.pt").exists()
    assert not (ws / "gate.properties").exists()


def _finished_run(ws: Path, run_id: str, accuracy: float) -> None:
    """The files a finished training run leaves in the workspace (what train.py writes)."""
    run = ws / "runs" / run_id
    run.mkdir(parents=True, exist_ok=True)
    (run / "model.pt").write_bytes(run_id.encode())
    (ws / "metrics.json").write_text(json.dumps({
        "accuracy": accuracy, "mode": "train", "run_id": run_id, "run_dir": f"runs/{run_id}",
        "model": f"runs/{run_id}/model.pt", "config": {"lr": 0.1}}))
    (ws / "accuracy.txt").write_text(f"{accuracy}\n")


def test_job4_judges_a_run_once_and_plots_only_what_it_measured(script_env, smtp_server):
    smtp, inbox = smtp_server
    ws = Path(script_env["CT_WORKSPACE"])
    artifacts = ws / "artifacts" / "job4"  # what Jenkins' job4 step sets (jenkins/jobs.yaml)
    env = {**script_env, **smtp, "CT_ARTIFACTS_DIR": str(artifacts)}
    _finished_run(ws, "train-a", 85.5)
    run_script("job4-gate.sh", env)
    assert (artifacts / "accuracy.csv").read_text() == "accuracy,threshold\n85.5,80\n"
    assert json.loads((ws / "best.json").read_text())["run_id"] == "train-a"
    assert len(inbox.messages) == 1
    # the same run again (job4 rebuilt, or a hand-over that raced job3's trigger): no new verdict,
    # promotion or mail, and nothing for the Plot plugin to read
    again = run_script("job4-gate.sh", env)
    assert "judged already" in again.stderr
    assert len(inbox.messages) == 1
    assert len((ws / "accuracy-history.csv").read_text().splitlines()) == 2  # header + 1 row
    assert not (artifacts / "accuracy.csv").exists()
    # a gate build that fails leaves no accuracy.csv: the plot gets no point for it, not the
    # previous build's value
    _finished_run(ws, "train-b", 90.0)
    (ws / "accuracy.txt").write_text("ninety\n")
    assert run_script("job4-gate.sh", env, check=False).returncode == 2
    assert list(artifacts.iterdir()) == []


def test_job4_refuses_a_run_folder_that_is_not_the_latest_run(script_env):
    ws = Path(script_env["CT_WORKSPACE"])
    _finished_run(ws, "train-new", 85.0)
    proc = run_script("job4-gate.sh", script_env, "runs/train-old", check=False)
    assert proc.returncode == 2
    assert "asked to judge runs/train-old, but the workspace's latest run is runs/train-new" in (
        proc.stderr)
    assert not (ws / "gate.properties").exists() and not (ws / "best.json").exists()
    run_script("job4-gate.sh", script_env, "runs/train-new")
    assert read_props(ws / "gate.properties")["RUN_ID"] == "train-new"


def test_job5_refuses_an_unknown_argument(script_env):
    proc = run_script("job5-tune.sh", script_env, "--no-mails", check=False)
    assert proc.returncode == 2
    assert "usage: job5-tune.sh [--no-mail | --worker K]" in proc.stderr
    assert not (Path(script_env["CT_WORKSPACE"]) / "status").exists(), "no tuning round counted"


@pytest.mark.parametrize("setting, value, says", [
    ("CT_TUNE_WORKERS", "0", "CT_TUNE_WORKERS must be in 1..64"),
    ("CT_TUNE_WORKERS", "two", "CT_TUNE_WORKERS must be a whole number"),
])
def test_job5_refuses_a_nonsense_worker_count(script_env, setting, value, says):
    proc = run_script("job5-tune.sh", {**script_env, setting: value}, check=False)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not (Path(script_env["CT_WORKSPACE"]) / "status").exists(), "no tuning round counted"


def test_job5_helper_needs_a_worker_number(script_env):
    proc = run_script("job5-tune.sh", script_env, "--worker", "0", check=False)
    assert proc.returncode == 2 and "--worker takes a number in 1..64" in proc.stderr


# ------------------------------------------------------------------------------------- job6


class _Jenkins(BaseHTTPRequestHandler):
    requests: ClassVar[list] = []

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        _Jenkins.requests.append((self.path, self.headers.get("Authorization")))
        self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_job6_weekly_posts_to_job2_build_with_parameters(script_env, source_repo):
    """Jenkins core jenkins-2.492.1, core/src/main/java/jenkins/model/ParameterizedJobMixIn.java:
    doBuild() hands a POST on a job with parameters (job2 has COMMIT) to
    ParametersDefinitionProperty._doBuild(), which calls req.getSubmittedForm(): without a `json`
    form field stapler (RequestImpl.getSubmittedForm, 1928.v9115fe47607f) answers HTTP 400 "This
    page expects a form submission". doBuildWithParameters() reads each parameter from the query
    or the form (SimpleParameterDefinition.createValue), defaults for the rest. Both call
    hudson/model/BuildAuthorizationToken.java checkPermission, which for a job with no token
    (job2) checks Job/Build and ignores a `token` sent: the API token is the only credential."""
    server = HTTPServer(("127.0.0.1", 0), _Jenkins)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Jenkins.requests = []
    try:
        env = {
            **script_env,
            "JENKINS_URL": f"http://127.0.0.1:{server.server_port}/",
            "JENKINS_USER": "ci-bot",
            "JENKINS_API_TOKEN": "11aa22bb",
        }
        run_script("job1-pull.sh", env, str(source_repo))  # nothing judged yet: a retrain
        proc = run_script("job6-monitor.sh", env, "weekly")
    finally:
        server.shutdown()
    assert len(_Jenkins.requests) == 1
    path, auth = _Jenkins.requests[0]
    url = urlsplit(path)
    assert url.path == "/job/job2/buildWithParameters"
    query = parse_qs(url.query)
    assert query.pop("FORCE") == ["false"]
    assert list(query) == ["DATA_VERSION"]  # its value: tests/test_changes.py
    assert auth == "Basic " + base64.b64encode(b"ci-bot:11aa22bb").decode()
    assert "HTTP 201" in proc.stderr
    assert "11aa22bb" not in proc.stdout + proc.stderr


def test_job6_weekly_needs_credentials(script_env):
    proc = run_script("job6-monitor.sh", script_env, "weekly", check=False)
    assert proc.returncode == 2
    assert "JENKINS_API_TOKEN" in proc.stderr
