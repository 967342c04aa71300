"""Shared fixtures: small datasets in the real CIFAR-10 format, paths to the repository."""

from __future__ import annotations

import email.policy
import os
import shutil
import socket
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest

from tests.devtools import DevTools
from tests.synthetic_cifar import make_cifar

REPO = Path(__file__).resolve().parent.parent
# The real CIFAR-10 copy lives beside the clone (../shared/data); CT_CIFAR_ARCHIVE points elsewhere.
SHARED_CIFAR = Path(
    os.environ.get("CT_CIFAR_ARCHIVE", REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz")
)


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs a worker per core), pin each worker to one core: the
    trainings its tests start inherit the mask, so ct.cpu_budget gives each one thread and the
    workers share the cores instead of oversubscribing them (3-17x slower, not 2x)."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if worker.startswith("gw") and hasattr(os, "sched_setaffinity"):
        cores = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cores[int(worker[2:]) % len(cores)]})


@pytest.fixture(scope="session")
def tiny_cifar_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only-by-convention data dir: 5 x 200 training images, 200 test images."""
    return make_cifar(tmp_path_factory.mktemp("cifar"), per_batch=200, test=200)


@pytest.fixture
def tiny_cifar(tiny_cifar_root: Path, tmp_path: Path) -> Path:
    """A private copy of the small data dir, for tests that may damage or extend it."""
    copy = tmp_path / "data"
    shutil.copytree(tiny_cifar_root, copy)
    return copy


# ------------------------------------------------------------------ pipeline (scripts/) fixtures
# Used by tests/test_scripts_*.py, tests/test_pipeline*.py and tests/test_docker*.py.


SCRIPTS = REPO / "scripts"
VENV_BIN = REPO / ".venv" / "bin"


@pytest.fixture(scope="session")
def docker_engine():
    """A running Docker engine and a base image (tests/docker_engine.py); skip or fail without."""
    from tests import docker_engine as de

    yield from real_service(de.engine_session, de.EngineUnavailable, "Docker engine",
                            "CT_REQUIRE_DOCKER")


def real_service(start: Callable[[], AbstractContextManager[Any]],
                 unavailable: type[Exception], what: str, require: str) -> Iterator[Any]:
    """Yield what `start()` provides for the session; skip with the reason when it raises
    `unavailable`, or fail when the environment variable `require` is 1 (CI)."""
    try:
        with start() as service:
            yield service
            return
    except unavailable as err:
        reason = f"no {what}: {err}"
    if os.environ.get(require) == "1":
        pytest.fail(f"{require}=1 but {reason}")
    pytest.skip(reason)


def required_tool(found: str | Path | None, what: str, install: str, require: str) -> str:
    """The path of a tool a test runs; without it (`found` empty) skip with the reason and how to
    install it, or fail when the environment variable `require` is 1 (.ci/run sets every
    CT_REQUIRE_*), so that a green CI run cannot hide a tool it lacked."""
    if found:
        return str(found)
    reason = f"{what} is not installed ({install})"
    if os.environ.get(require) == "1":
        pytest.fail(f"{require}=1 but {reason}")
    pytest.skip(f"{reason}; {require}=1 makes this a failure")


def real_cifar() -> Path:
    """The folder holding the real CIFAR-10 copy (SHARED_CIFAR); a skip without one, or a failure
    under CT_REQUIRE_DATA=1."""
    found = SHARED_CIFAR.parent if SHARED_CIFAR.is_file() else None
    return Path(required_tool(found, f"the CIFAR-10 copy {SHARED_CIFAR}",
                              "put it there or name it with CT_CIFAR_ARCHIVE", "CT_REQUIRE_DATA"))


def venv_tool(name: str) -> str | None:
    """A tool requirements-dev.txt installs: beside the Python that runs the tests (make test's
    .venv), else in .venv/bin, else on PATH; None where none is (pytest run outside make test)."""
    for candidate in (Path(sys.executable).with_name(name), VENV_BIN / name):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which(name)


def _project_files() -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [p for p in out.split("\0") if p and (REPO / p).is_file()]


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.com",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def source_repo(tmp_path: Path) -> Path:
    """A real git repository holding this project's files (the working tree), one commit."""
    repo = tmp_path / "src"
    repo.mkdir()
    for rel in _project_files():
        dst = repo / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, dst)
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "first push")
    return repo


