"""CIFAR-10 in the official python-version layout, read with pickle into uint8 tensors.

Accepted in a data dir: a `cifar-10-batches-py/` folder or a `cifar-10-python.tar.gz` archive
(read in place, never unpacked, so a read-only data dir works). Every load is checked for
structure, counts, shapes and labels; the official md5 is checked only for an archive that
`download` fetched, because faithful re-encodings of the dataset (such as a JPEG copy) differ
in bytes but not in structure. Labelled increments are appended to the loaded set by
ct.trainer.increments; what a run read is named by its data version (ct.data_version).
"""

from __future__ import annotations

import pickle
import tarfile
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ct import atomic, data_version
from ct import workspace as names
from ct.trainer.errors import UsageError

FOLDER = names.DATA_FOLDER
ARCHIVE = names.DATA_ARCHIVE
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = names.DATA_ARCHIVE_MD5
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
META = "batches.meta"
NUM_CLASSES = 10
TRAIN_IMAGES = 50_000  # in the full training set: what an epoch sees (benchmarks' unit)
CACHE = names.DATA_CACHE
HASH_CACHE = names.DATA_HASH_CACHE


class DataError(UsageError):
    """The dataset is missing or fails its check; the message says what to do."""


@dataclass
class Cifar:
    train_x: torch.Tensor  # uint8 (N, 3, 32, 32)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    source: str  # for the log: what was read, and the cache it came from
    location: Path | None = None  # the folder or archive read (`locate`)
    sha256: str = ""  # the dataset's `dataset_sha256`, when the caller asked for it
    version: str = ""  # ct.data_version: the base's sha256 and the increments' images
    record: dict[str, Any] = field(default_factory=dict)  # counts and increments, for the summary


def _unpickle(raw: bytes, name: str) -> dict[bytes, Any]:
    try:
        batch = pickle.loads(raw, encoding="bytes")
    except Exception as exc:  # any unpickling failure means a damaged file
        reason = exc.__class__.__name__
        raise DataError(f"{name} is not a readable CIFAR-10 pickle ({reason})") from exc
    if not isinstance(batch, dict):
        raise DataError(f"{name} holds a {type(batch).__name__}, not a CIFAR-10 batch dict")
    return batch


def _check_batch(batch: dict[bytes, Any], name: str) -> tuple[np.ndarray, np.ndarray]:
    if b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{name} lacks b'data' or b'labels'; it is not a CIFAR-10 batch")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{name}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072)")
    if labels.ndim != 1 or len(labels) != len(data) or len(data) == 0:
        raise DataError(f"{name}: {len(labels)} labels for {len(data)} images")
    if labels.min() < 0 or labels.max() >= NUM_CLASSES:
        raise DataError(f"{name}: labels outside 0..9 ({labels.min()}..{labels.max()})")
    return data, labels.astype(np.int64)


def _read_members(read: Callable[[str], bytes]) -> Cifar:
    """Check and assemble the dataset from a `read(member_name) -> bytes` accessor."""
    train = [_check_batch(_unpickle(read(name), name), name) for name in TRAIN_BATCHES]
    test_x, test_y = _check_batch(_unpickle(read(TEST_BATCH), TEST_BATCH), TEST_BATCH)
    meta = _unpickle(read(META), META)
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta.get(b"label_names", [])]
    if len(classes) != NUM_CLASSES:
        raise DataError(f"{META} names {len(classes)} classes, expected {NUM_CLASSES}")
    train_x = np.concatenate([x for x, _ in train])
    train_y = np.concatenate([y for _, y in train])
    for split, labels in (("training", train_y), ("test", test_y)):
        missing = sorted(set(range(NUM_CLASSES)) - set(np.unique(labels).tolist()))
        if missing:
            raise DataError(f"the {split} set has no image of class(es) {missing}")

    def to_tensor(flat: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(flat.reshape(-1, 3, 32, 32).copy())

    return Cifar(to_tensor(train_x), torch.from_numpy(train_y), to_tensor(test_x),
                 torch.from_numpy(test_y), classes, "")


def _read_folder(folder: Path) -> Cifar:
    def read(name: str) -> bytes:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is missing; the folder is not a complete {FOLDER}")
        return path.read_bytes()

    return _read_members(read)


def _read_archive(archive: Path) -> Cifar:
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}

            def read(name: str) -> bytes:
                if name not in members:
                    raise DataError(f"{archive} lacks {FOLDER}/{name}")
                handle = tar.extractfile(members[name])
                assert handle is not None  # a regular file member always has a handle
                return handle.read()

            return _read_members(read)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{archive} is not a readable tar.gz ({exc}); delete it or fetch it "
                        "again with --download") from exc


