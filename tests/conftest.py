"""Shared fixtures: small datasets in the real CIFAR-10 format, paths to the repository."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.synthetic_cifar import make_cifar

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"


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
