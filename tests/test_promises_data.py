"""The README's promises about where the data comes from, through job3 on the local runtime:
CT_DATA_DIR seeds the workspace's data/ with hard links on the same file system and a copy on
another; with neither CT_DATA_DIR nor data/, job3 has train.py download CIFAR-10, and offline that
ends in one line saying what to do."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import read_props, run_script

FOLDER = "cifar-10-batches-py"


def data_files(root: Path) -> dict[str, os.stat_result]:
    return {p.name: p.stat() for p in sorted((root / FOLDER).iterdir())}


def seed(env: dict[str, str]) -> Path:
    """job3 on a workspace with no push: it seeds data/ first (a setting to fix must not use up a
    push), then says no push waits (exit 3). The workspace's data/."""
    proc = run_script("job3-train.sh", env, check=False)
    assert proc.returncode == 3, proc.stderr
    assert "dataset seeded" in proc.stderr
    return Path(env["CT_WORKSPACE"]) / "data"


def test_data_dir_on_the_same_file_system_is_hard_linked(script_env, tiny_cifar):
    # tiny_cifar: a private copy, so no other workspace of the session links its files
    source = data_files(tiny_cifar)
    assert all(st.st_nlink == 1 for st in source.values())
    data = seed({**script_env, "CT_DATA_DIR": str(tiny_cifar)})
    seeded = data_files(data)
    assert seeded.keys() == source.keys() and len(seeded) == 7  # 5 batches, test, meta
    for name, st in seeded.items():
        assert (st.st_dev, st.st_ino) == (source[name].st_dev, source[name].st_ino), name
        assert os.stat(tiny_cifar / FOLDER / name).st_nlink == st.st_nlink == 2, name


@pytest.fixture
def other_file_system(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than tmp_path (/dev/shm, a tmpfs), where no hard link
    from tmp_path can be made."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system (/dev/shm) beside the test's temporary folder")
    folder = Path(tempfile.mkdtemp(prefix="ct-data-", dir=shm))
    yield folder
    shutil.rmtree(folder)


def test_data_dir_on_another_file_system_is_copied(script_env, tiny_cifar_root,
                                                   other_file_system):
    shutil.copytree(tiny_cifar_root / FOLDER, other_file_system / FOLDER)
    data = seed({**script_env, "CT_DATA_DIR": str(other_file_system)})
    source = data_files(other_file_system)
    seeded = data_files(data)
    assert seeded.keys() == source.keys() and len(seeded) == 7
    for name, st in seeded.items():
        assert st.st_dev != source[name].st_dev and st.st_nlink == 1, name
        assert (data / FOLDER / name).read_bytes() == (other_file_system / FOLDER / name
                                                       ).read_bytes(), name


@pytest.fixture
def refused_proxy() -> Iterator[str]:
    """An HTTP proxy URL on a loopback port that is bound and not listening: every connection
    to it is refused at once, so a download through it fails without waiting on a network."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_no_data_anywhere_downloads_and_offline_says_what_to_do(script_env, source_repo,
                                                                 refused_proxy):
    env = {k: v for k, v in script_env.items()
           if k not in ("CT_DATA_DIR", "NO_PROXY", "no_proxy")}
    env |= {"HTTPS_PROXY": refused_proxy, "https_proxy": refused_proxy,
            "HTTP_PROXY": refused_proxy, "http_proxy": refused_proxy}
    ws = Path(env["CT_WORKSPACE"])
    run_script("job1-pull.sh", env, str(source_repo))
    proc = run_script("job3-train.sh", env, check=False)
    assert proc.returncode == 1, proc.stderr
    assert "train.py downloads CIFAR-10 (--download)" in proc.stderr
    assert "--download" in (ws / "status" / "train.args").read_text().split("\0")
    # the trainer's own error: one line, what failed and what to do instead
    log = (ws / "status" / "train.log").read_text()
    assert "Traceback" not in log, log
    (line,) = [line for line in log.splitlines() if "could not download" in line]
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in line
    assert "refused" in line.lower()
    assert f"put cifar-10-python.tar.gz in {ws / 'data'} by hand" in line
    assert line.endswith("rerun without --download")
    assert line in proc.stdout  # job3 streams the run's log: the build's console shows it
    # bad input: exit 2, which a restart would only repeat
    assert read_props(ws / "status" / "train.properties")["EXIT_CODE"] == "2"
    assert "job6 will not restart it" in proc.stderr
    assert not list((ws / "data").glob("*.part")) and not (ws / "data" / FOLDER).exists()
