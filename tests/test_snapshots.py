"""ct.pipeline.snapshots and ct.workspace.code_sha256: each commit's read-only code snapshot, its
digest, and removing the snapshots nothing refers to (bounded, reported)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ct import workspace as names
from ct.pipeline import push_queue, snapshots
from ct.pipeline.push_queue import Push
from tests.conftest import REPO

COMMITS = [f"{n:x}" * 40 for n in range(1, 8)]  # seven commit ids, "111...", "222...", ...


def make_snapshot(ws: Path, commit: str, age: float) -> Path:
    """A read-only snapshot as job1 leaves it, `age` seconds old."""
    code = ws / "code" / commit
    (code / "ct").mkdir(parents=True)
    (code / "train.py").write_text(f"print('{commit}')\n")
    (code / "ct" / "net.py").write_text("x = 1\n" * 1000)
    for path in (code / "ct" / "net.py", code / "train.py", code / "ct", code):
        path.chmod(path.stat().st_mode & ~0o222)
    stamp = time.time() - age
    os.utime(code, (stamp, stamp))
    return code


def run(ws: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CT_")} | env
    return subprocess.run([sys.executable, "-m", "ct.pipeline.snapshots", "--workspace", str(ws),
                           *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=60)


def test_only_unneeded_snapshots_beyond_the_newest_few_are_removed():
    mtimes = {commit: 1000.0 - n for n, commit in enumerate(COMMITS)}  # COMMITS[0] is newest
    needed = {COMMITS[6]}
    assert snapshots.to_remove(mtimes, needed, keep=2) == sorted(COMMITS[2:6])
    assert snapshots.to_remove(mtimes, needed, keep=10) == []
    assert snapshots.to_remove(mtimes, set(COMMITS), keep=0) == []


def test_prune_keeps_what_is_referred_to_and_reports_the_space(tmp_path):
    ws = tmp_path / "ws"
    for n, commit in enumerate(COMMITS):
        make_snapshot(ws, commit, age=100 + n)
    waiting, running, champion, latest = COMMITS[6], COMMITS[5], COMMITS[4], COMMITS[3]
    push_queue.save(ws, [Push(waiting, "main", "2026-12-06T01:00:00Z")])
    (ws / "status" / "train.properties").write_text(f"COMMIT={running}\nSTATUS=running\n")
    (ws / names.BEST_FILE).write_text(json.dumps({"lineage": {"commit": champion}}))
    (ws / names.COMMIT_FILE).write_text(latest + "\n")
    leftover = ws / "code" / f"{COMMITS[0]}.Ab12Cd.tmp"
    leftover.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not ours")
    planted = ws / "code" / ("f" * 40)
    planted.symlink_to(outside)
    proc = run(ws, "prune", CT_KEEP_SNAPSHOTS="1")
    assert proc.returncode == 0, proc.stderr
    left = sorted(p.name for p in (ws / "code").iterdir())
    # the four referred to, plus the newest other one (COMMITS[0]); the link and leftover gone
    assert left == sorted([waiting, running, champion, latest, COMMITS[0]])
    assert (outside / "keep.txt").read_text() == "not ours"
    line = proc.stdout.strip()
    assert line.startswith("snapshots: 5 kept (") and "4 removed (" in line and "MB freed" in line
    assert "CT_KEEP_SNAPSHOTS=1" in line
    # nothing to do the second time
    assert "0 removed (0.0 MB freed)" in run(ws, "prune", CT_KEEP_SNAPSHOTS="1").stdout


def test_prune_of_a_fresh_workspace_and_a_bad_setting(tmp_path):
    assert run(tmp_path, "prune").stdout.strip() == "snapshots: none yet"
    proc = run(tmp_path, "prune", CT_KEEP_SNAPSHOTS="all")
    assert proc.returncode == 2 and "CT_KEEP_SNAPSHOTS must be a whole number" in proc.stderr


def test_digest_is_the_code_sha256_and_refuses_what_is_not_a_snapshot(tmp_path):
    ws = tmp_path / "ws"
    code = make_snapshot(ws, COMMITS[0], age=0)
    proc = run(ws, "digest", "--commit", COMMITS[0])
    assert proc.stdout.strip() == names.code_sha256(code)
    (ws / "code" / COMMITS[1]).symlink_to(code)
    proc = run(ws, "digest", "--commit", COMMITS[1])
    assert proc.returncode == 2 and "is not a snapshot folder" in proc.stderr
    proc = run(ws, "digest", "--commit", "../../etc")
    assert proc.returncode == 2 and "not a full commit id" in proc.stderr


def test_code_sha256_sees_every_change_to_the_code(tmp_path):
    def tree(root: Path) -> Path:
        (root / "pkg").mkdir(parents=True)
        (root / "train.py").write_text("print(1)\n")
        (root / "pkg" / "a.py").write_text("a = 1\n")
        (root / "pkg" / "__pycache__").mkdir()
        (root / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"compiled")
        (root / "pkg" / "link").symlink_to("a.py")
        return root

    base = names.code_sha256(tree(tmp_path / "one"))
    assert names.code_sha256(tree(tmp_path / "two")) == base  # same code, same digest
    changes = {
        "a file's bytes": lambda r: (r / "pkg" / "a.py").write_text("a = 2\n"),
        "a file's name": lambda r: (r / "pkg" / "a.py").rename(r / "pkg" / "b.py"),
        "a link's target": lambda r: ((r / "pkg" / "link").unlink(),
                                      (r / "pkg" / "link").symlink_to("train.py")),
        "a link to a folder": lambda r: (r / "dirlink").symlink_to("pkg"),
        "a new file": lambda r: (r / "extra.py").write_text(""),
    }
    for n, (what, change) in enumerate(changes.items()):
        root = tree(tmp_path / f"changed-{n}")
        change(root)
        assert names.code_sha256(root) != base, what
    cached = tree(tmp_path / "cache")
    (cached / "pkg" / "__pycache__" / "a.pyc").write_bytes(b"other")
    assert names.code_sha256(cached) == base  # compiled caches are not code


@pytest.mark.parametrize("order", ["all", "newest"])
def test_prune_never_removes_a_waiting_push(tmp_path, order):
    ws = tmp_path
    for n, commit in enumerate(COMMITS):
        make_snapshot(ws, commit, age=1000 - n)  # the waiting ones are the oldest snapshots
    waiting = COMMITS[-2:] if order == "all" else COMMITS[-1:]
    push_queue.save(ws, [Push(c, "", "2026-12-06T01:00:00Z") for c in waiting])
    assert run(ws, "prune", CT_KEEP_SNAPSHOTS="0").returncode == 0
    assert sorted(p.name for p in (ws / "code").iterdir()) == sorted(waiting)
