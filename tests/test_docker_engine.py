"""The tests' own Docker engine helper (tests/docker_engine.py): stopping the dockerd it started."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests import docker_engine as de


def test_stopping_a_daemon_this_process_started_reaps_it(tmp_path, monkeypatch):
    """A stopped child stays a zombie until its parent reaps it, and a zombie still answers
    kill(pid, 0): without reaping, _stop_dockerd waited its full 30 s after `--keep`. A real
    child process (sleep) stands in for dockerd; _stop_dockerd only sees its pidfile."""
    monkeypatch.setattr(de, "RUN_DIR", tmp_path)
    child = subprocess.Popen(["sleep", "600"])
    (tmp_path / "dockerd.pid").write_text(f"{child.pid}\n")
    de._stop_dockerd()
    with pytest.raises(ChildProcessError):
        os.waitpid(child.pid, os.WNOHANG)  # already reaped by _stop_dockerd
    child.returncode = -15  # tell Popen not to wait for it again
