"""The job scripts without a Docker engine: lint, settings, job1 (real git), job2 detection, job4
input checks, job6 weekly trigger (real HTTP server) and restart limit, the local-runtime chain."""

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

from tests.conftest import REPO, SCRIPTS, VENV_BIN, git, read_props, run_script

JOB_SCRIPTS = sorted(SCRIPTS.glob("*.sh"))


def test_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck)")
    proc = subprocess.run(
        ["shellcheck", "-x", *[str(p.relative_to(REPO)) for p in JOB_SCRIPTS]],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout
    assert {p.name for p in JOB_SCRIPTS} >= {
        "lib.sh", "job1-pull.sh", "job2-image.sh", "job3-train.sh", "job4-gate.sh",
        "job5-tune.sh", "job6-monitor.sh", "pipeline.sh",
    }  # fmt: skip


def test_scripts_are_strict():
    for script in JOB_SCRIPTS:
        if script.name != "lib.sh":
            text = script.read_text()
            assert "set -euo pipefail" in text, script.name
            assert "sudo" not in text, script.name


@pytest.mark.parametrize("name", ["Dockerfile.train", "Dockerfile.tune"])
def test_dockerfiles(name):
    proc = subprocess.run(
        [str(VENV_BIN / "hadolint"), name], cwd=REPO, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parser = DockerfileParser(fileobj=open(REPO / name, "rb"))
    text = (REPO / name).read_text()
    default_base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"pytorch/pytorch:[\w.\-]+", default_base), "a pinned official image"
    users = [i["value"] for i in parser.structure if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entries = [i["value"] for i in parser.structure if i["instruction"] == "ENTRYPOINT"]
    entry = json.loads(entries[-1])
    expected = ["python", "train.py"] + (["--tune"] if name.endswith("tune") else [])
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
                 "JENKINS_API_TOKEN", "CT_TRIGGER_TOKEN"):  # fmt: skip
        assert name in defaults
    readme = (REPO / "README.md").read_text() if (REPO / "README.md").exists() else ""
    settings = readme.split("## Settings", 1)[1] if "## Settings" in readme else ""
    missing = [name for name in defaults if f"`{name}`" not in settings]
    assert not missing, f"settings missing from README '## Settings': {missing}"


# ------------------------------------------------------------------------------------- job1


def test_job1_checks_out_pushes_and_keeps_state(source_repo, script_env):
    ws = Path(script_env["CT_WORKSPACE"])
    first = git(source_repo, "rev-parse", "HEAD")
    out = run_script("job1-pull.sh", script_env, str(source_repo)).stdout.strip()
    assert out == first
    assert (ws / "commit.txt").read_text() == first + "\n"
    assert (ws / "train.py").read_bytes() == (source_repo / "train.py").read_bytes()
    # state of the pipeline in the workspace
    for rel in ("data/cifar-10-batches-py/x", "runs/r1/model.pt", "outbox/m.eml"):
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text("state")
    for rel in ("accuracy.txt", "metrics.json", "best.json", "best-model.pt"):
        (ws / rel).write_text("state")
    # second push: a file changed, one removed
    (source_repo / "network.py").write_text((source_repo / "network.py").read_text() + "\n# v2\n")
    git(source_repo, "rm", "-q", "Makefile")
    git(source_repo, "commit", "-qam", "second push")
    second = git(source_repo, "rev-parse", "HEAD")
    assert run_script("job1-pull.sh", script_env, str(source_repo)).stdout.strip() == second
    assert (ws / "commit.txt").read_text().strip() == second
    assert (ws / "network.py").read_text().endswith("# v2\n")
    assert not (ws / "Makefile").exists()
    for rel in ("data/cifar-10-batches-py/x", "runs/r1/model.pt", "outbox/m.eml", "accuracy.txt",
                "metrics.json", "best.json", "best-model.pt"):  # fmt: skip
        assert (ws / rel).read_text() == "state", rel
    assert git(ws, "status", "--porcelain") == ""  # state is excluded, code is clean
    # an explicit older commit (what Jenkins passes as GIT_COMMIT)
    assert run_script("job1-pull.sh", script_env, str(source_repo), first).stdout.strip() == first
    assert (ws / "Makefile").exists()


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


def test_job5_refuses_an_unknown_argument(script_env):
    proc = run_script("job5-tune.sh", script_env, "--no-mails", check=False)
    assert proc.returncode == 2
    assert "usage: job5-tune.sh [--no-mail]" in proc.stderr
    assert not (Path(script_env["CT_WORKSPACE"]) / "status").exists(), "no tuning round counted"


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


def test_job6_weekly_posts_to_job2_remote_build(script_env):
    server = HTTPServer(("127.0.0.1", 0), _Jenkins)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Jenkins.requests = []
    try:
        env = {
            **script_env,
            "JENKINS_URL": f"http://127.0.0.1:{server.server_port}/",
            "JENKINS_USER": "ci-bot",
            "JENKINS_API_TOKEN": "11aa22bb",
            "CT_TRIGGER_TOKEN": "s3cret token&x",
        }
        proc = run_script("job6-monitor.sh", env, "weekly")
    finally:
        server.shutdown()
    assert len(_Jenkins.requests) == 1
    path, auth = _Jenkins.requests[0]
    url = urlsplit(path)
    assert url.path == "/job/job2/build"
    assert parse_qs(url.query) == {"token": ["s3cret token&x"]}
    assert auth == "Basic " + base64.b64encode(b"ci-bot:11aa22bb").decode()
    assert "HTTP 201" in proc.stderr
    assert "11aa22bb" not in proc.stdout + proc.stderr


def test_job6_weekly_needs_credentials(script_env):
    proc = run_script("job6-monitor.sh", script_env, "weekly", check=False)
    assert proc.returncode == 2
    assert "JENKINS_API_TOKEN" in proc.stderr


def test_job6_restart_limit_local(source_repo, script_env):
    """A run that fails every time is restarted CT_MAX_RESTARTS times, then job6 gives up."""
    env = {**script_env, "CT_TRAIN_ARGS": "--epochs -3", "CT_MAX_RESTARTS": "2"}
    run_script("job1-pull.sh", env, str(source_repo))
    proc = run_script("job3-train.sh", env, check=False)
    assert proc.returncode == 1 and "job6" in proc.stderr
    proc = run_script("job6-monitor.sh", env, "monitor", "--follow", check=False)
    assert proc.returncode == 1
    assert "giving up" in proc.stderr
    state = read_props(Path(env["CT_WORKSPACE"]) / "status" / "train.properties")
    assert state["RESTARTS"] == "2"
    assert state["STATUS"] == "gave-up"
    assert proc.stderr.count("restarting it") == 2
    # the next monitor cycle does not restart it again
    proc = run_script("job6-monitor.sh", env, "monitor")
    assert "gave up" in proc.stderr
    assert read_props(Path(env["CT_WORKSPACE"]) / "status" / "train.properties")["RESTARTS"] == "2"