@pytest.fixture
def script_env(tmp_path: Path, tiny_cifar_root: Path) -> dict[str, str]:
    """Environment for the job scripts: a fresh workspace, the small dataset, the venv's python."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "SMTP_", "NOTIFY_"))}
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '/usr/bin:/bin')}",
        CT_WORKSPACE=str(tmp_path / "ws"),
        CT_DATA_DIR=str(tiny_cifar_root),
        CT_TRAIN_ARGS="--batch-size 32 --epochs 3 --seed 1",  # the default recipe, scaled down
        CT_TUNE_ARGS="--epochs 2 --batch-size 64 --max-epochs 2",
        CT_TUNE_TRIALS="2",
        CT_TUNE_BUDGET="120",
        CT_RUNTIME="local",
        CT_DEPLOY="0",  # chains end at the verdict; tests/test_job7.py runs the deploy step
        # runs made up by a test have no model that runs: their claim promotes; the pipeline's
        # own measurement of a candidate is tested, with real chains, in tests/test_measured.py
        CT_MEASURE="0",
    )
    return env


def run_script(
    name: str, env: dict[str, str], *args: str, timeout: float = 600, check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(SCRIPTS / name), *args], env=env, capture_output=True, text=True, timeout=timeout,
        cwd=cwd,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{name} exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def lib_sh(env: dict[str, str], snippet: str) -> subprocess.CompletedProcess[str]:
    """Run `snippet` after sourcing scripts/lib.sh, as a job script does."""
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source scripts/lib.sh; {snippet}"],
                          cwd=REPO, env={**env, "CT_JOB": "test"}, capture_output=True,
                          text=True, timeout=120, check=False)


def read_props(path: Path) -> dict[str, str]:
    """A record as Jenkins reads it (java.util.Properties: escapes undone), through the pipeline's
    one properties reader, whose escaping tests/test_gate.py checks against literal text."""
    from ct.pipeline.records import parse_properties

    return parse_properties(path.read_text(encoding="utf-8"))


class _Inbox:
    def __init__(self) -> None:
        self.messages: list = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.messages.append(message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"


@pytest.fixture
def smtp_server():
    """A real SMTP server (aiosmtpd) on loopback; yields (env settings, inbox)."""
    from aiosmtpd.controller import Controller

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    inbox = _Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield (
            {
                "SMTP_HOST": "127.0.0.1",
                "SMTP_PORT": str(port),
                "SMTP_STARTTLS": "0",
                "NOTIFY_FROM": "ct@example.com",
                "NOTIFY_TO": "team@example.com",
            },
            inbox,
        )
    finally:
        controller.stop()


@pytest.fixture
def browser() -> str:
    """A real headless browser (Debian chromium) for pages; skip without, unless CI requires it."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CT_REQUIRE_BROWSER") == "1":
            pytest.fail("CT_REQUIRE_BROWSER=1 but chromium is not installed "
                        "(apt-get install -y --no-install-recommends chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI sets "
                    "CT_REQUIRE_BROWSER=1 to make this a failure")
    return found


@pytest.fixture
def devtools(browser: str, tmp_path: Path) -> Iterator[DevTools]:
    """A fresh page in that browser, driven over the DevTools protocol; closed after the test."""
    tools = DevTools(browser, tmp_path)
    try:
        tools.open_page()
        yield tools
    finally:
        tools.close()


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (tests/postgres_server.py) for the session; its URL. Skips
    without one, unless CT_REQUIRE_POSTGRES=1 (CI), which makes that a failure."""
    from tests import postgres_server as pg

    yield from real_service(pg.postgres_server, pg.PostgresUnavailable, "PostgreSQL server",
                            "CT_REQUIRE_POSTGRES")


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ET.Element]:
    """jenkins/jobs.yaml rendered once per session by the real Jenkins Job Builder."""
    from tests.jenkins_render import render_jobs

    return render_jobs(tmp_path_factory.mktemp("jjb") / "out")


@pytest.fixture
def docker_env(script_env, docker_engine):
    """script_env on the docker runtime, with the test base image and a private image prefix."""
    prefix = f"ct-test-{uuid.uuid4().hex[:8]}"
    env = {
        **script_env,
        "DOCKER_HOST": docker_engine.host,
        "CT_RUNTIME": "docker",
        "CT_BASE_IMAGE": docker_engine.base_image,
        "CT_IMAGE_PREFIX": prefix,
    }
    yield env
    ids = docker_engine.docker("ps", "-aq", "--filter", f"label=ct.workspace={env['CT_WORKSPACE']}")
    if ids.split():
        docker_engine.docker("rm", "-f", *ids.split(), check=False)
    images = docker_engine.docker("images", "-q", "--filter", f"reference={prefix}-*")
    if images.split():
        docker_engine.docker("rmi", "-f", *set(images.split()), check=False)
