"""The serving image: Dockerfile.serve linted, then built on the tests' Docker engine (the serve
base of tests/docker_engine.py: Debian's python3 and requirements-serve.txt's pins, no torch) and
run as a deployment runs it: uid 1000, a read-only root, the workspace mounted read-only, host
network. Its answer to a PNG must be `python -m ct.serving.predict`'s for the same model."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import REPO, required_tool, venv_tool

DOCKERFILE = REPO / "Dockerfile.serve"
MAX_IMAGE_BYTES = 400_000_000


def _instructions(name: str) -> list[str]:
    parser = DockerfileParser(fileobj=open(DOCKERFILE, "rb"))
    return [i["value"] for i in parser.structure if i["instruction"] == name]


def test_dockerfile_serve_is_hadolint_clean_and_runs_the_service_unprivileged() -> None:
    hadolint = required_tool(venv_tool("hadolint"), "hadolint",
                             "pip install -r requirements-dev.txt", "CT_REQUIRE_HADOLINT")
    proc = subprocess.run([hadolint, DOCKERFILE.name], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert base and base.group(1) == "python:3.11-slim-bookworm"
    assert _instructions("USER")[-1] == "1000:1000"
    assert json.loads(_instructions("ENTRYPOINT")[-1]) == ["python", "-m", "ct.serving"]
    command = json.loads(_instructions("CMD")[-1])
    assert command[:2] == ["--workspace", "/workspace"]
    assert _instructions("EXPOSE") == ["8500"] and _instructions("HEALTHCHECK")


def test_the_serving_requirements_are_pinned_and_bring_no_torch() -> None:
    lines = [line.split("#", 1)[0].strip()
             for line in (REPO / "requirements-serve.txt").read_text().splitlines()]
    pins = [line for line in lines if line]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[\w.]+", pin) for pin in pins), pins
    names = {pin.split("==")[0].lower() for pin in pins}
    assert {"onnxruntime", "numpy", "pillow", "starlette", "uvicorn"} <= names
    assert not names & {"torch", "torchvision", "onnx"}


# ------------------------------------------------------------------------ the built image


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def serve_image(docker_engine) -> Iterator[str]:
    from tests import docker_engine as de

    base = de.ensure_serve_base_image(docker_engine)
    digest = hashlib.sha256(DOCKERFILE.read_bytes() + base.encode()).hexdigest()[:12]
    tag = f"ct-test-serve:{digest}"
    docker_engine.docker("build", "--build-arg", f"BASE_IMAGE={base}", "-f", str(DOCKERFILE),
                         "-t", tag, str(REPO), timeout=900)
    yield tag
    docker_engine.docker("rmi", "-f", tag, check=False)


@pytest.mark.slow
def test_the_image_holds_the_serving_code_and_no_torch_in_under_400_mb(docker_engine,
                                                                      serve_image) -> None:
    size = int(docker_engine.docker("image", "inspect", "--format", "{{.Size}}",
                                    serve_image).strip())
    assert size < MAX_IMAGE_BYTES, f"{size / 1e6:.0f} MB"
    probe = ("import importlib.util as u, json, os; print(json.dumps({"
             "'torch': u.find_spec('torch') is not None, 'ct': sorted(os.listdir('/app/ct')),"
             "'uid': os.getuid()}))")
    seen = json.loads(docker_engine.docker("run", "--rm", "--entrypoint", "python", serve_image,
                                           "-c", probe))
    assert seen["torch"] is False
    assert "serving" in seen["ct"] and "images.py" in seen["ct"]
    assert not {"trainer", "pipeline"} & set(seen["ct"])
    assert seen["uid"] == 1000


def _readable(ws: Path) -> None:
    """The workspace as uid 1000 in the container reads it: every folder a+rx, file a+r."""
    for folder, _dirs, names in os.walk(ws):
        os.chmod(folder, 0o755)
        for name in names:
            os.chmod(Path(folder) / name, 0o644)


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read()
    finally:
        conn.close()


def _post_png(port: int, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/predict", body=body, headers={"Content-Type": "image/png"})
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def _wait_healthy(docker_engine, container: str, port: int, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if _get(port, "/healthz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    logs = docker_engine.docker("logs", container, check=False)
    pytest.fail(f"the service did not answer /healthz 200 within {seconds:.0f} s:\n{logs}")


def _png(tmp_path: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)
    path = tmp_path / "picture.png"
    Image.fromarray(pixels).save(path)  # 40x40: the service resizes it, as predict does
    return path


@pytest.mark.slow
def test_the_image_serves_as_predict_predicts(docker_engine, serve_image, tmp_path) -> None:
    from tests import served_model

    ws = tmp_path / "ws"
    champion = served_model.write_champion(ws, seed=3)
    served_model.want(ws, champion)
    served_model.write_best(ws, champion)
    _readable(ws)
    image = _png(tmp_path)
    port = _free_port()
    container = f"ct-test-serve-{port}"
    docker_engine.docker(
        "run", "-d", "--name", container, "--user", "1000:1000", "--read-only",
        "--tmpfs", "/tmp", "--network", "host", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "-e", f"CT_SERVE_PORT={port}",
        "--health-interval", "1s", "--health-start-period", "1s",
        "-v", f"{ws}:/workspace:ro", serve_image,
        "--workspace", "/workspace", "--host", "127.0.0.1", "--port", str(port))
    try:
        _wait_healthy(docker_engine, container, port)
        status, answer = _post_png(port, image.read_bytes())
        assert status == 200, answer
        assert answer["model"] == champion.id
        local = subprocess.run([sys.executable, "-m", "ct.serving.predict", "--model", str(ws),
                                str(image)], cwd=REPO, capture_output=True, text=True,
                               timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert local.returncode == 0, local.stderr
        expected = json.loads(local.stdout.strip().splitlines()[-1])
        (served,) = answer["predictions"]
        assert {k: served[k] for k in ("class", "probability", "top3")} == \
            {k: expected[k] for k in ("class", "probability", "top3")}
        assert expected["model"] == champion.id
        _wait_health_status(docker_engine, container, "healthy")
    finally:
        docker_engine.docker("rm", "-f", container, check=False)


def _wait_health_status(docker_engine, container: str, wanted: str, seconds: float = 30) -> None:
    """The image's own HEALTHCHECK (python urllib to /healthz on CT_SERVE_PORT) reaches `wanted`."""
    deadline, seen = time.monotonic() + seconds, ""
    while time.monotonic() < deadline:
        seen = docker_engine.docker("inspect", "--format", "{{.State.Health.Status}}",
                                    container).strip()
        if seen == wanted:
            return
        time.sleep(0.5)
    pytest.fail(f"health status {seen!r}, not {wanted!r}, after {seconds:.0f} s")
