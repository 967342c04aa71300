"""Run train.py's main in-process, so torch is imported once for a whole test session; the small
runs the trainer's tests share."""

from __future__ import annotations

from pathlib import Path

import pytest

import train


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
