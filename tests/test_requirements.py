"""Shipped is tested: the torch the test suite runs, the torch the test images run and the torch
the training image installs are one pin (requirements.txt), and what two images share is pinned
alike."""

from __future__ import annotations

import os
import re

import pytest
import torch

from tests import docker_engine
from tests.conftest import REPO


def pins(name: str) -> dict[str, str]:
    found = {}
    for line in (REPO / name).read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if "==" in spec:
            package, version = spec.split("==")
            found[package.lower()] = version
    return found


def test_the_suite_runs_the_pinned_torch() -> None:
    assert torch.__version__.split("+")[0] == pins("requirements.txt")["torch"]


def test_the_test_images_run_the_pinned_torch() -> None:
    try:
        wheel = docker_engine._wheel()
    except docker_engine.EngineUnavailable as exc:
        if os.environ.get("CT_REQUIRE_DOCKER") == "1":
            raise
        pytest.skip(str(exc))
    assert wheel.name.startswith(f"torch-{pins('requirements.txt')['torch']}+cpu-")


@pytest.mark.parametrize(("dockerfile", "files"), [
    ("Dockerfile.train", ["requirements.txt"]),
    ("Dockerfile.tune", ["requirements.txt", "requirements-tune.txt"])])
def test_the_training_images_install_the_pins(dockerfile: str, files: list[str]) -> None:
    text = (REPO / dockerfile).read_text()
    installs = re.findall(r"^RUN pip install --no-cache-dir (.+)$", text, re.M)
    assert installs == [" ".join(f"-r /tmp/{name}" for name in files)]


def test_what_the_trained_and_the_served_images_share_is_pinned_alike() -> None:
    trained, served = pins("requirements.txt"), pins("requirements-serve.txt")
    shared = set(trained) & set(served)
    assert {"pillow", "onnxruntime"} <= shared
    assert {name: trained[name] for name in shared} == {name: served[name] for name in shared}