def locate(data_dir: Path) -> Path:
    """The folder or archive to read for `data_dir` (which may also name either directly)."""
    candidates = [data_dir / FOLDER, data_dir / ARCHIVE, data_dir]
    for path in candidates:
        if path.is_dir() and (path / TEST_BATCH).exists():
            return path
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            return path
    raise DataError(f"no CIFAR-10 in {data_dir}: expected {FOLDER}/ or {ARCHIVE} there; "
                    "pass --data-dir DIR or --download")


def load_cifar(data_dir: Path, cache_dir: Path | None = None) -> Cifar:
    """Load and check CIFAR-10 from `data_dir`; raise DataError with a one-line reason.

    With `cache_dir`, the checked tensors are also kept there as one uncompressed file, which
    the next load of the same source reads in a fraction of a second instead of inflating the
    archive again (about 4 s on 2 cores): every container start and restart benefits.
    """
    source = locate(data_dir)
    cache = cache_dir / CACHE if cache_dir is not None else None
    if cache is not None and (cached := _read_cache(cache, source)) is not None:
        cached.location = source
        return cached
    data = _read_archive(source) if source.is_file() else _read_folder(source)
    data.source, data.location = str(source), source
    if cache is not None:
        _write_cache(cache, source, data)
    return data


def _fingerprint(source: Path) -> str:
    """Path, size and modification time of the source: a changed dataset invalidates the cache."""
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    return "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files)


def _read_cache(cache: Path, source: Path) -> Cifar | None:
    try:
        with np.load(cache, allow_pickle=False) as saved:
            if str(saved["fingerprint"]) != _fingerprint(source):
                return None
            arrays = {key: torch.from_numpy(saved[key].copy())
                      for key in ("train_x", "train_y", "test_x", "test_y")}
            classes = [str(c) for c in saved["classes"]]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # no cache, or a damaged one: read the source again
    ok = (arrays["train_x"].dtype == torch.uint8 and arrays["train_x"].shape[1:] == (3, 32, 32)
          and len(arrays["train_x"]) == len(arrays["train_y"]) and len(classes) == NUM_CLASSES)
    return Cifar(**arrays, classes=classes, source=f"{source} (cached in {cache})") if ok else None


def _write_cache(cache: Path, source: Path, data: Cifar) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez(handle, fingerprint=np.array(_fingerprint(source)),
                     train_x=data.train_x.numpy(), train_y=data.train_y.numpy(),
                     test_x=data.test_x.numpy(), test_y=data.test_y.numpy(),
                     classes=np.array(data.classes))

    try:
        atomic.write_via(cache, save)
    except OSError:
        pass  # a read-only or full cache folder only costs speed


def dataset_sha256(source: Path, cache_dir: Path | None = None) -> tuple[str, bool]:
    """(ct.workspace.dataset_sha256 of `source`, whether it came from the cache). With
    `cache_dir`, the digest is kept in cache_dir/HASH_CACHE under the files' paths, sizes and
    modification times, beside the decoded-data cache: later runs on the same files do not read
    them again (ct.data_version.base_sha256, which the host's tools share)."""
    try:
        return data_version.base_sha256(source, cache_dir)
    except OSError as exc:
        raise DataError(f"cannot read {exc.filename} to hash the dataset ({exc.strerror})") from exc


def download(data_dir: Path) -> Path:
    """Fetch the official archive into `data_dir` (kept when one with the official md5 is there)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / ARCHIVE
    try:
        if not archive.exists() or names.hash_files([archive], "md5") != MD5:
            partial = archive.with_suffix(".part")
            try:
                urllib.request.urlretrieve(URL, partial)
                partial.replace(archive)
            finally:
                partial.unlink(missing_ok=True)
    except OSError as exc:
        raise DataError(f"could not download {URL} ({exc}); put {ARCHIVE} in {data_dir} "
                        "by hand and rerun without --download") from exc
    if not archive.exists() or names.hash_files([archive], "md5") != MD5:
        archive.unlink(missing_ok=True)
        raise DataError(f"the downloaded {ARCHIVE} failed its md5 check; rerun with --download")
    return archive
