"""Run train.py's main in-process, so torch is imported once for a whole test session."""

from __future__ import annotations

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
