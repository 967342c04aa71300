"""Run train.py's main in-process, so torch is imported once for a whole test session; the small
runs the trainer's tests share."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

import train
from ct.trainer.stopping import TEST_SIGNAL_ENV


def run(argv: list, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `train.py ARGV`."""
    try:
        status = train.main([str(a) for a in argv])
    except SystemExit as exc:
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


# Small batches give the batch-norm statistics enough steps to settle on 1,000 images.
QUICK = ["--epochs", "3", "--batch-size", "64"]


def only_run_dir(ws: Path, kind: str = "train") -> Path:
    (run_dir,) = sorted(ws.glob(f"runs/{kind}-*"))
    return run_dir


def unfinished_run(tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str],
                    *extra: str) -> Path:
    """A workspace with a good earlier result and an unfinished run of the QUICK config."""
    ws = tmp_path / "ws"
    assert run(["--out", ws, "--data-dir", data, *QUICK, *extra], capsys)[0] == 0
    run_dir = only_run_dir(ws)
    (run_dir / "metrics.json").unlink()  # as if killed before the end
    return ws


def signalled_at(cmd: list[str], point: str, signame: str) -> subprocess.CompletedProcess[str]:
    """Run `cmd`, which sends itself `signame` once it reaches `point` (ct.trainer.stopping's
    CT_TEST_SIGNAL_AT): the same moment on every machine, where reading the log and then
    signalling raced the next epoch."""
    env = {**os.environ, TEST_SIGNAL_ENV: f"{signame}@{point}"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
