"""A pipeline workspace as a finished run leaves it, for the gate's and promotion's tests (and the
mail's), and the fixtures that make one read-only. Not a test module."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
COMMIT = "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"


def make_workspace(
    root: Path,
    accuracy: float = 81.27,
    *,
    run_id: str = "r1",
    mode: str = "train",
    model_bytes: bytes | None = b"model-r1",
    accuracy_text: str | None = None,
) -> Path:
    """A workspace as train.py leaves it: accuracy.txt, metrics.json, runs/<id>/model.pt."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "commit.txt").write_text(COMMIT + "\n")
    text = f"{accuracy}\n" if accuracy_text is None else accuracy_text
    (root / "accuracy.txt").write_text(text)
    write_run(root, accuracy, run_id=run_id, mode=mode, model_bytes=model_bytes)
    return root


def write_run(
    root: Path,
    accuracy: float,
    *,
    run_id: str,
    mode: str = "train",
    model_bytes: bytes | None = b"model",
) -> dict[str, Any]:
    run_dir = f"runs/{run_id}"
    (root / run_dir).mkdir(parents=True, exist_ok=True)
    if model_bytes is not None:
        (root / run_dir / "model.pt").write_bytes(model_bytes)
    metrics: dict[str, Any] = {
        "accuracy": accuracy,
        "test_loss": 0.61,
        "epochs": 3,
        "wall_time_s": 42.5,
        "images_per_s": 1834.2,
        "config": {"lr": 0.05, "optimizer": "sgd", "batch_size": 128, "seed": 1},
        "device": "cpu",
        "torch": "2.13.0",
        "commit": COMMIT,
        "run_id": run_id,
        "run_dir": run_dir,
        "model": f"{run_dir}/model.pt",
        "mode": mode,
    }
    if mode == "tune":
        metrics |= {
            "best_params": {"lr": 0.1, "optimizer": "adamw", "weight_decay": 0.0005},
            "val_accuracy": accuracy - 0.5,
            "trials": 4, "trials_finished": 3, "trials_pruned": 1, "study": "cifar10-0123456789ab",
        }
    (root / "metrics.json").write_text(json.dumps(metrics))
    return metrics


def run_module(
    module: str, *args: str, env: dict[str, str] | None = None, user: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """`python -m module args`, as another user when `user` is a command prefix (setpriv)."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("CT_", "BUILD_"))}
    # CT_MEASURE=0: a made-up run's model cannot run, so its claim promotes (conftest's
    # script_env says the same; tests/test_measured.py measures real ones)
    full_env |= {"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1",
                 "CT_MEASURE": "0"} | (env or {})
    return subprocess.run(
        [*user, sys.executable, "-m", module, *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def read_properties(path: Path) -> dict[str, str]:
    """Parse like java.util.Properties does for these simple files."""
    pairs = {}
    for line in path.read_text(encoding="ascii").splitlines():
        if line and not line.startswith(("#", "!")):
            key, sep, value = line.partition("=")
            assert sep, f"not a key=value line: {line!r}"
            pairs[key] = value
    return pairs


def snapshot(workspace: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(workspace)): p.read_bytes() for p in workspace.rglob("*") if p.is_file()
    }


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


class Reader(threading.Thread):
    """Calls `read` over and over until `finish()`, which raises what `read` raised: an exception
    in a plain thread is only a pytest warning, and a test would pass with its reader dead.
    `reads` counts the calls that returned; `wait_past(n)` blocks until there are more than n
    (or the reader has died), so a test can have the reader look between two of its writes."""

    def __init__(self, read: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.read, self.reads, self.error = read, 0, None
        self.stopping, self.progress = threading.Event(), threading.Condition()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.read()
                with self.progress:
                    self.reads += 1
                    self.progress.notify_all()
        except BaseException as err:  # handed to the test's thread by finish()
            self.error = err
        finally:
            with self.progress:
                self.stopping.set()
                self.progress.notify_all()

    def wait_past(self, reads: int) -> None:
        with self.progress:
            self.progress.wait_for(lambda: self.reads > reads or self.stopping.is_set())

    def finish(self) -> None:
        self.stopping.set()
        self.join()
        if self.error is not None:
            raise self.error


@pytest.fixture
def readonly_workspace() -> Iterator[Path]:
    """A workspace in a world-readable folder; the test makes it read-only (mode 0555 folders);
    as root, run the tools as nobody (see `other_user`), since root writes through any mode."""
    root = Path(tempfile.mkdtemp(prefix="ct-readonly-"))
    root.chmod(0o755)
    yield root / "ws"
    for path in [root, *root.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)
    shutil.rmtree(root)


def make_read_only(ws: Path) -> None:
    for path in [ws, *ws.rglob("*")]:
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o555)


@pytest.fixture(scope="session")
def other_user() -> tuple[str, ...]:
    """The command prefix that runs a tool as a user who cannot write the workspace."""
    if os.geteuid() != 0:
        return ()  # we are not root: mode 0555 already stops our writes
    prefix = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop privileges for this test")
    command = [*prefix, sys.executable, "-c", "import ct.pipeline.gate"]
    env = {"PYTHONPATH": str(REPO)}
    probe = subprocess.run(command, cwd=REPO, env=env, capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run {sys.executable}: {probe.stderr.decode()[-200:]}")
    return prefix
