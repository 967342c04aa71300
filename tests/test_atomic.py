"""ct.atomic: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ct import atomic


def test_atomic_writes_get_the_usual_file_mode(tmp_path: Path) -> None:
    """Results must be as readable as plainly written ones (the umask applies, not 0600)."""
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "accuracy.txt", "81.27\n")
    finally:
        os.umask(old)
    assert (tmp_path / "accuracy.txt").stat().st_mode & 0o777 == 0o644


def test_a_failed_write_keeps_the_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "metrics.json"
    atomic.write_json(target, {"accuracy": 81.27})
    before = target.read_bytes()

    def broken(tmp: Path) -> None:
        tmp.write_text("{half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic.write_via(target, broken)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
