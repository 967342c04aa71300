"""ct.atomic: a reader sees the old file or the new one, never half of either."""

from __future__ import annotations

import errno
import hashlib
import os
from pathlib import Path
from typing import Any

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


def test_write_files_is_all_or_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The second rename fails (injected fault): the first file gets its old content back."""
    first, second, third = tmp_path / "a.properties", tmp_path / "b.csv", tmp_path / "c" / "new"
    first.write_text("old a\n")
    second.write_text("old b\n")
    real_replace = os.replace

    def faulty_replace(src: Any, dst: Any) -> None:
        if Path(dst) == second:
            raise OSError(errno.EIO, "Input/output error (injected fault)", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", faulty_replace)
    with pytest.raises(atomic.WriteError) as failed:
        atomic.write_files({first: b"new a\n", third: b"new c\n", second: b"new b\n"})
    monkeypatch.undo()

    assert failed.value.target == second and failed.value.reason.startswith("Input/output")
    assert (first.read_text(), second.read_text()) == ("old a\n", "old b\n")
    assert not third.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.properties", "b.csv", "c"]


def test_write_files_names_the_file_in_the_way(tmp_path: Path) -> None:
    (tmp_path / "plot").write_text("a file where the folder must be")
    (tmp_path / "gate.properties").mkdir()
    with pytest.raises(atomic.WriteError) as failed:
        atomic.write_files({tmp_path / "plot" / "accuracy.csv": b"1\n"})
    assert str(failed.value) == (
        f"{tmp_path / 'plot' / 'accuracy.csv'}: Not a directory: {tmp_path / 'plot'}"
    )
    with pytest.raises(atomic.WriteError) as failed:
        atomic.write_files({tmp_path / "x": b"1", tmp_path / "gate.properties": b"2"})
    assert str(failed.value) == f"{tmp_path / 'gate.properties'}: Is a directory"
    assert not (tmp_path / "x").exists()


def test_store_by_content_names_the_file_by_its_sha256(tmp_path: Path) -> None:
    source = tmp_path / "model.pt"
    source.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    stored, sha256 = atomic.store_by_content(source, tmp_path / "models", "best-", ".pt")
    assert (stored.name, sha256) == (f"best-{digest[:16]}.pt", digest)
    assert stored.read_bytes() == b"weights"
    assert atomic.store_by_content(source, tmp_path / "models", "best-", ".pt")[0] == stored
    assert [p.name for p in (tmp_path / "models").iterdir()] == [stored.name]


def test_replace_symlink_switches_in_one_step(tmp_path: Path) -> None:
    link = tmp_path / "best-model.pt"
    link.write_bytes(b"a plain file from before")
    atomic.replace_symlink(link, "models/one.pt")
    assert os.readlink(link) == "models/one.pt"
    atomic.replace_symlink(link, "models/two.pt")
    assert os.readlink(link) == "models/two.pt"
    assert [p.name for p in tmp_path.iterdir()] == ["best-model.pt"]
    link.unlink()
    link.mkdir()
    with pytest.raises(atomic.WriteError) as failed:
        atomic.replace_symlink(link, "models/three.pt")
    assert failed.value.target == link and link.is_dir()
    assert [p.name for p in tmp_path.iterdir()] == ["best-model.pt"]
