"""The CIFAR-10 loader: both on-disk forms, every check, the real copy when present."""

from __future__ import annotations

import hashlib
import pickle
import shutil
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ct.trainer import data as data_module
from ct.trainer.data import DataError, load_cifar, locate
from tests.conftest import real_cifar
from tests.synthetic_cifar import make_cifar_archive


def test_folder_loads_as_uint8_tensors(tiny_cifar_root: Path) -> None:
    data = load_cifar(tiny_cifar_root)
    assert data.train_x.shape == (1000, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (200, 3, 32, 32)
    assert data.train_y.dtype == torch.int64 and set(data.train_y.tolist()) == set(range(10))
    assert data.classes[0] == "airplane" and len(data.classes) == 10


def test_archive_is_read_in_place_and_equals_folder(tmp_path: Path, tiny_cifar_root: Path) -> None:
    archive = make_cifar_archive(tmp_path / "arch", per_batch=200, test=200)
    shutil.rmtree(tmp_path / "arch" / "staging")
    from_archive = load_cifar(archive.parent)
    assert from_archive.source.endswith("cifar-10-python.tar.gz")
    assert not (archive.parent / "cifar-10-batches-py").exists(), "the archive must not be unpacked"
    assert torch.equal(from_archive.train_x, load_cifar(tiny_cifar_root).train_x)


def test_missing_dataset_names_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-10-batches-py/ or cifar-10-python.tar.gz"):
        locate(tmp_path)


def _rewrite(path: Path, change: dict) -> None:
    batch = pickle.loads(path.read_bytes(), encoding="bytes")
    batch.update(change)
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: (f / "data_batch_3").unlink(), "data_batch_3 is missing"),
        (lambda f: (f / "test_batch").write_bytes(b"not a pickle"), "not a readable CIFAR-10"),
        (lambda f: _rewrite(f / "data_batch_1", {b"labels": [11] * 200}), "labels outside 0..9"),
        (lambda f: _rewrite(f / "data_batch_2", {b"labels": [1] * 199}), "199 labels for 200"),
        (lambda f: _rewrite(f / "test_batch", {b"data": b"x" * 10}), "expected uint8"),
        (lambda f: _rewrite(f / "test_batch", {b"labels": [0] * 200}), "no image of class"),
        (lambda f: (f / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]})),
         "names 1 classes"),
    ],
)
def test_damaged_dataset_fails_its_check(tiny_cifar: Path, damage, message: str) -> None:
    damage(tiny_cifar / "cifar-10-batches-py")
    with pytest.raises(DataError, match=message):
        load_cifar(tiny_cifar)


def test_truncated_archive_is_reported(tmp_path: Path) -> None:
    archive = make_cifar_archive(tmp_path, per_batch=50, test=50)
    shutil.rmtree(tmp_path / "staging")
    archive.write_bytes(archive.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"not a readable tar\.gz|lacks|not a readable CIFAR"):
        load_cifar(tmp_path)


@pytest.mark.slow
def test_real_cifar_copy_passes_the_check() -> None:
    data = load_cifar(real_cifar())
    assert data.train_x.shape == (50000, 3, 32, 32) and data.test_x.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.test_y).tolist() == [1000] * 10
    assert torch.bincount(data.train_y).tolist() == [5000] * 10


@pytest.fixture
def archive_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A synthetic official-layout archive served over HTTP on loopback: (url, md5)."""
    archive = make_cifar_archive(tmp_path / "served", per_batch=20, test=20)
    handler = partial(SimpleHTTPRequestHandler, directory=str(archive.parent))
    handler.log_message = lambda *args: None  # type: ignore[method-assign]
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        yield url, hashlib.md5(archive.read_bytes()).hexdigest()
    finally:
        server.shutdown()


def test_download_fetches_and_verifies(tmp_path: Path, archive_server: tuple[str, str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5 = archive_server
    monkeypatch.setattr(data_module, "URL", url)
    monkeypatch.setattr(data_module, "MD5", md5)
    target = tmp_path / "data"
    archive = data_module.download(target)
    assert archive == target / "cifar-10-python.tar.gz"
    assert load_cifar(target).train_x.shape == (100, 3, 32, 32)


def test_download_with_a_wrong_checksum_keeps_nothing(tmp_path: Path,
                                                      archive_server: tuple[str, str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = archive_server
    monkeypatch.setattr(data_module, "URL", url)
    monkeypatch.setattr(data_module, "MD5", "0" * 32)
    with pytest.raises(DataError, match="md5"):
        data_module.download(tmp_path / "data")
    assert not (tmp_path / "data" / "cifar-10-python.tar.gz").exists()


def test_download_from_an_unreachable_host_says_what_to_do(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_module, "URL", "http://127.0.0.1:9/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match="by hand"):
        data_module.download(tmp_path / "data")


def test_cache_is_used_and_equals_the_source(tiny_cifar: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = load_cifar(tiny_cifar, cache_dir)
    assert (cache_dir / "cifar-10-uint8.npz").is_file()
    second = load_cifar(tiny_cifar, cache_dir)
    assert "cached in" in second.source and "cached in" not in first.source
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    assert second.classes == first.classes


def test_a_changed_source_or_damaged_cache_is_read_again(tiny_cifar: Path, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    load_cifar(tiny_cifar, cache_dir)
    _rewrite(tiny_cifar / "cifar-10-batches-py" / "data_batch_1", {b"labels": [11] * 200})
    with pytest.raises(DataError, match="labels outside"):
        load_cifar(tiny_cifar, cache_dir)  # the cache must not hide a damaged dataset
    (cache_dir / "cifar-10-uint8.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="labels outside"):
        load_cifar(tiny_cifar, cache_dir)


def test_dataset_sha256_covers_the_archive_as_read_and_is_cached(tmp_path: Path) -> None:
    from ct import workspace

    assert workspace.DATASET_FOLDER_FILES == (*data_module.TRAIN_BATCHES, data_module.TEST_BATCH,
                                              data_module.META)
    archive = make_cifar_archive(tmp_path / "arch", per_batch=20, test=20)
    cache_dir = tmp_path / "cache"
    expected = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert data_module.dataset_sha256(archive, cache_dir) == (expected, False)
    cache = cache_dir / "cifar-10-sha256.json"
    stamp = cache.stat().st_mtime_ns
    assert data_module.dataset_sha256(archive, cache_dir) == (expected, True)
    assert cache.stat().st_mtime_ns == stamp
    assert workspace.dataset_sha256(archive) == expected, "the host's --verify agrees"
    archive.write_bytes(archive.read_bytes() + b"\0")  # a changed source is hashed again
    changed = hashlib.sha256(archive.read_bytes()).hexdigest()
    assert data_module.dataset_sha256(archive, cache_dir) == (changed, False)
    cache.write_text("not json")
    assert data_module.dataset_sha256(archive, cache_dir) == (changed, False)
