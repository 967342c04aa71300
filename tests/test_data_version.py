"""ct.data_version: the version of CIFAR-10 plus the increments (stable under listing order and
names, changed by one pixel), its per-file digest cache, the layout it accepts, and its CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ct import data_version
from ct.data_version import DataVersionError, compute, version_of
from tests.conftest import REPO


def write_image(path: Path, seed: int, size: tuple[int, int] = (47, 13), mode: str = "RGB"
                ) -> Path:
    """A real image file of random pixels (the format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def add_increment(data: Path, name: str, images: dict[str, int]) -> Path:
    """data/increments/<name>/ with one image per "split/class/file" key (value: its seed)."""
    for rel, seed in images.items():
        write_image(data / "increments" / name / rel, seed)
    return data / "increments" / name


IMAGES = {"train/cat/a.png": 1, "train/cat/b.jpg": 2, "train/dog/c.png": 3, "test/dog/d.png": 4}


def test_the_version_ignores_order_and_names_and_changes_with_one_pixel(tiny_cifar: Path,
                                                                         tmp_path: Path) -> None:
    add_increment(tiny_cifar, "first", IMAGES)
    version = compute(tiny_cifar).version
    (tmp_path / "none").mkdir()  # an increments folder without increments: the base alone
    assert compute(tiny_cifar, tmp_path / "none").version != version

    # The same bytes under other file and increment names, split over two increments and
    # written in another order: the same data, the same version.
    other = tmp_path / "other"
    for rel in reversed(list(IMAGES)):
        split, cls, name = rel.split("/")
        target = other / ("zeta" if split == "test" else "alpha") / split / cls / f"x-{name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_cifar / "increments" / "first" / rel, target)
    assert compute(tiny_cifar, other).version == version

    # One pixel of one image: another version. The same image under another class: too.
    path = tiny_cifar / "increments" / "first" / "train" / "cat" / "a.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0, 0] ^= 1
    Image.fromarray(pixels).save(path)
    changed = compute(tiny_cifar).version
    assert changed != version
    moved = tiny_cifar / "increments" / "first" / "train" / "bird"
    moved.mkdir()
    path.rename(moved / "a.png")
    assert compute(tiny_cifar).version not in (version, changed)


def test_the_version_covers_the_base_and_needs_no_increments(tiny_cifar: Path) -> None:
    described = compute(tiny_cifar).describe()
    assert described["increments"] == {} and described["increments_dir"] is None
    assert described["data_version"] == version_of(described["base_sha256"], [])
    assert version_of("0" * 64, []) != version_of("1" * 64, [])
    assert version_of("0" * 64, ["train/cat/x", "test/dog/y"]) == \
        version_of("0" * 64, ["test/dog/y", "train/cat/x"])
    with pytest.raises(DataVersionError, match="check --data-dir"):
        compute(tiny_cifar / "nothing-here")


def test_the_digest_cache_is_used_for_unchanged_size_and_mtime(tiny_cifar: Path,
                                                               tmp_path: Path) -> None:
    add_increment(tiny_cifar, "first", IMAGES)
    cache_dir = tmp_path / "cache"
    first = compute(tiny_cifar, cache_dir=cache_dir)
    assert first.hashed == 4
    saved = json.loads((cache_dir / data_version.HASH_CACHE).read_text())
    assert set(saved["files"]) == {f"first/{rel}" for rel in IMAGES}
    assert compute(tiny_cifar, cache_dir=cache_dir).hashed == 0

    # Other bytes of the same size, the modification time put back: only a cache would keep
    # the old digest, and the version with it.
    path = tiny_cifar / "increments" / "first" / "train" / "dog" / "c.png"
    stat = path.stat()
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    cached = compute(tiny_cifar, cache_dir=cache_dir)
    assert cached.hashed == 0 and cached.version == first.version
    assert compute(tiny_cifar).version != first.version, "without the cache every file is read"

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a touched file is read again
    touched = compute(tiny_cifar, cache_dir=cache_dir)
    assert touched.hashed == 1 and touched.version != first.version
    (cache_dir / data_version.HASH_CACHE).write_text("{not json")
    assert compute(tiny_cifar, cache_dir=cache_dir).version == touched.version


def test_hidden_files_are_left_out(tiny_cifar: Path) -> None:
    folder = add_increment(tiny_cifar, "first", IMAGES)
    version = compute(tiny_cifar).version
    (folder / "train" / "cat" / ".DS_Store").write_bytes(b"\0\1")
    (tiny_cifar / "increments" / ".partial").mkdir()
    assert compute(tiny_cifar).version == version


@pytest.mark.parametrize(("make", "named", "says"), [
    (lambda inc: write_image(inc / "train" / "kitten" / "a.png", 9), "train/kitten",
     "is not a class folder"),
    (lambda inc: write_image(inc / "val" / "cat" / "a.png", 9), "first/val",
     "only train/ and test/"),
    (lambda inc: (inc / "train" / "cat" / "notes.txt").write_text("x"), "cat/notes.txt",
     "is not an image file"),
    (lambda inc: write_image(inc / "train" / "a.png", 9), "train/a.png", "class folder"),
    (lambda inc: (inc.parent / "README.md").write_text("x"), "increments/README.md",
     "only increment folders"),
    (lambda inc: (inc.parent / "empty" / "train" / "cat").mkdir(parents=True), "increments/empty",
     "empty increment"),
])
def test_a_layout_error_names_the_path(tiny_cifar: Path, make: object, named: str,
                                       says: str) -> None:
    folder = add_increment(tiny_cifar, "first", IMAGES)
    compute(tiny_cifar)
    make(folder)  # type: ignore[operator]
    with pytest.raises(DataVersionError) as caught:
        compute(tiny_cifar)
    message = str(caught.value)
    assert named in message and says in message and "\n" not in message


def test_increments_given_must_exist_the_default_may_not(tiny_cifar: Path) -> None:
    assert compute(tiny_cifar).increments_dir is None
    with pytest.raises(DataVersionError, match=r"--increments .*missing is not a folder"):
        compute(tiny_cifar, tiny_cifar / "missing")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ct.data_version", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_cli_prints_the_version_and_counts(tiny_cifar: Path) -> None:
    add_increment(tiny_cifar, "first", IMAGES)
    add_increment(tiny_cifar, "second", {"test/ship/s.png": 11})
    expected = compute(tiny_cifar).version
    proc = cli("--data-dir", str(tiny_cifar))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"data version {expected}"
    assert "increment first: 3 train, 1 test images" in lines
    assert "increment second: 0 train, 1 test images" in lines
    assert (tiny_cifar / data_version.HASH_CACHE).is_file(), "cached beside the data by default"
    described = json.loads(cli("--data-dir", str(tiny_cifar), "--json").stdout)
    assert described["data_version"] == expected
    assert described["increments"]["first"] == {"train": 3, "test": 1}
    assert (described["increment_train"], described["increment_test"]) == (3, 2)

    (tiny_cifar / "increments" / "second" / "test" / "ship" / "s.txt").write_text("x")
    proc = cli("--data-dir", str(tiny_cifar))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "ship/s.txt is not an image file" in proc.stderr
